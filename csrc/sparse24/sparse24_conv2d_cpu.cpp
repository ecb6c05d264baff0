// 2:4 conv2d on the CPU as an implicit GEMM: the 2:4 tile kernels read the shifted windows
// of a padded copy of the input through a table of offsets, one per column of W (see
// common/implicit_conv.h), so no im2col matrix is built.
#include <algorithm>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/implicit_conv.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

namespace {

using Cfg = Sparse24CpuConfig;
static_assert(kConvTileP <= Cfg::kPanel, "a conv tile is at most the tile kernels' widest panel");

Sparse24ConvRowsFn pick_conv(Isa isa) {
  switch (isa) {
#ifdef PYHWP_X86_KERNELS
    case Isa::kAvx512: return sparse24_rows_conv_avx512;
    case Isa::kAvx2: return sparse24_rows_conv_avx2;
#endif
    default: return sparse24_rows_conv_scalar;
  }
}

// Inputs per K block: the whole metadata words of the channels whose windows fit L1 (all their
// taps), at least one word.
int64_t conv_tile_k(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width) {
  const int64_t k = conv_channels_per_block(g, pd, width) * g.kh * g.kw / Cfg::kChunk * Cfg::kChunk;
  return std::max(Cfg::kChunk, k);
}

// The fewest bands per image, at least min_bands, with which a group of the shifted layout with
// `segments` fits a thread's L2; 0 when none does. Thin bands pad their dh*(kh-1) neighbouring
// rows again, kw copies each, and still paid where measured: 512->512 3x3 @56 batch 2 in 19
// bands of 3 rows 1.1x faster than the plain layout, @7 batch 32 in bands of 1 row 1.5x.
int64_t bands_for_l2(const ConvGeometry& g, int nt, int64_t segments, int64_t min_bands) {
  constexpr int64_t kL2Bytes = 2 << 20;
  for (int64_t bands = min_bands; bands <= g.ho; ++bands) {
    const PaddedPlanes pd(g, segments, bands);
    const int64_t bytes = pd.group_floats() * 4, per_thread = pd.groups >= nt ? bytes : bytes * pd.groups / nt;
    if (per_thread <= kL2Bytes && pd.group_floats() <= std::numeric_limits<int32_t>::max()) return bands;
  }
  return 0;
}

// The layout (PaddedPlanes): {0, 1} plain, else shifted copies {segments, bands}, in the form
// with one band a row (wo rounded up to 16 columns) unless packing several wo wide bands into a
// row computes at most 85% of its pixels; either with the fewest bands that bands_for_l2
// allows. Shifted when that computes at most 15% more pixels than the plain layout (columns
// past wo against its wrapped columns), else plain; strided convs always plain (over their
// stride phases). Measured, packing against one band a row
// (per-process A/B, 2 threads): at batch 1 bands of a few rows cost more in padding and in
// smaller K blocks than the columns they save, 0.93-0.95x at 64->64 @56, 0.78-0.83x at 128->128
// @28, 0.74x at 256->256 @14. Whole images side by side at 512->512 @7 batch 32 and 128->128 @8
// batch 64: 1.5x faster than the plain layout, which those took before (one band a row would
// compute 16 columns for their 7 and 8).
std::pair<int64_t, int64_t> conv_layout(const ConvGeometry& g, int nt) {
  if (g.kw == 1 || g.sh * g.sw > 1 || g.images == 0 || g.ho == 0 || g.wo == 0) return {0, 1};
  auto pixels = [&](int64_t segments, int64_t bands) {
    const PaddedPlanes pd(g, segments, bands);
    return pd.groups * pd.wide_pixels();
  };
  std::pair<int64_t, int64_t> best{0, 1};
  int64_t cost = g.images * g.ho * (g.wo + g.dw * (g.kw - 1)) * 115 / 100;  // plain, with its 15% handicap
  if (const int64_t bands = bands_for_l2(g, nt, 1, 1); bands > 0 && pixels(1, bands) <= cost) {
    best = {1, bands};
    cost = pixels(1, bands) * 85 / 100;
  }
  if (const int64_t segments = 16 / std::gcd<int64_t>(g.wo, 16); segments > 1) {
    const int64_t bands = bands_for_l2(g, nt, segments, (segments + g.images - 1) / g.images);
    if (bands > 0 && pixels(segments, bands) <= cost) best = {segments, bands};
  }
  return best;
}

int sparse24_conv2d_threads(const Sparse24Matrix& w, const ConvGeometry& g, int num_threads) {
  const int64_t work = w.rows * sparse24_padded_cols(w.cols) / 2 * g.images * g.ho * g.wo;
  return work < Cfg::kSerialWork ? 1 : num_threads;
}

// The checks both entry points share (the plain layout's offsets must fit int32; bands_for_l2
// admits no shifted layout that would not).
void check_args(const Sparse24Matrix& w, const ConvGeometry& g, int num_threads, const char* op) {
  check_conv_geometry(g, PaddedPlanes(g), op);
  PYHWP_CHECK(w.rows >= 0, op, ": W has ", w.rows, " rows");
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, op, ": W has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  PYHWP_CHECK(num_threads >= 1, op, ": num_threads must be >= 1");
}

}  // namespace

std::pair<int64_t, int64_t> sparse24_conv2d_layout(const Sparse24Matrix& w, const ConvGeometry& g, int num_threads) {
  check_args(w, g, num_threads, "sparse24_conv2d_layout");
  return conv_layout(g, sparse24_conv2d_threads(w, g, num_threads));
}

bool sparse24_conv2d(const Sparse24Matrix& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                     int num_threads) {
  check_args(w, g, num_threads, "sparse24_conv2d");
  if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return false;
  PYHWP_CHECK(x && y && w.values && w.meta, "sparse24_conv2d: null x, y, values or meta");
  const int nt = sparse24_conv2d_threads(w, g, num_threads);
  const auto [segments, bands] = conv_layout(g, nt);
  const PaddedPlanes pd(g, segments, bands);
  std::vector<int32_t> offsets(static_cast<size_t>(w.cols));
  conv_column_offsets(g, pd, offsets.data());
  const int64_t tile_k = conv_tile_k(g, pd, conv_tile_width(pd.wide_pixels()));
  const Sparse24ConvRowsFn kernel = pick_conv(vector_isa());
  const int64_t N = w.rows, row_blocks = (N + Cfg::kRowBlock - 1) / Cfg::kRowBlock;
  return run_implicit_conv(
      g, pd, N, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) {  // every row costs the same: whole row blocks
        for (int64_t i = 0; i <= parts; ++i) bounds->push_back(std::min(N, row_blocks * i / parts * Cfg::kRowBlock));
      },
      [&](const float* xp_group, int64_t group, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        for (int64_t rb = r0; rb < r1; rb += Cfg::kTileRows) {
          const int64_t rows = std::min(Cfg::kTileRows, r1 - rb);
          conv_output_tile(g, pd, y, N, group, rb, rows, Cfg::kTileRows, p0, width, [&](float* tile, int64_t ld) {
            kernel(w, xp_group + p0, offsets.data(), width, tile_k, bias, tile, ld, rb, rb + rows);
          });
        }
      });
}

}  // namespace pyhwp
