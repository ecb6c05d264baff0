// AVX2 CSR kernels: the fallback for CPUs without AVX-512 (same structure, 8 lanes).
#include <immintrin.h>

#include "common/simd_avx2.h"

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

template <typename I, typename T>
void gather(CsrArrays<I, T> a, const int64_t* begin, int64_t rows, const float* x, int64_t ldx,
            int64_t P, const float* bias, float* y, int64_t ldy_n, int64_t ldy_p) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = begin[i], len = begin[i + 1] - b;
    const I* cols = a.cols + b;
    const T* vals = a.vals + b;
    for (int64_t p = 0; p < P; ++p) {
      const float* xr = x + p * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= len; j += 16) {
        // W's streams, 16 values (one line of float32) ahead by kPrefetchBytes: from DRAM at batch
        // 1 (AVX2 kernels on this AVX-512 machine) 11008x4096 70% 1.41-1.46x -> 1.93-2.06x dense,
        // 4096x4096 90% 3.41-3.55x -> 4.45-4.55x.
        _mm_prefetch(reinterpret_cast<const char*>(cols + j) + CsrCpuConfig::kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vals + j) + CsrCpuConfig::kPrefetchBytes, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(vals + j), _mm256_i32gather_ps(xr, load_idx8(cols + j), 4), a0);
        a1 = _mm256_fmadd_ps(load8(vals + j + 8), _mm256_i32gather_ps(xr, load_idx8(cols + j + 8), 4), a1);
      }
      float tail = 0.f;  // the last < 16 terms, in order
      for (; j < len; ++j) tail += to_float(vals[j]) * xr[cols[j]];
      y[i * ldy_n + p * ldy_p] = hsum(_mm256_add_ps(a0, a1)) + tail + (bias ? bias[i] : 0.f);
    }
  }
}

// One row times a tile of V*8 columns (last vector masked); two accumulator sets.
template <int V, typename I, typename T>
inline void row_tile(const I* cols, const T* vals, int64_t len, const float* x, int64_t ldx,
                     const float* init, float* out, __m256i last) {
  __m256 a0[V], a1[V];
  const __m256i full = _mm256_set1_epi32(-1);
  for (int i = 0; i < V; ++i) {
    a0[i] = _mm256_maskload_ps(init + 8 * i, i == V - 1 ? last : full);
    a1[i] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= len; j += 2) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ldx;
    const float* x1 = x + static_cast<int64_t>(cols[j + 1]) * ldx;
    const __m256 v0 = _mm256_set1_ps(to_float(vals[j])), v1 = _mm256_set1_ps(to_float(vals[j + 1]));
    for (int i = 0; i < V; ++i) {
      const __m256i m = i == V - 1 ? last : full;
      a0[i] = _mm256_fmadd_ps(v0, _mm256_maskload_ps(x0 + 8 * i, m), a0[i]);
      a1[i] = _mm256_fmadd_ps(v1, _mm256_maskload_ps(x1 + 8 * i, m), a1[i]);
    }
  }
  if (j < len) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ldx;
    const __m256 v0 = _mm256_set1_ps(to_float(vals[j]));
    for (int i = 0; i < V; ++i) {
      a0[i] = _mm256_fmadd_ps(v0, _mm256_maskload_ps(x0 + 8 * i, i == V - 1 ? last : full), a0[i]);
    }
  }
  for (int i = 0; i < V; ++i) {
    _mm256_maskstore_ps(out + 8 * i, i == V - 1 ? last : full, _mm256_add_ps(a0[i], a1[i]));
  }
}

template <typename I, typename T>
void tile(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
          const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate, float* y,
          int64_t ldy) {
  alignas(32) float init[32];
  for (int64_t p0 = 0; p0 < P; p0 += 32) {
    const int64_t rem = P - p0;
    const int nv = rem >= 32 ? 4 : static_cast<int>((rem + 7) / 8);
    const __m256i last = tail_mask8(rem - 8 * (nv - 1));
    for (int64_t i = 0; i < rows; ++i) {
      float* out = y + i * ldy + p0;
      const float* src = out;
      if (!accumulate) {
        for (float& v : init) v = bias ? bias[i] : 0.f;
        src = init;
      }
      const I* cols = a.cols + begin[i];
      const T* vals = a.vals + begin[i];
      const int64_t len = end[i] - begin[i];
      switch (nv) {
        case 4: row_tile<4>(cols, vals, len, x + p0, ldx, src, out, last); break;
        case 3: row_tile<3>(cols, vals, len, x + p0, ldx, src, out, last); break;
        case 2: row_tile<2>(cols, vals, len, x + p0, ldx, src, out, last); break;
        default: row_tile<1>(cols, vals, len, x + p0, ldx, src, out, last); break;
      }
    }
  }
}

}  // namespace

template <typename I, typename T>
CsrKernels<I, T> csr_kernels_avx2() {
  return {&gather<I, T>, &tile<I, T>};
}
template CsrKernels<int32_t, float> csr_kernels_avx2();
template CsrKernels<uint16_t, float> csr_kernels_avx2();
template CsrKernels<int32_t, uint16_t> csr_kernels_avx2();
template CsrKernels<uint16_t, uint16_t> csr_kernels_avx2();

}  // namespace pyhwp
