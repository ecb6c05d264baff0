// Stride-1 2:4 conv2d on the CPU as an implicit GEMM: the 2:4 tile kernels read the shifted windows
// of a padded copy of the input through a table of offsets, one per column of W (see
// common/implicit_conv.h), so no im2col matrix is built.
#include <algorithm>
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
    case Isa::kAvx512: return sparse24_rows_conv_avx512;
    case Isa::kAvx2: return sparse24_rows_conv_avx2;
    default: return sparse24_rows_conv_scalar;
  }
}

// Inputs per K block: the whole metadata words of the channels whose windows fit L1 (all their
// taps), at least one word.
int64_t conv_tile_k(const ConvGeometry& g, const PaddedPlanes& pd, int64_t width) {
  const int64_t k = conv_channels_per_block(g, pd, width) * g.kh * g.kw / Cfg::kChunk * Cfg::kChunk;
  return std::max(Cfg::kChunk, k);
}

// Whether to read the input through shifted copies (PaddedPlanes): every window aligned, at the
// cost of kw copies of the padded input, when that computes at most 15% more columns than the
// unaligned windows do (wo rounded up to 16 against wo + dw*(kw-1); not at 7x7, 16 against 9)
// and a thread's copies fit its L2. Per-process A/B against unaligned windows, 2 threads:
// batch 1 64->64 @56, 128->128 @28, 256->256 @14 1.09-1.13x, 1.14-1.22x, 1.07-1.18x faster;
// batch 32 128->128 and 256->256 1.16-1.26x, 64->64 @56 (2.8 MB of copies per image) 0.95-0.99x.
bool shifted_copies(const ConvGeometry& g, int nt) {
  constexpr int64_t kL2Bytes = 2 << 20;
  const PaddedPlanes shifted(g, true);
  const int64_t bytes = shifted.image_floats() * 4, per_thread = g.images >= nt ? bytes : bytes * g.images / nt;
  return g.kw > 1 && shifted.wp * 100 <= (g.wo + g.dw * (g.kw - 1)) * 115 && per_thread <= kL2Bytes;
}

}  // namespace

bool sparse24_conv2d(const Sparse24Matrix& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                     int num_threads) {
  check_conv_geometry(g, PaddedPlanes(g), "sparse24_conv2d");
  PYHWP_CHECK(w.rows >= 0, "sparse24_conv2d: W has ", w.rows, " rows");
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, "sparse24_conv2d: W has ", w.cols,
              " columns, expected C*kh*kw = ", g.channels * g.kh * g.kw);
  PYHWP_CHECK(num_threads >= 1, "sparse24_conv2d: num_threads must be >= 1");
  if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return false;
  PYHWP_CHECK(x && y && w.values && w.meta, "sparse24_conv2d: null x, y, values or meta");
  const int64_t work = w.rows * sparse24_padded_cols(w.cols) / 2 * g.images * g.ho * g.wo;
  const int nt = work < Cfg::kSerialWork ? 1 : num_threads;
  const PaddedPlanes pd(g, shifted_copies(g, nt));
  check_conv_geometry(g, pd, "sparse24_conv2d");  // the copies' offsets fit int32 too
  std::vector<int32_t> offsets(static_cast<size_t>(w.cols));
  conv_column_offsets(g, pd, offsets.data());
  const int64_t tile_k = conv_tile_k(g, pd, conv_tile_width(pd.wide_pixels(g)));
  const Sparse24ConvRowsFn kernel = pick_conv(active_isa());
  const int64_t N = w.rows, row_blocks = (N + Cfg::kRowBlock - 1) / Cfg::kRowBlock;
  return run_implicit_conv(
      g, pd, N, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) {  // every row costs the same: whole row blocks
        for (int64_t i = 0; i <= parts; ++i) bounds->push_back(std::min(N, row_blocks * i / parts * Cfg::kRowBlock));
      },
      [&](const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        for (int64_t rb = r0; rb < r1; rb += Cfg::kTileRows) {
          const int64_t rows = std::min(Cfg::kTileRows, r1 - rb);
          conv_output_tile(g, pd, y, N, img, rb, rows, Cfg::kTileRows, p0, width, [&](float* tile, int64_t ld) {
            kernel(w, xp_img + p0, offsets.data(), width, tile_k, bias, tile, ld, rb, rb + rows);
          });
        }
      });
}

}  // namespace pyhwp
