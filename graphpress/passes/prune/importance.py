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
removed (``delta = -w_c``: every element of the channel in every trainable slice at once),
``dL ~= gbar^T delta + 1/2 delta^T H delta``, with the Hessian replaced by the empirical Fisher
of the user's batches, ``F = mean_b g_b g_b^T`` (NViT's Hessian-aware saliency). Restricted to
the channel's block the Fisher's quadratic form is a mean of squared directional gradients,
exact and cheap: with ``t_b = g_b . w_c``, ``|dL_c| ~= | -mean_b t_b + 1/2 mean_b t_b^2 |``.
Each batch is one sample of the Fisher: batches of one example give the per-sample Fisher
(batch-mean gradients cancel across examples and underestimate it). ``variance`` (activation
variance, see ``variance.py``) scores channels by data, not weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from graphpress.analysis.channels.solver import ChannelGroup, ChannelSlice
from graphpress.ir.program import Program

__all__ = ["CRITERIA", "REDUCTIONS", "group_importance", "hessian_saliency", "lamp_scores",
           "weight_gradients"]

Criterion = Callable[[Program, ChannelGroup], torch.Tensor]
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random", "lamp", "hessian", "variance")
REDUCTIONS = ("mean", "sum", "max")


def _axis_elements(tensor: torch.Tensor, s: ChannelSlice, size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tensor`` (detached, as ``dtype``) narrowed to the elements of the ``size`` channels of
    slice ``s`` along its axis."""
    t = tensor.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if s.offset or size * s.rep != t.shape[s.axis]:   # a narrow costs ~1 µs; most span it all
        t = t.narrow(s.axis, s.offset, size * s.rep)
    return t


def _rows(tensor: torch.Tensor, s: ChannelSlice, size: int,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The elements of each of the ``size`` channels of slice ``s``: ``[size, elements]``."""
    rows = _axis_elements(tensor, s, size, dtype)
    if s.axis:
        rows = rows.movedim(s.axis, 0)
    return rows.reshape(size, -1)


def _slice_scores(tensor: torch.Tensor, s: ChannelSlice, size: int, p: int) -> torch.Tensor:
    """The scores of one slice's channels up to sign (``_scores_by_slice`` takes ``abs``): a
    p-norm of each channel's elements, their sum for taylor (``p`` 0, the tensor ``w * grad``),
    the element itself where a channel has one (every norm of one element is ``|w|``). A
    channel of one element along the axis (``rep`` 1) is reduced over the other dims in place:
    no moved, reshaped copy."""
    if s.rep != 1:
        rows = _rows(tensor, s, size)
        if rows.shape[1] == 1:
            return rows.reshape(size)
        return rows.sum(1) if p == 0 else torch.linalg.vector_norm(rows, p, dim=1)
    t = _axis_elements(tensor, s, size)
    if t.dim() == 1:
        return t
    if t.numel() == size:
        return t.reshape(size)
    others = [d for d in range(t.dim()) if d != s.axis]
    return t.sum(others) if p == 0 else torch.linalg.vector_norm(t, p, dim=others)


def _scores_by_slice(weights: dict[str, torch.Tensor], slices: list[ChannelSlice], size: int,
                     p: int, grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``[len(slices), size]``: each slice's per-channel scores (``|.|`` of ``_slice_scores``,
    taken once over all of them). Slices of one weight axis with one ``rep`` (a group laid out
    in pieces, as at a grouped convolution) share one computation over the whole axis: each
    channel's elements are the same rows, reduced alike."""
    shared = Counter((s.weight, s.axis, s.rep) for s in slices)
    tensors: dict[str, torch.Tensor] = {}
    whole: dict[tuple[str, int, int], torch.Tensor] = {}
    out = []
    for s in slices:
        tensor = tensors.get(s.weight)
        if tensor is None:
            tensor = weights[s.weight]
            if grads is not None:
                tensor = tensor * grads[s.weight]
            tensors[s.weight] = tensor
        key = (s.weight, s.axis, s.rep)
        n = tensor.shape[s.axis]
        if shared[key] > 1 and n % s.rep == 0 and s.offset % s.rep == 0:
            scores = whole.get(key)
            if scores is None:
                scores = whole[key] = _slice_scores(
                    tensor, ChannelSlice(s.weight, s.axis, 0, s.rep), n // s.rep, p)
            out.append(scores[s.offset // s.rep: s.offset // s.rep + size])
        else:
            out.append(_slice_scores(tensor, s, size, p))
    return torch.stack(out).abs()


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


def hessian_saliency(program: Program, groups: list[ChannelGroup],
                     batches: list[tuple[Any, ...]], loss: Callable[[Any], torch.Tensor]
                     ) -> list[torch.Tensor]:
    """Per group, ``|-mean_b t_b + 1/2 mean_b t_b^2|`` per channel, ``t_b = g_b . w_c`` over the
    channel's elements in every trainable slice (one backward per batch; the program's weights
    are left without gradients)."""
    params = {n: t for n, t in program.state_dict.items() if isinstance(t, torch.nn.Parameter)}
    first = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    second = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    for batch in batches:
        for t in params.values():
            t.grad = None
        with torch.enable_grad():
            loss(program(*batch)).backward()
        for g, f, q in zip(groups, first, second, strict=True):
            t = torch.zeros(g.size, dtype=torch.float64)
            for s in g.slices:
                w = params.get(s.weight)
                if w is not None and w.grad is not None:
                    product = w.detach().double() * w.grad.double()
                    t += _rows(product, s, g.size, torch.float64).sum(1)
            f += t / len(batches)
            q += t * t / len(batches)
    for t in params.values():
        t.grad = None
    return [(-f + 0.5 * q).abs().float() for f, q in zip(first, second, strict=True)]


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
                     grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of ``group`` (higher = more important); ``grads``: the summed
    gradients of taylor. ``hessian`` and ``variance`` score all groups at once from data
    (:func:`hessian_saliency`, ``variance.variance_scores``)."""
    if callable(criterion):
        scores = torch.as_tensor(criterion(program, group), dtype=torch.float32).flatten()
        if scores.numel() != group.size:
            raise ValueError(f"custom importance returned {scores.numel()} scores for a group "
                             f"of {group.size} channels")
        return scores
    if criterion == "random":
        return torch.rand(group.size, generator=generator)
    weights = {name: program.weight(name) for name in {s.weight for s in group.slices}}
    slices = [s for s in group.slices if isinstance(weights[s.weight], torch.nn.Parameter)]
    if criterion == "bn_scale":
        bn = _bn_weights(program)
        scaled = [s for s in slices if s.weight in bn]
        if scaled:
            slices, criterion = scaled, "l1"
    if not slices:
        slices = list(group.slices)
    if criterion in ("hessian", "variance"):
        raise ValueError(f"importance={criterion!r} scores every group at once from data: "
                         "run PruneChannels (or hessian_saliency / variance.variance_scores)")
    if criterion == "taylor":
        grads = grads or {}
        slices = [s for s in slices if s.weight in grads]
        scores = _scores_by_slice(weights, slices, group.size, 0, grads)
    elif criterion == "lamp":
        scores = _scores_by_slice(weights, slices, group.size, 2) ** 2
        return lamp_scores(_reduced(scores, reduce))
    else:
        scores = _scores_by_slice(weights, slices, group.size, 2 if criterion == "l2" else 1)
    return _reduced(scores, reduce)


def _reduced(scores: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "sum":
        return scores.sum(0)
    if reduce == "max":
        return scores.amax(0)
    return scores.mean(0)
