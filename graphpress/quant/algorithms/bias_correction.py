"""Bias correction (Nagel et al., 2019): remove the mean output shift weight quantization
causes.

A layer linear in its input, ``y = L(x, W) + b`` (linear, convolution), quantized to ``W_q``
shifts its output by ``L(x, W) - L(x, W_q) = L(x, W - W_q)``. Over the calibration data the
expected shift per output channel ``o`` is, by linearity,

    delta_o = mean over positions of L(E[x], W - W_q)_o

where ``E[x]`` is the mean input over the calibration samples (kept at the per-sample shape,
so a convolution's zero padding and borders are accounted for exactly). Adding ``delta`` to the
bias makes the quantized layer's mean output equal the float one's on that data. It corrects
the weights' error only; the activations' rounding is not part of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["output_shift"]


def output_shift(layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 mean_input: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor,
                 channel_dim: int) -> torch.Tensor:
    """``delta`` per output channel: ``layer(E[x][None], W - W_q)`` (no bias) averaged over
    every dim but ``channel_dim``, in float64."""
    difference = weight.to(torch.float64) - quantized.to(torch.float64)
    out = layer(mean_input.to(torch.float64).unsqueeze(0), difference)
    dims = [d for d in range(out.dim()) if d != channel_dim % out.dim()]
    return out.mean(dim=dims)
