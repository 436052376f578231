"""Channel importance of a group, aggregated over every weight slice the group spans.

For a slice (weight ``W``, axis ``a``, offset, rep) the score of channel ``c`` is a norm of the
elements ``W[..., offset + c*rep : offset + (c+1)*rep, ...]`` along ``a``: ``l1`` = sum |w|,
``l2`` = sqrt(sum w^2); ``bn_scale`` = |gamma| of the BatchNorm weights in the group (network
slimming; groups without BatchNorm fall back to ``l1``); ``taylor`` = |sum w * dL/dw| over the
channel's elements (first-order change of the loss when the channel is removed; gradients from
``weight_gradients``); ``random`` is a seeded baseline. Scores
of the slices of trainable parameters are combined by ``mean`` (default), ``sum`` or ``max``.
A callable ``(program, group) -> tensor of group.size scores`` is a custom criterion.

``lamp`` (layer-adaptive magnitude pruning, Lee et al. 2021) turns the squared magnitudes
``s_c`` (the reduced per-slice ``sum w^2`` of channel ``c``) into ``s_c / sum_{j: s_j >= s_c}
s_j``: sorted ascending, each score divided by the sum of itself and every larger one. The
largest channel of every group scores 1 and the scores of different groups are comparable, so
a global ranking needs no per-layer ratios (within one group LAMP orders like ``l2``).

``hessian`` is the second-order Taylor estimate of the loss change when channel ``c`` is
removed (``delta w = -w_c``, every element of the channel in every trainable slice at once),
with the Hessian replaced by the diagonal empirical Fisher (the mean of squared gradients over
the user's batches, each batch one sample of it):
``|dL_c| ~= | -sum_e gbar_e w_e + 1/2 sum_e F_e w_e^2 |``, ``gbar = mean_b g_b``,
``F = mean_b g_b^2`` (NViT's Hessian-aware saliency; OBD when ``gbar = 0``). Batches of one
example give the per-sample Fisher. ``variance`` (activation variance, see ``variance.py``)
scores channels by data, not weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graphpress.analysis.channels.solver import ChannelGroup, ChannelSlice
from graphpress.ir.program import Program

__all__ = ["CRITERIA", "GRADIENT_CRITERIA", "REDUCTIONS", "gradient_moments", "group_importance",
           "lamp_scores", "weight_gradients"]

Criterion = Callable[[Program, ChannelGroup], torch.Tensor]
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random", "lamp", "hessian", "variance")
GRADIENT_CRITERIA = ("taylor", "hessian")
REDUCTIONS = ("mean", "sum", "max")


def _rows(tensor: torch.Tensor, s: ChannelSlice, size: int,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The elements of each of the ``size`` channels of slice ``s``: ``[size, elements]``."""
    rows = tensor.detach().to(dtype).movedim(s.axis, 0)
    return rows[s.offset: s.offset + size * s.rep].reshape(size, -1)


def _slice_scores(tensor: torch.Tensor, s: ChannelSlice, size: int, p: int) -> torch.Tensor:
    rows = _rows(tensor, s, size)
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


def gradient_moments(program: Program, batches: list[tuple[Any, ...]],
                     loss: Callable[[Any], torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per trainable weight, the mean gradient and the mean squared gradient over ``batches``
    (one backward per batch; the diagonal empirical Fisher is the second)."""
    params = {n: t for n, t in program.state_dict.items() if isinstance(t, torch.nn.Parameter)}
    mean: dict[str, torch.Tensor] = {}
    square: dict[str, torch.Tensor] = {}
    for batch in batches:
        for t in params.values():
            t.grad = None
        with torch.enable_grad():
            loss(program(*batch)).backward()
        for n, t in params.items():
            if t.grad is not None:
                g = t.grad.detach().double()
                mean[n] = mean.get(n, 0) + g / len(batches)
                square[n] = square.get(n, 0) + g * g / len(batches)
    for t in params.values():
        t.grad = None
    return mean, square


def lamp_scores(magnitudes: torch.Tensor) -> torch.Tensor:
    """LAMP: each score over the sum of itself and every score above it in ascending order."""
    order = torch.argsort(magnitudes, stable=True)
    ascending = magnitudes[order].double()
    tail = ascending.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(ascending)
    out[order] = ascending / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return out.float()


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
                     grads: dict[str, torch.Tensor] | None = None,
                     fisher: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of ``group`` (higher = more important). ``grads``: summed
    gradients (taylor) or mean gradients (hessian, with ``fisher`` the mean squared ones)."""
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
    if criterion == "hessian":
        return _hessian(program, group, slices, grads or {}, fisher or {})
    if criterion == "taylor":
        grads = grads or {}
        slices = [s for s in slices if s.weight in grads]
        scores = torch.stack([_slice_scores(program.weight(s.weight) * grads[s.weight], s,
                                            group.size, 0) for s in slices])
    elif criterion == "lamp":
        scores = torch.stack([_slice_scores(program.weight(s.weight), s, group.size, 2) ** 2
                              for s in slices])
        return lamp_scores(_reduced(scores, reduce))
    else:
        p = 2 if criterion == "l2" else 1
        scores = torch.stack([_slice_scores(program.weight(s.weight), s, group.size, p)
                              for s in slices])
    return _reduced(scores, reduce)


def _hessian(program: Program, group: ChannelGroup, slices: list[ChannelSlice],
             mean: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """|-gbar . w_c + 1/2 w_c^T diag(F) w_c| over every element of channel c in every slice."""
    change = torch.zeros(group.size, dtype=torch.float64)
    for s in slices:
        if s.weight not in mean:
            continue
        w = program.weight(s.weight).detach().double()
        term = -mean[s.weight] * w + 0.5 * fisher[s.weight] * w * w
        change += _rows(term, s, group.size, torch.float64).sum(1)
    return change.abs().float()


def _reduced(scores: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "sum":
        return scores.sum(0)
    if reduce == "max":
        return scores.amax(0)
    return scores.mean(0)
