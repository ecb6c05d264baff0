// AVX-512 CSR kernels: gather for small batches, register tiles of 64 columns for large ones.
#include <immintrin.h>

#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

inline __mmask16 tail_mask(int64_t count) {  // count in [1, 16]
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// One row of W times a tile of V*16 columns of X (the last vector masked by `last`).
// Two accumulator sets hide the FMA latency.
template <int V>
inline void row_tile(const int32_t* cols, const float* vals, int64_t len, const float* x,
                     int64_t ld, float b, float* out, __mmask16 last) {
  __m512 a0[V], a1[V];
  for (int i = 0; i < V; ++i) {
    a0[i] = _mm512_setzero_ps();
    a1[i] = _mm512_setzero_ps();
  }
  const __mmask16 full = 0xFFFF;
  int64_t j = 0;
  for (; j + 2 <= len; j += 2) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ld;
    const float* x1 = x + static_cast<int64_t>(cols[j + 1]) * ld;
    const __m512 v0 = _mm512_set1_ps(vals[j]), v1 = _mm512_set1_ps(vals[j + 1]);
    for (int i = 0; i < V; ++i) {
      const __mmask16 m = i == V - 1 ? last : full;
      a0[i] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(m, x0 + 16 * i), a0[i]);
      a1[i] = _mm512_fmadd_ps(v1, _mm512_maskz_loadu_ps(m, x1 + 16 * i), a1[i]);
    }
  }
  if (j < len) {
    const float* x0 = x + static_cast<int64_t>(cols[j]) * ld;
    const __m512 v0 = _mm512_set1_ps(vals[j]);
    for (int i = 0; i < V; ++i) {
      const __mmask16 m = i == V - 1 ? last : full;
      a0[i] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(m, x0 + 16 * i), a0[i]);
    }
  }
  const __m512 bias = _mm512_set1_ps(b);
  for (int i = 0; i < V; ++i) {
    const __m512 r = _mm512_add_ps(_mm512_add_ps(a0[i], a1[i]), bias);
    _mm512_mask_storeu_ps(out + 16 * i, i == V - 1 ? last : full, r);
  }
}

}  // namespace

void csr_rows_tile_avx512(const CsrMatrix& w, const DenseIn& x, const float* bias,
                          const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t P = x.cols;
  for (int64_t p0 = 0; p0 < P; p0 += 64) {
    const int64_t rem = P - p0;
    const int nv = rem >= 64 ? 4 : static_cast<int>((rem + 15) / 16);
    const __mmask16 last = tail_mask(rem - 16 * (nv - 1));
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

void csr_rows_gather_avx512(const CsrMatrix& w, const DenseIn& x, const float* bias,
                            const DenseOut& y, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int64_t begin = w.row_offsets[n], len = w.row_offsets[n + 1] - begin;
    const int32_t* cols = w.col_indices + begin;
    const float* vals = w.values + begin;
    const float b = bias ? bias[n] : 0.f;
    for (int64_t p = 0; p < x.cols; ++p) {
      const float* xr = x.data + p * x.stride_p;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= len; j += 32) {
        const __m512i i0 = _mm512_loadu_si512(cols + j);
        const __m512i i1 = _mm512_loadu_si512(cols + j + 16);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j), _mm512_i32gather_ps(i0, xr, 4), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j + 16), _mm512_i32gather_ps(i1, xr, 4), a1);
      }
      for (; j < len; j += 16) {
        const __mmask16 m = tail_mask(len - j);
        const __m512i i0 = _mm512_maskz_loadu_epi32(m, cols + j);
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, xr, 4);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, vals + j), xv, a0);
      }
      y.data[(n - row_begin) * y.stride_n + p * y.stride_p] =
          _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + b;
    }
  }
}

}  // namespace pyhwp
