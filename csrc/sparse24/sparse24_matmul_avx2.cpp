// AVX2 2:4 kernels: the fallback for CPUs without AVX-512 (same structure, 8 lanes).
#include <immintrin.h>

#include "common/simd_avx2.h"
#include "common/vector_count.h"

#include <algorithm>
#include <type_traits>

#include "common/bf16.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

namespace {

using Cfg = Sparse24CpuConfig;

using avx2::hsum;
using avx2::tail_mask8;

using avx2::load8;

// Selects the x of 8 slots (half h of a metadata word: 4 groups, 16 inputs [xlo | xhi]): lanes
// 0-3 come from xlo and lanes 4-7 from xhi, so two in-register permutes and a blend.
struct HalfSelect {
  const __m256i shifts[2] = {_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                             _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)};
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  __m256i indices(uint32_t m, int h) const {
    const __m256i s = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(m)), shifts[h]);
    return _mm256_or_si256(_mm256_and_si256(s, three), base);
  }
  static __m256 select(__m256 xlo, __m256 xhi, __m256i idx) {
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo, idx), _mm256_permutevar8x32_ps(xhi, idx), 0xF0);
  }
};

template <int R, int PB, typename T>
inline void permute_block(const T* vals, const uint32_t* meta, int64_t words, const float* x,
                          int64_t ldx, float* out, int64_t out_stride_n, int64_t out_stride_p,
                          const float* bias) {
  const HalfSelect sel;
  __m256 acc[R][PB];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < PB; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int64_t c = 0; c < words; ++c) {
    for (int h = 0; h < 2; ++h) {
      __m256 xlo[PB], xhi[PB];
      for (int q = 0; q < PB; ++q) {
        xlo[q] = _mm256_loadu_ps(x + q * ldx + 32 * c + 16 * h);
        xhi[q] = _mm256_loadu_ps(x + q * ldx + 32 * c + 16 * h + 8);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i idx = sel.indices(meta[r * words + c], h);
        const __m256 v = load8(vals + r * words * 16 + 16 * c + 8 * h);
        for (int q = 0; q < PB; ++q) {
          acc[r][q] = _mm256_fmadd_ps(v, HalfSelect::select(xlo[q], xhi[q], idx), acc[r][q]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[r] : 0.f;
    for (int q = 0; q < PB; ++q) out[r * out_stride_n + q * out_stride_p] = hsum(acc[r][q]) + b;
  }
}

template <int PB, typename T>
inline void permute_columns(const Sparse24MatrixT<T>& w, int64_t words, const DenseIn& x, int64_t p,
                            const float* bias, const DenseOut& y, int64_t row_begin,
                            int64_t row_end) {
  constexpr int R = PB >= 4 ? 2 : 4;
  const float* xp = x.data + p * x.stride_p;
  auto rows = [&](auto r_tag, int64_t n) {
    constexpr int RR = decltype(r_tag)::value;
    permute_block<RR, PB>(w.values + n * words * 16, w.meta + n * words, words, xp, x.stride_p,
                          y.data + (n - row_begin) * y.stride_n + p * y.stride_p, y.stride_n,
                          y.stride_p, bias ? bias + n : nullptr);
  };
  int64_t n = row_begin;
  for (; n + R <= row_end; n += R) rows(std::integral_constant<int, R>{}, n);
  for (; n < row_end; ++n) rows(std::integral_constant<int, 1>{}, n);
}

// One K block [k0, k1) of rows [n, n+R) against V*8 columns of X (its rows where `xr` says: a
// packed panel or a conv's windows); the last vector is masked by `last` when Masked. acc starts
// from bias (first block) or the partial sums already in `out`. Unmasked vectors are plain loads:
// vmaskmovps is two uops and cannot feed the FMA as its memory operand, and with it on every
// vector the batch-128 kernel issued three uops per FMA.
template <int R, int V, bool Masked, typename T, typename Rows>
inline void tile_block(const T* vals, const uint32_t* meta, int64_t words, int64_t K,
                       int64_t k0, int64_t k1, const Rows& xr, const float* bias,
                       float* out, int64_t out_stride, __m256i last) {
  auto load = [&](const float* p, int i) {
    return Masked && i == V - 1 ? _mm256_maskload_ps(p, last) : _mm256_loadu_ps(p);
  };
  // Every loop over r and i fully unrolled, so that acc lives in registers (without the pragmas
  // gcc kept half of it on the stack: 48 of 96 FMAs read and wrote acc through memory).
  __m256 acc[R][V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) {
      acc[r][i] = k0 == 0 ? _mm256_set1_ps(bias ? bias[r] : 0.f) : load(out + r * out_stride + 8 * i, i);
    }
  }
  const int64_t c_end = (k1 + 31) / 32;
  const int64_t c_whole = K / 32 < c_end ? K / 32 : c_end;  // words entirely below K
  int64_t c = k0 / 32;
  for (; c < c_whole; ++c) {
    // Each slot's x row from the word's chunk and a constant shift of its metadata word: no
    // running shift, and no padding test (every slot of a whole word is below K).
    const Rows xc = xr.chunk(c);
    uint32_t m[R];
    const T* v[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      m[r] = meta[r * words + c];
      v[r] = vals + r * words * 16 + 16 * c;
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float* xk = xc.row(sparse24_slot_input(m[r], j, 0));
        // A plain pointer register: base+index addressing would un-laminate every FMA's load.
        asm("" : "+r"(xk));
        const __m256 vb = _mm256_set1_ps(to_float(v[r][j]));
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i) acc[r][i] = _mm256_fmadd_ps(vb, load(xk + 8 * i, i), acc[r][i]);
      }
    }
  }
  for (; c < c_end; ++c) {  // the last word, partly beyond K: skip padding (X has K rows)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      uint32_t m = meta[r * words + c];
      const T* v = vals + r * words * 16 + 16 * c;
      for (int j = 0; j < 16; ++j, m >>= 2) {
        const int64_t k = 32 * c + 4 * (j >> 1) + (m & 3u);
        if (k >= K) continue;
        const float* xk = xr.row(k);
        const __m256 vb = _mm256_set1_ps(to_float(v[j]));
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i) acc[r][i] = _mm256_fmadd_ps(vb, load(xk + 8 * i, i), acc[r][i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) {
      float* o = out + r * out_stride + 8 * i;
      if (Masked && i == V - 1) {
        _mm256_maskstore_ps(o, last, acc[r][i]);
      } else {
        _mm256_storeu_ps(o, acc[r][i]);
      }
    }
  }
}

// Rows [row_begin, row_end) against 8V columns of X, K block by K block (tile_k inputs); row n's
// outputs at out + (n - row_begin) * out_stride.
template <int V, bool Masked, typename T, typename Rows>
inline void tile_rows(const Sparse24MatrixT<T>& w, int64_t words, const Rows& xr, int64_t tile_k, const float* bias,
                      float* out, int64_t out_stride, int64_t row_begin, int64_t row_end, __m256i last) {
  constexpr int R = 2;
  const int64_t K = w.cols;
  auto block = [&](auto r_tag, int64_t n, int64_t k0, int64_t k1) {
    constexpr int RR = decltype(r_tag)::value;
    tile_block<RR, V, Masked, T>(w.values + n * words * 16, w.meta + n * words, words, K, k0, k1, xr,
                                 bias ? bias + n : nullptr, out + (n - row_begin) * out_stride, out_stride, last);
  };
  for (int64_t k0 = 0; k0 < K || (K == 0 && k0 == 0); k0 += tile_k) {  // K == 0: Y = bias
    const int64_t k1 = k0 + tile_k < K ? k0 + tile_k : K;
    int64_t n = row_begin;
    for (; n + R <= row_end; n += R) {
      for (int r = 0; r < R; ++r) {
        sparse24_prefetch_row(w, words, tile_k, n + Cfg::kTileRowsAhead + r, k0, row_begin, row_end);
      }
      block(std::integral_constant<int, R>{}, n, k0, k1);
    }
    for (; n < row_end; ++n) block(std::integral_constant<int, 1>{}, n, k0, k1);
  }
}

// tile_rows over `width` columns of X, 48 (6 ymm) at a time.
template <typename T, typename Rows>
void tile_columns(const Sparse24MatrixT<T>& w, int64_t words, const Rows& rows, int64_t width, int64_t tile_k,
                  const float* bias, float* out, int64_t out_stride, int64_t row_begin, int64_t row_end) {
  for (int64_t q = 0; q < width; q += 48) {
    const int64_t rem = width - q;
    const int nv = rem >= 48 ? 6 : static_cast<int>((rem + 7) / 8);
    const int64_t tail = rem - 8 * (nv - 1);
    const __m256i last = tail_mask8(tail);
    const Rows xr = rows.columns(q);
    auto run = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      if (tail >= 8) {
        tile_rows<V, false>(w, words, xr, tile_k, bias, out + q, out_stride, row_begin, row_end, last);
      } else {
        tile_rows<V, true>(w, words, xr, tile_k, bias, out + q, out_stride, row_begin, row_end, last);
      }
    };
    with_vectors<6>(nv, run);
  }
}

}  // namespace

template <typename T>
void sparse24_rows_permute_avx2(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                                const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t words = sparse24_padded_cols(w.cols) / 32, P = x.cols;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) permute_columns<4>(w, words, x, p, bias, y, row_begin, row_end);
  for (; p + 2 <= P; p += 2) permute_columns<2>(w, words, x, p, bias, y, row_begin, row_end);
  for (; p < P; ++p) permute_columns<1>(w, words, x, p, bias, y, row_begin, row_end);
}

template <typename T>
void sparse24_rows_tile_avx2(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                             const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t P = x.cols, K = x.rows, words = sparse24_padded_cols(w.cols) / 32;
  const int64_t L = x.stride_k;  // panel width, a multiple of 16
  for (int64_t p0 = 0; p0 < P; p0 += L) {
    tile_columns(w, words, PanelRows{x.data + (p0 / L) * K * L, L}, std::min(L, P - p0), sparse24_tile_k(L), bias,
                 y.data + p0, y.stride_n, row_begin, row_end);
  }
}

void sparse24_rows_conv_avx2(const Sparse24Matrix& w, const float* x, const int32_t* offsets, int64_t width,
                             int64_t tile_k, const float* bias, float* y, int64_t ldy, int64_t row_begin,
                             int64_t row_end) {
  tile_columns(w, sparse24_padded_cols(w.cols) / 32, OffsetRows{x, offsets}, width, tile_k, bias, y, ldy,
               row_begin, row_end);
}

template void sparse24_rows_permute_avx2(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_permute_avx2(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_avx2(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_avx2(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);

}  // namespace pyhwp
