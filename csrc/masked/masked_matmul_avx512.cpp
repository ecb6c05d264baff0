// AVX-512 masked micro-kernel: 16 rows (one zmm) x mr columns, x broadcast from memory into FMAs.
#include <immintrin.h>

#include <array>
#include <type_traits>
#include <utility>

#include "common/simd_avx512.h"
#include "common/x_rows.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

using avx512::load16;
using avx512::transpose16;

// Widened bfloat16 weights of half a tile, one tile ahead (see wide); nothing for float, whose
// kernel must keep the stack frame (and registers) it had.
template <typename T>
struct WidenedHalfTiles {
  alignas(32) float v[2][Cfg::kTileK * 8];
};
template <>
struct WidenedHalfTiles<float> {};

// Lines of one stored tile: 16 for float32, 8 for bfloat16.
template <typename T>
constexpr int kTileLines = static_cast<int>(Cfg::kTileSize * sizeof(T) / 64);

// Per k: one load of the tile row (16 rows of W), then MR fused multiply-adds whose x operand is a
// {1to16} broadcast straight from the packed block, so MR + 1 loads feed MR FMAs and the MR
// accumulators stay in registers for the whole run of tiles.
template <int MR, typename T>
void block(const MaskedBlockT<T>& b) {
  __m512 c[MR];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
  const T* w = b.tiles;
  for (int64_t j = 0; j < b.count; ++j, w += Cfg::kTileSize) {
    const float* xt = b.xp + static_cast<int64_t>(b.tidx[j]) * (Cfg::kTileK * MR);
    // The next tile's x rows (MR lines) jump with the tile index, which the hardware prefetchers
    // cannot follow; the weights stream, but from DRAM, so they are requested kPrefetchTiles ahead.
    // (Prefetching past the last tile is harmless: prefetches never fault.)
    const int64_t jn = j + 1 < b.count ? j + 1 : j;
    const char* xn = reinterpret_cast<const char*>(b.xp + int64_t{b.tidx[jn]} * (Cfg::kTileK * MR));
    const char* wn = reinterpret_cast<const char*>(w + Cfg::kPrefetchTiles * Cfg::kTileSize);
#pragma GCC unroll 16
    for (int k = 0; k < Cfg::kTileK; ++k) {
      if (2 * k < MR) _mm_prefetch(xn + 128 * k, _MM_HINT_T0);
      if (2 * k + 1 < MR) _mm_prefetch(xn + 128 * k + 64, _MM_HINT_T0);
      if (k < kTileLines<T>) _mm_prefetch(wn + 64 * k, _MM_HINT_T0);
      if (k == 0) {
        // One stream per thread keeps too few lines in flight from DRAM (16 L1 fill buffers);
        // a touch in each of the pages kPageAhead and 2 kPageAhead bytes ahead starts the L2
        // streamer on them as well.
        _mm_prefetch(reinterpret_cast<const char*>(w) + Cfg::kPageAhead, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w) + 2 * Cfg::kPageAhead, _MM_HINT_T1);
      }
      const __m512 wv = load16(w + Cfg::kTileN * k);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) c[i] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xt[k * MR + i]), c[i]);
    }
  }

#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    float* out = b.acc + 16 * i;
    _mm512_store_ps(out, b.accumulate ? _mm512_add_ps(c[i], _mm512_load_ps(out)) : c[i]);
  }
}

template <typename T, int... I>
constexpr std::array<MaskedBlockFn<T>, sizeof...(I)> table(std::integer_sequence<int, I...>) {
  return {&block<I + 1, T>...};
}

template <typename T>
constexpr auto kBlocks = table<T>(std::make_integer_sequence<int, Cfg::kMrAvx512>{});

constexpr uint32_t kExponent = 0x7f800000u;

inline __m512i exponent_max(__m512i worst, __m512 v) {
  return _mm512_max_epu32(worst, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(kExponent)));
}

inline __mmask16 first_n(int64_t n) {  // lanes < n (none for n <= 0)
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// 8 rows x NV vectors of 16 columns, row k of k-tile t of x at rows.row(16 t + k) (PackedRows of the
// packed block, OffsetRows of the conv's padded planes: common/x_rows.h). Per k: NV vector loads
// of x, then each of the 8 weights is broadcast once into a register and feeds NV FMAs.
template <int NV, typename T, typename Rows>
void wide(const MaskedWideBlockT<T>& b, Rows rows) {
  __m512 c[8][NV];
  for (int r = 0; r < 8; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  const T* w = b.tiles + 8 * b.half;
  // bfloat16 tiles: this half's 16 x 8 weights are widened into L1 once per tile, one tile ahead
  // (double buffer), so that each weight stays a memory broadcast (16 conversions against 128 NV
  // FMAs) and the widening is off the path to the tile's first FMA. The opaque pointer stops gcc
  // from keeping them in registers, extracting lanes and spilling accumulators. float tiles are
  // read in place.
  constexpr bool kWiden = !std::is_same_v<T, float>;
  constexpr int64_t kWs = kWiden ? 8 : Cfg::kTileN;  // floats between k rows
  WidenedHalfTiles<T> widened;
  auto widen_tile = [&](int64_t jw) {
    if constexpr (kWiden) {
#pragma GCC unroll 16
      for (int k = 0; k < Cfg::kTileK; ++k) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + jw * Cfg::kTileSize + Cfg::kTileN * k));
        _mm256_store_ps(widened.v[jw & 1] + 8 * k,
                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
    }
  };
  if (b.count > 0) widen_tile(0);
  for (int64_t j = 0; j < b.count; ++j) {
    const int32_t tile = b.tidx[j], next = b.tidx[j + 1 < b.count ? j + 1 : j];
    const T* wj = w + j * Cfg::kTileSize;
    const char* wn = reinterpret_cast<const char*>(wj + Cfg::kPrefetchTiles * Cfg::kTileSize);
    const float* wf;
    if constexpr (kWiden) {
      if (j + 1 < b.count) widen_tile(j + 1);
      wf = widened.v[j & 1];
      asm("" : "+r"(wf));
    } else {
      wf = wj;
    }
#pragma GCC unroll 16
    for (int k = 0; k < Cfg::kTileK; ++k) {
      // The next tile's x: NV lines per k row, k-row by k-row; the weights kPrefetchTiles ahead.
      const char* xn = reinterpret_cast<const char*>(rows.row(int64_t{next} * Cfg::kTileK + k));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm_prefetch(xn + 64 * v, _MM_HINT_T0);
      if (k < kTileLines<T>) _mm_prefetch(wn + 64 * k, _MM_HINT_T0);
      const float* xk = rows.row(int64_t{tile} * Cfg::kTileK + k);
      __m512 xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xk + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        __m512 wb = _mm512_set1_ps(wf[kWs * k + r]);
        // Keep the broadcast in a register: folded into each FMA it would cost NV loads.
        asm("" : "+v"(wb));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(xv[v], wb, c[r][v]);
      }
    }
  }
  float* out = b.acc + 8 * b.half * b.ld;
  for (int r = 0; r < 8; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* o = out + r * b.ld + 16 * v;
      _mm512_store_ps(o, b.accumulate ? _mm512_add_ps(c[r][v], _mm512_load_ps(o)) : c[r][v]);
    }
  }
}

template <int NV, typename T>
void wide_packed(const MaskedWideBlockT<T>& b) { wide<NV>(b, PackedRows<16 * NV>{b.xp}); }

template <int NV>
void wide_conv(const MaskedWideBlockT<float>& b, const int32_t* offsets) {
  wide<NV>(b, OffsetRows{b.xp, offsets});
}

template <typename T, int... I>
constexpr std::array<void (*)(const MaskedWideBlockT<T>&), sizeof...(I)> wide_table(std::integer_sequence<int, I...>) {
  return {&wide_packed<I + 1, T>...};
}

template <int... I>
constexpr std::array<void (*)(const MaskedWideBlockT<float>&, const int32_t*), sizeof...(I)> wide_conv_table(
    std::integer_sequence<int, I...>) {
  return {&wide_conv<I + 1>...};
}

template <typename T>
constexpr auto kWide = wide_table<T>(std::make_integer_sequence<int, Cfg::kNvAvx512>{});
constexpr auto kWideConv = wide_conv_table(std::make_integer_sequence<int, Cfg::kNvAvx512>{});

}  // namespace

uint32_t masked_pack_avx512(const DenseIn& x, int64_t p0, int width, int ld, int64_t k0, int64_t k1,
                            float* dst) {
  __m512i worst = _mm512_setzero_si512();
  if (x.stride_k == 1 && x.stride_p != 1) {
    // Linear layout: 16 batch rows x 16 k are loaded as rows, transposed in registers and stored
    // as 16 k-rows of the packed block.
    for (int i0 = 0; i0 < ld; i0 += 16) {
      const int rows = width - i0;  // may be <= 0: zero padding columns
      const __mmask16 store_mask = first_n(ld - i0);
      for (int64_t kb = k0; kb < k1; kb += 16) {
        const int64_t nk = k1 - kb < 16 ? k1 - kb : 16;
        const __mmask16 k_mask = first_n(nk);
        __m512 r[16];
        for (int j = 0; j < 16; ++j) {
          r[j] = j < rows ? _mm512_maskz_loadu_ps(k_mask, x.data + (p0 + i0 + j) * x.stride_p + kb)
                          : _mm512_setzero_ps();
          worst = exponent_max(worst, r[j]);
        }
        transpose16(r);
        for (int c = 0; c < nk; ++c) _mm512_mask_storeu_ps(dst + (kb + c) * ld + i0, store_mask, r[c]);
      }
    }
  } else if (x.stride_p == 1) {
    // Conv layout: the block's columns are contiguous in each row of X.
    for (int64_t k = k0; k < k1; ++k) {
      const float* src = x.data + k * x.stride_k + p0;
      for (int i0 = 0; i0 < ld; i0 += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(first_n(width - i0), src + i0);
        worst = exponent_max(worst, v);
        _mm512_mask_storeu_ps(dst + k * ld + i0, first_n(ld - i0), v);
      }
    }
  } else {
    return masked_pack_scalar(x, p0, width, ld, k0, k1, dst);
  }
  return _mm512_reduce_max_epu32(worst);
}

void masked_store_avx512(const float* acc, int64_t cols, int rows, const float* bias,
                         bool accumulate, float* y, int64_t sn, int64_t sp) {
  const __mmask16 m = first_n(rows);
  const __m512 b = bias && !accumulate ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
  if (sn == 1) {  // linear: the 16 rows of one column are contiguous in y
    for (int64_t p = 0; p < cols; ++p) {
      float* out = y + p * sp;
      const __m512 base = accumulate ? _mm512_maskz_loadu_ps(m, out) : b;
      _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_load_ps(acc + 16 * p), base));
    }
    return;
  }
  if (sp == 1) {  // conv: transpose 16 columns at a time into rows of y
    alignas(64) float bias_lanes[16];
    _mm512_store_ps(bias_lanes, b);
    for (int64_t p0 = 0; p0 < cols; p0 += 16) {
      const int64_t n = cols - p0 < 16 ? cols - p0 : 16;
      const __mmask16 pm = first_n(n);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = j < n ? _mm512_load_ps(acc + 16 * (p0 + j)) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < rows; ++i) {
        float* out = y + i * sn + p0;
        const __m512 base = accumulate ? _mm512_maskz_loadu_ps(pm, out) : _mm512_set1_ps(bias_lanes[i]);
        _mm512_mask_storeu_ps(out, pm, _mm512_add_ps(r[i], base));
      }
    }
    return;
  }
  masked_store_scalar(acc, cols, rows, bias, accumulate, y, sn, sp);
}

void masked_store_wide_avx512(const float* acc, int64_t ld, int64_t cols, int rows,
                              const float* bias, bool accumulate, float* y, int64_t sn, int64_t sp) {
  if (sp == 1) {  // conv: rows of acc are rows of y
    for (int r = 0; r < rows; ++r) {
      const __m512 b = _mm512_set1_ps(bias && !accumulate ? bias[r] : 0.f);
      for (int64_t p0 = 0; p0 < cols; p0 += 16) {
        const __mmask16 m = first_n(cols - p0);
        float* out = y + r * sn + p0;
        const __m512 base = accumulate ? _mm512_maskz_loadu_ps(m, out) : b;
        _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_load_ps(acc + r * ld + p0), base));
      }
    }
    return;
  }
  if (sn == 1) {  // linear: transpose 16 columns at a time into 16-row segments of y
    const __mmask16 m = first_n(rows);
    const __m512 b = bias && !accumulate ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < cols; p0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(acc + i * ld + p0);
      transpose16(r);
      const int64_t n = cols - p0 < 16 ? cols - p0 : 16;
      for (int64_t j = 0; j < n; ++j) {
        float* out = y + (p0 + j) * sp;
        const __m512 base = accumulate ? _mm512_maskz_loadu_ps(m, out) : b;
        _mm512_mask_storeu_ps(out, m, _mm512_add_ps(r[j], base));
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const float add = bias && !accumulate ? bias[r] : 0.f;
    for (int64_t p = 0; p < cols; ++p) {
      float& o = y[r * sn + p * sp];
      o = acc[r * ld + p] + (accumulate ? o : add);
    }
  }
}

template <typename T>
void masked_wide_avx512(const MaskedWideBlockT<T>& b) { kWide<T>[b.nv - 1](b); }
template void masked_wide_avx512(const MaskedWideBlockT<float>&);
template void masked_wide_avx512(const MaskedWideBlockT<uint16_t>&);

void masked_wide_conv_avx512(const MaskedWideBlockT<float>& b, const int32_t* offsets) {
  kWideConv[b.nv - 1](b, offsets);
}

template <typename T>
void masked_block_avx512(const MaskedBlockT<T>& b) { kBlocks<T>[b.mr - 1](b); }
template void masked_block_avx512(const MaskedBlockT<float>&);
template void masked_block_avx512(const MaskedBlockT<uint16_t>&);

}  // namespace pyhwp
