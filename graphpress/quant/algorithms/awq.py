"""AWQ (Lin et al., 2024): activation-aware scales and clipping for weight-only quantization.

**Scale search.** Input channels that see large activations matter most. For a producer whose
channels feed linear layers ``W_r`` (q, k and v read one norm), scaling channel ``c`` up by
``s_c`` before quantizing, and the activation down by it, keeps the float function
(``X W^T = (X / s)(W s)^T``) but gives the salient channels a finer grid. AWQ takes

    s(alpha) = mean|X_c|^alpha,  normalized so that max(s) * min(s) = 1,

over a grid of ``alpha`` in ``[0, 1)`` (``alpha = 0``: plain round-to-nearest), and keeps the
one with the smallest output error over calibration rows ``X`` of every reader:

    L(alpha) = sum_r || X W_r^T - (X / s) Q(W_r s)^T ||^2

(``Q``: the round-to-nearest grid of :mod:`~graphpress.quant.algorithms.grid`), or any other
objective of the weights each reader computes with after folding, ``Q(W_r s) / s`` (the
quantization passes measure it where the readers' outputs meet: the attention output for q,
k and v; :mod:`graphpress.passes.quant.awq_block`). With
``duo`` the grid also holds AutoAWQ's "duo" candidates, which weigh the activation's magnitude
against the weight's,

    s(alpha) = mean|X_c|^alpha / mean|W_c|^(1 - alpha)

(``mean|W_c|``: the mean over every reader's rows of ``|W[:, k]|`` divided by its block's
``max |W|``, for the inputs ``k`` channel ``c`` feeds), and the search keeps the best of both
families. With ``power_of_two`` each candidate is rounded to powers of two before it is
scored, so the folding stays bit-exact (the search then picks among those).

**Clipping search.** Per block (one output row of one group), the grid's range is shrunk by a
ratio ``r`` in ``{1, 1 - 1/n, ...}`` down to ``min_ratio``; each block keeps the ratio with the
smallest error of its share of the output, ``sum_t (X_t,group . (W - Q_r(W))_row,group)^2``.
The qparams come from the shrunk range; values beyond it clamp to the grid's ends. With
``two_sided`` (asymmetric grids) the low and the high end shrink by ratios searched apart (the
``(n + 1)^2`` pairs), so a group whose outliers sit on one side keeps the other end.

**Grid refinement** (``refine`` steps, after clipping; in the spirit of NNCF's scale
estimation, which fits each group's scale to activation-weighted error). With the codes ``q``
of a block fixed, its error on the rows ``X`` is a quadratic in the block's grid: for the
weights ``w`` of one output row in group ``G`` and ``H = X_G^T X_G``,

    e(a, b) = (w - a q - b)^T H (w - a q - b),

minimized by a 2 x 2 linear solve (symmetric grids: ``b = 0``, ``a = q^T H w / q^T H q``).
The new grid is ``scale = a`` and ``zero_point = round(-b / a)`` (clamped to the code range),
``a`` re-solved for that integer zero point; the codes are rounded again on the new grid, and
each block keeps the grid with the smallest ``e`` seen, so refinement never does worse than
the clipping it starts from on this objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams, qparams_in
from graphpress.quant.spec import QuantSpec, block_minmax

__all__ = ["AwqReader", "Objective", "awq_clip_search", "awq_refine_qparams", "awq_scale_search",
           "linear_objective", "weight_salience"]


@dataclass
class AwqReader:
    """One linear reading the producer: calibration rows of its input ``x`` ``[T, K]``, its
    weight ``[N, K]`` (block ``block_size``), and the producer channel of each input."""

    x: torch.Tensor
    weight: torch.Tensor
    block_size: Sequence[int]
    channel_of: torch.Tensor


def weight_salience(readers: Sequence[AwqReader], channels: int) -> torch.Tensor:
    """``mean|W_c|`` of the duo candidates (module docstring), float64 ``[channels]``."""
    total = torch.zeros(channels, dtype=torch.float64)
    count = torch.zeros(channels, dtype=torch.float64)
    for reader in readers:
        rows, columns = reader.weight.shape
        block_rows, block_columns = reader.block_size
        blocks = reader.weight.abs().to(torch.float64).reshape(
            rows // block_rows, block_rows, columns // block_columns, block_columns)
        relative = blocks / blocks.amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
        per_input = relative.reshape(rows, columns).sum(dim=0)
        total.scatter_add_(0, reader.channel_of, per_input)
        count.scatter_add_(0, reader.channel_of, torch.full_like(per_input, rows))
    return total / count.clamp(min=1)


def _candidate(mean_abs: torch.Tensor, weight_mean: torch.Tensor | None, alpha: float,
               power_of_two: bool) -> torch.Tensor:
    scale = mean_abs.to(torch.float64).clamp(min=1e-8) ** alpha
    if weight_mean is not None:
        scale = (scale / (weight_mean.clamp(min=1e-8) ** (1 - alpha))).clamp(min=1e-4)
    scale = scale / torch.sqrt(scale.max() * scale.min())
    if power_of_two:
        scale = torch.exp2(torch.round(torch.log2(scale)))
    return scale


Objective = Callable[[Sequence[torch.Tensor]], float]


def linear_objective(readers: Sequence[AwqReader]) -> Objective:
    """``L`` of the module docstring for candidate weights ``C_r`` (``Q(W_r s) / s``, what
    each reader computes with after folding): ``sum_r ||X W_r^T - X C_r^T||^2``."""
    references = [r.x @ r.weight.T for r in readers]

    def loss(candidates: Sequence[torch.Tensor]) -> float:
        return sum(float(((r.x @ c.T - ref) ** 2).sum())
                   for r, c, ref in zip(readers, candidates, references, strict=True))
    return loss


def awq_scale_search(mean_abs: torch.Tensor, readers: Sequence[AwqReader], spec: QuantSpec, *,
                     grid: int = 20, power_of_two: bool = True, duo: bool = False,
                     objective: Objective | None = None
                     ) -> tuple[torch.Tensor, float, list[float]]:
    """(best scale per producer channel, its alpha, the loss of every candidate: the plain
    grid's, then with ``duo`` the duo grid's; ``losses[0]`` is round-to-nearest's). The loss
    is ``objective`` of the candidate weights (default: :func:`linear_objective`)."""
    objective = objective or linear_objective(readers)
    families = [None] + ([weight_salience(readers, mean_abs.numel())] if duo else [])
    best, best_scale, best_alpha, losses = None, None, 0.0, []
    for weight_mean in families:
        for step in range(grid):
            alpha = step / grid
            scale = _candidate(mean_abs, weight_mean, alpha, power_of_two)
            candidates = []
            for reader in readers:
                per_input = scale[reader.channel_of].to(torch.float32)
                scaled = reader.weight * per_input
                qscale, zero_point = minmax_qparams(scaled, reader.block_size, spec)
                candidates.append(fake_quantize(scaled, reader.block_size, spec, qscale,
                                                zero_point) / per_input)
            loss = objective(candidates)
            losses.append(loss)
            if best is None or loss < best:
                best, best_scale, best_alpha = loss, scale, alpha
    return best_scale, best_alpha, losses


def awq_clip_search(x: torch.Tensor, weight: torch.Tensor, block_size: Sequence[int],
                    spec: QuantSpec, *, steps: int = 20, min_ratio: float = 0.5,
                    two_sided: bool = False, chunk: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping ratios ``(of the low end, of the high end)`` of every block of ``weight``
    ``[N, K]`` (blocks ``[1, g]``), each shaped like its qparams ``[N, K / g]``: the pair whose
    quantization error on the rows ``x`` ``[T, K]`` is smallest for that block's output share
    (one ratio for both ends unless ``two_sided``)."""
    rows, columns = weight.shape
    if block_size[0] != 1:
        raise ValueError("clipping search takes per-row blocks ([1, g]); per-tensor weights "
                         "have one block")
    group = block_size[1]
    groups = columns // group
    xs = x.reshape(x.shape[0], groups, group)
    ratios = [1.0 - i * (1.0 - min_ratio) / steps for i in range(steps + 1)]
    pairs = ([(low, high) for low in ratios for high in ratios] if two_sided
             else [(r, r) for r in ratios])
    best_low, best_high = torch.ones(rows, groups), torch.ones(rows, groups)
    lows, highs = block_minmax(weight, list(block_size))
    for start in range(0, rows, chunk):
        w = weight[start:start + chunk]
        low, high = lows[start:start + chunk], highs[start:start + chunk]
        best_err = torch.full((w.shape[0], groups), float("inf"))
        chosen_low, chosen_high = torch.ones(w.shape[0], groups), torch.ones(w.shape[0], groups)
        for low_ratio, high_ratio in pairs:
            scale, zero_point = qparams_in(low * low_ratio, high * high_ratio, spec)
            diff = (w - fake_quantize(w, block_size, spec, scale, zero_point))
            diff = diff.reshape(w.shape[0], groups, group)
            err = (torch.einsum("tgk,ngk->tng", xs, diff) ** 2).sum(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen_low = torch.where(better, torch.full_like(chosen_low, low_ratio), chosen_low)
            chosen_high = torch.where(better, torch.full_like(chosen_high, high_ratio),
                                      chosen_high)
        best_low[start:start + chunk] = chosen_low
        best_high[start:start + chunk] = chosen_high
    return best_low, best_high


def _block_error(diff: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``d^T H d`` of every block: ``diff`` ``[N, G, g]``, ``gram`` ``[G, g, g]`` -> ``[N, G]``."""
    return (torch.einsum("ngk,gkl->ngl", diff, gram) * diff).sum(dim=-1)


def awq_refine_qparams(x: torch.Tensor, weight: torch.Tensor, block_size: Sequence[int],
                       spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor | None, *,
                       steps: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid refinement of the module docstring: ``steps`` rounds from ``(scale,
    zero_point)`` (``[N, K / g]``, blocks ``[1, g]`` of ``weight`` ``[N, K]``) on the rows
    ``x`` ``[T, K]``; the best grid of every block."""
    rows, columns = weight.shape
    group = block_size[1]
    groups = columns // group
    qmin, qmax = spec.qrange()
    xs = x.to(torch.float64).reshape(x.shape[0], groups, group)
    gram = torch.einsum("tgk,tgl->gkl", xs, xs)
    w = weight.to(torch.float64).reshape(rows, groups, group)
    one_h = gram.sum(dim=1)                      # 1^T H per group, [G, g]
    one_h_one = one_h.sum(dim=-1)                # [G]
    one_h_w = (w * one_h).sum(dim=-1)            # [N, G]

    def error(grid: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        quantized = fake_quantize(weight, block_size, spec, *grid).to(torch.float64)
        return _block_error(w - quantized.reshape(rows, groups, group), gram)

    best_scale, best_zero = scale.clone(), None if zero_point is None else zero_point.clone()
    best_err = error((scale, zero_point))
    current_scale, current_zero = scale, zero_point
    for _ in range(steps):
        old_scale = current_scale.to(torch.float64)
        offset = 0.0 if current_zero is None else current_zero.to(torch.float64).unsqueeze(-1)
        codes = torch.clamp(torch.round(w * (1.0 / old_scale.unsqueeze(-1))) + offset, qmin, qmax)
        codes_gram = torch.einsum("ngk,gkl->ngl", codes, gram)
        qhq = (codes_gram * codes).sum(dim=-1)
        qhw = (codes_gram * w).sum(dim=-1)
        if current_zero is None:
            a = qhw / qhq.clamp(min=1e-30)
            usable = torch.isfinite(a) & (a.abs() > 1e-12)
            new_zero = None
        else:
            qh1 = codes_gram.sum(dim=-1)
            det = qhq * one_h_one - qh1 ** 2
            a = (qhw * one_h_one - qh1 * one_h_w) / det
            b = (qhq * one_h_w - qh1 * qhw) / det
            zero = torch.clamp(torch.round(-b / a), qmin, qmax)
            shifted = codes - zero.unsqueeze(-1)
            shifted_gram = codes_gram - zero.unsqueeze(-1) * one_h
            a = (shifted_gram * w).sum(dim=-1) / (shifted_gram * shifted).sum(dim=-1)
            usable = torch.isfinite(a) & (a > 1e-12) & (det > 0)
            new_zero = torch.where(usable, zero, current_zero.to(torch.float64)).to(
                current_zero.dtype)
        current_scale = torch.where(usable, a, old_scale).to(scale.dtype)
        current_zero = new_zero
        err = error((current_scale, current_zero))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, current_scale, best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, current_zero, best_zero)
    return best_scale, best_zero
