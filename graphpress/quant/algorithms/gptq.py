"""GPTQ (Frantar et al., 2023): quantize a weight column by column, each column's rounding
error fed back into the columns not yet quantized through the inverse Hessian.

For a linear layer ``y = W x`` with calibration inputs ``X`` (rows ``x_t``), the layer-wise loss
``||W X^T - Q X^T||^2`` has Hessian ``H = 2 X^T X`` over the input channels. Quantizing column
``i`` to ``q_i = Q(w_i)`` and updating the rest optimally (the OBS step) gives

    err = (w_i - q_i) / [H^-1]_ii,      W[:, j] -= err * [H^-1]_ij   for j > i

with ``H^-1`` taken after dropping the quantized columns. GPTQ reads every row of those
successive inverses from the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): row
``i`` of ``U`` is ``[H^-1]_i,i: / sqrt([H^-1]_ii)`` of the reduced inverse. So, with ``d = U_ii``,
``err = (w_i - q_i) / d`` and ``W[:, i:] -= err U[i, i:]``.

* **Damping**: ``H += damp * mean(diag H) * I`` keeps it positive definite; input channels
  that never fire (``H_ii = 0``) get ``H_ii = 1`` and a zero column.
* **Lazy batches**: the update of the columns right of a block of ``B`` columns is deferred and
  applied at once, ``W[:, i2:] -= Err U[i1:i2, i2:]``: a rank-``B`` matrix product instead of
  ``B`` rank-1 updates of the whole weight (what makes a 4096 x 4096 layer a few seconds on a
  CPU; ``benchmarks/quant_algorithms.py`` times it).
* **Groups** (``per_group`` specs, blocks of ``g`` columns): each group's qparams come from
  its columns as the sweep reaches them, after the updates of the columns before (the block
  is a multiple of ``g`` so a group is never split by a deferred update). Per-channel and
  per-tensor qparams come from the whole weight first.
* **Act order**: columns are visited by decreasing ``H_ii`` (the most active inputs first,
  while the most freedom is left). With groups the qparams are then fixed up front from the
  unquantized weight (static groups), so the groups stay contiguous blocks of ``g`` input
  channels, the layout the fake-quant op and the packed kernels take.

The result is on the grid of :mod:`~graphpress.quant.algorithms.grid` (the quantization
``insert_fake_quant`` inserts), with its qparams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams
from graphpress.quant.spec import QuantSpec

__all__ = ["gptq_quantize"]


def _column_qparams(scale: torch.Tensor, zero_point: torch.Tensor | None, block: Sequence[int],
                    shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The qparams of every element, ``[N, K]`` (broadcast from the qparam shape)."""
    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1).expand(shape)
    return spread(scale), (None if zero_point is None else spread(zero_point))


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     spec: QuantSpec) -> torch.Tensor:
    column = [1, 1]
    return fake_quantize(w[:, None], column, spec, scale[:, None],
                         None if zero_point is None else zero_point[:, None])[:, 0]


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` in float32 (computed in float32, as GPTQ does; in
    float64 when float32 loses positive definiteness)."""
    for dtype in (torch.float32, torch.float64):
        H = hessian.to(dtype)
        factor, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
    raise ValueError("gptq: the damped Hessian is not positive definite; raise damp "
                     "(e.g. damp=0.1) or calibrate on more data")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  block_size: Sequence[int], *, damp: float = 0.01, act_order: bool = False,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(quantized weight, scale, zero point) of ``weight`` ``[N, K]`` (blocks ``block_size``:
    ``[1, g]``, ``[1, K]`` or ``[N, K]``) given ``hessian`` ``[K, K]`` (any positive multiple
    of ``X^T X``); see the module docstring."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq takes a [N, K] weight and a [K, K] Hessian, got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if spec.is_float:
        raise ValueError(f"gptq quantizes onto integer grids, not {spec.dtype}")
    rows, columns = weight.shape
    group = block_size[1] if block_size[0] == 1 and block_size[1] < columns else None
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = group is None or act_order
    scale, zero_point = minmax_qparams(W, block_size, spec) if static else (None, None)
    order = (torch.argsort(torch.diagonal(H), descending=True) if act_order
             else torch.arange(columns))
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype)
    U = _inverse_cholesky(H)
    if static:
        col_scale, col_zp = _column_qparams(scale, zero_point, block_size, (rows, columns))
        col_scale = col_scale[:, order]
        col_zp = None if col_zp is None else col_zp[:, order]
    else:
        block = group * max(1, block // group)
        scales, zps = [], []
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if not static and i % group == 0:
                s, z = minmax_qparams(W1[:, i:i + group], [1, group], spec)
                scales.append(s)
                zps.append(z)
            if static:
                s_col = col_scale[:, i1 + i]
                z_col = None if col_zp is None else col_zp[:, i1 + i]
            else:
                s_col, z_col = scales[-1][:, 0], None if zps[-1] is None else zps[-1][:, 0]
            w = W1[:, i]
            q = _quantize_column(w, s_col, z_col, spec)
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if not static:
        scale = torch.cat(scales, dim=1)
        zero_point = None if zps[0] is None else torch.cat(zps, dim=1)
    Q = Q[:, torch.argsort(order)].to(weight.dtype)
    return fake_quantize(Q, block_size, spec, scale, zero_point), scale, zero_point
