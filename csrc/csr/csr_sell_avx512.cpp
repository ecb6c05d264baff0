// AVX-512 kernel of the sliced-ELL CSR copy (csr_sell.h): 16 rows in the lanes, x's terms by
// two-register permutes of a 32-float window of each column of x.
#include <immintrin.h>

#include <algorithm>

#include "common/simd_avx512.h"
#include "csr/csr_sell.h"

namespace pyhwp {

namespace {

using avx512::load16;
using avx512::tail_mask;

// One slot for NP columns: lane r of every accumulator gains values[r] * x_p[window + lanes[r]].
template <int NP, typename T>
inline void slot(const T* v, const uint8_t* ln, const __m512 (&lo)[NP], const __m512 (&hi)[NP],
                 __m512 (&acc)[NP]) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ln)));
  const __m512 vv = load16(v);
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) acc[p] = _mm512_fmadd_ps(vv, _mm512_permutex2var_ps(lo[p], idx, hi[p]), acc[p]);
}

// Slices [s0, s1) for NP columns. Two accumulator sets take alternate slots, so that the FMA
// chains are not what a slot waits on at NP = 1.
template <int NP, typename T>
void sell_np(const CsrSell& s, int64_t s0, int64_t s1, const float* x, int64_t ldx, const float* bias,
             float* y, int64_t ldy_n, int64_t ldy_p) {
  const int64_t nw = s.windows;
  const int64_t tail = s.cols - 32 * (nw - 1);  // columns of the last window, 1..32
  const __mmask16 mlo = tail_mask(tail), mhi = tail > 16 ? tail_mask(tail - 16) : 0;
  for (int64_t sl = s0; sl < s1; ++sl) {
    const __mmask16 rows = tail_mask(s.rows - 16 * sl);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(rows, bias + 16 * sl) : _mm512_setzero_ps();
    __m512 a0[NP], a1[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) a0[p] = b, a1[p] = _mm512_setzero_ps();
    const T* v = static_cast<const T*>(s.values) + 16 * s.slice_slots[sl];
    const uint8_t* ln = s.lanes + 16 * s.slice_slots[sl];
    const uint8_t* counts = s.counts + sl * nw;
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t c = counts[w];
      if (c == 0) continue;
      __m512 lo[NP], hi[NP];
      const bool last = w == nw - 1;
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        const float* xw = x + p * ldx + 32 * w;
        lo[p] = last ? _mm512_maskz_loadu_ps(mlo, xw) : _mm512_loadu_ps(xw);
        hi[p] = last ? _mm512_maskz_loadu_ps(mhi, xw + 16) : _mm512_loadu_ps(xw + 16);
      }
      int64_t t = 0;
      for (; t + 2 <= c; t += 2) {
        slot<NP>(v + 16 * t, ln + 16 * t, lo, hi, a0);
        slot<NP>(v + 16 * t + 16, ln + 16 * t + 16, lo, hi, a1);
      }
      if (t < c) slot<NP>(v + 16 * t, ln + 16 * t, lo, hi, a0);
      v += 16 * c;
      ln += 16 * c;
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      const __m512 sum = _mm512_add_ps(a0[p], a1[p]);
      float* out = y + 16 * sl * ldy_n + p * ldy_p;
      if (ldy_n == 1) {
        _mm512_mask_storeu_ps(out, rows, sum);
      } else {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, sum);
        for (int64_t r = 0; r < std::min<int64_t>(16, s.rows - 16 * sl); ++r) out[r * ldy_n] = tmp[r];
      }
    }
  }
}

template <typename T>
void sell_t(const CsrSell& s, int64_t s0, int64_t s1, const float* x, int64_t ldx, int64_t P, const float* bias,
            float* y, int64_t ldy_n, int64_t ldy_p) {
  switch (P) {
    case 1: return sell_np<1, T>(s, s0, s1, x, ldx, bias, y, ldy_n, ldy_p);
    case 2: return sell_np<2, T>(s, s0, s1, x, ldx, bias, y, ldy_n, ldy_p);
    case 3: return sell_np<3, T>(s, s0, s1, x, ldx, bias, y, ldy_n, ldy_p);
    default: return sell_np<4, T>(s, s0, s1, x, ldx, bias, y, ldy_n, ldy_p);
  }
}

void sell(const CsrSell& s, int64_t s0, int64_t s1, const float* x, int64_t ldx, int64_t P, const float* bias,
          float* y, int64_t ldy_n, int64_t ldy_p) {
  (s.bf16 ? sell_t<uint16_t> : sell_t<float>)(s, s0, s1, x, ldx, P, bias, y, ldy_n, ldy_p);
}
static_assert(kCsrSellMaxNp == 4, "sell() dispatches 1..4 columns");

}  // namespace

CsrSellFn csr_sell_kernel_avx512() { return &sell; }

}  // namespace pyhwp
