"""CPU kernels of ``dequant_matmul`` in C++, built on first use with ``torch.utils.cpp_extension``
(cached per machine) when a compiler is there: a fused GEMV for small M and a blocked
dequantize-then-GEMM for large M.

Both compute, per output row ``n`` and group ``j`` (codes ``u``, zero code ``z``, scale ``s``)::

    y[m, n] = sum_j s[n, j] * sum_{k in group j} float(u[n, k] - z[n, j]) * x[m, k]

``u - z`` is an integer in ``(-2 ** bits, 2 ** bits)``, exact in float32, so every product is one
float32 rounding of ``(u - z) * x`` and the scale multiplies the group's sum once: the same value
as the fake-quant program's ``x @ ((u - z) * s)^T`` up to float32 accumulation order.

* :func:`fused_gemv` (small M, decode): reads the packed bytes once per 8 rows of ``x`` and never
  writes a float weight. 4-bit codes: the low nibbles of a group's bytes meet the even columns of
  ``x`` and the high nibbles the odd ones (``x`` is split once per call), so codes are never
  interleaved. With AVX-512 (BW, VL) the bytes are widened 16 at a time, masked at the end of a
  group, and each row of ``x`` keeps a vector accumulator per group that the group's scale
  multiplies into the row's total (one horizontal sum per output); elsewhere a portable loop
  the compiler vectorizes. Output rows ``n`` run in parallel on torch's intra-op threads.
* :func:`amx_matmul` (M > 4, prefill, CPUs with AMX and the OS's permission for its tile
  state; group sizes that are multiples of 32): ``x = x1 + x2 + x3`` split exactly into three
  bfloat16 parts and ``u - z`` (exact in bfloat16) as tiles of W; each product ``d * x_p`` is
  exact and the tiles accumulate in float32, one tile per group, which the group's scale
  multiplies into the output (the algebra above; measured more accurate against float64 than
  float32 ``linear`` itself), at bfloat16 tile speed: 256 rows of W are decoded at a time into
  a bfloat16 buffer, each 16 x 32 tile of it meets two 16-row blocks of x.
* :func:`dequant_gemm` (large M without AMX): rows of ``W`` are dequantized to float32 in blocks of
  ``rows_per_block`` (vectorized as above, in natural order) into one scratch buffer and each
  block is multiplied with ``x`` by ATen's float32 GEMM (MKL / oneDNN) into its slice of the
  output. The GEMM is the cost; the codes' conversion adds a few percent.

Both return None when the extension cannot be built (no compiler, or
``GRAPHPRESS_CPU_KERNELS=0``); callers then use the torch implementation.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

__all__ = ["amx_matmul", "build", "dequant_gemm", "dequantize", "fused_gemv", "kernel_available"]

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define GP_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define GP_AMX 1
#endif
#endif

namespace {

constexpr int64_t kRowsPerPass = 4;  // rows of x that share one decoding of the weight

#ifdef GP_AVX512
// the lanes of a 16-wide chunk that lie before the end (left: elements from its start)
inline __mmask16 chunk_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// The codes of the 16 bytes at ``bytes`` in natural order, as parts of 16 byte-sized codes:
// two parts (32 nibbles, low nibble first) at 4 bits, one at 8. Returns the number of parts.
inline int unpack_chunk(const uint8_t* bytes, int64_t bits, __m128i parts[2]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  if (bits != 4) {
    parts[0] = b;
    return 1;
  }
  const __m128i low_mask = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_mask);
  parts[0] = _mm_unpacklo_epi8(lo, hi);
  parts[1] = _mm_unpackhi_epi8(lo, hi);
  return 2;
}
#endif

struct Packed {
  const uint8_t* q; const float* s; const uint8_t* z;
  int64_t bytes, groups, z_stride, bits, group_size;
  int zero(int64_t n, int64_t g) const {
    if (z == nullptr) return 1 << (bits - 1);
    const uint8_t b = z[n * z_stride + (bits == 4 ? g / 2 : g)];
    return bits == 4 ? ((g & 1) ? (b >> 4) : (b & 15)) : b;
  }
};

#ifdef GP_AVX512
// One 16-byte chunk of 4-bit codes (32 weights): the low nibbles against the even columns of x,
// the high ones against the odd columns, into the chains acc[c] and acc[c + 1]. ``table`` holds
// float(v - z) for v = 0..15: a permute looks the 16 lanes up (it reads the low 4 bits of each
// index, so the low nibble needs no mask), one instruction for the subtraction and conversion.
template <int R, bool Full>
inline void chunk4(const uint8_t* codes, __mmask16 mask, __m512 table, const float* const* x_even,
                   const float* const* x_odd, int64_t at, __m512 (*acc)[R], int c) {
  const __m512i b = _mm512_cvtepu8_epi32(
      Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))
           : _mm_maskz_loadu_epi8(mask, codes));
  const __m512 lo = _mm512_permutexvar_ps(b, table);
  const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  for (int r = 0; r < R; ++r) {
    const float* even = x_even[r] + at;
    const float* odd = x_odd[r] + at;
    const __m512 xe = Full ? _mm512_loadu_ps(even) : _mm512_maskz_loadu_ps(mask, even);
    const __m512 xo = Full ? _mm512_loadu_ps(odd) : _mm512_maskz_loadu_ps(mask, odd);
    acc[c][r] = _mm512_fmadd_ps(lo, xe, acc[c][r]);
    acc[c + 1][r] = _mm512_fmadd_ps(hi, xo, acc[c + 1][r]);
  }
}

// One 16-byte chunk of 8-bit codes (16 weights) into the chain acc[c].
template <int R, bool Full>
inline void chunk8(const uint8_t* codes, __mmask16 mask, __m512i zero, const float* const* x,
                   int64_t at, __m512 (*acc)[R], int c) {
  const __m512 w = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(
      Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))
           : _mm_maskz_loadu_epi8(mask, codes)), zero));
  for (int r = 0; r < R; ++r)
    acc[c][r] = _mm512_fmadd_ps(
        w, Full ? _mm512_loadu_ps(x[r] + at) : _mm512_maskz_loadu_ps(mask, x[r] + at), acc[c][r]);
}
#endif

// y[r, n] for R rows of x: x_even[r] (and x_odd[r], 4 bits) point at row r's columns.
template <int R>
void gemv_row(const Packed& p, int64_t n, const float* const* x_even, const float* const* x_odd,
              float* totals) {
  const uint8_t* row = p.q + n * p.bytes;
  const int64_t step = p.bits == 4 ? p.group_size / 2 : p.group_size;  // bytes per group
#ifdef GP_AVX512
  // independent FMA chains per row of x: enough to hide the FMA latency at small R
  constexpr int kChains = R <= 2 ? 4 : 2;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  const int64_t full = step / 16 * 16;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int zero_code = p.zero(n, g);
    const __m512i zero = _mm512_set1_epi32(zero_code);
    const __m512 table = _mm512_sub_ps(
        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_ps(float(zero_code)));
    const uint8_t* codes = row + g * step;
    const int64_t at = g * step;
    __m512 acc[kChains][R];
    for (int c = 0; c < kChains; ++c)
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
    int64_t j = 0;
    if (p.bits == 4) {
      for (; j + 16 * (kChains / 2) <= full; j += 16 * (kChains / 2))
        for (int u = 0; u < kChains / 2; ++u)
          chunk4<R, true>(codes + j + 16 * u, 0, table, x_even, x_odd, at + j + 16 * u, acc,
                          2 * u);
      for (; j < full; j += 16) chunk4<R, true>(codes + j, 0, table, x_even, x_odd, at + j, acc, 0);
      if (j < step)
        chunk4<R, false>(codes + j, chunk_mask(step - j), table, x_even, x_odd, at + j, acc, 0);
    } else {
      for (; j + 16 * kChains <= full; j += 16 * kChains)
        for (int u = 0; u < kChains; ++u)
          chunk8<R, true>(codes + j + 16 * u, 0, zero, x_even, at + j + 16 * u, acc, u);
      for (; j < full; j += 16) chunk8<R, true>(codes + j, 0, zero, x_even, at + j, acc, 0);
      if (j < step) chunk8<R, false>(codes + j, chunk_mask(step - j), zero, x_even, at + j, acc, 0);
    }
    const __m512 scale = _mm512_set1_ps(p.s[n * p.groups + g]);
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[0][r];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c][r]);
      total[r] = _mm512_fmadd_ps(sum, scale, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) totals[r] = _mm512_reduce_add_ps(total[r]);
#else
  for (int r = 0; r < R; ++r) totals[r] = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int zero = p.zero(n, g);
    const uint8_t* codes = row + g * step;
    const int64_t at = g * step;
    const float scale = p.s[n * p.groups + g];
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      if (p.bits == 4) {
        #pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < step; ++j)
          sum += float(int(codes[j] & 15) - zero) * x_even[r][at + j] +
                 float(int(codes[j] >> 4) - zero) * x_odd[r][at + j];
      } else {
        #pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < step; ++j) sum += float(int(codes[j]) - zero) * x_even[r][at + j];
      }
      totals[r] += scale * sum;
    }
  }
#endif
}

using RowKernel = void (*)(const Packed&, int64_t, const float* const*, const float* const*,
                           float*);
constexpr RowKernel kRowKernels[kRowsPerPass] = {
    gemv_row<1>, gemv_row<2>, gemv_row<3>, gemv_row<4>};

Packed packed(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
              int64_t bits, int64_t group_size, bool has_zeros) {
  return Packed{qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                has_zeros ? zeros.data_ptr<uint8_t>() : nullptr, qweight.size(1), scales.size(1),
                has_zeros ? zeros.size(1) : 0, bits, group_size};
}

// W[n0 + i, :] for i < rows as float32 into out (row stride k), codes in natural order.
void dequantize_rows(const Packed& p, int64_t n0, int64_t rows, int64_t k, float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = n0 + i;
      const uint8_t* row = p.q + n * p.bytes;
      float* w = out + i * k;
#ifdef GP_AVX512
      // whole 16-byte chunks (32 codes at 4 bits, 16 at 8) inside one group
      const int64_t codes_per_chunk = p.bits == 4 ? 32 : 16;
      if (p.group_size % codes_per_chunk == 0) {
        for (int64_t g = 0; g < p.groups; ++g) {
          const __m512i zero = _mm512_set1_epi32(p.zero(n, g));
          const __m512 scale = _mm512_set1_ps(p.s[n * p.groups + g]);
          for (int64_t c = g * p.group_size; c < (g + 1) * p.group_size; c += codes_per_chunk) {
            __m128i parts[2];
            const int count = unpack_chunk(row + c * p.bits / 8, p.bits, parts);
            for (int h = 0; h < count; ++h) {
              const __m512i u = _mm512_cvtepu8_epi32(parts[h]);
              _mm512_storeu_ps(w + c + 16 * h,
                               _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(u, zero)), scale));
            }
          }
        }
        continue;
      }
#endif
      for (int64_t c = 0; c < k; ++c) {
        const int64_t g = c / p.group_size;
        const int u = p.bits == 4 ? ((c & 1) ? row[c / 2] >> 4 : row[c / 2] & 15) : row[c];
        w[c] = float(u - p.zero(n, g)) * p.s[n * p.groups + g];
      }
    }
  });
}


#ifdef GP_AMX
// ---- AMX (bfloat16 tiles, float32 accumulation):
//   C^T[n, m] = sum_g s[n, g] * sum_{k in g} d[n, k] * x[m, k]
// d = u - z is exact in bfloat16 (|d| < 2 ** bits <= 256) and x = x1 + x2 + x3 exactly with
// bfloat16 parts, so every product d * x_p is exact; the tiles accumulate in float32.
constexpr int64_t kAmxRows = 256;  // rows of W whose d is held in bfloat16 at a time

bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0, 1: C (16 x 16 float32) of two blocks of 16 rows of x; 2: A (16 rows of W x 32 bfloat16
// of K); 3, 4: B of the two blocks (16 pairs of K x 16 rows of x, a bfloat16 pair each)
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

inline __m512 bf16_to_float(__m256bh h) { return _mm512_cvtpbh_ps(h); }

// what is left of x once its bfloat16 part is taken: x - part, and 0 where the part is infinite
// (an infinite x is then carried by its first part alone, as float32 would carry it, not
// turned into inf - inf = NaN)
inline __m512 residual(__m512 x, __m512 part) {
  const __mmask16 infinite = _mm512_fpclass_ps_mask(part, 0x18);  // +inf, -inf
  return _mm512_maskz_sub_ps(__mmask16(~infinite), x, part);
}

// x [M, K] as three bfloat16 parts in B's pair layout, 16 rows of x a block (a B tile is then
// 1 KiB in one piece): parts[m / 16][p][r][m % 16] = (x_p[m, 2r], x_p[m, 2r + 1]) as one uint32,
// rows m >= M zero.
void split_x(const float* x, int64_t m_rows, int64_t m_pad, int64_t k, uint32_t* parts) {
  const int64_t pairs = k / 2;
  std::fill(parts, parts + 3 * pairs * m_pad, 0u);
  const __m512i index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(16));
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t c = 0; c < k; c += 32) {  // 16 pairs at a time
      __m512 lo = _mm512_maskz_loadu_ps(chunk_mask(k - c), x + m * k + c);
      __m512 hi = _mm512_maskz_loadu_ps(chunk_mask(k - c - 16), x + m * k + c + 16);
      const __mmask16 pair_mask = chunk_mask((k - c) / 2);
      for (int p = 0; p < 3; ++p) {
        const __m256bh lo_h = _mm512_cvtneps_pbh(lo), hi_h = _mm512_cvtneps_pbh(hi);
        const __m512i both = _mm512_inserti64x4(
            _mm512_castsi256_si512((__m256i)lo_h), (__m256i)hi_h, 1);  // 16 pairs in order
        _mm512_mask_i32scatter_epi32(parts + ((m / 16 * 3 + p) * pairs + c / 2) * 16 + m % 16,
                                     pair_mask, index, both, 4);
        lo = residual(lo, bf16_to_float(lo_h));
        hi = residual(hi, bf16_to_float(hi_h));
      }
    }
  }
}

// d = u - z of W's rows [n0, n0 + rows) as bfloat16 [16 * ceil(rows / 16), K] with row stride
// ``stride`` (rows past the end zero), codes in natural order (group_size % 32 == 0).
void dequantize_codes_bf16(const Packed& p, int64_t n0, int64_t rows, int64_t padded, int64_t k,
                           int64_t stride, uint16_t* out) {
  const int64_t codes_per_chunk = p.bits == 4 ? 32 : 16;
  for (int64_t i = 0; i < padded; ++i) {
    uint16_t* w = out + i * stride;
    if (i >= rows) {
      std::fill(w, w + k, uint16_t(0));
      continue;
    }
    const int64_t n = n0 + i;
    const uint8_t* row = p.q + n * p.bytes;
    for (int64_t g = 0; g < p.groups; ++g) {
      const __m512i zero = _mm512_set1_epi32(p.zero(n, g));
      for (int64_t c = g * p.group_size; c < (g + 1) * p.group_size; c += codes_per_chunk) {
        __m128i parts[2];
        const int count = unpack_chunk(row + c * p.bits / 8, p.bits, parts);
        for (int h = 0; h < count; ++h) {
          const __m512 d =
              _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(parts[h]), zero));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + c + 16 * h),
                              (__m256i)_mm512_cvtneps_pbh(d));
        }
      }
    }
  }
}

// out_t [N, m_pad] = (x @ W^T)^T for the rows of x in parts (see split_x)
void amx_gemm(const Packed& p, const uint32_t* parts, int64_t m_pad, int64_t k, int64_t n_rows,
              float* out_t) {
  const int64_t pairs = k / 2;
  const int64_t blocks = (n_rows + kAmxRows - 1) / kAmxRows;
  // rows of d one cache line longer than K: an A tile's 16 rows then fall in different L1 sets
  const int64_t stride = k + 32;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<uint16_t> d(kAmxRows * stride);
    alignas(64) float c_tile[16 * 32];  // the C tiles of two blocks of x, side by side
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kAmxRows, rows = std::min(kAmxRows, n_rows - n0);
      const int64_t padded = (rows + 15) / 16 * 16;
      dequantize_codes_bf16(p, n0, rows, padded, k, stride, d.data());
      for (int64_t m0 = 0; m0 < m_pad; m0 += 32) {  // two 16-row blocks of x share each A tile
        const bool pair = m0 + 16 < m_pad;
        for (int64_t t = 0; t < padded; t += 16) {
          const int64_t live = std::min<int64_t>(16, n_rows - n0 - t);  // rows of W in the tile
          for (int64_t i = 0; i < live; ++i)
            std::fill(out_t + (n0 + t + i) * m_pad + m0,
                      out_t + (n0 + t + i) * m_pad + m0 + (pair ? 32 : 16), 0.f);
          for (int64_t g = 0; g < p.groups; ++g) {
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t kk = g * p.group_size; kk < (g + 1) * p.group_size; kk += 32) {
              _tile_loadd(2, d.data() + t * stride + kk, stride * 2);
              const uint32_t* b = parts + (m0 / 16 * 3 * pairs + kk / 2) * 16;
              for (int part = 0; part < 3; ++part) {
                _tile_loadd(3, b + part * pairs * 16, 64);
                _tile_dpbf16ps(0, 2, 3);
                if (pair) {
                  _tile_loadd(4, b + (3 + part) * pairs * 16, 64);
                  _tile_dpbf16ps(1, 2, 4);
                }
              }
            }
            _tile_stored(0, c_tile, 128);
            if (pair) _tile_stored(1, c_tile + 16, 128);
            for (int64_t i = 0; i < live; ++i) {
              const __m512 scale = _mm512_set1_ps(p.s[(n0 + t + i) * p.groups + g]);
              float* row = out_t + (n0 + t + i) * m_pad + m0;
              for (int h = 0; h < (pair ? 2 : 1); ++h)
                _mm512_storeu_ps(row + 16 * h,
                                 _mm512_fmadd_ps(_mm512_load_ps(c_tile + 32 * i + 16 * h), scale,
                                                 _mm512_loadu_ps(row + 16 * h)));
            }
          }
        }
      }
    }
    _tile_release();
  });
}
#endif

}  // namespace

// x: [M, K] float32 contiguous; returns [M, N] float32
at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, int64_t bits, int64_t group_size, bool has_zeros) {
  const int64_t m_rows = x.size(0), k = x.size(1), n_rows = qweight.size(0);
  const Packed p = packed(qweight, scales, zeros, bits, group_size, has_zeros);
  auto out = at::empty({m_rows, n_rows}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float> halves;
  const float* even_base = xp;
  const float* odd_base = xp;
  int64_t width = k;
  if (bits == 4) {  // even and odd columns of x, [M, K / 2] each
    width = k / 2;
    halves.resize(2 * m_rows * width);
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t j = 0; j < width; ++j) {
        halves[m * width + j] = xp[m * k + 2 * j];
        halves[(m_rows + m) * width + j] = xp[m * k + 2 * j + 1];
      }
    even_base = halves.data();
    odd_base = halves.data() + m_rows * width;
  }
  float* y = out.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    const float* even[kRowsPerPass];
    const float* odd[kRowsPerPass];
    float totals[kRowsPerPass];
    for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsPerPass) {
      const int64_t rows = std::min(kRowsPerPass, m_rows - m0);
      for (int64_t r = 0; r < rows; ++r) {
        even[r] = even_base + (m0 + r) * width;
        odd[r] = odd_base + (m0 + r) * width;
      }
      const RowKernel kernel = kRowKernels[rows - 1];
      for (int64_t n = begin; n < end; ++n) {
        kernel(p, n, even, odd, totals);
        for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * n_rows + n] = totals[r];
      }
    }
  });
  return out;
}

// x: [M, K] float32 contiguous; returns [M, N] float32
at::Tensor dequant_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t bits, int64_t group_size, bool has_zeros,
                        int64_t rows_per_block) {
  const int64_t m_rows = x.size(0), k = x.size(1), n_rows = qweight.size(0);
  const Packed p = packed(qweight, scales, zeros, bits, group_size, has_zeros);
  auto out = at::empty({m_rows, n_rows}, x.options());
  const int64_t block = std::max<int64_t>(1, std::min(rows_per_block, n_rows));
  auto weights = at::empty({block, k}, x.options());
  for (int64_t n0 = 0; n0 < n_rows; n0 += block) {
    const int64_t rows = std::min(block, n_rows - n0);
    auto w = weights.narrow(0, 0, rows);
    dequantize_rows(p, n0, rows, k, w.data_ptr<float>());
    auto slice = out.narrow(1, n0, rows);
    at::mm_out(slice, x, w.t());
  }
  return out;
}

// x: [M, K] float32 contiguous; returns [M, N] float32, or an empty tensor when AMX is not
// there (not compiled in, the OS refuses the tile state, or a group size AMX does not tile)
at::Tensor amx_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size, bool has_zeros) {
#ifdef GP_AMX
  const int64_t m_rows = x.size(0), k = x.size(1), n_rows = qweight.size(0);
  if (group_size % (bits == 4 ? 32 : 16) != 0 || group_size % 32 != 0 || !amx_permitted())
    return at::empty({0}, x.options());
  const Packed p = packed(qweight, scales, zeros, bits, group_size, has_zeros);
  const int64_t m_pad = (m_rows + 15) / 16 * 16;
  std::vector<uint32_t> parts(3 * (k / 2) * m_pad);
  split_x(x.data_ptr<float>(), m_rows, m_pad, k, parts.data());
  auto out_t = at::empty({n_rows, m_pad}, x.options());
  amx_gemm(p, parts.data(), m_pad, k, n_rows, out_t.data_ptr<float>());
  return out_t.narrow(1, 0, m_rows).t().contiguous();
#else
  return at::empty({0}, x.options());
#endif
}

// W as float32 [N, K] (the dequantized weight; for tests and the reference)
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                      int64_t bits, int64_t group_size, bool has_zeros) {
  const int64_t n_rows = qweight.size(0), k = qweight.size(1) * 8 / bits;
  const Packed p = packed(qweight, scales, zeros, bits, group_size, has_zeros);
  auto out = at::empty({n_rows, k}, scales.options());
  dequantize_rows(p, 0, n_rows, k, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY(GP_LIBRARY, m) {
  m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "bool has_zeros) -> Tensor", &gemv);
  m.def("dequant_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
        "int group_size, bool has_zeros, int rows_per_block) -> Tensor", &dequant_gemm);
  m.def("amx_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
        "int group_size, bool has_zeros) -> Tensor", &amx_matmul);
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "bool has_zeros) -> Tensor", &dequantize);
}
"""

_ROWS_PER_BLOCK = 256  # rows of W dequantized per GEMM call: 256 x 4096 float32 = 4 MiB


_LIBRARY = "graphpress_cpu_kernels_v2"


@functools.cache
def build(name: str = _LIBRARY, extra_cflags: tuple[str, ...] = ()) -> Any:
    """The kernels' op namespace ``torch.ops.<name>`` (built with ``-O3 -march=native`` and
    ``extra_cflags``), or None when they cannot be built. Another ``name`` with other flags
    builds another copy (the tests build the portable loops with ``-mno-avx512f``)."""
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-march=native", "-fopenmp-simd", f"-DGP_LIBRARY={name}", *extra_cflags]
    try:
        load_inline(name, cpp_sources=[_SOURCE], is_python_module=False, extra_cflags=flags,
                    verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: torch's path instead
        warnings.warn(f"graphpress: the CPU dequant-matmul kernels could not be built "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "using the slower torch implementation", RuntimeWarning, stacklevel=3)
        return None
    return getattr(torch.ops, name)


def _load() -> Any:
    if os.environ.get("GRAPHPRESS_CPU_KERNELS", "1") == "0":
        return None
    return build()


def kernel_available() -> bool:
    """Whether the CPU kernels are built (builds them on the first call)."""
    return _load() is not None


def _operands(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    empty = torch.empty(0, dtype=torch.uint8)
    return (qweight.contiguous(), scales.to(torch.float32).contiguous(),
            empty if zeros is None else zeros.contiguous())


def fused_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int, *,
               kernels: Any = None) -> torch.Tensor | None:
    """``x @ W^T`` (float32 ``x`` [M, K]) by the fused kernel, or None when it is not built or
    does not cover the layout (4 bits with an odd group size). ``kernels``: a namespace of
    :func:`build` (default: the library the op uses)."""
    kernels = kernels or _load()
    if kernels is None or (bits == 4 and group_size % 2):
        return None
    return kernels.gemv(x.contiguous(), *_operands(qweight, scales, zeros), bits, group_size,
                        zeros is not None)


def dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 rows_per_block: int = _ROWS_PER_BLOCK, *, kernels: Any = None
                 ) -> torch.Tensor | None:
    """``x @ W^T`` (float32 ``x`` [M, K]) by blocks of dequantized rows and ATen's GEMM, or None
    when the kernels are not built. Every layout (odd group sizes too)."""
    kernels = kernels or _load()
    if kernels is None:
        return None
    return kernels.dequant_gemm(x.contiguous(), *_operands(qweight, scales, zeros), bits,
                                group_size, zeros is not None, rows_per_block)


def amx_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int, *,
               kernels: Any = None) -> torch.Tensor | None:
    """``x @ W^T`` (float32 ``x`` [M, K]) on AMX bfloat16 tiles with exact products (W's
    ``u - z`` and three bfloat16 parts of x), or None where AMX is not there or the group size
    is not a multiple of 32."""
    kernels = kernels or _load()
    if kernels is None:
        return None
    out = kernels.amx_matmul(x.contiguous(), *_operands(qweight, scales, zeros), bits,
                             group_size, zeros is not None)
    return out if out.dim() == 2 else None


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group_size: int, *, kernels: Any = None) -> torch.Tensor | None:
    """The float32 weight ``[N, K]`` by the C++ dequantizer, or None when it is not built."""
    kernels = kernels or _load()
    if kernels is None:
        return None
    return kernels.dequantize(*_operands(qweight, scales, zeros), bits, group_size,
                              zeros is not None)
