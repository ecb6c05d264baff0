// AVX2 CSR kernels: the fallback for CPUs without AVX-512 (same structure, 8 lanes).
#include <immintrin.h>

#include <cmath>

#include "common/cpu_features.h"
#include "common/simd_avx2.h"
#include "common/vector_count.h"

#include "csr/csr_kernels_inl.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

using avx2::hsum;
using avx2::tail_mask8;

using avx2::load8;

// 8 indices widened to int32 lanes.
inline __m256i load_idx8(const int32_t* c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)); }
inline __m256i load_idx8(const uint16_t* c) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}

// x[c[0..3]], one scalar load each, merged by vinsertps (which takes the load as its operand);
// with the indices a 64-bit word at a time (load_cols), each term costs one load of x and a
// quarter or half of an index load.
inline __m128 four(const float* x, const uint64_t* c) {
  __m128 r = _mm_load_ss(x + c[0]);
  r = _mm_insert_ps(r, _mm_load_ss(x + c[1]), 0x10);
  r = _mm_insert_ps(r, _mm_load_ss(x + c[2]), 0x20);
  return _mm_insert_ps(r, _mm_load_ss(x + c[3]), 0x30);
}
// x[c[0..7]]: two xmm halves of four.
inline __m256 eight(const float* x, const uint64_t* c) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(four(x, c)), four(x, c + 4), 1);
}

// One row (len terms at cols, vals) against NP columns of x (ldx apart) by scalar loads, 32 terms
// per step in four chains a column, the last ones (< 8) in order in a scalar chain: out[q] is
// column q's sum. The columns share the index split and the values' loads, which at NP = 1 are
// about half of a term's instructions; each column's arithmetic is the same at any NP.
// Always inlined: as a call per row (gcc's choice) batch 1 ran 1.1x slower.
template <int NP, typename I, typename T>
__attribute__((always_inline)) inline void scalar_row(const I* cols, const T* vals, int64_t len, const float* x,
                                                      int64_t ldx, float (&out)[NP]) {
  __m256 acc[NP][4];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[q][u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= len; j += 32) {
    prefetch_ahead<32>(cols + j);
    prefetch_ahead<32>(vals + j);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      uint64_t c[8];
      load_cols<8>(cols + j + 8 * u, c);
      const __m256 v = load8(vals + j + 8 * u);
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) acc[q][u] = _mm256_fmadd_ps(v, eight(x + q * ldx, c), acc[q][u]);
    }
  }
  for (; j + 8 <= len; j += 8) {
    uint64_t c[8];
    load_cols<8>(cols + j, c);
    const __m256 v = load8(vals + j);
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) acc[q][0] = _mm256_fmadd_ps(v, eight(x + q * ldx, c), acc[q][0]);
  }
  float tail[NP] = {};
  // fused, whatever gcc contracts: the int32 and uint16 index variants must round alike
  for (; j < len; ++j) {
    const float v = to_float(vals[j]);
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) tail[q] = std::fma(v, x[q * ldx + cols[j]], tail[q]);
  }
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[q][0], acc[q][2]), _mm256_add_ps(acc[q][1], acc[q][3]));
    out[q] = hsum(s) + tail[q];
  }
}

// Gather kernel. kScalarLoads: x's terms come from scalar loads (scalar_row) instead of the
// hardware gather, two columns at a time. Where gathers are slow (on a Zen 4, 1 thread, batch
// 1: 1536x384 90% / 70%, 768x3072 90%, 3072x768 90% 1.5-1.7x faster than with VGATHERDPS;
// NOTES.md, stop 27) the AVX-512 kernel set uses it too.
template <bool kScalarLoads, typename I, typename T>
void gather(CsrArrays<I, T> a, const int64_t* begin, int64_t rows, const float* x, int64_t ldx,
            int64_t P, const float* bias, float* y, int64_t ldy_n, int64_t ldy_p) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = begin[i], len = begin[i + 1] - b;
    const I* cols = a.cols + b;
    const T* vals = a.vals + b;
    const float bi = bias ? bias[i] : 0.f;
    if constexpr (kScalarLoads) {
      int64_t p = 0;
      for (; p + 2 <= P; p += 2) {
        float s[2];
        scalar_row<2>(cols, vals, len, x + p * ldx, ldx, s);
        y[i * ldy_n + p * ldy_p] = s[0] + bi;
        y[i * ldy_n + (p + 1) * ldy_p] = s[1] + bi;
      }
      if (p < P) {
        float s[1];
        scalar_row<1>(cols, vals, len, x + p * ldx, ldx, s);
        y[i * ldy_n + p * ldy_p] = s[0] + bi;
      }
    } else {
      for (int64_t p = 0; p < P; ++p) {
        const float* xr = x + p * ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
          prefetch_ahead<16>(cols + j);
          prefetch_ahead<16>(vals + j);
          a0 = _mm256_fmadd_ps(load8(vals + j), _mm256_i32gather_ps(xr, load_idx8(cols + j), 4), a0);
          a1 = _mm256_fmadd_ps(load8(vals + j + 8), _mm256_i32gather_ps(xr, load_idx8(cols + j + 8), 4), a1);
        }
        float tail = 0.f;  // the last terms (< 16), in order
        // fused, whatever gcc contracts: the int32 and uint16 index variants must round alike
        for (; j < len; ++j) tail = std::fma(to_float(vals[j]), xr[cols[j]], tail);
        y[i * ldy_n + p * ldy_p] = hsum(_mm256_add_ps(a0, a1)) + tail + bi;
      }
    }
  }
}

// One row times a tile of V*8 columns of X (the last vector masked by `last` when Masked). U
// independent accumulator sets keep U*V >= 8 FMA chains in flight (2 FMA ports x 4 cycles), and
// whole vectors are plain loads that fold into the FMAs (vmaskmovps is two uops and cannot).
// The accumulators start from `out` when accumulating, else from `bias` in every lane.
template <int V, bool Masked, typename I, typename T>
inline void row_tile(const I* cols, const T* vals, int64_t len, const float* x, int64_t ldx,
                     bool accumulate, __m256 bias, float* out, __m256i last) {
  constexpr int U = V >= 5 ? 1 : (V >= 3 ? 2 : 8 / (V * 2));
  auto load = [&](const float* p, int i) {
    return Masked && i == V - 1 ? _mm256_maskload_ps(p, last) : _mm256_loadu_ps(p);
  };
  __m256 acc[U][V];
#pragma GCC unroll 8
  for (int i = 0; i < V; ++i) acc[0][i] = accumulate ? load(out + 8 * i, i) : bias;
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) acc[u][i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + U <= len; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const float* xr = x + static_cast<int64_t>(cols[j + u]) * ldx;
      const __m256 v = _mm256_set1_ps(to_float(vals[j + u]));
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) acc[u][i] = _mm256_fmadd_ps(v, load(xr + 8 * i, i), acc[u][i]);
    }
  }
  for (; j < len; ++j) {
    const float* xr = x + static_cast<int64_t>(cols[j]) * ldx;
    const __m256 v = _mm256_set1_ps(to_float(vals[j]));
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) acc[0][i] = _mm256_fmadd_ps(v, load(xr + 8 * i, i), acc[0][i]);
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) acc[0][i] = _mm256_add_ps(acc[0][i], acc[u][i]);
#pragma GCC unroll 8
  for (int i = 0; i < V; ++i) {
    if (Masked && i == V - 1) {
      _mm256_maskstore_ps(out + 8 * i, last, acc[0][i]);
    } else {
      _mm256_storeu_ps(out + 8 * i, acc[0][i]);
    }
  }
}

// Rows times `width` (<= 64) columns of X starting at x, into y.
template <int V, bool Masked, typename I, typename T>
void tile_v(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows, const float* x,
            int64_t ldx, const float* bias, bool accumulate, float* y, int64_t ldy, __m256i last) {
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 b = _mm256_set1_ps(bias && !accumulate ? bias[i] : 0.f);
    row_tile<V, Masked>(a.cols + begin[i], a.vals + begin[i], end[i] - begin[i], x, ldx, accumulate, b, y + i * ldy,
                        last);
  }
}

// 64 columns (8 ymm) per pass over the rows: W is read once per 64 columns of X.
template <typename I, typename T>
void tile(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
          const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate, bool /*stream_w*/, float* y,
          int64_t ldy) {
  for (int64_t p0 = 0; p0 < P; p0 += 64) {
    const int64_t rem = P - p0;
    const int nv = rem >= 64 ? 8 : static_cast<int>((rem + 7) / 8);
    const int64_t tail = rem - 8 * (nv - 1);
    const __m256i last = tail_mask8(tail);
    auto run = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      if (tail >= 8) {
        tile_v<V, false>(a, begin, end, rows, x + p0, ldx, bias, accumulate, y + p0, ldy, last);
      } else {
        tile_v<V, true>(a, begin, end, rows, x + p0, ldx, bias, accumulate, y + p0, ldy, last);
      }
    };
    with_vectors<8>(nv, run);
  }
}

}  // namespace

template <typename I, typename T>
CsrKernels<I, T> csr_kernels_avx2() {
  return {slow_gathers() ? &gather<true, I, T> : &gather<false, I, T>, &tile<I, T>};
}
template CsrKernels<int32_t, float> csr_kernels_avx2();
template CsrKernels<uint16_t, float> csr_kernels_avx2();
template CsrKernels<int32_t, uint16_t> csr_kernels_avx2();
template CsrKernels<uint16_t, uint16_t> csr_kernels_avx2();

}  // namespace pyhwp
