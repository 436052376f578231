"""Dead-code elimination.

Removes pure nodes (see :mod:`graphpress.ir.purity`) whose value no one uses, repeatedly
from the outputs backward, and weights whose placeholder no node uses (their tensors leave the
state dict and the signature with them). User inputs stay: they are the program's signature.
Exact: the removed values never reached an output.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphpress.ir.program import Program
from graphpress.ir.purity import is_pure
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.registry import register_pass

__all__ = ["DeadCodeElimination"]


@register_pass("dce")
@dataclass
class DeadCodeElimination(Pass):
    """Removes unused pure nodes and unused weights."""

    remove_unused_weights: bool = True

    contract = Contract.exact(rtol=0.0, atol=0.0)
    preserves = ("symbolic_shapes",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        removed_nodes = 0
        for node in reversed(list(program.graph.nodes)):
            if not node.users and is_pure(node):
                program.graph.erase_node(node)
                removed_nodes += 1
        removed_weights = 0
        if self.remove_unused_weights:
            mutated = program.mutated_weights()
            for node in list(program.nodes("placeholder")):
                name = program.weight_name(node)
                if name is not None and not node.users and name not in mutated:
                    program.remove_weight(node)
                    removed_weights += 1
        changed = bool(removed_nodes or removed_weights)
        return PassResult(changed, {"nodes_removed": removed_nodes,
                                    "weights_removed": removed_weights})
