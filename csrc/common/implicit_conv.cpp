// The shared part of the CPU implicit-GEMM conv drivers (see implicit_conv.h).
#include "common/implicit_conv.h"

#include <cstring>
#include <limits>

#include "common/checks.h"

namespace pyhwp {

void check_conv_geometry(const ConvGeometry& g, const PaddedPlanes& pd, const char* op) {
  PYHWP_CHECK(g.images >= 0 && g.channels >= 1 && g.h >= 0 && g.w >= 0 && g.pt >= 0 && g.pl >= 0 && g.kh >= 1 &&
              g.kw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ho >= 0 && g.wo >= 0, op, ": bad geometry");
  PYHWP_CHECK(pd.image_floats() <= std::numeric_limits<int32_t>::max(), op,
              ": a padded image must hold fewer than 2^31 elements");
}

int64_t conv_tile_width(int64_t P) {
  const int64_t tiles = std::max<int64_t>(1, (P + kConvTileP - 1) / kConvTileP);
  return ((P + tiles - 1) / tiles + 15) / 16 * 16;
}

void conv_column_offsets(const ConvGeometry& g, const PaddedPlanes& pd, int32_t* table) {
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s) {
        const int64_t shift = pd.copies > 1 ? s * pd.copy_stride : s * g.dw;
        *table++ = static_cast<int32_t>(c * pd.plane + r * g.dh * pd.wp + shift);
      }
}

int64_t conv_channels_per_block(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width) {
  if (g.kh * g.kw == 1) return g.channels;
  const int64_t window = width + (g.kh - 1) * g.dh * pd.wp;  // the rows of one s, all r
  const int64_t per_channel = 4 * (pd.copies > 1 ? pd.copies * window : window + (g.kw - 1) * g.dw);
  return std::max<int64_t>(1, std::min(g.channels, kConvL1Bytes / per_channel));
}

bool pad_input_row(const float* x_img, const ConvGeometry& g, const PaddedPlanes& pd, float* xp_img, int64_t a) {
  const int64_t i = a - g.pt;
  // The side pads are a float or two: stores, not memset calls (measured: the calls were a third
  // of this pass), and no memcpy calls either (for short rows, the calls cost more than the
  // copies). A zero the compiler cannot see keeps it from turning the loops into calls.
  float zero = 0.f;
  asm("" : "+x"(zero));
  uint32_t seen = 0;
  for (int64_t s = 0; s < pd.copies; ++s) {
    // Copy s: the padded row shifted left by `shift` (zeros shifted in): lo zeros, n inputs from
    // `skip` on, hi zeros.
    const int64_t shift = s * g.dw;
    const int64_t lo = std::min(std::max<int64_t>(0, g.pl - shift), pd.wp), skip = std::max<int64_t>(0, shift - g.pl);
    const int64_t n = std::max<int64_t>(0, std::min(g.w - skip, pd.wp - lo)), hi = pd.wp - lo - n;
    for (int64_t c = 0; c < g.channels; ++c) {
      float* row = xp_img + s * pd.copy_stride + c * pd.plane + a * pd.wp;
      if (a + 1 == pd.hp) {  // the alignment padding after the last row
        for (int64_t b = pd.wp; b < pd.plane - (pd.hp - 1) * pd.wp; ++b) row[b] = zero;
      }
      if (i < 0 || i >= g.h) {
        std::memset(row, 0, sizeof(float) * pd.wp);
        continue;
      }
      for (int64_t b = 0; b < lo; ++b) row[b] = zero;
      const uint32_t* in = reinterpret_cast<const uint32_t*>(x_img + (c * g.h + i) * g.w + skip);
      uint32_t* out = reinterpret_cast<uint32_t*>(row + lo);
      for (int64_t b = 0; b < n; ++b) {
        out[b] = in[b];
        seen |= (in[b] & 0x7f800000u) == 0x7f800000u;
      }
      for (int64_t b = 0; b < hi; ++b) row[lo + n + b] = zero;
    }
  }
  return seen != 0;
}

void store_conv_tile(const float* tile, int64_t ld_tile, int64_t rows, int64_t p0, int64_t width,
                     const ConvGeometry& g, const PaddedPlanes& pd, float* y, int64_t ld_y) {
  for (int64_t q = 0; q < width;) {
    const int64_t p = p0 + q, a = p / pd.wp, b = p % pd.wp;
    const int64_t run = std::min(width - q, pd.wp - b);
    if (b < g.wo) {
      const int64_t keep = std::min(run, g.wo - b);
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(y + i * ld_y + a * g.wo + b, tile + i * ld_tile + q, sizeof(float) * keep);
    }
    q += run;
  }
}

}  // namespace pyhwp
