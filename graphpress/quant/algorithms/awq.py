"""AWQ (Lin et al., 2024): activation-aware scales and clipping for weight-only quantization.

**Scale search.** Input channels that see large activations matter most. For a producer whose
channels feed linear layers ``W_r`` (q, k and v read one norm), scaling channel ``c`` up by
``s_c`` before quantizing, and the activation down by it, keeps the float function
(``X W^T = (X / s)(W s)^T``) but gives the salient channels a finer grid. AWQ takes

    s(alpha) = mean|X_c|^alpha,  normalized so that max(s) * min(s) = 1,

over a grid of ``alpha`` in ``[0, 1)`` (``alpha = 0``: plain round-to-nearest), and keeps the
one with the smallest output error over calibration rows ``X`` of every reader:

    L(alpha) = sum_r || X W_r^T - (X / s) Q(W_r s)^T ||^2

(``Q``: the round-to-nearest grid of :mod:`~graphpress.quant.algorithms.grid`). With
``power_of_two`` each candidate is rounded to powers of two before it is scored, so the
folding stays bit-exact (the search then picks among those).

**Clipping search.** Per block (one output row of one group), the grid's range is shrunk by a
ratio ``r`` in ``{1, 1 - 1/n, ...}`` down to ``min_ratio``; each block keeps the ratio with the
smallest error of its share of the output, ``sum_t (X_t,group . (W - Q_r(W))_row,group)^2``.
The qparams come from the shrunk range; values beyond it clamp to the grid's ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams
from graphpress.quant.spec import QuantSpec

__all__ = ["AwqReader", "awq_clip_search", "awq_scale_search"]


@dataclass
class AwqReader:
    """One linear reading the producer: calibration rows of its input ``x`` ``[T, K]``, its
    weight ``[N, K]`` (block ``block_size``), and the producer channel of each input."""

    x: torch.Tensor
    weight: torch.Tensor
    block_size: Sequence[int]
    channel_of: torch.Tensor


def _candidate(mean_abs: torch.Tensor, alpha: float, power_of_two: bool) -> torch.Tensor:
    scale = mean_abs.to(torch.float64).clamp(min=1e-8) ** alpha
    scale = scale / torch.sqrt(scale.max() * scale.min())
    if power_of_two:
        scale = torch.exp2(torch.round(torch.log2(scale)))
    return scale


def awq_scale_search(mean_abs: torch.Tensor, readers: Sequence[AwqReader], spec: QuantSpec, *,
                     grid: int = 20, power_of_two: bool = True
                     ) -> tuple[torch.Tensor, float, list[float]]:
    """(best scale per producer channel, its alpha, the loss of every alpha on the grid)."""
    references = [r.x @ r.weight.T for r in readers]
    best, best_alpha, losses = None, 0.0, []
    for step in range(grid):
        alpha = step / grid
        scale = _candidate(mean_abs, alpha, power_of_two)
        loss = 0.0
        for reader, reference in zip(readers, references, strict=True):
            per_input = scale[reader.channel_of].to(torch.float32)
            scaled = reader.weight * per_input
            qscale, zero_point = minmax_qparams(scaled, reader.block_size, spec)
            quantized = fake_quantize(scaled, reader.block_size, spec, qscale, zero_point)
            out = (reader.x / per_input) @ quantized.T
            loss += float(((out - reference) ** 2).sum())
        losses.append(loss)
        if best is None or loss < losses[best]:
            best, best_alpha = step, alpha
    return _candidate(mean_abs, best_alpha, power_of_two), best_alpha, losses


def awq_clip_search(x: torch.Tensor, weight: torch.Tensor, block_size: Sequence[int],
                    spec: QuantSpec, *, steps: int = 20, min_ratio: float = 0.5,
                    chunk: int = 256) -> torch.Tensor:
    """The clipping ratio of every block of ``weight`` ``[N, K]`` (blocks ``[1, g]``), shaped
    like its qparams ``[N, K / g]``: the ratio whose quantization error on the rows ``x``
    ``[T, K]`` is smallest for that block's output share."""
    rows, columns = weight.shape
    if block_size[0] != 1:
        raise ValueError("clipping search takes per-row blocks ([1, g]); per-tensor weights "
                         "have one block")
    group = block_size[1]
    groups = columns // group
    xs = x.reshape(x.shape[0], groups, group)
    ratios = [1.0 - i * (1.0 - min_ratio) / steps for i in range(steps + 1)]
    best_ratio = torch.ones(rows, groups)
    for start in range(0, rows, chunk):
        w = weight[start:start + chunk]
        best_err = torch.full((w.shape[0], groups), float("inf"))
        chosen = torch.ones(w.shape[0], groups)
        for ratio in ratios:
            scale, zero_point = minmax_qparams(w, block_size, spec, ratio)
            diff = (w - fake_quantize(w, block_size, spec, scale, zero_point))
            diff = diff.reshape(w.shape[0], groups, group)
            err = (torch.einsum("tgk,ngk->tng", xs, diff) ** 2).sum(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, torch.full_like(chosen, ratio), chosen)
        best_ratio[start:start + chunk] = chosen
    return best_ratio
