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
* **Damping by cross-validation** (:func:`gptq_damp_search`, ``damp="auto"`` in the pass):
  too little damping overfits ``H`` when the calibration rows are few for the input width (the
  quantized layer is then worse than RTN's on new inputs), too much ignores it. With the
  calibration batches split into ``F`` folds (Grams ``H_f``, ``H = sum_f H_f``), each candidate
  ``d`` quantizes on ``H - H_f`` and is scored on the fold it did not see,
  ``sum_f tr((W - Q_f) H_f (W - Q_f)^T)``; the lowest score's ``d`` quantizes on ``H``. The
  ``F x |candidates|`` runs share one column sweep (a batch dimension), which pays the sweep's
  per-column overhead once; their arithmetic and Cholesky factorizations are still
  ``F x |candidates|`` plain runs' (a 384 x 1536 weight: 7 s against 0.45 s, one thread).
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

__all__ = ["DAMP_CANDIDATES", "gptq_damp_search", "gptq_quantize"]

# the damping factors gptq_damp_search chooses from (fractions of the mean of diag H)
DAMP_CANDIDATES = (0.01, 0.03, 0.1, 0.3, 1.0)


def _inverse_cholesky(hessians: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factors of ``H^-1`` (a batch ``[C, K, K]``) in float32, computed in
    float32 as GPTQ does, in float64 when float32 loses positive definiteness."""
    for dtype in (torch.float32, torch.float64):
        H = hessians.to(dtype)
        factor, info = torch.linalg.cholesky_ex(H)
        if not info.any():
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if not info.any():
                return upper.to(torch.float32)
    raise ValueError("gptq: the damped Hessian is not positive definite; raise damp "
                     "(e.g. damp=0.1) or calibrate on more data")


def _check(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> None:
    if weight.dim() != 2 or hessian.shape[-2:] != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq takes a [N, K] weight and a [K, K] Hessian, got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if spec.is_float:
        raise ValueError(f"gptq quantizes onto integer grids, not {spec.dtype}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  block_size: Sequence[int], *, damp: float = 0.01, act_order: bool = False,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(quantized weight, scale, zero point) of ``weight`` ``[N, K]`` (blocks ``block_size``:
    ``[1, g]``, ``[1, K]`` or ``[N, K]``) given ``hessian`` ``[K, K]`` (any positive multiple
    of ``X^T X``); see the module docstring."""
    _check(weight, hessian, spec)
    hessians = hessian.detach().to(torch.float64, copy=True)[None]
    q, scale, zero_point = _sweep(weight, hessians, torch.tensor([damp]), spec, block_size,
                                  act_order, block)
    return q[0], scale[0], None if zero_point is None else zero_point[0]


def gptq_damp_search(weight: torch.Tensor, folds: Sequence[torch.Tensor], spec: QuantSpec,
                     block_size: Sequence[int], *, candidates: Sequence[float] = DAMP_CANDIDATES,
                     act_order: bool = False, block: int = 128) -> tuple[float, list[float]]:
    """(the chosen damping, each candidate's held-out error) for ``weight`` given the Grams of
    two or more calibration folds (module docstring)."""
    if len(folds) < 2:
        raise ValueError(f"gptq's damping search cross-validates over calibration folds; it "
                         f"needs at least 2, got {len(folds)}: calibrate on 2 or more batches, "
                         "or pass a number as damp")
    _check(weight, folds[0], spec)
    held = torch.stack([f.to(torch.float64) for f in folds])
    count, rows, columns = len(folds), *weight.shape
    trained = (held.sum(0) - held).expand(len(candidates), count, columns, columns)
    damps = torch.tensor(candidates, dtype=torch.float64).repeat_interleave(count)
    q, _, _ = _sweep(weight, trained.reshape(-1, columns, columns), damps, spec, block_size,
                     act_order, block)
    residual = (weight.float() - q.float()).view(len(candidates), count, rows, columns)
    errors = ((residual @ held.float()) * residual).sum((2, 3), dtype=torch.float64).sum(1)
    return float(candidates[int(errors.argmin())]), errors.tolist()


def _sweep(weight: torch.Tensor, hessians: torch.Tensor, damps: torch.Tensor, spec: QuantSpec,
           block_size: Sequence[int], act_order: bool, block: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of one weight under ``C`` Hessians and damping factors at once: every tensor
    carries a leading batch dim ``C``; results ``[C, N, K]`` and qparams ``[C, ...]``.
    ``hessians`` is a float64 batch of the caller's own, which the sweep overwrites."""
    rows, columns = weight.shape
    count = hessians.shape[0]
    group = block_size[1] if block_size[0] == 1 and block_size[1] < columns else None
    batched_block = [1, *block_size]
    W = weight.detach().to(torch.float32).expand(count, rows, columns).clone()
    H = hessians
    diagonal = torch.diagonal(H, dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    static = group is None or act_order
    scale, zero_point = minmax_qparams(W, batched_block, spec) if static else (None, None)
    order = (torch.argsort(diagonal, dim=1, descending=True) if act_order
             else torch.arange(columns).expand(count, columns))
    if act_order:
        W = W.gather(2, order[:, None, :].expand(count, rows, columns))
        H = H[torch.arange(count)[:, None, None], order[:, :, None], order[:, None, :]]
        diagonal = torch.diagonal(H, dim1=1, dim2=2)
    diagonal += damps.to(H.dtype)[:, None] * diagonal.mean(1, keepdim=True)
    U = _inverse_cholesky(H)
    if static:
        col_scale, col_zp = (_permuted(t, batched_block, order, rows) if t is not None else None
                             for t in (scale, zero_point))
    else:
        block = group * max(1, block // group)
        scales, zps = [], []
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if not static and i % group == 0:
                s, z = minmax_qparams(W1[:, :, i:i + group], [1, 1, group], spec)
                scales.append(s)
                zps.append(z)
            if static:
                s_col = col_scale[:, :, i1 + i]
                z_col = None if col_zp is None else col_zp[:, :, i1 + i]
            else:
                s_col, z_col = scales[-1][:, :, 0], None if zps[-1] is None else zps[-1][:, :, 0]
            w = W1[:, :, i]
            q = fake_quantize(w[..., None], [1, 1, 1], spec, s_col[..., None],
                              None if z_col is None else z_col[..., None])[..., 0]
            Q[:, :, i1 + i] = q
            err = (w - q) / U1[:, i, i, None]
            W1[:, :, i:].baddbmm_(err[:, :, None], U1[:, i:i + 1, i:], alpha=-1.0)
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]
    if not static:
        scale = torch.cat(scales, dim=2)
        zero_point = None if zps[0] is None else torch.cat(zps, dim=2)
    if act_order:
        Q = Q.gather(2, torch.argsort(order, dim=1)[:, None, :].expand(count, rows, columns))
    Q = Q.to(weight.dtype)
    return fake_quantize(Q, batched_block, spec, scale, zero_point), scale, zero_point


def _permuted(qparam: torch.Tensor, block: Sequence[int], order: torch.Tensor,
              rows: int) -> torch.Tensor:
    """The qparam of every element, ``[C, N, K]``, its columns in the sweep's ``order``."""
    spread = qparam.repeat_interleave(block[1], 1).repeat_interleave(block[2], 2)
    spread = spread.expand(order.shape[0], rows, order.shape[1])
    return spread.gather(2, order[:, None, :].expand(-1, rows, -1))
