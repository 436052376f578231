"""A fused CPU kernel for ``dequant_matmul`` at small M (decode): C++ built on first use with
``torch.utils.cpp_extension`` (cached per machine), used when a compiler is there.

For each output row ``n`` and group ``j`` the kernel rebuilds the group's weights in a small
buffer, ``w = (u - z) * s`` (float32, the same values as the fake-quantized weight), and adds
``w . x[m, group]`` for every row ``m`` of ``x``. The codes are read once, straight from the
packed bytes: 4-bit codes as two halves (low nibbles against the even columns of ``x``, high
nibbles against the odd ones, which the host splits once per call), so no float copy of the
weight is ever written. The dot products are SIMD reductions (``omp simd``, no fast-math) and
rows ``n`` run in parallel on torch's intra-op threads.

:func:`fused_gemv` returns None when the extension cannot be built (no compiler, or
``GRAPHPRESS_CPU_KERNELS=0``); callers then use the torch implementation.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

__all__ = ["fused_gemv", "kernel_available"]

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <vector>

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  #pragma omp simd reduction(+:acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// x_halves: [H, M, K / H] float32 (H = 2 for 4 bits: even and odd columns; H = 1 for 8 bits)
at::Tensor gemv(const at::Tensor& x_halves, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, int64_t bits, int64_t group_size, bool has_zeros) {
  const int64_t halves = x_halves.size(0), m_rows = x_halves.size(1), width = x_halves.size(2);
  const int64_t n_rows = qweight.size(0), bytes = qweight.size(1);
  const int64_t groups = scales.size(1), step = group_size / halves;  // bytes per group
  auto out = at::empty({m_rows, n_rows}, x_halves.options());
  const float* x = x_halves.data_ptr<float>();
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const uint8_t* z = has_zeros ? zeros.data_ptr<uint8_t>() : nullptr;
  const int64_t z_stride = has_zeros ? zeros.size(1) : 0;
  float* y = out.data_ptr<float>();
  const float midpoint = float(1 << (bits - 1));
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> low(step), high(step), acc(m_rows);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* row = q + n * bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = s[n * groups + g];
        float zero = midpoint;
        if (has_zeros) {
          const uint8_t b = z[n * z_stride + (bits == 4 ? g / 2 : g)];
          zero = float(bits == 4 ? ((g & 1) ? (b >> 4) : (b & 15)) : b);
        }
        const uint8_t* codes = row + g * step;
        if (bits == 4) {
          #pragma omp simd
          for (int64_t j = 0; j < step; ++j) {
            low[j] = (float(codes[j] & 15) - zero) * scale;
            high[j] = (float(codes[j] >> 4) - zero) * scale;
          }
        } else {
          #pragma omp simd
          for (int64_t j = 0; j < step; ++j) low[j] = (float(codes[j]) - zero) * scale;
        }
        for (int64_t m = 0; m < m_rows; ++m) {
          const float* xs = x + m * width + g * step;
          float value = dot(low.data(), xs, step);
          if (halves == 2) value += dot(high.data(), xs + m_rows * width, step);
          acc[m] += value;
        }
      }
      for (int64_t m = 0; m < m_rows; ++m) y[m * n_rows + n] = acc[m];
    }
  });
  return out;
}

TORCH_LIBRARY(graphpress_cpu_kernels, m) {
  m.def("gemv(Tensor x_halves, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
        "int group_size, bool has_zeros) -> Tensor", &gemv);
}
"""


@functools.cache
def _load() -> Any:
    if os.environ.get("GRAPHPRESS_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline("graphpress_cpu_kernels", cpp_sources=[_SOURCE], is_python_module=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: torch's path instead
        warnings.warn(f"graphpress: the fused CPU dequant-matmul kernel could not be built "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "using the slower torch implementation", RuntimeWarning, stacklevel=3)
        return None
    return torch.ops.graphpress_cpu_kernels.gemv.default


def kernel_available() -> bool:
    """Whether the fused CPU kernel is built (builds it on the first call)."""
    return _load() is not None


def fused_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor | None:
    """``x @ W^T`` (float32 ``x`` [M, K]) by the fused kernel, or None when it is not built or
    does not cover the layout (4 bits with an odd group size)."""
    kernel = _load()
    if kernel is None or (bits == 4 and group_size % 2):
        return None
    halves = (torch.stack((x[:, 0::2], x[:, 1::2])) if bits == 4 else x.unsqueeze(0))
    empty = torch.empty(0, dtype=torch.uint8)
    return kernel(halves.contiguous(), qweight.contiguous(),
                  scales.to(torch.float32).contiguous(),
                  empty if zeros is None else zeros.contiguous(), bits, group_size,
                  zeros is not None)
