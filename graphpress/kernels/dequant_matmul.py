"""Triton kernels of ``graphpress::dequant_matmul``: ``out[M, N] = x[M, K] @ W^T`` with ``W``
dequantized in registers from the packed format of docs/ops/packed_formats.md::

    W[n, k] = (u[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

``u`` is the 4-bit code in nibble ``k % 2`` of byte ``qweight[n, k // 2]`` (low first) or the
byte ``qweight[n, k]`` for 8 bits; zero codes are packed the same way along the groups, and no
zeros means the midpoint ``2 ** (bits - 1)``. Every tile computes its group index per element,
so any group size that divides K works (32, 64, 128, per channel, odd ones), and K and N need
not be multiples of the tiles (masked loads).

* **GEMV, split-K** (``M <= 16``, decode): a program owns ``BLOCK_N`` outputs and one of
  ``split_k`` slices of K; it accumulates ``sum_k x[m, k] * W[n, k]`` in float32 on the CUDA
  cores (the product is memory-bound: the packed weight is read once), writes a partial sum, and
  the host adds the slices. Splitting K keeps every SM busy when N alone gives few programs.
* **GEMM, tiled** (``M > 16``, prefill): ``BLOCK_M x BLOCK_N`` tiles, K in ``BLOCK_K`` steps,
  the weight tile dequantized in registers and fed to ``tl.dot`` with float32 accumulation
  (IEEE float32 products for float32 inputs, no TF32).

Both are autotuned over a small set of tile sizes keyed on ``(M, N, K)``; under
``TRITON_INTERPRET=1`` (CPU tensors, how the tests run them) one configuration is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphpress.kernels import interpreting

__all__ = ["GEMV_MAX_M", "triton_dequant_matmul"]

GEMV_MAX_M = 16
_SPLIT_K_STEP = 256  # every K slice is a multiple of this (and so of every BLOCK_K below)


def _configs(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if interpreting() else configs


_GEMV_CONFIGS = _configs([
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
])
_GEMM_CONFIGS = _configs([
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
])


@triton.jit
def _weight_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, stride_qw, stride_s, stride_z,
                 group_size, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """The dequantized weight tile W^T[offs_k, offs_n] in float32 ([BLOCK_K, BLOCK_N])."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    rows = offs_n[None, :]
    if BITS == 4:
        byte = tl.load(qw_ptr + rows * stride_qw + offs_k[:, None] // 2, mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 0xF
    else:
        code = tl.load(qw_ptr + rows * stride_qw + offs_k[:, None], mask=mask,
                       other=0).to(tl.int32)
    group = offs_k[:, None] // group_size
    scale = tl.load(s_ptr + rows * stride_s + group, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        if BITS == 4:
            zbyte = tl.load(z_ptr + rows * stride_z + group // 2, mask=mask, other=0)
            zero = (zbyte.to(tl.int32) >> ((group % 2) * 4)) & 0xF
        else:
            zero = tl.load(z_ptr + rows * stride_z + group, mask=mask, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    return (code - zero).to(tl.float32) * scale


@triton.autotune(configs=_GEMV_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _gemv_split_k(x_ptr, qw_ptr, s_ptr, z_ptr, partial_ptr, M, N, K, k_per_split,
                  stride_xm, stride_qw, stride_s, stride_z, group_size,
                  BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + step + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, stride_qw, stride_s,
                         stride_z, group_size, BITS, HAS_ZEROS)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    out = partial_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _gemm(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_s,
          stride_z, stride_om, group_size, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
          INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, N, K, stride_qw, stride_s,
                         stride_z, group_size, BITS, HAS_ZEROS)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _split_k(n: int, k: int, device: torch.device) -> int:
    """Slices of K so that about two programs per SM run (64-wide output blocks assumed)."""
    if device.type != "cuda":
        return min(2, triton.cdiv(k, _SPLIT_K_STEP))
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 2
    return max(1, min(triton.cdiv(programs, triton.cdiv(n, 64)), triton.cdiv(k, _SPLIT_K_STEP)))


def triton_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, bits: int, group_size: int,
                          split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` in float32 (``x``: [M, K] float32, float16 or bfloat16, contiguous rows)."""
    if bits not in (4, 8):
        raise ValueError(f"the Triton dequant-matmul kernels take 4 or 8 bits, got {bits}")
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    zero_arg = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    stride_z = zeros.stride(0) if zeros is not None else 0
    if m <= GEMV_MAX_M:
        splits = split_k or _split_k(n, k, x.device)
        k_per_split = triton.cdiv(triton.cdiv(k, splits), _SPLIT_K_STEP) * _SPLIT_K_STEP
        splits = triton.cdiv(k, k_per_split)
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)

        def gemv_grid(meta: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_N"]), splits)

        _gemv_split_k[gemv_grid](
            x, qweight, scales, zero_arg, partial, m, n, k, k_per_split, x.stride(0),
            qweight.stride(0), scales.stride(0), stride_z, group_size, BITS=bits,
            HAS_ZEROS=zeros is not None, BLOCK_M=max(2, triton.next_power_of_2(m)))
        return partial.sum(0) if splits > 1 else partial[0]
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)

    def gemm_grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _gemm[gemm_grid](
        x, qweight, scales, zero_arg, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), stride_z, out.stride(0), group_size, BITS=bits,
        HAS_ZEROS=zeros is not None,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out
