"""Channel importance of a group, aggregated over every weight slice the group spans.

For a slice (weight ``W``, axis ``a``, offset, rep) the score of channel ``c`` is a norm of the
elements ``W[..., offset + c*rep : offset + (c+1)*rep, ...]`` along ``a``: ``l1`` = sum |w|,
``l2`` = sqrt(sum w^2); ``bn_scale`` = |gamma| of the BatchNorm weights in the group (network
slimming; groups without BatchNorm fall back to ``l1``); ``taylor`` = |sum w * dL/dw| over the
channel's elements (first-order change of the loss when the channel is removed; gradients from
``weight_gradients``); ``random`` is a seeded baseline. Scores
of the slices of trainable parameters are combined by ``mean`` (default), ``sum`` or ``max``.
A callable ``(program, group) -> tensor of group.size scores`` is a custom criterion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graphpress.analysis.channels.solver import ChannelGroup, ChannelSlice
from graphpress.ir.program import Program

__all__ = ["CRITERIA", "REDUCTIONS", "group_importance", "weight_gradients"]

Criterion = Callable[[Program, ChannelGroup], torch.Tensor]
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")
REDUCTIONS = ("mean", "sum", "max")


def _slice_scores(tensor: torch.Tensor, s: ChannelSlice, size: int, p: int) -> torch.Tensor:
    rows = tensor.detach().float().movedim(s.axis, 0)
    rows = rows[s.offset: s.offset + size * s.rep].reshape(size, -1)
    if p == 0:          # taylor: the tensor is w * grad; the first-order term is signed
        return rows.sum(1).abs()
    return rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1).sqrt()


def weight_gradients(program: Program, batches: list[tuple[Any, ...]],
                     loss: Callable[[Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """dL/dw of every trainable weight, summed over ``batches`` (the program runs in place)."""
    params = {n: t for n, t in program.state_dict.items() if isinstance(t, torch.nn.Parameter)}
    for t in params.values():
        t.grad = None
    for batch in batches:
        with torch.enable_grad():
            loss(program(*batch)).backward()
    grads = {n: t.grad.detach().clone() for n, t in params.items() if t.grad is not None}
    for t in params.values():
        t.grad = None
    return grads


def _bn_weights(program: Program) -> set[str]:
    names = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target) and node.args[1]:
            name = program.weight_name(node.args[1])
            if name:
                names.add(name)
    return names


def group_importance(program: Program, group: ChannelGroup, criterion: str | Criterion,
                     reduce: str = "mean", generator: torch.Generator | None = None,
                     grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of ``group`` (higher = more important)."""
    if callable(criterion):
        scores = torch.as_tensor(criterion(program, group), dtype=torch.float32).flatten()
        if scores.numel() != group.size:
            raise ValueError(f"custom importance returned {scores.numel()} scores for a group "
                             f"of {group.size} channels")
        return scores
    if criterion == "random":
        return torch.rand(group.size, generator=generator)
    slices = [s for s in group.slices
              if isinstance(program.weight(s.weight), torch.nn.Parameter)]
    if criterion == "bn_scale":
        bn = _bn_weights(program)
        scaled = [s for s in slices if s.weight in bn]
        if scaled:
            slices, criterion = scaled, "l1"
    if not slices:
        slices = list(group.slices)
    if criterion == "taylor":
        grads = grads or {}
        slices = [s for s in slices if s.weight in grads]
        scores = torch.stack([_slice_scores(program.weight(s.weight) * grads[s.weight], s,
                                            group.size, 0) for s in slices])
    else:
        p = 2 if criterion == "l2" else 1
        scores = torch.stack([_slice_scores(program.weight(s.weight), s, group.size, p)
                              for s in slices])
    if reduce == "sum":
        return scores.sum(0)
    if reduce == "max":
        return scores.amax(0)
    return scores.mean(0)
