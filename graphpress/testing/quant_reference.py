"""An independent quantize-dequantize reference, in plain PyTorch, for checking quantization.

Written apart from the ``graphpress::*_affine`` ops (it imports nothing of ``graphpress.ops``)
so that a bug in the ops or in the passes that insert them shows as a mismatch. It computes the
same math a different way: the tensor is reshaped into its blocks,
``[n0, b0, n1, b1, ...]`` with ``n = size // block``, and each block's qparams broadcast over
the ``b`` dimensions; round-half-to-even is spelled out from ``floor``; min and max come from
flattening each block. Integers::

    v     = x * (1 / scale)                         (float32; float64 for float64 inputs)
    q     = min(max(rint(v) + zero_point, quant_min), quant_max)
    x_hat = (q - zero_point) * scale

float8: ``x_hat = float8(min(max(x / scale, quant_min), quant_max)) * scale``. Qparams from a
block's min and max: asymmetric ``scale = max((max(hi, 0) - min(lo, 0)) / (qmax - qmin), eps)``,
``zero_point = clamp(qmin - rint(min(lo, 0) / scale))``; symmetric
``scale = max(amax / ((qmax - qmin) / 2), eps)``; float8 ``scale = max(amax / qmax, eps)``.

Only torch tensor ops, no ``.item()`` and no data-dependent Python: the functions run on
FakeTensors, so contracts can use them inside a traced program.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["reference_fake_quantize", "reference_qparams"]

_FLOAT8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_INTEGER = {"int8", "uint8", "int4", "uint4", "int3", "uint3"}


def _split(shape: Sequence[int], block_size: Sequence[int]) -> tuple[list[int], list[int]]:
    if len(block_size) != len(shape):
        raise ValueError(f"block_size {list(block_size)} needs one entry per dimension of "
                         f"shape {tuple(shape)}")
    blocked: list[int] = []
    qparams: list[int] = []
    for size, block in zip(shape, block_size, strict=True):
        blocked += [size // block, block]
        qparams += [size // block, 1]
    return blocked, qparams


def _rint(v: torch.Tensor) -> torch.Tensor:
    """Round half to even from floor: ties go to the even neighbour."""
    low = torch.floor(v)
    frac = v - low
    tie_up = torch.remainder(low, 2) == 1
    up = (frac > 0.5) | ((frac == 0.5) & tie_up)
    return torch.where(up, low + 1, low)


def reference_fake_quantize(x: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                            zero_point: torch.Tensor | None, quant_min: float,
                            quant_max: float, dtype: str) -> torch.Tensor:
    """x quantized and dequantized with one (scale, zero_point) per block (module docstring);
    ``scale`` / ``zero_point`` have shape ``[s // b for s, b in zip(x.shape, block_size)]``."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocked, qparams = _split(x.shape, block_size)
    values = x.to(compute).reshape(blocked)
    s = scale.to(compute).reshape(qparams)
    low = torch.full((), quant_min, dtype=compute, device=x.device)
    high = torch.full((), quant_max, dtype=compute, device=x.device)
    if dtype in _FLOAT8:
        ratio = torch.minimum(torch.maximum(values / s, low), high)
        out = ratio.to(_FLOAT8[dtype]).to(compute) * s
    elif dtype in _INTEGER:
        z = (torch.zeros((), dtype=compute, device=x.device) if zero_point is None
             else zero_point.to(compute).reshape(qparams))
        q = torch.minimum(torch.maximum(_rint(values * (1.0 / s)) + z, low), high)
        out = (q - z) * s
    else:
        raise ValueError(f"unknown quantized dtype {dtype!r}")
    return out.reshape(x.shape).to(x.dtype)


def reference_qparams(x: torch.Tensor, block_size: Sequence[int], quant_min: float,
                      quant_max: float, symmetric: bool, dtype: str,
                      eps: float = float(torch.finfo(torch.float32).eps),
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) from each block's min and max (module docstring)."""
    blocked, _ = _split(x.shape, block_size)
    rank = len(block_size)
    order = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
    counts = [blocked[2 * i] for i in range(rank)]
    flat = x.to(torch.float32).reshape(blocked).permute(order).reshape([*counts, -1])
    zero = torch.zeros((), device=x.device)
    lo = torch.minimum(flat.min(dim=-1).values, zero)
    hi = torch.maximum(flat.max(dim=-1).values, zero)
    amax = torch.maximum(hi, -lo)
    floor = torch.full((), eps, device=x.device)
    zeros = torch.zeros(counts, dtype=torch.int32, device=x.device)
    if dtype in _FLOAT8:
        return torch.maximum(amax / quant_max, floor), zeros
    if symmetric:
        return torch.maximum(amax / ((quant_max - quant_min) / 2), floor), zeros
    scale = torch.maximum((hi - lo) / (quant_max - quant_min), floor)
    zero_point = torch.clamp(quant_min - _rint(lo / scale), quant_min, quant_max)
    return scale, zero_point.to(torch.int32)
