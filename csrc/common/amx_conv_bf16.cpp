// Stride-1 bfloat16 conv2d on AMX as an implicit GEMM (see amx_conv.h). Built with the AMX flags.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "common/amx_conv.h"
#include "common/bf16.h"
#include "common/cpu_features.h"
#include "common/dense.h"
#include "common/simd_avx512.h"

namespace pyhwp {

namespace {

constexpr int64_t kTileValues = 512;          // bfloat16 values of a 16 x 64-byte tile
constexpr int64_t kBlock = 16;                // pixels of a C tile
constexpr int64_t kGroupPixels = 2 * kBlock;  // pixels of a work item (two A tiles)

// Palette 1, every tile 16 rows x 64 bytes: tmm0-3 C (tile 2i + j: pixel block i, channel tile
// j), tmm4-5 A (the two pixel blocks), tmm6-7 B (the two channel tiles).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// The padded input, pixel-major: image i's padded pixel p (= row * wp + column) holds its cp
// channels (C rounded up to 32, zeros past C) at image + (i * pixels + p) * cp bfloat16 values,
// zeros for the padding and the tail the last pixel group reads past the image (`pixels` >= its
// reach). A tile row, 32 channels of one pixel, is then one aligned 64-byte line at every tap.
struct Padded {
  int64_t cp, wp, rows, pixels;
};

Padded padded_of(const ConvGeometry& g, int64_t groups) {
  Padded p;
  p.cp = (g.channels + 31) / 32 * 32;
  p.wp = g.wo + (g.kw - 1) * g.dw;
  const int64_t hp = g.ho + (g.kh - 1) * g.dh;
  const int64_t reach = groups * kGroupPixels + (g.kh - 1) * g.dh * p.wp + (g.kw - 1) * g.dw;
  p.rows = (std::max(hp * p.wp, reach) + p.wp - 1) / p.wp;
  p.pixels = p.rows * p.wp;
  return p;
}

// Writes padded row r of image i; returns whether its pixels hold a NaN/Inf. Channels are
// transposed 16 pixels x 32 channels at a time: channel pairs as 32-bit lanes, then a 16 x 16
// transpose of those.
bool fill_row(const ConvGeometry& g, const Padded& pd, const uint16_t* x, int64_t i, int64_t r, uint16_t* image) {
  uint16_t* row = image + r * pd.wp * pd.cp;
  const int64_t src_row = r - g.pt;
  if (src_row < 0 || src_row >= g.h) {
    std::memset(row, 0, sizeof(uint16_t) * static_cast<size_t>(pd.wp * pd.cp));
    return false;
  }
  std::memset(row, 0, sizeof(uint16_t) * static_cast<size_t>(g.pl * pd.cp));
  std::memset(row + (g.pl + g.w) * pd.cp, 0, sizeof(uint16_t) * static_cast<size_t>((pd.wp - g.pl - g.w) * pd.cp));
  const __m256i expo = _mm256_set1_epi16(0x7f80);
  __mmask16 bad = 0;
  const int64_t hw = g.h * g.w;
  const uint16_t* src = x + (i * g.channels) * hw + src_row * g.w;
  for (int64_t c0 = 0; c0 < pd.cp; c0 += 32) {
    for (int64_t j = 0; j < g.w; j += 16) {
      const __mmask16 m = avx512::tail_mask(g.w - j);
      __m512 v[16];
      for (int q = 0; q < 16; ++q) {
        const int64_t c = c0 + 2 * q;
        const __m256i a = c < g.channels ? _mm256_maskz_loadu_epi16(m, src + c * hw + j) : _mm256_setzero_si256();
        const __m256i b = c + 1 < g.channels ? _mm256_maskz_loadu_epi16(m, src + (c + 1) * hw + j)
                                             : _mm256_setzero_si256();
        bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(a, expo), expo);
        bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, expo), expo);
        v[q] = _mm512_castsi512_ps(
            _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
      avx512::transpose16(v);  // v[p]: pixel j + p's 16 channel pairs
      uint16_t* dst = row + (g.pl + j) * pd.cp + c0;
      for (int p = 0; p < 16 && j + p < g.w; ++p) _mm512_store_si512(dst + p * pd.cp, _mm512_castps_si512(v[p]));
    }
  }
  return bad != 0;
}

// Rounds acc (16 pixels x 16 output channels float32, pixel rows) + bias to bfloat16 and writes
// the pixels p0 .. p0 + 15 that are outputs (b < wo, a < ho) of channels n0 .. n0 + rows - 1.
void store_block(const float* acc, const float* bias, int rows, const ConvGeometry& g, int64_t wp, int64_t p0,
                 uint16_t* y_image) {
  // The block's runs of consecutive outputs: lanes [s, s + len) go to output offset o.
  int64_t run_lane[kBlock], run_len[kBlock], run_out[kBlock];
  int runs = 0;
  for (int64_t s = 0; s < kBlock;) {
    const int64_t p = p0 + s, a = p / wp, b = p % wp;
    if (a >= g.ho) break;
    if (b >= g.wo) {  // a wrapped column: skip to the next row's start
      s += wp - b;
      continue;
    }
    const int64_t len = std::min(kBlock - s, g.wo - b);
    run_lane[runs] = s, run_len[runs] = len, run_out[runs] = a * g.wo + b;
    ++runs;
    s += len;
  }
  if (runs == 0) return;
  __m512 m[16];
  for (int r = 0; r < 16; ++r) m[r] = _mm512_load_ps(acc + 16 * r);
  avx512::transpose16(m);  // m[n]: output channel n, 16 pixels
  const int64_t plane_out = g.ho * g.wo;
  const bool whole = runs == 1 && run_lane[0] == 0;  // the block starts a run (no compress)
  for (int n = 0; n < rows; n += 2) {  // two channels per conversion
    const __m512 lo = _mm512_add_ps(m[n], _mm512_set1_ps(bias[n]));
    const __m512 hi = _mm512_add_ps(m[n + 1], _mm512_set1_ps(bias[n + 1]));
    const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    for (int e = 0; e < 2 && n + e < rows; ++e) {
      const __m256i h = e ? _mm512_extracti64x4_epi64(both, 1) : _mm512_castsi512_si256(both);
      uint16_t* out = y_image + (n + e) * plane_out;
      if (whole) {
        _mm256_mask_storeu_epi16(out + run_out[0], avx512::tail_mask(run_len[0]), h);
        continue;
      }
      for (int r = 0; r < runs; ++r) {
        const __mmask16 lanes = static_cast<__mmask16>(avx512::tail_mask(run_len[r]) << run_lane[r]);
        _mm256_mask_storeu_epi16(out + run_out[r], avx512::tail_mask(run_len[r]),
                                 _mm256_maskz_compress_epi16(lanes, h));
      }
    }
  }
}

}  // namespace

AmxConvStatus amx_conv2d_bf16(const AmxConvWeight& w, const ConvGeometry& g, const uint16_t* x,
                              const uint16_t* bias, uint16_t* y, int num_threads) {
  if (active_isa() != Isa::kAmx) return AmxConvStatus::kUnavailable;
  const int64_t out = w.out, taps = g.kh * g.kw, cblocks = (g.channels + 31) / 32;
  const int64_t ctiles = (out + 15) / 16, citems = (ctiles + 1) / 2;
  const int64_t wp = g.wo + (g.kw - 1) * g.dw;
  const int64_t groups = (g.ho * wp + kGroupPixels - 1) / kGroupPixels;
  const Padded pd = padded_of(g, groups);
  const int64_t items = g.images * groups * citems;
  if (items == 0 || out == 0) return AmxConvStatus::kDone;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));

  // Scratch of the calling thread: the float32 bias (padded to whole channel-tile pairs), then
  // the padded input (64-byte aligned: 32 * citems floats before it).
  const int64_t image_values = pd.pixels * pd.cp;
  float* bias_f = scratch(0, 32 * citems + g.images * image_values / 2 + 16);
  std::fill(bias_f, bias_f + 32 * citems, 0.f);
  widen_bf16(bias, out, bias_f);
  uint16_t* padded = reinterpret_cast<uint16_t*>(bias_f + 32 * citems);
  const int64_t stride = pd.cp * 2;  // bytes between A rows (consecutive pixels)
  int bad = 0;

#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
  for (int64_t f = 0; f < g.images * pd.rows; ++f) {
    bad |= fill_row(g, pd, x, f / pd.rows, f % pd.rows, padded + (f / pd.rows) * image_values);
  }
  if (bad) return AmxConvStatus::kNonfinite;

#pragma omp parallel num_threads(nt)
  {
    const TileConfig config;
    _tile_loadconfig(&config);
    float* acc = scratch(1, 4 * 256);
    // Items in (image, pixel group, channel-tile pair) order: a thread's consecutive items read
    // the same pixels, which stay in its caches.
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t image = it / (groups * citems), rem = it % (groups * citems);
      const int64_t grp = rem / citems, o0 = 2 * (rem % citems);
      const bool two = o0 + 1 < ctiles;
      const int64_t p0 = grp * kGroupPixels;
      const uint16_t* xa = padded + image * image_values + p0 * pd.cp;
      const uint16_t* b0 = w.tiles + o0 * taps * cblocks * kTileValues;
      const uint16_t* b1 = b0 + taps * cblocks * kTileValues;
      const uint8_t* nz0 = w.nonzero + o0 * taps * cblocks;
      const uint8_t* nz1 = nz0 + taps * cblocks;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t off = (tap / g.kw) * g.dh * wp + (tap % g.kw) * g.dw;
        for (int64_t c = 0; c < cblocks; ++c) {
          const int64_t k = tap * cblocks + c;
          const bool use0 = nz0[k] != 0, use1 = two && nz1[k] != 0;
          if (!use0 && !use1) continue;
          const uint16_t* a = xa + off * pd.cp + 32 * c;
          _tile_loadd(4, a, stride);
          _tile_loadd(5, a + kBlock * pd.cp, stride);
          if (use0) {
            _tile_loadd(6, b0 + k * kTileValues, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
          }
          if (use1) {
            _tile_loadd(7, b1 + k * kTileValues, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, acc, 64);
      _tile_stored(1, acc + 256, 64);
      _tile_stored(2, acc + 512, 64);
      _tile_stored(3, acc + 768, 64);
      asm volatile("" ::: "memory");  // the stores above write acc behind the compiler's back
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        const int64_t n0 = 16 * (o0 + h);
        const int rows = static_cast<int>(std::min<int64_t>(16, out - n0));
        uint16_t* y_image = y + (image * out + n0) * g.ho * g.wo;
        for (int j = 0; j < 2; ++j) {
          store_block(acc + (2 * j + h) * 256, bias_f + n0, rows, g, wp, p0 + j * kBlock, y_image);
        }
      }
    }
    _tile_release();
  }
  return AmxConvStatus::kDone;
}

}  // namespace pyhwp
