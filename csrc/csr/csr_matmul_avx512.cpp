// AVX-512 CSR kernels: gather for small batches, register tiles of up to 128 columns for large ones.
#include <immintrin.h>

#include <type_traits>

#include "common/cpu_features.h"
#include "common/simd_avx512.h"
#include "common/vector_count.h"
#include "csr/csr_matmul.h"
#include "csr/csr_kernels_inl.h"

namespace pyhwp {

namespace {

using avx512::load16;
using avx512::tail_mask;

// 16 values as float32 under a mask (bfloat16 bits: exact 16-bit shift).
inline __m512 load16(const float* v, __mmask16 m) { return _mm512_maskz_loadu_ps(m, v); }
inline __m512 load16(const uint16_t* v, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 column indices as int32 lanes.
inline __m512i load_idx(const int32_t* c) { return _mm512_loadu_si512(c); }
inline __m512i load_idx(const uint16_t* c) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
}
inline __m512i load_idx(const int32_t* c, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, c); }
inline __m512i load_idx(const uint16_t* c, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, c));
}

// Gather kernel: 32 terms per step in two chains, a row's last < 32 by masked gathers of 16.
template <typename I, typename T>
void gather(CsrArrays<I, T> a, const int64_t* begin, int64_t rows, const float* x, int64_t ldx,
            int64_t P, const float* bias, float* y, int64_t ldy_n, int64_t ldy_p) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = begin[i], len = begin[i + 1] - b;
    const I* cols = a.cols + b;
    const T* vals = a.vals + b;
    const float bi = bias ? bias[i] : 0.f;
    for (int64_t p = 0; p < P; ++p) {
      const float* xr = x + p * ldx;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= len; j += 32) {
        prefetch_ahead<32>(cols + j);
        prefetch_ahead<32>(vals + j);
        const __m512i i0 = load_idx(cols + j), i1 = load_idx(cols + j + 16);
        a0 = _mm512_fmadd_ps(load16(vals + j), _mm512_i32gather_ps(i0, xr, 4), a0);
        a1 = _mm512_fmadd_ps(load16(vals + j + 16), _mm512_i32gather_ps(i1, xr, 4), a1);
      }
      for (; j < len; j += 16) {
        const __mmask16 m = tail_mask(len - j);
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, load_idx(cols + j, m), xr, 4);
        a0 = _mm512_fmadd_ps(load16(vals + j, m), xv, a0);
      }
      y[i * ldy_n + p * ldy_p] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + bi;
    }
  }
}

// One row times a tile of V*16 columns of X (the last vector masked by `last`). U independent
// accumulator sets keep U*V >= 8 FMA chains in flight (2 FMA ports x 4 cycles latency). The last
// vector is a masked load even when whole: the FMA then takes its weight as an embedded
// broadcast. Whole vectors as plain loads that fold into the FMAs, after a separate broadcast,
// ran slower on a Zen 4 (1 thread, batch 16, 1536x384 / 768x3072 / 3072x768 at 90%: 46 / 188 /
// 181 us with load_cols, against 43 / 170 / 161 without it).
// kLd16: X's rows are 16 floats apart (ldx == 16, a packed 16-column panel), so the byte offset
// of a row comes out of the index split with no multiply. kStream: W comes from DRAM (not
// CsrMatrix::resident), which the 16-column kernel then prefetches.
// The accumulators start from `out` when accumulating, else from `bias` in every lane.
template <int V, bool kLd16, bool kStream, typename I, typename T>
inline void row_tile(const I* cols, const T* vals, int64_t len, const float* x, int64_t ldx,
                     bool accumulate, __m512 bias, float* out, __mmask16 last) {
  constexpr int U = V >= 5 ? 1 : (V >= 3 ? 2 : 8 / (V * 2));
  auto load = [&](const float* p, int i) {
    return i == V - 1 ? _mm512_maskz_loadu_ps(last, p) : _mm512_loadu_ps(p);
  };
  __m512 acc[U][V];
  _Pragma("GCC unroll 8")
  for (int i = 0; i < V; ++i) acc[0][i] = accumulate ? load(out + 16 * i, i) : bias;
  _Pragma("GCC unroll 8")
  for (int u = 1; u < U; ++u)
    _Pragma("GCC unroll 8")
    for (int i = 0; i < V; ++i) acc[u][i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U <= len; j += U) {
    if constexpr (V == 1 && kStream) {
      // 16 columns: a stored weight is only one FMA, and W streams too fast for the hardware
      // prefetcher (batch 16, 4096x4096 and 11008x4096 at 90%: 1.19-1.24x; 32 columns and more
      // measured no change, W then streams at half the rate or less). Where W stays in L2 or L3
      // (CsrMatrix::resident) they cost about 10% instead (NOTES.md, stop 30).
      prefetch_ahead<U>(cols + j);
      prefetch_ahead<U>(vals + j);
    }
    uint64_t c[U];
    load_cols<U, kLd16 ? 6 : 0>(cols + j, c);
    _Pragma("GCC unroll 8")
    for (int u = 0; u < U; ++u) {
      const float* xr = kLd16 ? reinterpret_cast<const float*>(reinterpret_cast<const char*>(x) + c[u])
                              : x + static_cast<int64_t>(c[u]) * ldx;
      const __m512 v = _mm512_set1_ps(to_float(vals[j + u]));
      _Pragma("GCC unroll 8")
      for (int i = 0; i < V; ++i) acc[u][i] = _mm512_fmadd_ps(v, load(xr + 16 * i, i), acc[u][i]);
    }
  }
  for (; j < len; ++j) {
    const float* xr = x + static_cast<int64_t>(cols[j]) * (kLd16 ? 16 : ldx);
    const __m512 v = _mm512_set1_ps(to_float(vals[j]));
    _Pragma("GCC unroll 8")
    for (int i = 0; i < V; ++i) acc[0][i] = _mm512_fmadd_ps(v, load(xr + 16 * i, i), acc[0][i]);
  }
  _Pragma("GCC unroll 8")
  for (int u = 1; u < U; ++u)
    _Pragma("GCC unroll 8")
    for (int i = 0; i < V; ++i) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
  _Pragma("GCC unroll 8")
  for (int i = 0; i < V; ++i) _mm512_mask_storeu_ps(out + 16 * i, i == V - 1 ? last : 0xFFFF, acc[0][i]);
}

template <int V, bool kLd16, bool kStream = false, typename I, typename T>
void tile_v(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
            const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate, float* y,
            int64_t ldy) {
  const __mmask16 last = tail_mask(P - 16 * (V - 1));
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 b = _mm512_set1_ps(bias && !accumulate ? bias[i] : 0.f);
    row_tile<V, kLd16, kStream>(a.cols + begin[i], a.vals + begin[i], end[i] - begin[i], x, ldx, accumulate, b,
                                y + i * ldy, last);
  }
}

template <typename I, typename T>
void tile(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
          const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate, bool stream_w, float* y,
          int64_t ldy) {
  if (P <= 16) {  // one vector: the four forms of (packed 16-column panel, prefetch W)
    auto one = [&](auto ld16, auto stream) {
      tile_v<1, decltype(ld16)::value, decltype(stream)::value>(a, begin, end, rows, x, ldx, P, bias, accumulate,
                                                                 y, ldy);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (ldx == 16) {
      stream_w ? one(Yes{}, Yes{}) : one(Yes{}, No{});
    } else {
      stream_w ? one(No{}, Yes{}) : one(No{}, No{});
    }
    return;
  }
  with_vectors<8>(static_cast<int>((P + 15) / 16), [&](auto v_tag) {
    tile_v<decltype(v_tag)::value, false>(a, begin, end, rows, x, ldx, P, bias, accumulate, y, ldy);
  });
}

// The CSR conv's tap rows (csr_conv2d_aligned): the entries of one mask M (bit s: the entry has
// a weight at column s) add their weights times the same V whole-line vectors of x, column 0 into
// the accumulators, columns 1 and 2 into their own sums t1, t2, which are shifted down by s*dw
// <= 8 lanes later and so also need the first 8 lanes past the tile: a 256-bit halo h1, h2 (half
// the cost of a 512-bit FMA on Zen 4's 256-bit units). An entry with two or three weights loads
// each vector once.
template <int V, int M>
__attribute__((always_inline)) inline void tap_run(const int32_t* stream, int64_t begin, int64_t end, const float* x,
                                                   __m512 (&acc)[V], __m512 (&t1)[V], __m512 (&t2)[V], __m256& h1,
                                                   __m256& h2) {
  constexpr int k0 = 1, k1 = k0 + (M & 1), k2 = k1 + (M >> 1 & 1), kWords = k2 + (M >> 2 & 1);  // where w_s is
  for (int64_t e = begin; e < end; e += kWords) {
    const float* xr = x + stream[e];
    // the weights are float bits among the int32 words
    [[maybe_unused]] const __m512 w0 = _mm512_castsi512_ps(_mm512_set1_epi32((M & 1) ? stream[e + k0] : 0));
    [[maybe_unused]] const __m512 w1 = _mm512_castsi512_ps(_mm512_set1_epi32((M & 2) ? stream[e + k1] : 0));
    [[maybe_unused]] const __m512 w2 = _mm512_castsi512_ps(_mm512_set1_epi32((M & 4) ? stream[e + k2] : 0));
    _Pragma("GCC unroll 8")
    for (int k = 0; k < V; ++k) {
      __m512 xv = _mm512_loadu_ps(xr + 16 * k);
      // Two or more weights: one load into a register for all of them (else gcc folds a copy of
      // the load into every FMA, which is what this kernel is for avoiding).
      if constexpr ((M & (M - 1)) != 0) asm("" : "+v"(xv));
      if constexpr ((M & 1) != 0) acc[k] = _mm512_fmadd_ps(w0, xv, acc[k]);
      if constexpr ((M & 2) != 0) t1[k] = _mm512_fmadd_ps(w1, xv, t1[k]);
      if constexpr ((M & 4) != 0) t2[k] = _mm512_fmadd_ps(w2, xv, t2[k]);
    }
    if constexpr ((M & 6) != 0) {
      __m256 xh = _mm256_loadu_ps(xr + 16 * V);
      if constexpr ((M & 6) == 6) asm("" : "+v"(xh));
      if constexpr ((M & 2) != 0) h1 = _mm256_fmadd_ps(_mm512_castps512_ps256(w1), xh, h1);
      if constexpr ((M & 4) != 0) h2 = _mm256_fmadd_ps(_mm512_castps512_ps256(w2), xh, h2);
    }
  }
}

// acc[k] += the vectors of t (then the halo h) moved down by `shift` lanes (0 < shift <= 8).
template <int V>
__attribute__((always_inline)) inline void add_shifted(__m512 (&acc)[V], const __m512 (&t)[V], __m256 h,
                                                       int32_t shift) {
  const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32(shift));
  _Pragma("GCC unroll 8")
  for (int k = 0; k < V; ++k) {
    const __m512 next = k + 1 < V ? t[k + 1] : _mm512_castps256_ps512(h);  // lanes 8-15 never selected
    acc[k] = _mm512_add_ps(acc[k], _mm512_permutex2var_ps(t[k], idx, next));
  }
}

template <int V, int KW>
void tap_rows(const int32_t* stream, const int64_t* starts, int64_t N, const int32_t* shifts, int64_t rows,
              const float* x, int64_t P, const float* bias, bool accumulate, float* y, int64_t ldy) {
  const __mmask16 last = tail_mask(P - 16 * (V - 1));
  for (int64_t i = 0; i < rows; ++i) {
    float* out = y + i * ldy;
    const int64_t* run = starts + i;  // run M - 1 of this row: [run[(M - 1) * N], run[M * N])
    const __m512 b0 = _mm512_set1_ps(bias && !accumulate ? bias[i] : 0.f);
    __m512 acc[V], t1[V], t2[V];
    __m256 h1 = _mm256_setzero_ps(), h2 = _mm256_setzero_ps();
    _Pragma("GCC unroll 8")
    for (int k = 0; k < V; ++k)
      acc[k] = accumulate ? _mm512_maskz_loadu_ps(k == V - 1 ? last : 0xFFFF, out + 16 * k) : b0;
    _Pragma("GCC unroll 8")
    for (int k = 0; k < V; ++k) t1[k] = t2[k] = _mm512_setzero_ps();
    tap_run<V, 1>(stream, run[0], run[N], x, acc, t1, t2, h1, h2);
    tap_run<V, 2>(stream, run[N], run[2 * N], x, acc, t1, t2, h1, h2);
    tap_run<V, 3>(stream, run[2 * N], run[3 * N], x, acc, t1, t2, h1, h2);
    if constexpr (KW == 3) {
      tap_run<V, 4>(stream, run[3 * N], run[4 * N], x, acc, t1, t2, h1, h2);
      tap_run<V, 5>(stream, run[4 * N], run[5 * N], x, acc, t1, t2, h1, h2);
      tap_run<V, 6>(stream, run[5 * N], run[6 * N], x, acc, t1, t2, h1, h2);
      tap_run<V, 7>(stream, run[6 * N], run[7 * N], x, acc, t1, t2, h1, h2);
      add_shifted<V>(acc, t2, h2, shifts[2]);
    }
    add_shifted<V>(acc, t1, h1, shifts[1]);
    _Pragma("GCC unroll 8")
    for (int k = 0; k < V; ++k) _mm512_mask_storeu_ps(out + 16 * k, k == V - 1 ? last : 0xFFFF, acc[k]);
  }
}

void tap_tile(const int32_t* stream, const int64_t* starts, int64_t N, int64_t kw, const int32_t* shifts, int64_t rows,
              const float* x, int64_t P, const float* bias, bool accumulate, float* y, int64_t ldy) {
  with_vectors<8>(static_cast<int>((P + 15) / 16), [&](auto v_tag) {
    constexpr int V = decltype(v_tag)::value;
    (kw == 3 ? &tap_rows<V, 3> : &tap_rows<V, 2>)(stream, starts, N, shifts, rows, x, P, bias, accumulate, y, ldy);
  });
}

}  // namespace

CsrTapTileFn csr_tap_tile_avx512() { return &tap_tile; }

template <typename I, typename T>
CsrKernels<I, T> csr_kernels_avx512() {
  // Where gathers are slow, the AVX2 set's gather kernel, which takes x's terms by scalar loads.
  return {slow_gathers() ? csr_kernels_avx2<I, T>().gather : &gather<I, T>, &tile<I, T>};
}
template CsrKernels<int32_t, float> csr_kernels_avx512();
template CsrKernels<uint16_t, float> csr_kernels_avx512();
template CsrKernels<int32_t, uint16_t> csr_kernels_avx512();
template CsrKernels<uint16_t, uint16_t> csr_kernels_avx512();

}  // namespace pyhwp
