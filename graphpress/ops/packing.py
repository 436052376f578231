"""Packed weight formats of ``graphpress::dequant_matmul`` (docs/ops/packed_formats.md).

A linear weight ``W[N, K]`` (N outputs, K inputs) quantized with ``bits`` bits in groups of
``group_size`` consecutive inputs (``group_size == K`` is per channel) is stored as

* ``qweight``: uint8. 8 bits: ``[N, K]``, one code a byte. 4 bits: ``[N, K // 2]``, two codes a
  byte along K: code ``k`` of row ``n`` is in byte ``k // 2``, in the **low** nibble for even
  ``k`` and the **high** nibble for odd ``k`` (the layout of onnxruntime's ``MatMulNBits``, whose
  ``B[N, K / block, block / 2]`` is this tensor reshaped);
* ``scales``: ``[N, K // group_size]``, float32, float16 or bfloat16;
* ``zeros``: the zero codes, one per row and group, packed as the codes along the groups (8
  bits: uint8 ``[N, G]``; 4 bits: uint8 ``[N, ceil(G / 2)]``, group ``j`` in the low nibble of
  byte ``j // 2`` for even ``j``, the high nibble for odd ``j``, a last high nibble of 0 for odd
  ``G``: ``MatMulNBits``' ``zero_points``), with ``G = K // group_size``; or None for symmetric
  quantization, which means the midpoint ``2 ** (bits - 1)`` (8 for 4 bits, 128 for 8 bits).

Codes are unsigned, ``u`` in ``[0, 2 ** bits)``, and the weight is::

    W[n, k] = (u[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

A signed quantized value ``q`` (int4 in [-8, 7], int8 in [-128, 127]) and its zero point are
stored shifted by ``2 ** (bits - 1)`` (``u = q + 8``); unsigned ones (uint4, uint8) as they are.
The shift cancels in ``u - zeros``, so the integer ``u - zeros`` equals ``q - zero_point`` and,
with float32 scales, :func:`dequantize_packed` is bit-identical to ``fake_quantize_affine`` on
the same qparams (both compute one float32 product of that integer and the scale).

:func:`pack_codes` / :func:`unpack_codes` are exact inverses on codes of the format's range;
:func:`pack_weight` packs the output of ``quantize_affine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BITS", "SCALE_DTYPES", "PackedWeight", "dequantize_packed", "midpoint",
           "pack_codes", "pack_weight", "pack_zeros", "unpack_codes", "unpack_zeros", "zeros_shape"]

BITS = (4, 8)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# quantized dtype name -> bits of its codes, shift from the quantized value to the code
_DTYPE_CODES: dict[str, tuple[int, int]] = {
    "int4": (4, 8), "uint4": (4, 0), "int8": (8, 128), "uint8": (8, 0)}


def midpoint(bits: int) -> int:
    """The zero code of a symmetric format (``zeros=None``): ``2 ** (bits - 1)``."""
    return 1 << (bits - 1)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"packed weights have 4 or 8 bits, got bits={bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ([N, K], integers in ``[0, 2 ** bits)``) as the uint8 ``qweight``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"{bits}-bit codes lie in [0, {(1 << bits) - 1}], got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if codes.shape[1] % 2:
        raise ValueError(f"4-bit packing puts two codes in a byte along K, so K must be even; "
                         f"got K={codes.shape[1]}")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 codes ``[N, K]`` of a packed ``qweight`` (the inverse of :func:`pack_codes`)."""
    _check_bits(bits)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a uint8 [N, K * bits / 8] tensor, got "
                         f"{qweight.dtype} of shape {tuple(qweight.shape)}")
    if bits == 8:
        return qweight
    low, high = qweight & 0x0F, qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def pack_zeros(zero_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero codes ``[N, G]`` as the stored ``zeros`` (4 bits: padded to an even G, packed)."""
    if bits == 4 and zero_codes.shape[1] % 2:
        zero_codes = torch.nn.functional.pad(zero_codes, (0, 1))
    return pack_codes(zero_codes, bits)


def unpack_zeros(zeros: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """The zero codes ``[N, groups]`` of stored ``zeros`` (the inverse of :func:`pack_zeros`)."""
    return unpack_codes(zeros, bits)[:, :groups]


def zeros_shape(out_features: int, groups: int, bits: int) -> tuple[int, int]:
    """The shape of the stored ``zeros`` of ``groups`` groups per row."""
    return (out_features, groups if bits == 8 else (groups + 1) // 2)


@dataclass(frozen=True)
class PackedWeight:
    """One packed linear weight (the format of the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8 // self.bits

    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, scales, zeros)."""
        tensors = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in tensors)


def pack_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                dtype: str, *, scale_dtype: torch.dtype = torch.float32) -> PackedWeight:
    """Pack ``q`` ([N, K], what ``quantize_affine`` returns for the quantized ``dtype``) with
    its ``scale`` / ``zero_point`` of shape ``[N, K // group_size]`` (or ``[1, G]``, ``[1, 1]``:
    one per block of rows: repeated over its rows); ``zero_point`` None is 0 (symmetric)."""
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"packed weights hold int4, uint4, int8 or uint8 values, not {dtype!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scales are float32, float16 or bfloat16, not {scale_dtype}")
    bits, shift = _DTYPE_CODES[dtype]
    n, k = q.shape
    groups = scale.shape[-1]
    if scale.dim() != 2 or k % groups or n % scale.shape[0]:
        raise ValueError(f"scale of shape {tuple(scale.shape)} is not one per block of rows "
                         f"and group of a [{n}, {k}] weight")
    rows = n // scale.shape[0]
    scales = scale.repeat_interleave(rows, dim=0).to(scale_dtype).contiguous()
    codes = pack_codes(q.to(torch.int32) + shift, bits)
    if zero_point is None:
        zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    zero_codes = zero_point.to(torch.int32).repeat_interleave(rows, dim=0) + shift
    zeros = None if bool((zero_codes == midpoint(bits)).all()) else pack_zeros(zero_codes, bits)
    return PackedWeight(codes, scales, zeros, bits, k // groups)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W = (u - zeros) * scales`` per group, ``[N, K]`` in ``dtype`` (computed in float32)."""
    codes = unpack_codes(qweight, bits)
    n, k = codes.shape
    groups = k // group_size
    grouped = codes.reshape(n, groups, group_size).to(torch.float32)
    zero = (torch.tensor(float(midpoint(bits))) if zeros is None
            else unpack_zeros(zeros, bits, groups).to(torch.float32).unsqueeze(-1))
    weight = (grouped - zero) * scales.to(torch.float32).unsqueeze(-1)
    return weight.reshape(n, k).to(dtype)
