"""smooth_quant: move activation outliers into the weights of the layers that read them.

For a producer (LayerNorm, RMSNorm, a per-channel multiply, or a linear) whose channels reach
only linear layers through scale-commuting ops (:mod:`~graphpress.passes.quant.channel_scaling`),
SmoothQuant (Xiao et al., 2023) divides channel ``j`` of the activation by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies input channel ``j`` of every reading weight by it: ``X W^T = (X / s)(W s)^T``.
``max|X_j|`` is taken over the calibration batches at the reading layers' inputs (a channel
read through a view by several layers takes the largest), ``max|W_j|`` over the reading
weights' column ``j``. ``alpha`` moves the difficulty: 0 leaves the activations alone, 1 makes
every channel of ``X / s`` peak at 1 and puts the whole range into the weights; 0.5 balances
them. A channel that is zero in the activations or the weights keeps ``s_j = 1``; scales are
clamped to ``[1e-5, 1e5]``. With ``power_of_two=True`` (the default) each ``s_j`` is rounded to
the nearest power of two, at most a factor ``sqrt(2)`` from the formula, so that dividing and
multiplying by it is exact in floating point.

Before quantization the rewrite is exact (``exact`` contract; bit-exact with power-of-two
scales): the divide goes into the producer's parameters (a norm's weight and bias, a linear's
rows and bias), nothing is added to the graph. Quantization comes after it
(``insert_fake_quant``), which then sees activations with smaller outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphpress.errors import InputError
from graphpress.ir.program import Program
from graphpress.passes.quant.channel_scaling import (
    apply_scales,
    find_chains,
    power_of_two,
    to_producer,
    weight_input_range,
)
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.registry import register_pass
from graphpress.quant.algorithms.statistics import AbsMax, collect

__all__ = ["SmoothQuant", "smoothing_scales"]

_BOUNDS = (1e-5, 1e5)
_PRODUCERS = ("norm", "layer")


def smoothing_scales(activation_max: torch.Tensor, weight_max: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """``max|X|^alpha / max|W|^(1 - alpha)`` per channel, 1 where either is 0, clamped."""
    activation_max = activation_max.to(torch.float64)
    weight_max = weight_max.to(torch.float64)
    live = (activation_max > 0) & (weight_max > 0)
    scale = activation_max.clamp(min=1e-30) ** alpha / weight_max.clamp(min=1e-30) ** (1 - alpha)
    return torch.where(live, scale, torch.ones_like(scale)).clamp(*_BOUNDS)


@register_pass("smooth_quant")
@dataclass
class SmoothQuant(Pass):
    """Replaces norm/linear -> linear pairs with pairs whose activations are divided by
    per-channel smoothing scales that the reading weights absorb."""

    alpha: float = 0.5
    producers: tuple[str, ...] = _PRODUCERS   # "norm" and/or "layer" (a preceding linear)
    calibration_batches: int | None = None
    power_of_two: bool = True   # round scales to powers of two: the rewrite is then bit-exact

    contract = Contract.exact()
    rewrites_weights = True
    runs_after = ("fold_bn", "prune_channels")

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        self.producers = ((self.producers,) if isinstance(self.producers, str)
                          else tuple(self.producers))
        unknown = set(self.producers) - set(_PRODUCERS)
        if unknown or not self.producers:
            raise ValueError(f"producers takes 'norm' and/or 'layer', got {self.producers}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        chains, skipped = find_chains(program, self.producers, ("linear",))
        if not chains:
            return PassResult(False, {"smoothed": 0, "not_smoothed": len(skipped)}, skipped)
        batches = ctx.calibration_data[: self.calibration_batches]
        if not batches:
            raise InputError("smooth_quant needs calibration data for the activation ranges: "
                             "pass gp.compile(..., calibration_data=[(x,), ...])")
        ranges = {r.value.name: AbsMax(-1) for chain in chains for r in chain.readers}
        collect(program, batches, {name: [obs] for name, obs in ranges.items()},
                what="smooth_quant")
        summary = []
        for chain in chains:
            act = torch.zeros(chain.channels, dtype=torch.float64)
            weight = torch.zeros(chain.channels, dtype=torch.float64)
            for reader in chain.readers:
                act = torch.maximum(act, to_producer(reader, ranges[reader.value.name].value,
                                                     chain.channels))
                weight = torch.maximum(weight, to_producer(
                    reader, weight_input_range(program, reader), chain.channels))
            scale = smoothing_scales(act, weight, self.alpha)
            if self.power_of_two:
                scale = power_of_two(scale)
            apply_scales(program, chain, scale)
            readers = ", ".join(r.node.name for r in chain.readers)
            summary.append(f"{chain.where} -> {readers}: scales {float(scale.min()):.3g}.."
                           f"{float(scale.max()):.3g}, activation max {float(act.max()):.3g}"
                           f" -> {float((act / scale).max()):.3g}")
        stats = {"smoothed": len(chains), "layers": sum(len(c.readers) for c in chains),
                 "calibration_batches": len(batches), "not_smoothed": len(skipped)}
        return PassResult(True, stats, skipped, {"summary": summary})
