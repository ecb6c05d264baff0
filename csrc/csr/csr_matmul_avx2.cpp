// AVX2 CSR kernels: the fallback for CPUs without AVX-512 (same structure, 8 lanes).
#include <immintrin.h>

#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

inline __m256i tail_mask8(int64_t count) {  // count in [1, 8]: lanes < count all-ones
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int V>
inline void row_tile(const int32_t* cols, const float* vals, int64_t len, const float* x,
                     int64_t ld, float b, float* out, __m256i last) {
  __m256 a0[V], a1[V];
  for (int i = 0; i < V; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  const __m256i full = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 2 <= len; j += 2) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ld;
    const float* x1 = x + static_cast<int64_t>(cols[j + 1]) * ld;
    const __m256 v0 = _mm256_set1_ps(vals[j]), v1 = _mm256_set1_ps(vals[j + 1]);
    for (int i = 0; i < V; ++i) {
      const __m256i m = i == V - 1 ? last : full;
      a0[i] = _mm256_fmadd_ps(v0, _mm256_maskload_ps(x0 + 8 * i, m), a0[i]);
      a1[i] = _mm256_fmadd_ps(v1, _mm256_maskload_ps(x1 + 8 * i, m), a1[i]);
    }
  }
  if (j < len) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ld;
    const __m256 v0 = _mm256_set1_ps(vals[j]);
    for (int i = 0; i < V; ++i) {
      const __m256i m = i == V - 1 ? last : full;
      a0[i] = _mm256_fmadd_ps(v0, _mm256_maskload_ps(x0 + 8 * i, m), a0[i]);
    }
  }
  const __m256 bias = _mm256_set1_ps(b);
  for (int i = 0; i < V; ++i) {
    const __m256 r = _mm256_add_ps(_mm256_add_ps(a0[i], a1[i]), bias);
    _mm256_maskstore_ps(out + 8 * i, i == V - 1 ? last : full, r);
  }
}

}  // namespace

void csr_rows_tile_avx2(const CsrMatrix& w, const DenseIn& x, const float* bias,
                        const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t P = x.cols;
  for (int64_t p0 = 0; p0 < P; p0 += 32) {
    const int64_t rem = P - p0;
    const int nv = rem >= 32 ? 4 : static_cast<int>((rem + 7) / 8);
    const __m256i last = tail_mask8(rem - 8 * (nv - 1));
    const float* xt = x.data + p0;
    for (int64_t n = row_begin; n < row_end; ++n) {
      const int64_t begin = w.row_offsets[n], len = w.row_offsets[n + 1] - begin;
      const int32_t* cols = w.col_indices + begin;
      const float* vals = w.values + begin;
      const float b = bias ? bias[n] : 0.f;
      float* out = y.data + (n - row_begin) * y.stride_n + p0;
      switch (nv) {
        case 4: row_tile<4>(cols, vals, len, xt, x.stride_k, b, out, last); break;
        case 3: row_tile<3>(cols, vals, len, xt, x.stride_k, b, out, last); break;
        case 2: row_tile<2>(cols, vals, len, xt, x.stride_k, b, out, last); break;
        default: row_tile<1>(cols, vals, len, xt, x.stride_k, b, out, last); break;
      }
    }
  }
}

void csr_rows_gather_avx2(const CsrMatrix& w, const DenseIn& x, const float* bias,
                          const DenseOut& y, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int64_t begin = w.row_offsets[n], len = w.row_offsets[n + 1] - begin;
    const int32_t* cols = w.col_indices + begin;
    const float* vals = w.values + begin;
    const float b = bias ? bias[n] : 0.f;
    for (int64_t p = 0; p < x.cols; ++p) {
      const float* xr = x.data + p * x.stride_p;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= len; j += 16) {
        const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j));
        const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j + 8));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), _mm256_i32gather_ps(xr, i0, 4), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j + 8), _mm256_i32gather_ps(xr, i1, 4), a1);
      }
      for (; j < len; j += 8) {
        const __m256i m = tail_mask8(len - j);
        const __m256i i0 = _mm256_maskload_epi32(cols + j, m);
        const __m256 xv =
            _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xr, i0, _mm256_castsi256_ps(m), 4);
        a0 = _mm256_fmadd_ps(_mm256_maskload_ps(vals + j, m), xv, a0);
      }
      y.data[(n - row_begin) * y.stride_n + p * y.stride_p] = hsum(_mm256_add_ps(a0, a1)) + b;
    }
  }
}

}  // namespace pyhwp
