// bfloat16 conv2d on AMX as an implicit GEMM (see amx_conv.h). Built with the AMX flags.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "common/amx_bf16.h"
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
constexpr int64_t kChunkBytes = int64_t{64} << 20;  // the most bytes of input phases at a time

// Every tile register 16 rows x 64 bytes: tmm0-3 C (tile 2i + j: pixel block i, channel tile
// j), tmm4-5 A (the two pixel blocks), tmm6-7 B (the two channel tiles).
amx::TileConfig conv_tiles() {
  amx::TileConfig c;
  for (int t = 0; t < 8; ++t) c.set(t, 16, 64);
  return c;
}

// The input as the kernel reads it: the padded image split into sh x sw phases (phase (u, v)
// holds the padded pixels (i sh + u, j sw + v), i < hq, j < wq; one phase for stride 1), each
// pixel-major: a pixel's cp channels (C rounded up to 32, zeros past C) contiguous. Phase ph of
// image n starts at (n sh sw + ph) * pixels * cp bfloat16 values; zeros for the padding and the
// tail the last pixel group reads past the phase (`pixels` >= its reach). Tap (r, s) of output
// pixel (a, b) is phase ((r dh) % sh, (s dw) % sw) at (a + (r dh) / sh, b + (s dw) / sw): a
// stride-1 window of one phase, whose A tile rows, 32 channels of one pixel, are aligned 64-byte
// lines at every tap.
// `groups` counts the work items' pixel groups (ho rows of wq pixels, wrapped columns included).
struct Phases {
  int64_t cp, hq, wq, groups, rows, pixels;
};

Phases phases_of(const ConvGeometry& g) {
  const int64_t sh = g.sh, sw = g.sw;
  Phases p;
  p.cp = (g.channels + 31) / 32 * 32;
  p.hq = ((g.ho - 1) * sh + (g.kh - 1) * g.dh) / sh + 1;  // rows of padded input read, per phase
  p.wq = ((g.wo - 1) * sw + (g.kw - 1) * g.dw) / sw + 1;
  p.groups = (g.ho * p.wq + kGroupPixels - 1) / kGroupPixels;
  const int64_t reach = p.groups * kGroupPixels + ((g.kh - 1) * g.dh / sh) * p.wq + (g.kw - 1) * g.dw / sw;
  p.rows = (std::max(p.hq * p.wq, reach) + p.wq - 1) / p.wq;
  p.pixels = p.rows * p.wq;
  return p;
}

// 16 bfloat16 values of one input row at columns base + sw q (q < 16), zeros outside [0, w).
inline __m256i load_columns(const uint16_t* row, int64_t base, int64_t sw, int64_t w) {
  const int64_t lanes = 16 * sw, first = std::max<int64_t>(0, -base), last = std::min(lanes, w - base);
  if (last <= first) return _mm256_setzero_si256();
  const __mmask32 m = static_cast<__mmask32>((last >= 32 ? ~0u : (1u << last) - 1) & ~((1u << first) - 1));
  if (sw == 1) return _mm256_maskz_loadu_epi16(static_cast<__mmask16>(m), row + base);
  // sw == 2: the even lanes of 32
  const __m512i all = _mm512_maskz_loadu_epi16(m, row + base);
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                                        24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi16(even, all));
}

// Writes row i of phase ph of image n (at `row`); returns whether it read a NaN/Inf. From NCHW,
// channels are transposed 16 pixels x 32 channels at a time: channel pairs as 32-bit lanes, then
// a 16 x 16 transpose of those; from channels_last, each pixel's channels are one copy.
bool fill_row(const ConvGeometry& g, const Phases& ph, const uint16_t* x, bool channels_last, int64_t n,
              int64_t phase, int64_t i, uint16_t* row) {
  const int64_t u = phase / g.sw, v = phase % g.sw;
  const int64_t src_row = i * g.sh + u - g.pt;
  if (i >= ph.hq || src_row < 0 || src_row >= g.h) {
    std::memset(row, 0, sizeof(uint16_t) * static_cast<size_t>(ph.wq * ph.cp));
    return false;
  }
  if (channels_last) {  // x is (images, h, w, C): each pixel's channels are contiguous already
    const __m512i expo = _mm512_set1_epi16(0x7f80);
    __mmask32 bad = 0;
    for (int64_t j = 0; j < ph.wq; ++j) {
      uint16_t* dst = row + j * ph.cp;
      const int64_t col = j * g.sw + v - g.pl;
      if (col < 0 || col >= g.w) {
        std::memset(dst, 0, sizeof(uint16_t) * static_cast<size_t>(ph.cp));
        continue;
      }
      const uint16_t* src = x + ((n * g.h + src_row) * g.w + col) * g.channels;
      for (int64_t c0 = 0; c0 < ph.cp; c0 += 32) {
        const int64_t left = g.channels - c0;
        const __mmask32 m = left >= 32 ? ~__mmask32{0} : left > 0 ? (__mmask32{1} << left) - 1 : 0;
        const __m512i vals = _mm512_maskz_loadu_epi16(m, src + c0);
        bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(vals, expo), expo);
        _mm512_store_si512(dst + c0, vals);
      }
    }
    return bad != 0;
  }
  const __m256i expo = _mm256_set1_epi16(0x7f80);
  __mmask16 bad = 0;
  const int64_t hw = g.h * g.w;
  const uint16_t* src = x + (n * g.channels) * hw + src_row * g.w;
  for (int64_t c0 = 0; c0 < ph.cp; c0 += 32) {
    for (int64_t j = 0; j < ph.wq; j += 16) {
      const int64_t base = j * g.sw + v - g.pl;  // input column of phase column j
      __m512 t[16];
      for (int q = 0; q < 16; ++q) {
        const int64_t c = c0 + 2 * q;
        const __m256i a = c < g.channels ? load_columns(src + c * hw, base, g.sw, g.w) : _mm256_setzero_si256();
        const __m256i b = c + 1 < g.channels ? load_columns(src + (c + 1) * hw, base, g.sw, g.w)
                                             : _mm256_setzero_si256();
        bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(a, expo), expo);
        bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, expo), expo);
        t[q] = _mm512_castsi512_ps(
            _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
      avx512::transpose16(t);  // t[p]: phase column j + p's 16 channel pairs
      uint16_t* dst = row + j * ph.cp + c0;
      for (int p = 0; p < 16 && j + p < ph.wq; ++p) _mm512_store_si512(dst + p * ph.cp, _mm512_castps_si512(t[p]));
    }
  }
  return bad != 0;
}

// Rounds acc (16 pixels x 16 output channels float32, pixel rows) + bias to bfloat16 and writes
// the pixels p0 .. p0 + 15 that are outputs (b < wo, a < ho) of channels n0 .. n0 + rows - 1:
// y_image points at channel n0 of the image's output, which has g_out channels; NCHW (a
// transpose of the block first) or channels_last.
void store_block(const float* acc, const float* bias, int rows, const ConvGeometry& g, int64_t wp, int64_t p0,
                 bool channels_last, int64_t g_out, uint16_t* y_image) {
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
  if (channels_last) {  // y is (images, ho, wo, out): an accumulator row is 16 consecutive outputs
    const __mmask16 nm = avx512::tail_mask(rows);
    const __m512 b = _mm512_maskz_loadu_ps(nm, bias);
    for (int r = 0; r < runs; ++r) {
      for (int64_t l = run_lane[r]; l < run_lane[r] + run_len[r]; ++l) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(acc + 16 * l), b);
        uint16_t* out = y_image + (run_out[r] + l - run_lane[r]) * g_out;
        _mm256_mask_storeu_epi16(out, nm, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
      }
    }
    return;
  }
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

AmxConvStatus amx_conv2d_bf16(const AmxConvWeight& w, const ConvGeometry& g, bool channels_last, const uint16_t* x,
                              const uint16_t* bias, uint16_t* y, int num_threads) {
  const int64_t sh = g.sh, sw = g.sw;
  if (active_isa() != Isa::kAmx || sh < 1 || sw < 1 || sw > 2) return AmxConvStatus::kUnavailable;
  const int64_t out = w.out, taps = g.kh * g.kw, cblocks = (g.channels + 31) / 32;
  const int64_t ctiles = (out + 15) / 16, citems = (ctiles + 1) / 2;
  const Phases ph = phases_of(g);
  const int64_t wq = ph.wq, groups = ph.groups;
  if (g.images == 0 || groups == 0 || out == 0) return AmxConvStatus::kDone;
  // The images run in chunks whose phases fit kChunkBytes (the copy of a large batch, or of a
  // 3-channel input padded to 32 channels, would otherwise be many times the input).
  const int64_t phase_values = ph.pixels * ph.cp, image_values = sh * sw * phase_values;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(g.images, kChunkBytes / (2 * image_values)));
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunk * groups * citems)));

  // Scratch of the calling thread: the float32 bias (padded to whole channel-tile pairs), then
  // the chunk's phases (64-byte aligned: 32 * citems floats before them).
  float* bias_f = scratch(0, 32 * citems + chunk * image_values / 2 + 16);
  std::fill(bias_f, bias_f + 32 * citems, 0.f);
  widen_bf16(bias, out, bias_f);
  uint16_t* phases = reinterpret_cast<uint16_t*>(bias_f + 32 * citems);
  const int64_t stride = ph.cp * 2;  // bytes between A rows (consecutive pixels)

  for (int64_t i0 = 0; i0 < g.images; i0 += chunk) {
    const int64_t images = std::min(chunk, g.images - i0);
    const int64_t fill_rows = images * sh * sw * ph.rows;
    int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
    for (int64_t f = 0; f < fill_rows; ++f) {
      const int64_t plane = f / ph.rows, i = f % ph.rows;  // plane: image * phases + phase
      bad |= fill_row(g, ph, x, channels_last, i0 + plane / (sh * sw), plane % (sh * sw), i,
                      phases + plane * phase_values + i * ph.wq * ph.cp);
    }
    if (bad) return AmxConvStatus::kNonfinite;
    const int64_t items = images * groups * citems;

#pragma omp parallel num_threads(nt)
    {
      const amx::TileConfig config = conv_tiles();
      _tile_loadconfig(&config);
      float* acc = scratch(1, 4 * 256);
      // Items in (image, pixel group, channel-tile pair) order: a thread's consecutive items read
      // the same pixels, which stay in its caches.
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t local = it / (groups * citems), rem = it % (groups * citems);
        const int64_t image = i0 + local;
        const int64_t grp = rem / citems, o0 = 2 * (rem % citems);
        const bool two = o0 + 1 < ctiles;
        const int64_t p0 = grp * kGroupPixels;
        const uint16_t* xa = phases + local * image_values + p0 * ph.cp;
        const uint16_t* b0 = w.tiles + o0 * taps * cblocks * kTileValues;
        const uint16_t* b1 = b0 + taps * cblocks * kTileValues;
        const uint8_t* nz0 = w.nonzero + o0 * taps * cblocks;
        const uint8_t* nz1 = nz0 + taps * cblocks;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t r = (tap / g.kw) * g.dh, q = (tap % g.kw) * g.dw;
          const int64_t off = ((r % sh) * sw + q % sw) * phase_values + ((r / sh) * wq + q / sw) * ph.cp;
          for (int64_t c = 0; c < cblocks; ++c) {
            const int64_t k = tap * cblocks + c;
            const bool use0 = nz0[k] != 0, use1 = two && nz1[k] != 0;
            if (!use0 && !use1) continue;
            const uint16_t* a = xa + off + 32 * c;
            _tile_loadd(4, a, stride);
            _tile_loadd(5, a + kBlock * ph.cp, stride);
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
          uint16_t* y_image = y + image * out * g.ho * g.wo + (channels_last ? n0 : n0 * g.ho * g.wo);
          for (int j = 0; j < 2; ++j) {
            store_block(acc + (2 * j + h) * 256, bias_f + n0, rows, g, wq, p0 + j * kBlock, channels_last, out,
                        y_image);
          }
        }
      }
      _tile_release();
    }
  }
  return AmxConvStatus::kDone;
}

}  // namespace pyhwp
