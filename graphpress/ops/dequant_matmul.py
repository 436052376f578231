"""Matmuls on packed integer weights: ``graphpress::dequant_matmul`` (weight-only, 4 or 8 bits)
and ``graphpress::dynamic_quant_matmul`` (W8A8: int8 activations per token times int8 weights).

``dequant_matmul(x, qweight, scales, zeros, bias, bits, group_size)``, with the packed format of
:mod:`graphpress.ops.packing` (docs/ops/packed_formats.md)::

    W[n, k] = (u[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]
    y       = x @ W.T + bias                      (x [..., K] -> y [..., N], float32 accumulation)

``W`` is bit-identical to the fake-quantized weight it was packed from (float32 scales), so the
op equals ``linear(x, fake_quantize_affine(W_float), bias)`` up to the order of the sums. On CPU,
half and bfloat16 inputs are computed in float32 and the result cast back; the Triton kernels
multiply them with the weights rounded to their type (tensor cores), accumulating in float32.

``dynamic_quant_matmul(x, qweight, scales, bias, act_symmetric)``: ``qweight`` int8 ``[N, K]``
(signed, symmetric), ``scales`` float32 ``[N, 1]``; per row of ``x`` (each token) the op computes
the int8 qparams ``(s_x, z_x)`` with the formula of ``choose_qparams_affine`` and the codes
``q_x`` with ``quantize_affine``, exactly as the fake-quant program does, then::

    y[m, n] = s_x[m] * scales[n] * (sum_k q_x[m, k] * qweight[n, k] - z_x[m] * sum_k qweight[n, k])

The integer sum is exact (int32, ``torch._int_mm``; |sum| < 2**31 for K < 2**16), so the result
differs from the fake-quant program's float32 matmul only by that program's own rounding.

Kernels (the torch one lives here, the C++ and Triton ones in :mod:`graphpress.kernels`):

* CPU, with the C++ kernels of :mod:`graphpress.kernels.cpu_dequant` (built on first use, about
  a minute, cached per machine; ``GRAPHPRESS_CPU_KERNELS=0`` or no compiler: the torch path
  below): ``M <= 4`` (decode) the fused GEMV, which reads the packed codes once and never writes
  float weights (several times faster than float32 ``linear``, which reads 8x the bytes);
  larger M, on CPUs with AMX (bfloat16 tiles) and group sizes that are multiples of 32, the
  tiles multiply ``u - z`` (exact in bfloat16) with three bfloat16 parts of ``x`` (exactly
  ``x``), so the products are exact and accumulate in float32, scaled once per group; else
  the rows of ``W`` dequantized in cache-sized blocks by vectorized C++ and multiplied by
  ATen's float32 GEMM (the same float32 products as float32 ``linear``, at its speed);
* CPU without the C++ kernels: the same blocked algorithm in torch ops (``(u - z) * s``, the
  low and the high nibbles of 4-bit codes as two halves of the sum over K), slower than
  float32 ``linear`` by the cost of converting the codes;
* CUDA: the Triton kernels (split-K GEMV for ``M <= 16``, tiled GEMM otherwise) when triton is
  installed, else the CPU algorithm on the device;
* ``use_triton()``: run the Triton kernels on CPU tensors too (with ``TRITON_INTERPRET=1``),
  which is how the kernels are tested without a GPU.

ONNX: 4- and 8-bit weights whose group is a power of two >= 16 become onnxruntime's
``com.microsoft::MatMulNBits`` (its ``B`` is ``qweight`` reshaped, its zero points the same
codes packed two a byte for 4 bits); other group sizes become the dequantization in standard
ops and a MatMul. MatMulNBits' accuracy level (0: float32 activations, the exact choice and the
default; 4: int8 activations, onnxruntime's fastest CPU path) is the ONNX backend's option
``backend_options={"accuracy_level": N}``, which exports inside ``matmul_nbits_options``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from graphpress.kernels import triton_available
from graphpress.kernels.cpu_dequant import amx_matmul, dequant_gemm, fused_gemv
from graphpress.ops.packing import BITS, midpoint, unpack_zeros, zeros_shape
from graphpress.ops.quant import choose_qparams_affine, quantize_affine
from graphpress.ops.registry import define_op

__all__ = ["DEQUANT_MATMUL", "DYNAMIC_QUANT_MATMUL", "cpu_dequant_matmul", "matmul_nbits_options",
           "use_triton"]

_ROWS_PER_BLOCK = 128       # rows of W dequantized at a time on CPU: 128 x 4096 fp32 = 2 MiB
# up to this many rows of x the fused C++ GEMV beats dequantize-then-GEMM (it decodes the codes
# again for every 4 rows of x and has none of a GEMM's blocking)
_FUSED_CPU_MAX_M = 4
# rows of W per dequantize-then-GEMM block: small blocks stay in L2 at small M; at large M the
# GEMM packs x once per block, which larger blocks amortize
_GEMM_SMALL_M, _GEMM_ROWS_SMALL_M, _GEMM_ROWS = 32, 64, 256
_STATE: dict[str, Any] = {"triton_on_cpu": False, "accuracy_level": 0}


@contextlib.contextmanager
def use_triton(enabled: bool = True) -> Iterator[None]:
    """Inside the block, run the Triton kernels on CPU tensors too (needs triton and
    ``TRITON_INTERPRET=1`` set before triton was imported)."""
    previous = _STATE["triton_on_cpu"]
    _STATE["triton_on_cpu"] = enabled
    try:
        yield
    finally:
        _STATE["triton_on_cpu"] = previous


@contextlib.contextmanager
def matmul_nbits_options(*, accuracy_level: int = 0) -> Iterator[None]:
    """MatMulNBits' ``accuracy_level`` (0, 1: float32; 2: float16; 3: bfloat16; 4: int8
    activations) for the ONNX exports made inside the block (what the ONNX backend's
    ``accuracy_level`` option does around its export)."""
    if accuracy_level not in range(5):
        raise ValueError(f"accuracy_level is 0..4 (onnxruntime's MatMulNBits), got "
                         f"{accuracy_level!r}")
    previous = _STATE["accuracy_level"]
    _STATE["accuracy_level"] = accuracy_level
    try:
        yield
    finally:
        _STATE["accuracy_level"] = previous


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
           group_size: int) -> tuple[int, int]:
    op = "graphpress::dequant_matmul"
    if bits not in BITS:
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be uint8 [N, K * bits / 8], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} features but the {bits}-bit qweight "
                         f"{tuple(qweight.shape)} holds K={k}")
    if group_size < 1 or k % group_size:
        raise ValueError(f"{op}: group_size {group_size} does not divide K={k}")
    groups = (n, k // group_size)
    if tuple(scales.shape) != groups or not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be float [{n}, {groups[1]}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    stored = zeros_shape(n, groups[1], bits)
    if zeros is not None and (tuple(zeros.shape) != stored or zeros.dtype != torch.uint8):
        raise ValueError(f"{op}: zeros must be uint8 {list(stored)} ({bits}-bit codes of "
                         f"{groups[1]} groups), got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got {tuple(bias.shape)}")
    return n, k


def _dequantized(codes: torch.Tensor, zero: torch.Tensor | float, scale: torch.Tensor,
                 group: int) -> torch.Tensor:
    """``(codes - zero) * scale`` in float32, ``codes`` [rows, G * group] uint8, per group."""
    rows = codes.shape[0]
    grouped = codes.to(torch.float32).view(rows, -1, group)
    return grouped.sub_(zero).mul_(scale).view(rows, -1)


def cpu_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bits: int, group_size: int,
                       rows_per_block: int = _ROWS_PER_BLOCK) -> torch.Tensor:
    """``x @ W.T`` in float32 for ``x`` [M, K], dequantizing ``rows_per_block`` rows of W at a
    time.

    4 bits: the sum over K is split into even and odd k, ``x[:, 0::2] @ W_low.T + x[:, 1::2] @
    W_high.T``, where ``W_low`` holds the low nibbles of the bytes and ``W_high`` the high ones,
    so the codes are never interleaved back (each half-group of ``group_size / 2`` bytes shares
    the group's scale and zero). Odd group sizes straddle bytes, so they unpack the codes whole.
    """
    n, k = qweight.shape[0], x.shape[1]
    groups = k // group_size
    scale = scales.to(torch.float32).unsqueeze(-1)
    zero: torch.Tensor | float = float(midpoint(bits)) if zeros is None else (
        unpack_zeros(zeros, bits, groups).to(torch.float32).unsqueeze(-1))
    split = bits == 4 and group_size % 2 == 0
    halves = (x[:, 0::2].contiguous(), x[:, 1::2].contiguous()) if split else (x,)
    out = x.new_empty((x.shape[0], n), dtype=torch.float32)
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        block = qweight[start:stop]
        z = zero if isinstance(zero, float) else zero[start:stop]
        s = scale[start:stop]
        if bits == 8:
            parts = [block]
        elif split:
            parts = [block & 0x0F, block >> 4]
        else:
            parts = [torch.stack((block & 0x0F, block >> 4), dim=-1).view(stop - start, k)]
        group = group_size // 2 if split else group_size
        result = torch.mm(halves[0], _dequantized(parts[0], z, s, group).t())
        if split:
            result.addmm_(halves[1], _dequantized(parts[1], z, s, group).t())
        out[:, start:stop] = result
    return out


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   group_size: int) -> torch.Tensor:
    """y = x @ W.T + bias with W dequantized from packed ``bits``-bit codes per group."""
    n, k = _check(x, qweight, scales, zeros, bias, bits, group_size)
    x2d = x.reshape(-1, k)
    out = None
    if (x.is_cuda or _STATE["triton_on_cpu"]) and triton_available():
        from graphpress.kernels.dequant_matmul import triton_dequant_matmul

        # float16 / bfloat16 inputs meet weights rounded to their type (tensor cores)
        out = triton_dequant_matmul(x2d, qweight, scales, zeros, bits, group_size)
    x2d = x2d.to(torch.float32)
    if out is None and x.device.type == "cpu" and x2d.shape[0]:
        m = x2d.shape[0]
        if m <= _FUSED_CPU_MAX_M:
            out = fused_gemv(x2d, qweight, scales, zeros, bits, group_size)
        else:
            out = amx_matmul(x2d, qweight, scales, zeros, bits, group_size)
        if out is None:
            rows = _GEMM_ROWS_SMALL_M if m <= _GEMM_SMALL_M else _GEMM_ROWS
            out = dequant_gemm(x2d, qweight, scales, zeros, bits, group_size, rows)
    if out is None:
        out = cpu_dequant_matmul(x2d.contiguous(), qweight, scales, zeros, bits, group_size)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def _dequant_matmul_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                         group_size: int) -> torch.Tensor:
    n, _ = _check(x, qweight, scales, zeros, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], n))


def _check_dynamic(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None) -> int:
    op = "graphpress::dynamic_quant_matmul"
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be int8 [N, K], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} features, qweight {tuple(qweight.shape)} "
                         f"needs K={k}")
    if tuple(scales.shape) != (n, 1) or not scales.is_floating_point():
        raise ValueError(f"{op}: scales must be float [{n}, 1], got {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got {tuple(bias.shape)}")
    if k >= 1 << 16:
        raise ValueError(f"{op}: K={k} could overflow the int32 accumulator; K < 65536")
    return n


# id(qweight) -> (a weak reference to it, its version, its row sums); entries leave with the
# tensor, and a tensor written in place (a new version) gets its sums again
_ROW_SUMS: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}


def _row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``sum_k qweight[n, k]`` as int32 ``[1, N]``, computed once per weight: an int8 matmul
    with a row of ones (torch's int8 reduction is an order of magnitude slower)."""
    key = id(qweight)
    cached = _ROW_SUMS.get(key)
    if cached is not None and cached[0]() is qweight and cached[1] == qweight._version:
        return cached[2]
    ones = torch.ones((1, qweight.shape[1]), dtype=torch.int8, device=qweight.device)
    sums = torch._int_mm(ones, qweight.t())
    _ROW_SUMS[key] = (weakref.ref(qweight, lambda _, key=key: _ROW_SUMS.pop(key, None)),
                      qweight._version, sums)
    return sums


def dynamic_quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None, act_symmetric: bool) -> torch.Tensor:
    """y = x @ W.T + bias with x quantized to int8 per token and int8 weights (W8A8)."""
    n = _check_dynamic(x, qweight, scales, bias)
    k = qweight.shape[1]
    x2d = x.reshape(-1, k).to(torch.float32)
    block = [1, k]
    x_scale, x_zero = choose_qparams_affine(x2d, block, -128.0, 127.0, act_symmetric, "int8")
    codes = quantize_affine(x2d, block, x_scale, None if act_symmetric else x_zero,
                            -128.0, 127.0, "int8")
    acc = torch._int_mm(codes, qweight.t()) if x2d.shape[0] else torch.zeros(
        (0, n), dtype=torch.int32, device=x.device)
    if not act_symmetric and x2d.shape[0]:
        acc = acc - x_zero * _row_sums(qweight)
    out = acc.to(torch.float32) * (x_scale * scales.to(torch.float32).reshape(1, n))
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def _dynamic_quant_matmul_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               bias: torch.Tensor | None, act_symmetric: bool) -> torch.Tensor:
    n = _check_dynamic(x, qweight, scales, bias)
    return x.new_empty((*x.shape[:-1], n))


# The translations import onnxscript only when an export runs (importing graphpress stays
# light); tensor parameters are unannotated, which the exporter reads as inputs.
def _dequant_matmul_onnx(x, qweight, scales, zeros=None, bias=None,
                         bits: int = 4, group_size: int = 128) -> Any:
    from graphpress.ops.dequant_matmul_onnx import dequant_matmul_onnx

    return dequant_matmul_onnx(x, qweight, scales, zeros, bias, bits, group_size,
                               accuracy_level=_STATE["accuracy_level"])


def _dynamic_quant_matmul_onnx(x, qweight, scales, bias=None,
                               act_symmetric: bool = False) -> Any:
    from graphpress.ops.dequant_matmul_onnx import dynamic_quant_matmul_onnx

    return dynamic_quant_matmul_onnx(x, qweight, scales, bias, act_symmetric)


def _dequant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                           group_size: int) -> torch.Tensor:
    """The op on its Triton kernels on any device (the Triton backend calls this)."""
    with use_triton():
        return dequant_matmul(x, qweight, scales, zeros, bias, bits, group_size)


DEQUANT_MATMUL = define_op(
    "graphpress::dequant_matmul", dequant_matmul, fake=_dequant_matmul_fake,
    schema=("(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
            "int group_size) -> Tensor"),
    onnx_translation=_dequant_matmul_onnx, triton_lowering=_dequant_matmul_triton)
DYNAMIC_QUANT_MATMUL = define_op(
    "graphpress::dynamic_quant_matmul", dynamic_quant_matmul, fake=_dynamic_quant_matmul_fake,
    schema=("(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, bool act_symmetric) "
            "-> Tensor"),
    onnx_translation=_dynamic_quant_matmul_onnx)
