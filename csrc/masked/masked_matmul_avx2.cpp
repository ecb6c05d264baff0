// AVX2 masked micro-kernel: 16 rows (two ymm) x mr <= 6 columns, the classic 16x6 register block.
#include <immintrin.h>

#include <array>
#include <utility>

#include "common/simd_avx2.h"
#include "common/x_rows.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

using avx2::load8;

// AVX2 has no broadcast memory operand, so each x value is broadcast once into a register and
// feeds the two FMAs of the 16-row tile column. Row k of k-tile t of x at rows.row(16 t + k)
// (common/x_rows.h).
template <int MR, typename T, typename Rows>
void block(const MaskedBlockT<T>& b, Rows rows) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const T* w = b.tiles;
  for (int64_t j = 0; j < b.count; ++j, w += Cfg::kTileSize) {
    const int32_t tile = b.tidx[j];
    // At batch 1 (a tile is 32 FMAs) the weights stream as in the AVX-512 kernel: the tile
    // kPrefetchTiles ahead, a line per k, and a touch in the pages kPageAhead and 2 kPageAhead
    // ahead. AVX2 kernels on this machine, from DRAM, no zero tiles: 4096x4096 0.74x -> 0.88-0.92x
    // dense, 3072x768 0.79-0.81x -> 0.93-0.94x; 4096x4096 with 75% zero tiles 2.48x -> 2.85-2.98x.
    // At batch 16 and 128 the same prefetches cost 5-8% on the shapes whose weights stay in L3,
    // so they are left out there.
    const char* wn = reinterpret_cast<const char*>(w + Cfg::kPrefetchTiles * Cfg::kTileSize);
    if constexpr (MR == 1) {
      _mm_prefetch(reinterpret_cast<const char*>(w) + Cfg::kPageAhead, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w) + 2 * Cfg::kPageAhead, _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int k = 0; k < Cfg::kTileK; ++k) {
      if (MR == 1 && 64 * k < Cfg::kTileSize * static_cast<int64_t>(sizeof(T))) _mm_prefetch(wn + 64 * k, _MM_HINT_T0);
      const __m256 w0 = load8(w + Cfg::kTileN * k);
      const __m256 w1 = load8(w + Cfg::kTileN * k + 8);
      const float* xk = rows.row(int64_t{tile} * Cfg::kTileK + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_broadcast_ss(xk + i);
        c0[i] = _mm256_fmadd_ps(w0, xv, c0[i]);
        c1[i] = _mm256_fmadd_ps(w1, xv, c1[i]);
      }
    }
  }

#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* out = b.acc + 16 * i;
    if (b.accumulate) {
      c0[i] = _mm256_add_ps(c0[i], _mm256_load_ps(out));
      c1[i] = _mm256_add_ps(c1[i], _mm256_load_ps(out + 8));
    }
    _mm256_store_ps(out, c0[i]);
    _mm256_store_ps(out + 8, c1[i]);
  }
}

template <int MR, typename T>
void block_packed(const MaskedBlockT<T>& b) { block<MR>(b, PackedRows<MR>{b.xp}); }

template <int MR>
void block_conv(const MaskedBlockT<float>& b, const int32_t* offsets) {
  block<MR>(b, OffsetRows{b.xp, offsets});
}

template <typename T, int... I>
constexpr std::array<MaskedBlockFn<T>, sizeof...(I)> table(std::integer_sequence<int, I...>) {
  return {&block_packed<I + 1, T>...};
}

template <int... I>
constexpr std::array<void (*)(const MaskedBlockT<float>&, const int32_t*), sizeof...(I)> conv_table(
    std::integer_sequence<int, I...>) {
  return {&block_conv<I + 1>...};
}

template <typename T>
constexpr auto kBlocks = table<T>(std::make_integer_sequence<int, Cfg::kMrAvx2>{});
constexpr auto kConvBlocks = conv_table(std::make_integer_sequence<int, Cfg::kMrAvx2>{});

}  // namespace

void masked_block_conv_avx2(const MaskedBlockT<float>& b, const int32_t* offsets) {
  kConvBlocks[b.mr - 1](b, offsets);
}

template <typename T>
void masked_block_avx2(const MaskedBlockT<T>& b) { kBlocks<T>[b.mr - 1](b); }
template void masked_block_avx2(const MaskedBlockT<float>&);
template void masked_block_avx2(const MaskedBlockT<uint16_t>&);

}  // namespace pyhwp
