"""Fold BatchNorm, and any constant per-channel scale/shift, into a neighbouring conv or linear.

Eval-mode BatchNorm is the per-channel affine map ``BN(x) = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``; so is ``x * gamma`` (LayerScale),
``x / c``, ``x + c`` and ``x - c`` for a constant ``c`` with one value per channel (or one in
all). Next to a layer ``L(x) = W (*) x + b`` (conv, transposed conv, linear) it folds:

* after the layer (preferred): ``W' = W * s[o]`` per output channel ``o`` (axis 0 of a conv or
  linear weight, axis 1 of a transposed conv's, per group), ``b' = b * s + t``; a layer without
  bias gets one;
* before it (``input_side=True``), when the op's output only feeds layers: ``W' = W * s[i]``
  per input channel ``i``, ``b' = b + sum W * t[i]``, which holds only without zero padding
  and not for transposed convolutions unless ``t == 0`` (zero padding of ``x * s + t`` pads with
  0, not ``t``; border outputs of a transposed conv see fewer taps).

Between the layer and the op there may be views (reshape, flatten, permute, transpose, ...) as
long as the channel axis provably maps to the op's axis (``[B, N, C]`` linear outputs flattened
for BatchNorm1d, as in LeViT). The folded weights are computed in float64 and stored in the
weight's dtype; the op, and weights and nodes left unused (BatchNorm's buffers, the LayerScale
parameter), are removed. Each op that does not fold is reported with the reason (BatchNorm
always; arithmetic only when a layer is adjacent, so unrelated ``x * 2`` stay quiet).

Contract: exact up to rounding (float64 programs are checked at rtol 1e-12, others at 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import (
    erase_unused,
    follow_axis,
    is_view,
    reads_only_metadata,
    set_arg,
    view_source,
)
from graphpress.ir.program import WEIGHT_KINDS, Program
from graphpress.passes.fold_bn.affine import Affine, Constants, as_affine
from graphpress.passes.fold_bn.algebra import fold_input, fold_output
from graphpress.passes.fold_bn.match import Layer, as_layer
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.registry import register_pass

__all__ = ["FoldBatchNorm"]

# Outputs are O(1); where an output element cancels to ~0, its error is the rounding of its
# O(1) summands, so the absolute floor is the relative tolerance itself.
_CONTRACTS = {torch.float64: Contract.exact(rtol=1e-12, atol=1e-12),
              torch.float32: Contract.exact(rtol=1e-5, atol=1e-5)}
_KIND = {kind: name for name, kind in WEIGHT_KINDS.items()}
_MAX_SWEEPS = 10


@dataclass
class _Plan:
    affine: Affine
    layers: list[Layer]
    output_side: bool


@register_pass("fold_bn")
@dataclass
class FoldBatchNorm(Pass):
    """Replaces BatchNorm(conv(x)) (and per-channel x * s + t next to conv/linear) with conv'(x)."""

    input_side: bool = True     # also fold ops that come before a layer into its input side
    arithmetic: bool = True     # also fold constant per-channel mul/div/add/sub, not only BN
    clone_shared: bool = False  # fold into a private copy of a weight other layers also use
    rtol: float | None = None   # checked tolerance; None: by the program's dtype (see below)
    atol: float | None = None

    contract: ClassVar[Contract] = _CONTRACTS[torch.float32]
    rewrites_weights = True

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 (or None for the dtype default), "
                                 f"got {value!r}")

    def contract_for(self, program: Program) -> Contract:
        # The checked tolerance follows the program's precision (the folding is float64), unless
        # given: an fp32 model that amplifies rounding needs a looser one (docs/passes/fold_bn.md).
        default = _contract_for(program)
        return Contract.exact(default.rtol if self.rtol is None else self.rtol,
                              default.atol if self.atol is None else self.atol)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "folded_batchnorm": 0, "folded_input_side": 0}
        folds: list[str] = []
        skipped: list[Skip] = []
        for _ in range(_MAX_SWEEPS):  # a fold can make its neighbour foldable (a chain of ops)
            done, skipped = self._sweep(program, stats, folds)
            if not done:
                break
        stats["not_folded"] = len(skipped)
        return PassResult(stats["folded"] > 0, stats, skipped, {"folds": folds})

    def _sweep(self, program: Program, stats: dict[str, int], folds: list[str]
               ) -> tuple[int, list[Skip]]:
        constants = Constants(program)
        erased: set[Node] = set()
        skipped: list[Skip] = []
        done = 0
        for node in list(program.graph.nodes):
            if node in erased:
                continue
            affine = as_affine(node, constants, arithmetic=self.arithmetic)
            if affine is None:
                continue
            if affine.refusal:
                skipped.append(Skip(node.name, affine.refusal))
                continue
            plan, reason, adjacent = self._plan(program, affine)
            if plan is None:
                if affine.batchnorm or adjacent:
                    skipped.append(Skip(node.name, reason))
                continue
            side = "output" if plan.output_side else "input"
            folds.append(f"{node.name} -> {', '.join(x.node.name for x in plan.layers)} ({side})")
            erased |= self._apply(program, plan)
            done += 1
            stats["folded"] += 1
            stats["folded_batchnorm"] += affine.batchnorm
            stats["folded_input_side"] += not plan.output_side
        return done, skipped

    # ------------------------------------------------------------------------------ matching
    def _plan(self, program: Program, affine: Affine) -> tuple[_Plan | None, str, bool]:
        """The fold to make, or why none (and whether a layer is adjacent at all)."""
        layer, reason = self._before(program, affine)
        if layer is not None and not reason:
            return _Plan(affine, [layer], True), "", True
        if not self.input_side:
            return None, reason, layer is not None
        layers, reason_in, adjacent_in = self._after(program, affine)
        if layers:
            return _Plan(affine, layers, False), "", True
        if (layer is not None) != adjacent_in:  # only one side has a layer: its reason
            return None, reason if layer is not None else reason_in, True
        return None, f"{reason}; and {reason_in}", adjacent_in

    def _before(self, program: Program, affine: Affine) -> tuple[Layer | None, str]:
        """Output side: the layer whose output reaches the op through views only."""
        path = view_source(affine.source)
        layer = as_layer(path[0])
        if layer is None:
            return None, f"not after a conv/linear (its input comes from %{path[0].name})"
        name = layer.node.name
        for value, user in zip(path, [*path[1:], affine.calls[-1]]):
            others = ", ".join(f"%{u.name}" for u in value.users
                               if u is not user and not reads_only_metadata(u, value))
            if others:
                return layer, (f"the output of %{name}" + (f" (at %{value.name})" if
                               value is not layer.node else "") + f" is also used by {others}")
        axis: int | None = layer.channel_axis(layer.node)
        for view in path[1:]:
            axis = follow_axis(view, axis)
            if axis is None:
                return layer, (f"channel axis not provable: %{view.name} ({view.target}) "
                               f"merges or splits the channel axis of %{name}")
        if affine.axis is not None and affine.axis != axis:
            return layer, (f"channel axis not provable: it acts on axis {affine.axis} of its "
                           f"input, where %{name} has its channels on axis {axis}")
        return layer, self._refusal(program, layer, affine, output_side=True)

    def _after(self, program: Program, affine: Affine) -> tuple[list[Layer], str, bool]:
        """Input side: the layers the op's output feeds through views, if it feeds nothing
        else; or the first reason it cannot fold into them, and whether any layer was seen."""
        layers: list[Layer] = []
        problems: list[str] = []
        adjacent = False
        stack: list[tuple[Node, int | None]] = [(affine.node, affine.axis)]
        while stack:
            value, axis = stack.pop()
            for user in value.users:
                if reads_only_metadata(user, value):
                    continue
                layer = as_layer(user)
                if layer is not None and layer.arg("input") is value and value not in (
                        layer.arg("weight"), layer.arg("bias")):
                    adjacent = True
                    reason = self._refusal(program, layer, affine, output_side=False)
                    if not reason and axis is not None and axis != layer.channel_axis(value):
                        reason = (f"channel axis not provable: it acts on the axis that is "
                                  f"axis {axis} of %{user.name}'s input, not its channel axis")
                    (problems.append(reason) if reason else layers.append(layer))
                elif is_view(user) and user.args[0] is value:
                    mapped = None if axis is None else follow_axis(user, axis)
                    if axis is not None and mapped is None:
                        problems.append(f"channel axis not provable: %{user.name} "
                                        f"({user.target}) merges or splits it")
                    stack.append((user, mapped))
                elif user.op == "output":
                    problems.append("its output is an output of the graph")
                else:
                    problems.append(f"its output is used by %{user.name} ({user.target}), "
                                    "not only by conv/linear inputs")
        if problems:
            return [], problems[0], adjacent
        if not layers:
            return [], "its output feeds no conv/linear", False
        return layers, "", True

    def _refusal(self, program: Program, layer: Layer, affine: Affine, *, output_side: bool
                 ) -> str:
        """Why ``affine`` cannot fold into ``layer``'s weights, or ''."""
        name = layer.node.name
        for role in ("weight", "bias"):
            value = layer.arg(role)
            if value is None:
                continue
            if not program.is_weight(value):
                return f"the {role} of %{name} is computed in the graph, not a stored weight"
            if not program.weight(value).is_floating_point():
                return f"the {role} of %{name} is not floating point"
            others = ", ".join(f"%{u.name}" for u in value.users if u is not layer.node)
            if others and not self.clone_shared:
                return (f"the {role} {program.weight_name(value)!r} of %{name} is shared with "
                        f"{others}; pass clone_shared=True to fold into a private copy")
        if output_side or not affine.has_shift:
            return ""
        if layer.transposed:
            return (f"a shift before the transposed convolution %{name} is not a bias of its "
                    "output (border outputs see fewer taps)")
        if not layer.zero_padding:
            return (f"%{name} zero-pads its input: padding x * s + t with zeros is not "
                    "padding x with zeros and then shifting, so the shift does not fold")
        return ""

    # ----------------------------------------------------------------------------- rewriting
    def _apply(self, program: Program, plan: _Plan) -> set[Node]:
        affine = plan.affine
        shift = affine.shift if affine.has_shift else None
        for layer in plan.layers:
            weight, bias = layer.arg("weight"), layer.arg("bias")
            old_w = program.weight(weight)
            old_b = None if bias is None else program.weight(bias)
            if plan.output_side:
                new_w, new_b = fold_output(old_w, old_b, affine.scale, shift, layer.out_axis,
                                           layer.groups)
            else:
                new_w, new_b = fold_input(old_w, old_b, affine.scale, shift, layer.in_axis,
                                          layer.groups)
            if new_w is not old_w:
                self._store(program, layer, "weight", new_w)
            if new_b is not None and new_b is not old_b:
                self._store(program, layer, "bias", new_b)
        affine.node.replace_all_uses_with(affine.source)
        for call in affine.calls:
            program.graph.erase_node(call)
        return set(affine.calls) | erase_unused(program, affine.operands)

    def _store(self, program: Program, layer: Layer, role: str, tensor: torch.Tensor) -> None:
        """Write a folded weight: in place of a private one, else as a new weight."""
        current = layer.arg(role)
        if current is not None and set(current.users) == {layer.node}:
            program.replace_weight(current, tensor)
            return
        like = layer.arg("weight")
        if current is None:
            module = program.weight_name(like).rpartition(".")[0]
            base = f"{module}.bias" if module else "bias"
        else:  # shared with another layer (clone_shared=True): a private copy
            base = f"{program.weight_name(current)}_{layer.node.name}"
        existing, name, i = program.weights(), base, 1
        while name in existing:
            i += 1
            name = f"{base}_folded{i}"
        with GraphBuilder(program, anchor=layer.node, pass_name=self.name) as build:
            set_arg(layer.node, role,
                    build.weight(name, tensor, kind=_KIND[program.input_kind(like)]))
        if current is not None and not current.users:
            program.remove_weight(current)


def _contract_for(program: Program) -> Contract:
    """float64 tolerance when every floating output is float64, else float32's."""
    outputs = pytree.tree_leaves(program.output_node().args)
    dtypes = {n.meta["val"].dtype for n in outputs
              if isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].is_floating_point()}
    return _CONTRACTS[torch.float64 if dtypes == {torch.float64} else torch.float32]
