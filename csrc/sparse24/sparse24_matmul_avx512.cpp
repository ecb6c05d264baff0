// AVX-512 2:4 kernels: x selected in registers for small batches, register tiles for large ones.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "common/bf16.h"
#include "common/simd_avx512.h"
#include "common/vector_count.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

namespace {

using Cfg = Sparse24CpuConfig;

using avx512::load16;
using avx512::tail_mask;


// Widened bfloat16 values of R rows, one word ahead (see tile_block); nothing for float, whose
// kernels must keep the stack frame (and registers) they had.
template <typename T, int R>
struct WidenedWords {
  alignas(64) float v[2][R][16];
};
template <int R>
struct WidenedWords<float, R> {};

// Widens word cw of R rows (words words apart) into buffer cw % 2.
template <int R>
inline void widen_words(WidenedWords<uint16_t, R>& buf, const uint16_t* vals, int64_t words, int64_t cw) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) _mm512_store_ps(buf.v[cw & 1][r], load16(vals + r * words * 16 + 16 * cw));
}

// Horizontal sum. The maskz forms with full masks avoid gcc 12's false -Wuninitialized inside
// the unmasked intrinsics (and _mm512_reduce_add_ps), which pass an undefined source.
inline float hsum(__m512 v) {
  const __mmask16 all = 0xFFFF;
  __m512 t = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm512_add_ps(t, _mm512_maskz_shuffle_f32x4(all, t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 s = _mm512_maskz_extractf32x4_ps(0xF, t, 0);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Expands one metadata word into the 16 lane indices of its slots into the 32 inputs [x0 | x1]
// of its chunk: lane j gets 4*(j/2) + ((m >> 2j) & 3). No gather: the selection is one
// vpermt2ps per 16 slots.
struct LaneIndices {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  __m512i operator()(uint32_t m) const {
    const __m512i s = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(m)), shifts);
    return _mm512_ternarylogic_epi32(s, three, base, 0xEA);  // (s & three) | base
  }
};

// R rows times PB columns of x: acc[r][q] accumulates row r against x column q.
template <int R, int PB, typename T>
inline void permute_block(const T* vals, const uint32_t* meta, int64_t words, const float* x,
                          int64_t ldx, float* out, int64_t out_stride_n, int64_t out_stride_p,
                          const float* bias) {
  const LaneIndices lanes;
  __m512 acc[R][PB];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < PB; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t c = 0; c < words; ++c) {
    __m512 x0[PB], x1[PB];
    for (int q = 0; q < PB; ++q) {
      x0[q] = _mm512_loadu_ps(x + q * ldx + 32 * c);
      x1[q] = _mm512_loadu_ps(x + q * ldx + 32 * c + 16);
    }
    for (int r = 0; r < R; ++r) {
      // R rows are R concurrent streams of 64 bytes per step: the hardware prefetcher alone
      // leaves the batch-1 kernel at ~60% of the bandwidth MKL's dense sgemv gets from L3.
      // (Reads past a row's end only prefetch the next row; prefetches never fault.) The same
      // bytes ahead for bfloat16 values, whose 16 slots take half a line: every other word.
      constexpr int64_t kAhead = 16 * Cfg::kPermutePrefetch * 4 / static_cast<int64_t>(sizeof(T));
      if (sizeof(T) == 4 || (c & 1) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(vals + r * words * 16 + 16 * c + kAhead), _MM_HINT_T0);
      }
      const __m512i idx = lanes(meta[r * words + c]);
      const __m512 v = load16(vals + r * words * 16 + 16 * c);
      for (int q = 0; q < PB; ++q) {
        acc[r][q] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(x0[q], idx, x1[q]), acc[r][q]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[r] : 0.f;
    for (int q = 0; q < PB; ++q) {
      out[r * out_stride_n + q * out_stride_p] = hsum(acc[r][q]) + b;
    }
  }
}

// Rows [n, n+R) of W times PB columns of x, written to Y.
template <int R, int PB, typename T>
inline void permute_rows(const Sparse24MatrixT<T>& w, int64_t words, const DenseIn& x, int64_t p,
                         const float* bias, const DenseOut& y, int64_t row_begin, int64_t n) {
  permute_block<R, PB>(w.values + n * words * 16, w.meta + n * words, words,
                       x.data + p * x.stride_p, x.stride_p,
                       y.data + (n - row_begin) * y.stride_n + p * y.stride_p, y.stride_n,
                       y.stride_p, bias ? bias + n : nullptr);
}

template <int PB, typename T>
inline void permute_columns(const Sparse24MatrixT<T>& w, int64_t words, const DenseIn& x, int64_t p,
                            const float* bias, const DenseOut& y, int64_t row_begin,
                            int64_t row_end) {
  constexpr int R = PB >= 4 ? 2 : 4;
  int64_t n = row_begin;
  for (; n + R <= row_end; n += R) permute_rows<R, PB>(w, words, x, p, bias, y, row_begin, n);
  for (; n < row_end; ++n) permute_rows<1, PB>(w, words, x, p, bias, y, row_begin, n);
}

// One K block [k0, k1) of rows [n, n+R) against V*16 columns of X (its rows where `xr` says: a
// packed panel or a conv's windows); the last vector is masked by `last` when Masked. acc starts from bias
// (first block) or the partial sums already in `out`. Every slot costs one broadcast and V FMAs
// whose X operand comes straight from L1 (the K block of the panel fits there): (V+1) loads per
// V FMAs, against two 512-bit loads per cycle.
template <int R, int V, bool Masked, typename T, typename Rows>
inline void tile_block(const T* vals, const uint32_t* meta, int64_t words, int64_t K,
                       int64_t k0, int64_t k1, const Rows& xr, const float* bias,
                       float* out, int64_t out_stride, __mmask16 last) {
  const __mmask16 full = 0xFFFF;
  auto mask = [&](int i) { return Masked && i == V - 1 ? last : full; };
  __m512 acc[R][V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) {
      acc[r][i] = k0 == 0 ? _mm512_set1_ps(bias ? bias[r] : 0.f)
                          : _mm512_maskz_loadu_ps(mask(i), out + r * out_stride + 16 * i);
    }
  }
  const int64_t c_end = (k1 + 31) / 32;
  const int64_t c_whole = K / 32 < c_end ? K / 32 : c_end;  // words entirely below K
  int64_t c = k0 / 32;
  // bfloat16 values: each word's 16 slots are widened into L1 once, one word ahead (double
  // buffer), so each slot stays a memory broadcast (load ports) as for float, and the widening
  // is off the path to the word's first FMA. The opaque pointers stop gcc from keeping the
  // widened values in registers and extracting lanes with two port-5 shuffles per slot.
  constexpr bool kWiden = !std::is_same_v<T, float>;
  WidenedWords<T, R> widened;
  if constexpr (kWiden) {
    if (c < c_whole) widen_words(widened, vals, words, c);
  }
  for (; c < c_whole; ++c) {
    const Rows xc = xr.chunk(c);
    uint32_t m[R];
    const float* v[R];
    if constexpr (kWiden) {
      if (c + 1 < c_whole) widen_words(widened, vals, words, c + 1);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      m[r] = meta[r * words + c];
      if constexpr (kWiden) {
        const float* wr = widened.v[c & 1][r];
        asm("" : "+r"(wr));
        v[r] = wr;
      } else {
        v[r] = vals + r * words * 16 + 16 * c;
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float* xk = xc.row(sparse24_slot_input(m[r], j, 0));
        // A plain pointer register: base+index addressing would un-laminate every FMA's load.
        asm("" : "+r"(xk));
        const __m512 vb = _mm512_set1_ps(v[r][j]);
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i) {
          acc[r][i] = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask(i), xk + 16 * i), acc[r][i]);
        }
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
        const __m512 vb = _mm512_set1_ps(to_float(v[j]));
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i) {
          acc[r][i] = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask(i), xr.row(k) + 16 * i), acc[r][i]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < V; ++i) _mm512_mask_storeu_ps(out + r * out_stride + 16 * i, mask(i), acc[r][i]);
  }
}

// Rows [row_begin, row_end) against 16V columns of X, K block by K block (tile_k inputs) so
// that X's block stays in L1 while every row of the range passes over it; row n's outputs at
// out + (n - row_begin) * out_stride.
// Out of line, as gcc compiled it before the kernels were templated on the value type (the
// second instantiation tipped its inlining budget); keeps the float32 code as it was.
template <int V, bool Masked, typename T, typename Rows>
__attribute__((noinline)) void tile_rows(const Sparse24MatrixT<T>& w, int64_t words, const Rows& xr, int64_t tile_k,
                                         const float* bias, float* out, int64_t out_stride, int64_t row_begin,
                                         int64_t row_end, __mmask16 last) {
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
    // X's next K block into L2 (Rows::span; the matmul's panels only), a share per row pair:
    // once a long weight has streamed through L2, the block would otherwise come from L3 line
    // by line (measured +1-3.5% at K >= 3072, batch 128).
    const char* next = k1 < K ? reinterpret_cast<const char*>(xr.row(k1)) : nullptr;
    const int64_t next_bytes = k1 < K ? xr.span(k1, std::min(K, k1 + tile_k)) : 0;
    const int64_t pairs = (row_end - row_begin) / R;
    const int64_t share = pairs > 0 ? (next_bytes / 64 + pairs - 1) / pairs * 64 : 0;
    int64_t next_at = 0;
    for (; n + R <= row_end; n += R) {
      for (int r = 0; r < R; ++r) {
        sparse24_prefetch_row(w, words, tile_k, n + Cfg::kTileRowsAhead + r, k0, row_begin, row_end);
      }
      for (const int64_t e = std::min(next_bytes, next_at + share); next_at < e; next_at += 64) {
        _mm_prefetch(next + next_at, _MM_HINT_T1);
      }
      block(std::integral_constant<int, R>{}, n, k0, k1);
    }
    for (; n < row_end; ++n) block(std::integral_constant<int, 1>{}, n, k0, k1);
  }
}

// tile_rows for `width` (<= kPanel) columns: V and the tail mask chosen at run time.
template <typename T, typename Rows>
void tile_columns(const Sparse24MatrixT<T>& w, int64_t words, const Rows& xr, int64_t width, int64_t tile_k,
                  const float* bias, float* out, int64_t out_stride, int64_t row_begin, int64_t row_end) {
  const int nv = static_cast<int>((width + 15) / 16);
  const __mmask16 last = tail_mask(width - 16 * (nv - 1));
  auto run = [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    if (last == 0xFFFF) {
      tile_rows<V, false, T>(w, words, xr, tile_k, bias, out, out_stride, row_begin, row_end, last);
    } else {
      tile_rows<V, true, T>(w, words, xr, tile_k, bias, out, out_stride, row_begin, row_end, last);
    }
  };
  with_vectors<8>(nv, run);
}

}  // namespace

template <typename T>
void sparse24_rows_permute_avx512(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                                  const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t words = sparse24_padded_cols(w.cols) / 32, P = x.cols;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) permute_columns<4>(w, words, x, p, bias, y, row_begin, row_end);
  for (; p + 2 <= P; p += 2) permute_columns<2>(w, words, x, p, bias, y, row_begin, row_end);
  for (; p < P; ++p) permute_columns<1>(w, words, x, p, bias, y, row_begin, row_end);
}

template <typename T>
void sparse24_rows_tile_avx512(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                               const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t P = x.cols, K = x.rows, words = sparse24_padded_cols(w.cols) / 32;
  const int64_t L = x.stride_k;  // panel width, a multiple of 16 up to kPanel = 8 vectors
  for (int64_t p0 = 0; p0 < P; p0 += L) {
    tile_columns(w, words, PanelRows{x.data + (p0 / L) * K * L, L}, std::min(L, P - p0), sparse24_tile_k(L), bias,
                 y.data + p0, y.stride_n, row_begin, row_end);
  }
}

void sparse24_rows_conv_avx512(const Sparse24Matrix& w, const float* x, const int32_t* offsets, int64_t width,
                               int64_t tile_k, const float* bias, float* y, int64_t ldy, int64_t row_begin,
                               int64_t row_end) {
  tile_columns(w, sparse24_padded_cols(w.cols) / 32, OffsetRows{x, offsets}, width, tile_k, bias, y, ldy,
               row_begin, row_end);
}

template void sparse24_rows_permute_avx512(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_permute_avx512(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_avx512(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_avx512(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);

}  // namespace pyhwp
