"""The round-to-nearest grid the algorithms quantize onto, the one ``insert_fake_quant`` uses.

A weight ``W`` with block shape ``b`` (:meth:`QuantSpec.block_size`, or
:func:`graphpress.quant.spec.weight_block_size`) has one ``(scale, zero_point)`` per block;
:func:`minmax_qparams` derives them from each block's range (optionally shrunk by a clipping
ratio, AWQ's search) with ``graphpress.ops.quant.qparams_from_minmax``, and
:func:`fake_quantize` is the ``graphpress::fake_quantize_affine`` op itself, so a weight an
algorithm produces is on exactly the grid the inserted fake-quant computes:
``fake_quantize(fake_quantize(W)) == fake_quantize(W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphpress.ops.quant import fake_quantize_affine, qparams_from_minmax
from graphpress.quant.spec import QuantSpec, block_minmax

__all__ = ["fake_quantize", "minmax_qparams", "qparams_in"]


def qparams_in(low: torch.Tensor, high: torch.Tensor, spec: QuantSpec
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point or None when symmetric) of blocks whose range is ``[low, high]``."""
    qmin, qmax = spec.qrange()
    scale, zero_point = qparams_from_minmax(low, high, qmin, qmax, spec.symmetric, spec.dtype,
                                            signed_scale=spec.signed_scale)
    return scale, (None if spec.symmetric or spec.is_float else zero_point)


def minmax_qparams(weight: torch.Tensor, block_size: Sequence[int], spec: QuantSpec,
                   ratio: torch.Tensor | float = 1.0, high_ratio: torch.Tensor | float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point or None when symmetric) of each block, from its min times ``ratio``
    and its max times ``high_ratio`` (``ratio`` when None; floats, or tensors of the qparam
    shape)."""
    low, high = block_minmax(weight, list(block_size))
    return qparams_in(low * ratio, high * (ratio if high_ratio is None else high_ratio), spec)


def fake_quantize(weight: torch.Tensor, block_size: Sequence[int], spec: QuantSpec,
                  scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``weight`` quantized and dequantized on the grid of ``(scale, zero_point)``."""
    qmin, qmax = spec.qrange()
    return fake_quantize_affine(weight, list(block_size), scale, zero_point, float(qmin),
                                float(qmax), spec.dtype)
