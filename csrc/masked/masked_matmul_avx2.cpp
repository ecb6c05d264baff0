// AVX2 masked micro-kernel: 16 rows (two ymm) x mr <= 6 columns, the classic 16x6 register block.
#include <immintrin.h>

#include <array>
#include <utility>

#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

// AVX2 has no broadcast memory operand, so each x value is broadcast once into a register and
// feeds the two FMAs of the 16-row tile column.
template <int MR>
void block(const MaskedBlock& b) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const float* w = b.tiles;
  for (int64_t j = 0; j < b.count; ++j, w += Cfg::kTileSize) {
    const float* xt = b.xp + static_cast<int64_t>(b.tidx[j]) * (Cfg::kTileK * MR);
#pragma GCC unroll 4
    for (int k = 0; k < Cfg::kTileK; ++k) {
      const __m256 w0 = _mm256_loadu_ps(w + Cfg::kTileN * k);
      const __m256 w1 = _mm256_loadu_ps(w + Cfg::kTileN * k + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_broadcast_ss(xt + k * MR + i);
        c0[i] = _mm256_fmadd_ps(w0, xv, c0[i]);
        c1[i] = _mm256_fmadd_ps(w1, xv, c1[i]);
      }
    }
  }

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

template <int... I>
constexpr std::array<MaskedBlockFn, sizeof...(I)> table(std::integer_sequence<int, I...>) {
  return {&block<I + 1>...};
}

constexpr auto kBlocks = table(std::make_integer_sequence<int, Cfg::kMrAvx2>{});

}  // namespace

void masked_block_avx2(const MaskedBlock& b) { kBlocks[b.mr - 1](b); }

}  // namespace pyhwp
