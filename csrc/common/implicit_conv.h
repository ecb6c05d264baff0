// Stride-1 conv2d as an implicit GEMM on the CPU (common/conv_geometry.h), the part the CSR and
// 2:4 drivers share: the padded copy of the input whose shifted rows the tile kernels read, the
// copy of computed tiles into the output planes, and the split of the work over threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/conv_geometry.h"
#include "common/dense.h"

namespace pyhwp {

// The padded planes the kernels read: hp x wp per channel, one every `plane` floats, a multiple
// of 16 so that tap (c, 0, 0) of a 64-byte aligned tile starts on a cache line (1x1 convs: every
// load aligned, measured 1.46x faster at 7x7 than planes 49 floats apart). hp = ho + dh*(kh-1)
// + 1: the spare zero row is only read by windows that wrap past a row's end (none for kw = 1).
// With `shifted` copies (kw > 1), every tap's window starts on a cache line too: the image is
// stored kw times, copy s with every padded row shifted left by s*dw (zeros shifted in), one copy
// every `copy_stride` floats, and wp is wo rounded up to 16 (a row's shifted copy holds the
// columns that outputs [0, wo) read; the outputs beyond are dropped). Tap (c, r, s) then
// reads copy s at c*plane + r*dh*wp, and no window wraps past a row's end.
struct PaddedPlanes {
  int64_t hp, wp, plane, copies, copy_stride;
  explicit PaddedPlanes(const ConvGeometry& g, bool shifted = false)
      : hp(g.ho + g.dh * (g.kh - 1) + (g.kw > 1 && !shifted ? 1 : 0)),
        wp(shifted ? (g.wo + 15) / 16 * 16 : g.wo + g.dw * (g.kw - 1)),
        plane((hp * wp + 15) / 16 * 16),
        copies(shifted ? g.kw : 1),
        copy_stride(g.channels * plane) {}
  // x is already its own padded copy: no padding, no spare row, aligned planes.
  bool is_input(const ConvGeometry& g) const {
    return copies == 1 && g.pt == 0 && g.pl == 0 && hp == g.h && wp == g.w && plane == g.h * g.w;
  }
  int64_t wide_pixels(const ConvGeometry& g) const { return g.ho * wp; }  // P of the GEMM
  int64_t image_floats() const { return copies * copy_stride; }
};

// Output columns per tile (8 zmm), and the L1 bytes a tile's windows of X may take while every
// row of W passes over them (half of a 48 KiB L1 data cache, the other half for W and the
// accumulators).
constexpr int64_t kConvTileP = 128;
constexpr int64_t kConvL1Bytes = 24 << 10;

// Checks the geometry's fields and that a padded image fits int32 offsets (what every plan
// holds); `op` names the caller in the message.
void check_conv_geometry(const ConvGeometry& g, const PaddedPlanes& pd, const char* op);

// The width of every column tile for P wide pixels: equal tiles, a multiple of 16, at most
// kConvTileP (the last one may be narrower).
int64_t conv_tile_width(int64_t P);

// table[j], j < C*kh*kw: the offset of column j of W in a padded image (its copies included).
void conv_column_offsets(const ConvGeometry& g, const PaddedPlanes& pd, int32_t* table);

// Channels whose windows (a tile `width` wide, all taps) fit kConvL1Bytes: every row of W sweeps
// all channels, so unless a block of channels stays in L1 each sweep refetches X from L2. All of
// them for 1x1 convs, where a channel's row is read by no other tap, so blocks only add
// accumulator passes (measured 1.9x slower at 512->2048 on 8x8 with 5 blocks).
int64_t conv_channels_per_block(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width);

// Copies padded row `a` of every channel of one image (x_img: its (C, h, w) input) into the
// image's padded planes (and their shifted copies) at xp_img; returns whether that input row
// holds a NaN/Inf.
bool pad_input_row(const float* x_img, const ConvGeometry& g, const PaddedPlanes& pd, float* xp_img, int64_t a);

// Copies a computed wide tile (rows x width at p0, wp columns per output row) into the NCHW
// output planes (ld = ho*wo per row), dropping the wrapped columns b >= wo.
void store_conv_tile(const float* tile, int64_t ld_tile, int64_t rows, int64_t p0, int64_t width,
                     const ConvGeometry& g, const PaddedPlanes& pd, float* y, int64_t ld_y);

// Output rows [r0, r0 + rows) of image img over wide pixels [p0, p0 + width), y the (images, N,
// ho, wo) output: compute(tile, ld) writes them as rows ld floats apart, into the output planes
// when the wide rows are the output's (wp == wo: kw = 1, or shifted copies with wo a multiple of
// 16), else into a scratch tile (rows <= max_rows) that is then copied.
template <typename Compute>
void conv_output_tile(const ConvGeometry& g, const PaddedPlanes& pd, float* y, int64_t N, int64_t img, int64_t r0,
                      int64_t rows, int64_t max_rows, int64_t p0, int64_t width, Compute compute) {
  float* out = y + (img * N + r0) * g.ho * g.wo;
  if (pd.wp == g.wo) {
    compute(out + p0, g.ho * g.wo);
    return;
  }
  float* tile = scratch(1, max_rows * kConvTileP);
  compute(tile, kConvTileP);
  store_conv_tile(tile, kConvTileP, rows, p0, width, g, pd, out, g.ho * g.wo);
}

// Pads x (unless it is read in place) and runs tile(xp_img, img, r0, r1, p0, width) over every
// image, column tile (conv_tile_width) and run of output rows [r0, r1) (of N); returns whether x
// holds a NaN/Inf. row_bounds(parts, &bounds) splits the N rows into `parts` runs of about equal
// work (bounds: parts + 1 entries from 0 to N).
template <typename Tile, typename RowBounds>
bool run_implicit_conv(const ConvGeometry& g, const PaddedPlanes& pd, int64_t N, const float* x, int nt,
                       RowBounds row_bounds, Tile tile) {
  const int64_t P = pd.wide_pixels(g), tile_p = conv_tile_width(P), ptiles = (P + tile_p - 1) / tile_p;
  const int64_t x_image = pd.image_floats(), in_image = g.channels * g.h * g.w;
  const bool in_place = pd.is_input(g);  // 1x1 convs without padding
  if (in_place) {
    const int64_t count = g.images * x_image;
    if (any_nonfinite(DenseIn{x, 1, count, count, 1})) return true;  // caller redoes it exactly
  }
  if (g.images >= nt && !in_place) {
    // At least an image per thread: each thread pads whole images into its own scratch and runs
    // their tiles while the planes are in its L2 (one padded batch, written out and read back,
    // measured 1.38x dense at 64->64 @56x56 batch 32).
    int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : bad)
    for (int64_t img = 0; img < g.images; ++img) {
      float* xp = scratch(2, x_image);
      for (int64_t a = 0; a < pd.hp; ++a) bad |= pad_input_row(x + img * in_image, g, pd, xp, a);
      for (int64_t t = 0; t < ptiles; ++t) tile(xp, img, int64_t{0}, N, t * tile_p, std::min(tile_p, P - t * tile_p));
    }
    return bad != 0;
  }
  // Fewer images than threads: pad the batch by (image, row) ranges and hand out the column
  // tiles statically in the same order, so that a thread mostly reads the rows it wrote, from its
  // own L2 (padded by channels instead, half of every tile's X came from the other core: 1.5x
  // scaling from 1 to 2 threads at 64->64 @56x56 against 2.1x now). When the tiles do not divide
  // evenly over the threads, rows are split into parts too.
  const float* xp = x;
  int bad = 0;
  if (!in_place) {
    float* buf = scratch(3, g.images * x_image);  // the calling thread's; slots 1-2 are the workers'
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
    for (int64_t q = 0; q < g.images * pd.hp; ++q)
      bad |= pad_input_row(x + (q / pd.hp) * in_image, g, pd, buf + (q / pd.hp) * x_image, q % pd.hp);
    xp = buf;
  }
  const int64_t tiles = g.images * ptiles;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N / 16, nt / std::gcd<int64_t>(tiles, nt)));
  std::vector<int64_t> bounds;
  row_bounds(parts, &bounds);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t it = 0; it < tiles * parts; ++it) {
    const int64_t part = it % parts, tile_id = it / parts, img = tile_id / ptiles;
    const int64_t p0 = (tile_id % ptiles) * tile_p;
    tile(xp + img * x_image, img, bounds[static_cast<size_t>(part)], bounds[static_cast<size_t>(part + 1)], p0,
         std::min(tile_p, P - p0));
  }
  return bad != 0;
}

}  // namespace pyhwp
