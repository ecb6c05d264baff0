// conv2d as an implicit GEMM on the CPU (common/conv_geometry.h), the part the CSR and
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
// load aligned, measured 1.46x faster at 7x7 than planes 49 floats apart). The batch is padded
// and computed in `groups` (each one GEMM over wide pixels p = t*wp + b, t < band).
//
// Plain layout (shifted_segments == 0; segments == 1 stored): a group is an image, band = ho,
// wp = wo + dw*(kw-1), hp = ho + dh*(kh-1) + 1; the wp - wo wrapped columns of each output row are
// computed and dropped, and the spare zero row is only read by windows that wrap past a row's end
// (none for kw = 1). Strided convs take this layout with `phases` = sh*sw planes per channel
// (conv_geometry.h), wp = wo + (dw*(kw-1))/sw, hp = ho + (dh*(kh-1))/sh + 1.
//
// Aligned rows (aligned_rows, plain layout, stride 1): wp rounded up to a multiple of 16, so that
// every window of tap (c, r, s) starts s*dw floats past a cache line (the CSR conv's tap rows,
// csr_conv2d_aligned).
//
// Shifted layout (shifted_segments >= 1, kw > 1): every tap's window starts on a cache line too. The
// image is stored kw times, copy s with every padded row shifted left by s*dw (zeros shifted in),
// one copy every `copy_stride` floats, so that tap (c, r, s) reads copy s at c*plane + r*dh*wp.
// Each image is cut into `bands` bands of `band` output rows (the last may run past ho), and a
// row of the planes holds the same row of `segments` bands side by side: one band wo rounded up
// to 16 columns wide (segments == 1), or several wo columns wide with segments*wo a multiple of
// 16 (no wasted column). Band u of the batch (image u / bands, output rows from (u % bands) *
// band) is segment u % segments of group u / segments; hp = band + dh*(kh-1) padded rows.
// Outputs of missing bands (past the batch), rows past ho and columns past wo are computed and
// dropped. Stride 1 only.
struct PaddedPlanes {
  int64_t segments, bands, band, groups, hp, wp, plane, phases, copies, copy_stride;
  static constexpr int64_t kMaxSegments = 16;  // 16 / gcd(wo, 16) at most
  explicit PaddedPlanes(const ConvGeometry& g, int64_t shifted_segments = 0, int64_t shifted_bands = 1,
                        bool aligned_rows = false);
  int64_t segment_width() const { return wp / segments; }
  // x is already its own padded copy: no padding, no spare row, aligned planes.
  bool is_input(const ConvGeometry& g) const {
    return copies == 1 && phases == 1 && g.pt == 0 && g.pl == 0 && hp == g.h && wp == g.w && plane == g.h * g.w;
  }
  int64_t wide_pixels() const { return band * wp; }  // P of a group's GEMM
  int64_t group_floats() const { return copies * copy_stride; }
};

// Output columns per tile (8 zmm), and the L1 bytes a tile's windows of X may take while every
// row of W passes over them (half of a 48 KiB L1 data cache, the other half for W and the
// accumulators).
constexpr int64_t kConvTileP = 128;
constexpr int64_t kConvL1Bytes = 24 << 10;

// Checks the geometry's fields and that a padded group fits int32 offsets (what every plan
// holds); `op` names the caller in the message.
void check_conv_geometry(const ConvGeometry& g, const PaddedPlanes& pd, const char* op);

// The width of every column tile for P wide pixels: equal tiles, a multiple of 16, at most
// kConvTileP (the last one may be narrower).
int64_t conv_tile_width(int64_t P);

// table[j], j < C*kh*kw: the offset of column j of W in a padded group (its copies included).
void conv_column_offsets(const ConvGeometry& g, const PaddedPlanes& pd, int32_t* table);

// Channels whose windows (a tile `width` wide, all taps) fit kConvL1Bytes: every row of W sweeps
// all channels, so unless a block of channels stays in L1 each sweep refetches X from L2. All of
// them for 1x1 convs, where a channel's row is read by no other tap, so blocks only add
// accumulator passes (measured 1.9x slower at 512->2048 on 8x8 with 5 blocks).
int64_t conv_channels_per_block(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width);

// Writes rows [t0, t1) of every channel (and copy, or phase) of padded group `group` at xp_group,
// from x (the contiguous (images, C, h, w) input); returns whether the input rows it read hold a
// NaN/Inf.
bool pad_group_rows(const float* x, const ConvGeometry& g, const PaddedPlanes& pd, int64_t group, float* xp_group,
                    int64_t t0, int64_t t1);

// Copies a computed wide tile of group `group` (output rows [r0, r0 + rows) of W, wide pixels
// [p0, p0 + width) at tile + (r - r0) * ld_tile) into y, the (images, N, ho, wo) output, dropping
// the pixels that are not outputs (wrapped columns, missing bands, rows past ho).
void store_conv_tile(const float* tile, int64_t ld_tile, int64_t r0, int64_t rows, int64_t p0, int64_t width,
                     const ConvGeometry& g, const PaddedPlanes& pd, int64_t group, int64_t N, float* y);

// Output rows [r0, r0 + rows) of group `group` over wide pixels [p0, p0 + width), y the (images,
// N, ho, wo) output: compute(tile, ld) writes them as rows ld floats apart, into the output planes
// when the group's wide rows are its image's output rows (one image per group, wp == wo: kw = 1,
// or shifted copies with wo a multiple of 16), else into a scratch tile (rows <= max_rows) that is
// then copied.
template <typename Compute>
void conv_output_tile(const ConvGeometry& g, const PaddedPlanes& pd, float* y, int64_t N, int64_t group, int64_t r0,
                      int64_t rows, int64_t max_rows, int64_t p0, int64_t width, Compute compute) {
  if (pd.segments == 1 && pd.bands == 1 && pd.wp == g.wo) {
    compute(y + (group * N + r0) * g.ho * g.wo + p0, g.ho * g.wo);
    return;
  }
  float* tile = scratch(1, max_rows * kConvTileP);
  compute(tile, kConvTileP);
  store_conv_tile(tile, kConvTileP, r0, rows, p0, width, g, pd, group, N, y);
}

// Pads x (unless it is read in place; scratch slots 1 to 3) and runs tile(xp_group, group, r0, r1, p0, width) over
// every group, column tile (conv_tile_width) and run of output rows [r0, r1) (of N); returns
// whether x holds a NaN/Inf. row_bounds(parts, &bounds) splits the N rows into `parts` runs of
// about equal work (bounds: parts + 1 entries from 0 to N). A tile kernel may read whole vectors
// of 16 floats past `width` in the padded copies (16 floats of slack); one that does
// (`whole_vectors`) reads x in place only where every tile is a whole number of vectors.
template <typename Tile, typename RowBounds>
bool run_implicit_conv(const ConvGeometry& g, const PaddedPlanes& pd, int64_t N, const float* x, int nt,
                       RowBounds row_bounds, Tile tile, bool whole_vectors = false) {
  const int64_t P = pd.wide_pixels(), tile_p = conv_tile_width(P), ptiles = (P + tile_p - 1) / tile_p;
  const int64_t x_group = pd.group_floats();
  const bool in_place = pd.is_input(g) && (!whole_vectors || P % 16 == 0);  // convs without padding
  if (in_place) {
    const int64_t count = g.images * x_group;
    if (any_nonfinite(DenseIn{x, 1, count, count, 1})) return true;  // caller redoes it exactly
  }
  if (pd.groups >= nt && !in_place) {
    // At least a group per thread: each thread pads whole groups into its own scratch and runs
    // their tiles while the planes are in its L2 (one padded batch, written out and read back,
    // measured 1.38x dense at 64->64 @56x56 batch 32).
    int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : bad)
    for (int64_t q = 0; q < pd.groups; ++q) {
      float* xp = scratch(2, x_group + 16);  // (+16: a tile kernel's last vector may read past the group)
      bad |= pad_group_rows(x, g, pd, q, xp, 0, pd.hp);
      for (int64_t i = 0; i < ptiles; ++i) tile(xp, q, int64_t{0}, N, i * tile_p, std::min(tile_p, P - i * tile_p));
    }
    return bad != 0;
  }
  // Fewer groups than threads: pad the batch by (group, row) ranges and hand out the column
  // tiles statically in the same order, so that a thread mostly reads the rows it wrote, from its
  // own L2 (padded by channels instead, half of every tile's X came from the other core: 1.5x
  // scaling from 1 to 2 threads at 64->64 @56x56 against 2.1x now). When the tiles do not divide
  // evenly over the threads, rows are split into parts too.
  const float* xp = x;
  int bad = 0;
  if (!in_place) {
    float* buf = scratch(3, pd.groups * x_group + 16);  // the calling thread's; slots 1-2 are the workers'
    const int64_t rows = pd.groups * pd.hp;  // thread k pads rows [k, k + 1) * rows / nt, in (group, row) order
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
    for (int64_t k = 0; k < nt; ++k)
      for (int64_t r = rows * k / nt, end = rows * (k + 1) / nt; r < end;) {
        const int64_t q = r / pd.hp, t1 = std::min(end - q * pd.hp, pd.hp);
        bad |= pad_group_rows(x, g, pd, q, buf + q * x_group, r % pd.hp, t1);
        r = q * pd.hp + t1;
      }
    xp = buf;
  }
  const int64_t tiles = pd.groups * ptiles;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N / 16, nt / std::gcd<int64_t>(tiles, nt)));
  std::vector<int64_t> bounds;
  row_bounds(parts, &bounds);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t it = 0; it < tiles * parts; ++it) {
    const int64_t part = it % parts, tile_id = it / parts, q = tile_id / ptiles;
    const int64_t p0 = (tile_id % ptiles) * tile_p;
    tile(xp + q * x_group, q, bounds[static_cast<size_t>(part)], bounds[static_cast<size_t>(part + 1)], p0,
         std::min(tile_p, P - p0));
  }
  return bad != 0;
}

}  // namespace pyhwp
