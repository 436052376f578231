"""Choosing ``round_to`` from measured latency: time every conv / linear layer of the program at
the shape it would have after pruning, for each candidate multiple, and keep the fastest.

Pruning ``ratio`` of a group of ``n`` channels keeps ``k = n - floor(ratio * n)``; with
``round_to=m`` the pass rounds ``k`` up so that every weight slice keeps a multiple of ``m``
elements (``rounded_keep``: ``k`` itself a multiple of ``m`` for plain channels; attention
heads of head_dim 64 need no rounding for ``m`` up to 64). Channel counts
that are multiples of the SIMD width or of a kernel's register block (8, 16 for oneDNN and MLAS
on AVX2 / AVX-512) take the kernels' fast paths; a few channels more can then run faster than
fewer. For each candidate ``m`` every conv / linear node is run alone, on random inputs of its
pruned shape (input and weight sizes from the channel analysis' layouts, ``new_size``), with
PyTorch's kernels on the current thread count; identical shapes are timed once. The estimate of
a candidate is the sum over layers of the median of ``repeats`` calls; the choice is the
candidate with the lowest estimate (the smaller multiple on a tie within ``tolerance``).
Elementwise ops and norms scale with the channel counts alike for every candidate, so they are
not timed. The default ``timer`` runs PyTorch's kernels (the eager backend); another backend's
kernels prefer other multiples (onnxruntime's blocked NCHWc convolutions want multiples of
their block), so ``timer`` takes any ``(Layer, repeats) -> seconds`` that runs the layer there
(``benchmarks/prune.py`` has one for onnxruntime).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from graphpress.analysis.channels.rules import op_name, size
from graphpress.analysis.channels.solver import ChannelGroup
from graphpress.analysis.channels.views import new_size
from graphpress.ir.graph import get_arg
from graphpress.ir.program import Program

if TYPE_CHECKING:
    from graphpress.passes.prune.prune_channels import PruneChannels

__all__ = ["Layer", "RoundToChoice", "choose_round_to", "eager_seconds", "rounded_keep"]

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


@dataclass
class RoundToChoice:
    """The chosen multiple, and per candidate the summed layer latency (s) and MACs."""

    best: int
    seconds: dict[int, float] = field(default_factory=dict)
    macs: dict[int, int] = field(default_factory=dict)
    layers: int = 0             # conv / linear nodes timed per candidate

    def table(self) -> str:
        rows = [f"| {m} | {self.seconds[m] * 1e3:.2f} | {self.macs[m] / 1e6:.1f} |"
                for m in sorted(self.seconds)]
        return "\n".join(["| round_to | layer latency ms | layer MMACs |", "|---|---|---|", *rows])


@dataclass(frozen=True)
class Layer:
    """One conv / linear layer at its pruned shape (what a timer runs)."""

    op: str                     # conv1d | conv2d | conv3d | linear
    input: tuple[int, ...]
    weight: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    macs: int = 0

    def call(self) -> Callable[[], Any]:
        """A call of the layer on random data, with PyTorch's kernels."""
        x, w = torch.randn(self.input), torch.randn(self.weight)
        if self.op == "linear":
            return lambda: F.linear(x, w)
        conv = _CONV[self.op]
        return lambda: conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)


def eager_seconds(layer: Layer, repeats: int) -> float:
    """The median of ``repeats`` calls of the layer in PyTorch, after one warm-up call."""
    fn = layer.call()
    with torch.no_grad():
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _layers(program: Program) -> list[Any]:
    """The conv / linear nodes whose weight is a program weight."""
    out = []
    for node in program.graph.nodes:
        name = op_name(node) if node.op == "call_function" else ""
        weight = node.args[1] if len(node.args) > 1 else None
        if (name in _CONV or name == "linear") and getattr(weight, "op", "") == "placeholder":
            out.append(node)
    return out


def _shape(layouts: dict[str, Any], node: Any, kept: dict[int, int]) -> tuple[int, ...]:
    old = [size(s) for s in node.meta["val"].shape]
    layout = layouts.get(node.name)
    if not isinstance(layout, list):
        return tuple(old)
    return tuple(n if d is None else new_size(d, kept) for n, d in zip(old, layout, strict=True))


def _layer(node: Any, layouts: dict[str, Any], kept: dict[int, int]) -> Layer | None:
    """The layer of ``node`` once the groups keep ``kept`` channels (None: not timed)."""
    x = _shape(layouts, node.args[0], kept)
    w = _shape(layouts, node.args[1], kept)
    name = op_name(node)
    if name == "linear":
        return Layer(name, x, w, macs=math.prod(x) * w[0])
    groups = get_arg(node, "groups")
    if groups > 1:
        if groups != size(node.args[0].meta["val"].shape[1]):
            return None                 # grouped (not depthwise): not timed
        groups = x[1]
    out = [size(s) for s in node.meta["val"].shape[2:]]
    padding = get_arg(node, "padding")
    return Layer(name, x, w, tuple(get_arg(node, "stride")),
                 padding if isinstance(padding, str) else tuple(padding),
                 tuple(get_arg(node, "dilation")), groups,
                 x[0] * w[0] * math.prod(out) * math.prod(w[1:]))


def rounded_keep(group: ChannelGroup, keep: int, round_to: int) -> int:
    """``keep`` channels of ``group`` rounded up so that every weight slice keeps a multiple of
    ``round_to`` elements along its axis (a channel spans ``rep`` elements there): the
    multiple of channels is ``lcm_s(round_to / gcd(round_to, rep_s))``, ``round_to`` itself
    for plain channels, 1 for attention heads whose head_dim is a multiple of it. At least one
    multiple, at most the group."""
    step = math.lcm(*(round_to // math.gcd(round_to, s.rep) for s in group.slices))
    return min(group.size, max(step, math.ceil(keep / step) * step))


def choose_round_to(program: Program, prune: PruneChannels,
                    candidates: tuple[int, ...] = (1, 4, 8, 16, 32), *, repeats: int = 5,
                    tolerance: float = 0.02,
                    timer: Callable[[Layer, int], float] = eager_seconds
                    ) -> RoundToChoice:
    """The ``round_to`` among ``candidates`` whose pruned conv / linear layers run fastest for
    ``prune``'s ratios (per group; ``global_ranking`` depends on the scores and is refused)."""
    if prune.global_ranking:
        raise ValueError("choose_round_to needs per-group ratios; global_ranking=True keeps "
                         "counts that depend on the scores")
    if not candidates or any(m < 1 for m in candidates):
        raise ValueError(f"candidates must be multiples >= 1, got {candidates}")
    analysis = prune._analysis(program)
    ignored = prune._ignored(program)
    groups = [g for g in analysis.prunable()
              if ignored is None or not any(ignored(w) for w in g.weights)]
    layers = _layers(program)
    if not groups or not layers:
        raise ValueError("nothing to choose from: the program has no prunable group feeding a "
                         "conv or linear layer")
    measured: dict[Layer, float] = {}
    choice = RoundToChoice(best=candidates[0])
    for m in candidates:
        kept = {}
        for g in groups:
            k = g.size - math.floor(prune._ratio(g) * g.size)
            kept[g.id] = rounded_keep(g, k, m)
        total, macs, timed = 0.0, 0, 0
        for node in layers:
            layer = _layer(node, analysis.layouts, kept)
            if layer is None:
                continue
            if layer not in measured:
                measured[layer] = timer(layer, repeats)
            total += measured[layer]
            macs += layer.macs
            timed += 1
        choice.seconds[m], choice.macs[m], choice.layers = total, macs, timed
    fastest = min(choice.seconds.values())
    choice.best = min(m for m in candidates if choice.seconds[m] <= fastest * (1 + tolerance))
    return choice
