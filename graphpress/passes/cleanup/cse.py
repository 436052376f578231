"""Common-subexpression elimination.

Two pure nodes with the same target and the same arguments compute the same value; the later
one is replaced by the earlier one. Arguments are compared by identity for graph values and by
type *and* value for literals (``1``, ``1.0`` and ``True`` hash alike in Python but are
different ATen arguments). Exact: each replaced node computed bit-identical values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.program import Program
from graphpress.ir.purity import is_pure
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.registry import register_pass

__all__ = ["CommonSubexpressionElimination"]


def _key(value: Any) -> Any:
    if isinstance(value, Node):
        return ("node", value)
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if isinstance(value, float) and value != value:  # NaN literal: equal to itself here
        return ("float", "nan")
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ("sym", str(value))
    return (type(value).__name__, value)


@register_pass("cse")
@dataclass
class CommonSubexpressionElimination(Pass):
    """Replaces repeated pure computations with the first occurrence."""

    contract = Contract.exact(rtol=0.0, atol=0.0)
    preserves = ("symbolic_shapes",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        seen: dict[Any, Node] = {}
        merged = 0
        for node in list(program.graph.nodes):
            if not is_pure(node):
                continue
            try:
                key = (node.target, _key(node.args), _key(node.kwargs))
                hash(key)
            except TypeError:  # an unhashable literal argument: leave the node alone
                continue
            first = seen.setdefault(key, node)
            if first is not node:
                node.replace_all_uses_with(first)
                program.graph.erase_node(node)
                merged += 1
        return PassResult(merged > 0, {"merged": merged})
