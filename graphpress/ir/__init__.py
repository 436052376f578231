"""The graphpress IR: a Program over a torch.export graph, analyses, purity, printing, diff."""

from graphpress.ir.analyses import ANALYSES, register_analysis
from graphpress.ir.costs import Costs, count_costs
from graphpress.ir.printer import diff_programs, format_program
from graphpress.ir.program import Program
from graphpress.ir.shapes import propagate_shapes, symbolic_shapes

__all__ = [
    "ANALYSES",
    "Costs",
    "Program",
    "count_costs",
    "diff_programs",
    "format_program",
    "propagate_shapes",
    "register_analysis",
    "symbolic_shapes",
]
