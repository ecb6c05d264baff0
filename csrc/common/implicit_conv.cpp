// The shared part of the CPU implicit-GEMM conv drivers (see implicit_conv.h).
#include "common/implicit_conv.h"

#include <cstring>
#include <limits>

#include "common/checks.h"
#include "common/row_copy.h"

namespace pyhwp {

PaddedPlanes::PaddedPlanes(const ConvGeometry& g, int64_t shifted_segments, int64_t shifted_bands,
                           bool aligned_rows) {
  const bool shifted = shifted_segments >= 1;
  PYHWP_CHECK(!aligned_rows || (!shifted && g.sh * g.sw == 1), "PaddedPlanes: aligned rows are plain stride 1 only");
  PYHWP_CHECK(g.sh >= 1 && g.sw >= 1, "bad geometry: stride (", g.sh, ", ", g.sw, ")");
  PYHWP_CHECK(!shifted || g.sh * g.sw == 1, "PaddedPlanes: the shifted layout is stride 1 only");
  segments = shifted ? shifted_segments : 1;
  bands = shifted ? shifted_bands : 1;
  band = (g.ho + bands - 1) / bands;
  groups = (g.images * bands + segments - 1) / segments;
  const int64_t reach_w = g.dw * (g.kw - 1) / g.sw;  // the columns a window reaches past its pixel
  hp = band + g.dh * (g.kh - 1) / g.sh + (reach_w > 0 && !shifted ? 1 : 0);
  wp = !shifted ? (aligned_rows ? (g.wo + reach_w + 15) / 16 * 16 : g.wo + reach_w)
       : segments == 1 ? (g.wo + 15) / 16 * 16
                       : segments * g.wo;
  plane = (hp * wp + 15) / 16 * 16;
  phases = g.sh * g.sw;
  copies = shifted ? g.kw : 1;
  copy_stride = g.channels * phases * plane;
  PYHWP_CHECK(segments <= kMaxSegments && (segments == 1 || segments * g.wo % 16 == 0),
              "PaddedPlanes: ", segments, " segments of ", g.wo, " columns");
}

void check_conv_geometry(const ConvGeometry& g, const PaddedPlanes& pd, const char* op) {
  PYHWP_CHECK(g.images >= 0 && g.channels >= 1 && g.h >= 0 && g.w >= 0 && g.pt >= 0 && g.pl >= 0 && g.kh >= 1 &&
              g.kw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ho >= 0 && g.wo >= 0 && g.sh >= 1 && g.sw >= 1, op,
              ": bad geometry");
  PYHWP_CHECK(pd.group_floats() <= std::numeric_limits<int32_t>::max(), op,
              ": a padded image (or group of images) must hold fewer than 2^31 elements");
}

int64_t conv_tile_width(int64_t P) {
  const int64_t tiles = std::max<int64_t>(1, (P + kConvTileP - 1) / kConvTileP);
  return ((P + tiles - 1) / tiles + 15) / 16 * 16;
}

void conv_column_offsets(const ConvGeometry& g, const PaddedPlanes& pd, int32_t* table) {
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s) {
        const int64_t down = r * g.dh, across = s * g.dw, phase = down % g.sh * g.sw + across % g.sw;
        const int64_t shift = pd.copies > 1 ? s * pd.copy_stride : across / g.sw;
        *table++ = static_cast<int32_t>((c * pd.phases + phase) * pd.plane + down / g.sh * pd.wp + shift);
      }
}

int64_t conv_channels_per_block(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width) {
  if (g.kh * g.kw == 1) return g.channels;
  const int64_t window = width + (g.kh - 1) * g.dh / g.sh * pd.wp;  // the rows of one s, all r
  const int64_t planes = std::min(pd.phases, g.kh * g.kw);              // the phases its taps read
  const int64_t per_channel =
      4 * (pd.copies > 1 ? pd.copies * window : planes * (window + (g.kw - 1) * g.dw / g.sw));
  return std::max<int64_t>(1, std::min(g.channels, kConvL1Bytes / per_channel));
}

namespace {

// Columns [0, n) of phases 0 and 1 of one input row of a width-2 stride: even[b] = in[2b], odd[b] =
// in[2b + 1]; returns whether one is a NaN/Inf. (gcc vectorises it as loads and shuffles.)
uint32_t split_pairs(const uint32_t* __restrict in, uint32_t* __restrict even, uint32_t* __restrict odd, int64_t n) {
  uint32_t seen = 0;
  for (int64_t b = 0; b < n; ++b) {
    const uint32_t e = in[2 * b], o = in[2 * b + 1];
    even[b] = e, odd[b] = o;
    seen |= ((e & 0x7f800000u) == 0x7f800000u) | ((o & 0x7f800000u) == 0x7f800000u);
  }
  return seen;
}

// pad_group_rows of a strided conv (plain layout: a group is an image): row t of phase (u, v) of
// every channel holds the padded pixels (t*sh + u, b*sw + v), b < wp. Channel by channel, so that
// the input is read in order (row by row across the channels instead: the whole call 1.2x slower
// at 128->128 3x3 stride 2 @56, batch 1).
bool pad_phase_rows(const float* x, const ConvGeometry& g, const PaddedPlanes& pd, int64_t image, float* xp,
                    int64_t t0, int64_t t1) {
  const int64_t sw = g.sw;
  // Phase columns [lo, hi) read input columns b*sw + v - pl inside [0, w) for every phase v; the
  // few outside that range take the checked loop.
  const int64_t lo = std::min(pd.wp, (g.pl + sw - 1) / sw);
  const int64_t hi = std::max(lo, std::min(pd.wp, (g.w + g.pl) / sw));
  uint32_t seen = 0;
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t u = 0; u < g.sh; ++u) {
        const int64_t i = t * g.sh + u - g.pt;  // the input row, if any
        const uint32_t* in = i >= 0 && i < g.h
                                 ? reinterpret_cast<const uint32_t*>(x + ((image * g.channels + c) * g.h + i) * g.w)
                                 : nullptr;
        uint32_t* row0 = reinterpret_cast<uint32_t*>(xp + (c * g.sh + u) * sw * pd.plane + t * pd.wp);
        for (int64_t v = 0; v < sw; ++v) {
          uint32_t* row = row0 + v * pd.plane;
          if (t + 1 == pd.hp) std::memset(row + pd.wp, 0, sizeof(float) * (pd.plane - t * pd.wp - pd.wp));
          if (!in) {
            std::memset(row, 0, sizeof(float) * pd.wp);
            continue;
          }
          for (int64_t b = 0; b < pd.wp; ++b) {
            if (b == lo && sw == 2) b = hi;  // split_pairs below
            if (b == pd.wp) break;
            const int64_t col = b * sw + v - g.pl;
            const uint32_t bits = col >= 0 && col < g.w ? in[col] : 0;
            row[b] = bits;
            seen |= (bits & 0x7f800000u) == 0x7f800000u;
          }
        }
        if (in && sw == 2 && hi > lo)
          seen |= split_pairs(in + 2 * lo - g.pl, row0 + lo, row0 + pd.plane + lo, hi - lo);
      }
  return seen != 0;
}

// Row t of every channel (and copy) of a stride-1 conv's padded group, each segment's row of
// zeros and inputs written (and its inputs checked for NaN/Inf) by copy_run.
bool pad_group_row(const float* x, const ConvGeometry& g, const PaddedPlanes& pd, int64_t group, float* xp_group,
                   int64_t t, RowCopyFn copy_run) {
  // Each segment's input row (channel 0), or nullptr where it is zeros: a missing band, or a
  // padded row outside the input.
  const float* src[PaddedPlanes::kMaxSegments];
  for (int64_t sg = 0; sg < pd.segments; ++sg) {
    const int64_t u = group * pd.segments + sg, i = (u % pd.bands) * pd.band + t - g.pt;
    src[sg] = u < g.images * pd.bands && i >= 0 && i < g.h ? x + (u / pd.bands * g.channels * g.h + i) * g.w : nullptr;
  }
  const int64_t seg = pd.segment_width();
  // The alignment padding after the last row is a few floats: stores, not memset calls (the calls
  // measured a third of this pass when the side pads took them too). A zero the compiler cannot
  // see keeps it from turning the loop into calls.
  float zero = 0.f;
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(zero));
#elif defined(__aarch64__)
  asm("" : "+w"(zero));
#endif
  bool seen = false;
  for (int64_t s = 0; s < pd.copies; ++s) {
    float* copy = xp_group + s * pd.copy_stride + t * pd.wp;
    if (t + 1 == pd.hp) {  // the alignment padding after the last row
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t b = pd.wp; b < pd.plane - (pd.hp - 1) * pd.wp; ++b) copy[c * pd.plane + b] = zero;
    }
    // Copy s: each segment holds its padded row shifted left by `shift` (zeros shifted in): lo
    // zeros, n inputs from `skip` on, hi zeros.
    const int64_t shift = s * g.dw;
    const int64_t lo = std::min(std::max<int64_t>(0, g.pl - shift), seg), skip = std::max<int64_t>(0, shift - g.pl);
    const int64_t n = std::max<int64_t>(0, std::min(g.w - skip, seg - lo)), hi = seg - lo - n;
    for (int64_t sg = 0; sg < pd.segments; ++sg) {
      float* row = copy + sg * seg;
      if (!src[sg]) {
        for (int64_t c = 0; c < g.channels; ++c) std::memset(row + c * pd.plane, 0, sizeof(float) * seg);
        continue;
      }
      const float* first = src[sg] + skip;
      for (int64_t c = 0; c < g.channels; ++c, row += pd.plane) seen |= copy_run(first + c * g.h * g.w, lo, n, hi, row);
    }
  }
  return seen;
}

}  // namespace

bool pad_group_rows(const float* x, const ConvGeometry& g, const PaddedPlanes& pd, int64_t group, float* xp_group,
                    int64_t t0, int64_t t1) {
  if (pd.phases > 1) return pad_phase_rows(x, g, pd, group, xp_group, t0, t1);
  const RowCopyFn copy = pick_row_copy(vector_isa());
  if (pd.copies == 1 && pd.segments == 1 && pd.bands == 1 && g.pl == 0 && pd.wp == g.w) {
    // No column padding (the padded rows are x's rows: 1x1 convs, and any conv with neither left
    // nor right padding): rows [t0, t1) of a channel are one run in x and in its plane, copied by
    // one call (row by row, 14-float rows at 256->1024 @14 made this pass 14% of the call). Rows
    // [i0, i1) of them come from x, the others (top and bottom padding, the spare row) are zeros.
    const int64_t i0 = std::min(std::max(t0, g.pt), t1), i1 = std::max(i0, std::min(t1, g.pt + g.h));
    const int64_t tail = t1 == pd.hp ? pd.plane - pd.hp * pd.wp : 0;  // the alignment padding
    const float* in = x + (group * g.channels * g.h + std::clamp<int64_t>(i0 - g.pt, 0, g.h)) * g.w;
    bool bad = false;
    for (int64_t c = 0; c < g.channels; ++c)
      bad |= copy(in + c * g.h * g.w, (i0 - t0) * g.w, (i1 - i0) * g.w, (t1 - i1) * g.w + tail,
                  xp_group + c * pd.plane + t0 * pd.wp);
    return bad;
  }
  bool bad = false;
  for (int64_t t = t0; t < t1; ++t) bad |= pad_group_row(x, g, pd, group, xp_group, t, copy);
  return bad;
}

void store_conv_tile(const float* tile, int64_t ld_tile, int64_t r0, int64_t rows, int64_t p0, int64_t width,
                     const ConvGeometry& g, const PaddedPlanes& pd, int64_t group, int64_t N, float* y) {
  // Runs of consecutive pixels within one segment's row: row t, segment sg, from column b (the
  // divisions once per call: the CSR conv stores 16 rows at a time).
  const int64_t seg = pd.segment_width(), units = g.images * pd.bands;
  int64_t t = p0 / pd.wp, sg = p0 % pd.wp / seg, b = p0 % seg;
  for (int64_t q = 0; q < width; b = 0) {
    const int64_t run = std::min(width - q, seg - b);
    const int64_t u = group * pd.segments + sg;  // the band in this segment
    const int64_t image = pd.bands == 1 ? u : u / pd.bands, a = (pd.bands == 1 ? 0 : u % pd.bands) * pd.band + t;
    if (b < g.wo && u < units && a < g.ho) {
      const int64_t keep = std::min(run, g.wo - b);
      float* out = y + ((image * N + r0) * g.ho + a) * g.wo + b;
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(out + r * g.ho * g.wo, tile + r * ld_tile + q, sizeof(float) * keep);
    }
    q += run;
    if (++sg == pd.segments) sg = 0, ++t;
  }
}

}  // namespace pyhwp
