// AVX512-BF16 masked micro-kernel: bfloat16 tiles times X packed as bfloat16 pairs, two k per vdpbf16ps.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;
constexpr int kPairs = Cfg::kTileK / 2;  // k pairs per tile

static_assert(Cfg::kTileK % 2 == 0 && Cfg::kTileN == 16, "a k pair of 16 rows is one zmm of bfloat16");

inline __mmask16 first_n(int64_t n) {  // lanes < n (none for n <= 0)
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Per k pair: tile rows 2j and 2j+1 (64 contiguous bytes) interleaved into 16 (even, odd) bfloat16
// pairs by one vpermw, then MR vdpbf16ps whose x operand is a {1to16} broadcast of the packed pair.
// Half the multiply-add instructions of the float32 kernel, and no widening of either operand.
template <int MR>
void block(const MaskedBlockT<uint16_t>& b) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  __m512 c[MR];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
  const uint16_t* w = b.tiles;
  const uint32_t* xq = reinterpret_cast<const uint32_t*>(b.xp);
  for (int64_t j = 0; j < b.count; ++j, w += Cfg::kTileSize) {
    const uint32_t* xt = xq + int64_t{b.tidx[j]} * (kPairs * MR);
    // As in the float32 kernel: the next tile's x (MR * 32 bytes) and the weights kPrefetchTiles
    // ahead (8 lines a tile).
    const int64_t jn = j + 1 < b.count ? j + 1 : j;
    const char* xn = reinterpret_cast<const char*>(xq + int64_t{b.tidx[jn]} * (kPairs * MR));
    const char* wn = reinterpret_cast<const char*>(w + Cfg::kPrefetchTiles * Cfg::kTileSize);
#pragma GCC unroll 8
    for (int k = 0; k < kPairs; ++k) {
      if (128 * k < 32 * MR) _mm_prefetch(xn + 128 * k, _MM_HINT_T0);
      if (128 * k + 64 < 32 * MR) _mm_prefetch(xn + 128 * k + 64, _MM_HINT_T0);
      _mm_prefetch(wn + 64 * k, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_permutexvar_epi16(interleave, _mm512_loadu_si512(w + 32 * k));
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        c[i] = _mm512_dpbf16_ps(c[i], wv, (__m512bh)_mm512_set1_epi32(static_cast<int>(xt[k * MR + i])));
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float* out = b.acc + 16 * i;
    _mm512_store_ps(out, b.accumulate ? _mm512_add_ps(c[i], _mm512_load_ps(out)) : c[i]);
  }
}

template <int... I>
constexpr std::array<MaskedBlockFn<uint16_t>, sizeof...(I)> table(std::integer_sequence<int, I...>) {
  return {&block<I + 1>...};
}

constexpr auto kBlocks = table(std::make_integer_sequence<int, Cfg::kMrAvx512>{});

// In-register transpose of a 16x16 block of 32-bit lanes: r[i][c] -> r[c][i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int m = 0; m < 8; ++m) {
    t[2 * m] = _mm512_unpacklo_epi32(r[2 * m], r[2 * m + 1]);
    t[2 * m + 1] = _mm512_unpackhi_epi32(r[2 * m], r[2 * m + 1]);
  }
  __m512i s[4][4];
  for (int q = 0; q < 4; ++q) {
    s[q][0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    s[q][1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    s[q][2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    s[q][3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(s[0][j], s[1][j], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(s[0][j], s[1][j], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(s[2][j], s[3][j], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(s[2][j], s[3][j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// Largest float32 exponent field of the two bfloat16 values in each 32-bit lane of v.
inline __m512i exponent_max(__m512i worst, __m512i v) {
  const __m512i e = _mm512_set1_epi32(0x7f800000);
  const __m512i hi = _mm512_and_si512(v, e), lo = _mm512_and_si512(_mm512_slli_epi32(v, 16), e);
  return _mm512_max_epu32(worst, _mm512_max_epu32(hi, lo));
}

uint32_t exponent_of(uint16_t bits) { return (static_cast<uint32_t>(bits) << 16) & 0x7f800000u; }

}  // namespace

void masked_block_avx512bf16(const MaskedBlockT<uint16_t>& b) { kBlocks[b.mr - 1](b); }

uint32_t masked_pack_pairs_bf16(const DenseInBf16& x, int64_t p0, int width, int ld, int64_t k0,
                                int64_t k1, uint32_t* dst) {
  const int64_t K = x.rows, j0 = k0 / 2, j1 = k1 / 2;
  const int64_t jk = K / 2 < j0 ? j0 : (K / 2 < j1 ? K / 2 : j1);  // pairs [j0, jk) lie below K
  __m512i worst = _mm512_setzero_si512();
  uint32_t worst_scalar = 0;
  if (x.stride_k == 1 && x.stride_p != 1) {
    // Linear layout: a row's pairs are adjacent 32-bit words already; transpose 16 rows x 16
    // pairs in registers into 16 pair rows of the block.
    for (int i0 = 0; i0 < ld; i0 += 16) {
      const int rows = width - i0;  // may be <= 0: zero padding columns
      const __mmask16 store_mask = first_n(ld - i0);
      for (int64_t jb = j0; jb < jk; jb += 16) {
        const int64_t nj = jk - jb < 16 ? jk - jb : 16;
        __m512i r[16];
        for (int c = 0; c < 16; ++c) {
          r[c] = c < rows ? _mm512_maskz_loadu_epi32(first_n(nj), x.data + (p0 + i0 + c) * x.stride_p + 2 * jb)
                          : _mm512_setzero_si512();
          worst = exponent_max(worst, r[c]);
        }
        transpose16(r);
        for (int c = 0; c < nj; ++c) _mm512_mask_storeu_epi32(dst + (jb + c) * ld + i0, store_mask, r[c]);
      }
    }
  } else if (x.stride_p == 1) {
    // Conv layout: rows 2j and 2j+1 of X hold the block's columns contiguously; interleave them.
    for (int64_t j = j0; j < jk; ++j) {
      const uint16_t* lo = x.data + 2 * j * x.stride_k + p0;
      for (int i0 = 0; i0 < ld; i0 += 16) {
        const __mmask16 m = first_n(width - i0);
        const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + i0));
        const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + x.stride_k + i0));
        const __m512i v = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
        worst = exponent_max(worst, v);
        _mm512_mask_storeu_epi32(dst + j * ld + i0, first_n(ld - i0), v);
      }
    }
  } else {
    for (int64_t j = j0; j < jk; ++j) {
      for (int i = 0; i < ld; ++i) {
        uint32_t v = 0;
        if (i < width) {
          const uint16_t a = x.data[2 * j * x.stride_k + (p0 + i) * x.stride_p];
          const uint16_t b = x.data[(2 * j + 1) * x.stride_k + (p0 + i) * x.stride_p];
          worst_scalar = std::max({worst_scalar, exponent_of(a), exponent_of(b)});
          v = a | static_cast<uint32_t>(b) << 16;
        }
        dst[j * ld + i] = v;
      }
    }
  }
  // The pair straddling K (odd K): its low half from x, the high half zero; then zero pairs.
  for (int64_t j = jk; j < j1; ++j) {
    for (int i = 0; i < ld; ++i) {
      uint32_t v = 0;
      if (2 * j < K && i < width) {
        const uint16_t a = x.data[2 * j * x.stride_k + (p0 + i) * x.stride_p];
        worst_scalar = std::max(worst_scalar, exponent_of(a));
        v = a;
      }
      dst[j * ld + i] = v;
    }
  }
  return std::max(worst_scalar, _mm512_reduce_max_epu32(worst));
}

}  // namespace pyhwp
