"""AWQ's block objective: a producer's scale is scored where its readers' outputs meet.

The readers of one producer (q, k and v after an attention block's norm; gate and up after an
MLP's) are not independent: their errors combine in what reads them all. The *merge point*
``M`` of readers ``R`` is the first node, in graph order, that depends on every one of them
(the attention op for q, k and v, ``silu(gate) * up`` for an MLP; a single reader is its own
merge point). The *region* is every node between the readers and ``M``: the nodes that depend on
some reader and that ``M`` depends on, readers and ``M`` included. A candidate scale ``s`` is
scored on calibration batches ``b`` by

    L(s) = sum_b || M_b(W) - M_b(C(s)) ||^2,        C_r(s) = Q(W_r s) / s

with the region re-run on the values it reads from outside (recorded for the first batches:
the readers' inputs, rotary tables, masks, weights), the readers' weights replaced by the
candidates. ``C_r(s)`` is what reader ``r`` computes with once the scale is folded
(``(x / s) Q(W_r s)^T = x C_r(s)^T``), so ``L`` is the error the folded, quantized block makes at
``M`` (AutoAWQ scores q, k, v on the attention module's output and gate, up on the MLP's, one
projection further). A region longer than ``MAX_REGION`` nodes, one that ends at the program's
output, or one whose merge point is not a tensor keeps the readers' own outputs as the
objective (:func:`graphpress.quant.algorithms.awq.linear_objective`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node
from torch.fx.node import map_arg

from graphpress.ir.program import Program
from graphpress.quant.algorithms.awq import Objective

__all__ = ["MAX_REGION", "Region", "block_objective", "find_region"]

MAX_REGION = 400


@dataclass
class Region:
    """The nodes from the readers to their merge point, in graph order, and what they read
    from outside."""

    nodes: list[Node]
    merge: Node
    externals: list[Node]


def find_region(readers: Sequence[Node]) -> Region | None:
    """The region of ``readers`` (module docstring), or None when it falls back."""
    graph_nodes = list(readers[0].graph.nodes)
    first = min(graph_nodes.index(r) for r in readers)
    bits = {r: 1 << i for i, r in enumerate(readers)}
    full = (1 << len(readers)) - 1
    masks: dict[Node, int] = {}
    merge = None
    for node in graph_nodes[first:]:
        mask = bits.get(node, 0)
        for parent in node.all_input_nodes:
            mask |= masks.get(parent, 0)
        if mask:
            masks[node] = mask
        if mask == full:
            merge = node
            break
    if merge is None or merge.op != "call_function" or not isinstance(
            merge.meta.get("val"), torch.Tensor):
        return None
    ancestors, stack = {merge}, [merge]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in ancestors and parent in masks:
                ancestors.add(parent)
                stack.append(parent)
    nodes = [n for n in graph_nodes[first:graph_nodes.index(merge) + 1] if n in ancestors]
    if len(nodes) > MAX_REGION or any(n.op != "call_function" for n in nodes):
        return None
    inside = set(nodes)
    externals = list(dict.fromkeys(p for n in nodes for p in n.all_input_nodes
                                   if p not in inside))
    return Region(nodes, merge, externals)


def _run(region: Region, values: dict[Node, Any]) -> torch.Tensor:
    env = dict(values)
    for node in region.nodes:
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        env[node] = node.target(*args, **kwargs)
    return env[region.merge]


def block_objective(program: Program, region: Region, weights: Sequence[Node],
                    recorded: dict[str, list[Any]]) -> Objective:
    """``L`` of the module docstring, for candidates given in the order of ``weights`` (the
    readers' weight placeholders); ``recorded`` holds each external's values by node name,
    batch by batch (a weight's value comes from the program)."""
    batches = min(len(recorded[n.name]) for n in region.externals if n.name in recorded)
    stored = {n: program.weight(n).detach() for n in region.externals if program.is_weight(n)}
    inputs = [{n: stored[n] if n in stored else recorded[n.name][b] for n in region.externals}
              for b in range(batches)]
    with torch.no_grad():
        references = [_run(region, values) for values in inputs]

    def loss(candidates: Sequence[torch.Tensor]) -> float:
        total = 0.0
        with torch.no_grad():
            for values, reference in zip(inputs, references, strict=True):
                values = {**values, **dict(zip(weights, candidates, strict=True))}
                total += float(((_run(region, values) - reference) ** 2).sum())
        return total
    return loss
