"""equalize: cross-layer equalization of consecutive conv / linear layers.

For a layer ``W1`` (conv or linear, with bias ``b1``) whose output channels reach the next
layers ``W2`` only through positive-homogeneous ops (``relu(x / s) = relu(x) / s`` for
``s > 0``; also leaky_relu, pooling, views, flatten; see
:mod:`~graphpress.passes.quant.channel_scaling`), Nagel et al. (2019) rescale channel ``c``:

    W1'[c] = W1[c] / s_c,   b1'[c] = b1[c] / s_c,   W2'[:, c] = W2[:, c] * s_c

with ``s_c = sqrt(r1_c / r2_c)``, where ``r1_c = max|W1[c]|`` is the range of output channel
``c``'s filter and ``r2_c = max|W2[:, c]|`` the range of what reads it (over every reading
layer; every input a flatten maps to ``c``). Both ranges become ``sqrt(r1_c r2_c)``: per-tensor
and per-channel weight grids then lose less to channels with small ranges, which is where
depthwise convolutions break int8. A layer that is both the second of one pair and the first
of the next is rescaled from both sides, so the pass sweeps all pairs until the largest
``|log s|`` is below ``tolerance`` or ``max_sweeps`` is reached. Channels with a zero range
keep ``s = 1``. With ``power_of_two=True`` (the default) each ``s_c`` is rounded to the nearest
power of two (the ranges then agree within a factor 2; sweeps stop when every scale is 1), so
the rescaled weights are exact in floating point and the program computes the same bits.

The rewrite is exact before quantization (``exact`` contract); it needs no data. ReLU6 and
hardtanh clip at a fixed value and are not positive-homogeneous: pairs through them are
refused (as through BatchNorm: run ``fold_bn`` first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

__all__ = ["Equalize", "equalization_scales"]

_LAYERS = ("linear", "conv1d", "conv2d", "conv3d")


def equalization_scales(first_range: torch.Tensor, second_range: torch.Tensor) -> torch.Tensor:
    """``sqrt(r1 / r2)`` per channel, 1 where either range is 0."""
    live = (first_range > 0) & (second_range > 0)
    scale = torch.sqrt(first_range.clamp(min=1e-30) / second_range.clamp(min=1e-30))
    return torch.where(live, scale, torch.ones_like(scale))


@register_pass("equalize")
@dataclass
class Equalize(Pass):
    """Replaces layer pairs W2(f(W1 x)) with W2 s (f(W1 x / s)), s equalizing their channel
    ranges."""

    max_sweeps: int = 20
    tolerance: float = 1e-4
    power_of_two: bool = True   # round scales to powers of two: the rewrite is then bit-exact

    contract = Contract.exact()
    rewrites_weights = True
    runs_after = ("fold_bn", "prune_channels")

    def __post_init__(self) -> None:
        if self.max_sweeps < 1:
            raise ValueError(f"max_sweeps must be >= 1, got {self.max_sweeps}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        chains, skipped = find_chains(program, ("layer",), _LAYERS)
        if not chains:
            return PassResult(False, {"pairs": 0, "not_equalized": len(skipped)}, skipped)
        total = {chain.producer.name: torch.ones(chain.channels, dtype=torch.float64)
                 for chain in chains}
        sweeps = 0
        while sweeps < self.max_sweeps:
            sweeps += 1
            largest = 0.0
            for chain in chains:
                weight = program.weight(chain.params[0]).detach().abs().to(torch.float64)
                first = weight.reshape(chain.channels, -1).amax(dim=1)
                second = torch.zeros(chain.channels, dtype=torch.float64)
                for reader in chain.readers:
                    second = torch.maximum(second, to_producer(
                        reader, weight_input_range(program, reader), chain.channels))
                scale = equalization_scales(first, second)
                if self.power_of_two:
                    scale = power_of_two(scale)
                apply_scales(program, chain, scale)
                total[chain.producer.name] *= scale
                largest = max(largest, float(scale.log().abs().max()))
            if largest < self.tolerance:
                break
        summary = [f"{chain.where} -> {', '.join(r.node.name for r in chain.readers)}: "
                   f"scales {float(total[chain.producer.name].min()):.3g}.."
                   f"{float(total[chain.producer.name].max()):.3g}" for chain in chains]
        stats = {"pairs": len(chains), "sweeps": sweeps, "not_equalized": len(skipped)}
        return PassResult(True, stats, skipped, {"summary": summary})
