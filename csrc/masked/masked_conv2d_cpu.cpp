// Masked conv2d on the CPU as an implicit GEMM: the micro-kernels of masked_matmul (AVX-512 wide,
// AVX2 narrow) read each stored tile's 16 rows of X straight from a padded copy of the input (of
// its stride phases for a strided conv; common/implicit_conv.h) through a table of offsets, so
// neither an im2col matrix nor a packed copy of it is built, and zero tiles cost nothing.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/implicit_conv.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef PYHWP_X86_KERNELS
// One 16-row panel of W over `width` wide pixels of a padded group from xp, AVX-512, into acc (16
// rows of acc_ld floats): blocks of kNvAvx512 vectors, each block's tiles in groups of
// kWideGroupTiles so that both row halves replay the group's x from L1 (as masked_matmul's loop
// nest does). `values` are w's tiles as float (masked_wide_conv_avx512) or bfloat16
// (masked_wide_conv_dot).
template <typename T>
void panel_wide(const MaskedMatrix& w, const T* values, void (*kernel)(const MaskedWideBlockT<T>&, const int32_t*),
                int64_t panel, const float* xp, const int32_t* offsets, int64_t width, float* acc, int64_t acc_ld) {
  const int64_t t0 = w.tile_ptr[panel], t1 = w.tile_ptr[panel + 1];
  const int64_t nvec = width / 16, blocks = ceil_div(nvec, Cfg::kNvAvx512);
  int64_t s = t0;
  do {  // a panel without tiles runs once over none: zeros, then its bias
    const int64_t count = std::min<int64_t>(Cfg::kWideGroupTiles, t1 - s);
    for (int64_t bi = 0, v0 = 0; bi < blocks; ++bi) {
      const int64_t nv = ceil_div(nvec - v0, blocks - bi);
      MaskedWideBlockT<T> blk;
      blk.tiles = values + s * Cfg::kTileSize;
      blk.tidx = w.tile_idx + s;
      blk.count = count;
      blk.xp = xp + 16 * v0;
      blk.nv = static_cast<int>(nv);
      blk.acc = acc + 16 * v0;
      blk.ld = acc_ld;
      blk.accumulate = s > t0;
      for (blk.half = 0; blk.half < 2; ++blk.half) kernel(blk, offsets);
      v0 += nv;
    }
    s += count;
  } while (s < t1);
}

// The same on AVX2, straight into the output tile (row r at tile + r * ld): blocks of at most
// kMrAvx2 columns, each over all the panel's tiles (which stay in L1) with its 16 x mr
// accumulators in registers.
void panel_narrow(const MaskedMatrix& w, int64_t panel, const float* xp, const int32_t* offsets, int64_t width,
                  float* acc, const float* bias, int rows, float* tile, int64_t ld) {
  const int64_t blocks = ceil_div(width, Cfg::kMrAvx2);
  MaskedBlockT<float> blk;
  blk.tiles = w.values + w.tile_ptr[panel] * Cfg::kTileSize;
  blk.tidx = w.tile_idx + w.tile_ptr[panel];
  blk.count = w.tile_ptr[panel + 1] - w.tile_ptr[panel];
  blk.acc = acc;
  for (int64_t bi = 0, c0 = 0; bi < blocks; ++bi) {
    const int64_t mr = ceil_div(width - c0, blocks - bi);
    blk.xp = xp + c0;
    blk.mr = static_cast<int>(mr);
    masked_block_conv_avx2(blk, offsets);
    masked_store_scalar(acc, mr, rows, bias, false, tile + c0, ld, 1);
    c0 += mr;
  }
}

// The call on AVX-512 (`wide`) or AVX2; returns whether x holds a NaN/Inf.
bool run(const MaskedMatrix& w, const uint16_t* values_bf16, const ConvGeometry& g, const PaddedPlanes& pd,
         const float* x, const float* bias, float* y, int num_threads, bool wide) {
  const int64_t N = w.rows, npanels = ceil_div(N, Cfg::kTileN), ktiles = ceil_div(w.cols, Cfg::kTileK);
  // Row k of W's columns at offsets[k] in a padded group; the rows of the last k-tile past K (zero
  // weights) read column 0, a finite value: x holds no NaN/Inf on this path.
  std::vector<int32_t> offsets(static_cast<size_t>(ktiles * Cfg::kTileK), 0);
  conv_column_offsets(g, pd, offsets.data());
  std::vector<int64_t> panel_bounds;  // the threads' runs of panels, balanced by their tiles
  const int nt = w.ntiles * Cfg::kTileSize * g.images * g.ho * pd.wp < Cfg::kSerialWork ? 1 : num_threads;
  return run_implicit_conv(
      g, pd, N, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) {
        balanced_runs(w.tile_ptr, npanels, 1, parts, &panel_bounds);
        for (const int64_t b : panel_bounds) bounds->push_back(std::min(N, b * Cfg::kTileN));
      },
      [&](const float* xp_group, int64_t group, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        const int64_t acc_ld = 16 * ceil_div(width, 16);
        float* acc = scratch(0, Cfg::kTileN * acc_ld + 16);
        for (int64_t n0 = r0; n0 < r1; n0 += Cfg::kTileN) {
          const int rows = static_cast<int>(std::min(Cfg::kTileN, N - n0));
          const int64_t panel = n0 / Cfg::kTileN;
          const float* b = bias ? bias + n0 : nullptr;
          if (wide) {
            // The accumulator rows are the tile: the bias added in place, then copied into y once.
#ifdef PYHWP_AMX_KERNELS
            if (values_bf16) {
              panel_wide(w, values_bf16, masked_wide_conv_dot, panel, xp_group + p0, offsets.data(), acc_ld, acc,
                         acc_ld);
            } else
#endif
            {
              panel_wide(w, w.values, masked_wide_conv_avx512, panel, xp_group + p0, offsets.data(), acc_ld, acc,
                         acc_ld);
            }
            if (b) {
              for (int r = 0; r < rows; ++r)
                for (int64_t i = 0; i < width; ++i) acc[r * acc_ld + i] += b[r];
            }
            store_conv_tile(acc, acc_ld, n0, rows, p0, width, g, pd, group, N, y);
            continue;
          }
          conv_output_tile(g, pd, y, N, group, n0, rows, Cfg::kTileN, p0, width, [&](float* tile, int64_t ld) {
            panel_narrow(w, panel, xp_group + p0, offsets.data(), width, acc, b, rows, tile, ld);
          });
        }
      },
      wide);  // the wide kernel reads whole vectors past a tile's width
}
#endif

}  // namespace

MaskedConvStatus masked_conv2d(const MaskedMatrix& w, const ConvGeometry& g, const float* x, const float* bias,
                               float* y, int num_threads, const uint16_t* values_bf16) {
  const PaddedPlanes pd(g);
  check_conv_geometry(g, pd, "masked_conv2d");
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, "masked_conv2d: W has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  PYHWP_CHECK(num_threads >= 1, "masked_conv2d: num_threads must be >= 1");
  PYHWP_CHECK(w.tile_ptr && (w.ntiles == 0 || (w.tile_idx && w.values)), "masked_conv2d: null tile array");
  PYHWP_CHECK(w.tile_ptr[ceil_div(w.rows, Cfg::kTileN)] == w.ntiles, "masked_conv2d: tile_ptr[-1] != ntiles");
#ifdef PYHWP_X86_KERNELS
  const Isa isa = vector_isa();
  if (isa == Isa::kAvx512 || isa == Isa::kAvx2) {
    if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return MaskedConvStatus::kDone;
    PYHWP_CHECK(x && y, "masked_conv2d: null x or y");
    // VDPBF16PS where it is the active level: with AMX, bfloat16 convs take the tile unit instead
    // (amx_conv2d_bf16), and this path only serves what that one does not.
    const bool dot = values_bf16 && isa == Isa::kAvx512 && active_isa() == Isa::kAvx512Bf16;
    const bool bad = run(w, dot ? values_bf16 : nullptr, g, pd, x, bias, y, num_threads, isa == Isa::kAvx512);
    return bad ? MaskedConvStatus::kNonfinite : MaskedConvStatus::kDone;
  }
#else
  (void)x, (void)bias, (void)y, (void)values_bf16;
#endif
  return MaskedConvStatus::kUnavailable;
}

}  // namespace pyhwp
