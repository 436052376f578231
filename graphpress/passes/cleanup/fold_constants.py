"""Constant folding, including computations on weights.

A foldable node (pure, and its op allows precomputation: see :mod:`graphpress.ir.purity`;
fake-quant and dequantize are pure but not foldable) whose tensor inputs are all constant
weights (parameters, buffers, constant tensors that the program never writes: a mutated
buffer is state, not a constant) and whose other arguments are literals computes the same
value on every call; it is evaluated once and replaced by a new weight. Nodes are visited in
execution order, so chains fold in one run (``w.t() * 2`` becomes one weight). The new weight
is a parameter if any input was a parameter (so fine-tuning still trains it), else a buffer or
a constant. Inputs left unused are removed.

The model never grows: a node folds only if the bytes it adds are at most the bytes of the
inputs it frees, or the result is small (at most ``max_new_elements``); so ``expand`` of a bias
to the batch size is left alone. Results of symbolic shape, and non-tensor results, are not
folded. Exact: the node ran the same ATen kernel on the same values ahead of time, and the
result keeps its strides (a transposed weight made contiguous would send the consumer's matmul
down another kernel and change its rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.program import Program
from graphpress.ir.purity import is_foldable, is_pure
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.registry import register_pass

__all__ = ["FoldConstants"]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@register_pass("fold_constants")
@dataclass
class FoldConstants(Pass):
    """Replaces computations on weights and literals with precomputed weights."""

    max_new_elements: int = 1024

    contract = Contract.exact(rtol=0.0, atol=0.0)
    rewrites_weights = True

    def __post_init__(self) -> None:
        if self.max_new_elements < 0:
            raise ValueError(f"max_new_elements must be >= 0, got {self.max_new_elements}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        folded = 0
        skipped: list[Skip] = []
        for node in list(program.graph.nodes):
            if not isinstance(node.meta.get("val"), torch.Tensor):
                continue
            inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs))
                      if isinstance(a, Node)]
            if not all(program.is_constant(a) for a in inputs):
                continue
            if not is_foldable(node):
                if is_pure(node):
                    skipped.append(Skip(node.name, f"{node.target} is pure but not foldable "
                                                   "(its op keeps it for the backend)"))
                continue
            if any(isinstance(s, torch.SymInt) for s in node.meta["val"].shape):
                skipped.append(Skip(node.name, "result has a symbolic shape"))
                continue
            reason = self._fold(program, node, inputs)
            if reason:
                skipped.append(Skip(node.name, reason))
            else:
                folded += 1
        return PassResult(folded > 0, {"folded": folded}, skipped)

    def _fold(self, program: Program, node: Node, inputs: list[Node]) -> str:
        def value(a: Any) -> Any:
            return program.weight(a) if isinstance(a, Node) else a
        args, kwargs = pytree.tree_map(value, (node.args, node.kwargs))
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            return "result is not a tensor"
        dying = {a for a in inputs if set(a.users) == {node}}
        freed = sum(_bytes(program.weight(a)) for a in dying)
        if _bytes(result) > freed and result.numel() > self.max_new_elements:
            return (f"folding would add {_bytes(result)} bytes but free only {freed} "
                    f"(result larger than max_new_elements={self.max_new_elements})")
        kinds = {program.input_kind(a) for a in inputs}
        kind = ("parameter" if InputKind.PARAMETER in kinds
                else "buffer" if InputKind.BUFFER in kinds else "constant")
        if kind == "parameter" and not result.is_floating_point():
            kind = "buffer"
        name = self._new_name(program, node)
        if result._base is not None:  # a view of an input: own the memory, keep the strides
            result = result.clone()
        with GraphBuilder(program, anchor=node, pass_name=self.name) as build:
            new = build.weight(name, result, kind=kind)
        node.replace_all_uses_with(new)
        program.graph.erase_node(node)
        for a in dying:
            program.remove_weight(a)
        return ""

    @staticmethod
    def _new_name(program: Program, node: Node) -> str:
        module = program.source_module(node)
        return program.free_weight_name(
            f"{module}.{node.name}_folded" if module else f"{node.name}_folded")
