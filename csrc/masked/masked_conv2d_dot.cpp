// The masked conv's wide micro-kernel on VDPBF16PS (AVX512-BF16; built with the AMX files' flags):
// for bfloat16 weights on a CPU without AMX, the implicit GEMM of masked_conv2d_cpu.cpp multiplies
// pairs of k instead of single ones. X stays the driver's padded float32 planes (copies of
// bfloat16 inputs, so rounding them back is exact); each k pair's two rows are converted and
// interleaved into one register of 16 pixel pairs (VCVTNE2PS2BF16, VPERMW), shared by the 8
// rows of the block, whose weight pairs are broadcast from a 256-byte copy of the tile's half.
#include <immintrin.h>

#include <array>
#include <utility>

#include "common/amx_bf16.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

// Rows 8 half .. 8 half + 7 of a stored tile (k-major bfloat16: (k, n) at 16 k + n) as 8 k pairs x
// 8 rows of 32-bit (k, k + 1) pairs.
inline void half_pairs(const uint16_t* tile, int half, uint32_t* out) {
#pragma GCC unroll 8
  for (int p = 0; p < Cfg::kTileK / 2; ++p) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16 * (2 * p) + 8 * half));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16 * (2 * p + 1) + 8 * half));
    _mm_store_si128(reinterpret_cast<__m128i*>(out + 8 * p), _mm_unpacklo_epi16(lo, hi));
    _mm_store_si128(reinterpret_cast<__m128i*>(out + 8 * p + 4), _mm_unpackhi_epi16(lo, hi));
  }
}

// 8 rows x NV vectors of 16 pixels over b.count stored tiles; row k of k-tile t at b.xp +
// offsets[16 t + k] (float32). As the float32 wide kernel: per k pair, NV x registers, each of
// the 8 weight pairs broadcast once and fed to NV VDPBF16PS.
template <int NV>
void wide_dot(const MaskedWideBlockT<uint16_t>& b, const int32_t* offsets) {
  __m512 c[8][NV];
  for (int r = 0; r < 8; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  const __m512i interleave = _mm512_load_si512(amx::kPairInterleave);
  alignas(64) uint32_t pairs[2][Cfg::kTileK / 2 * 8];  // double buffer, one tile ahead
  if (b.count > 0) half_pairs(b.tiles, b.half, pairs[0]);
  for (int64_t j = 0; j < b.count; ++j) {
    const int32_t tile = b.tidx[j], next = b.tidx[j + 1 < b.count ? j + 1 : j];
    if (j + 1 < b.count) half_pairs(b.tiles + (j + 1) * Cfg::kTileSize, b.half, pairs[(j + 1) & 1]);
    const uint32_t* wp = pairs[j & 1];
    asm("" : "+r"(wp));  // broadcast from memory: not 64 pairs held in registers
    const int32_t* rows = offsets + int64_t{tile} * Cfg::kTileK;
    const int32_t* next_rows = offsets + int64_t{next} * Cfg::kTileK;
#pragma GCC unroll 8
    for (int p = 0; p < Cfg::kTileK / 2; ++p) {
      for (int h = 0; h < 2; ++h) {  // the next tile's x, two rows per pair
        const char* xn = reinterpret_cast<const char*>(b.xp + next_rows[2 * p + h]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) _mm_prefetch(xn + 64 * v, _MM_HINT_T0);
      }
      const float* x0 = b.xp + rows[2 * p];
      const float* x1 = b.xp + rows[2 * p + 1];
      __m512bh xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i both = reinterpret_cast<__m512i>(
            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x1 + 16 * v), _mm512_loadu_ps(x0 + 16 * v)));
        xv[v] = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(interleave, both));
      }
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        __m512i wb = _mm512_set1_epi32(static_cast<int32_t>(wp[8 * p + r]));
        asm("" : "+v"(wb));  // one broadcast feeds NV products
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], xv[v], reinterpret_cast<__m512bh>(wb));
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

template <int... I>
constexpr std::array<void (*)(const MaskedWideBlockT<uint16_t>&, const int32_t*), sizeof...(I)> wide_dot_table(
    std::integer_sequence<int, I...>) {
  return {&wide_dot<I + 1>...};
}

constexpr auto kWideDot = wide_dot_table(std::make_integer_sequence<int, Cfg::kNvAvx512>{});

}  // namespace

void masked_wide_conv_dot(const MaskedWideBlockT<uint16_t>& b, const int32_t* offsets) {
  kWideDot[b.nv - 1](b, offsets);
}

}  // namespace pyhwp
