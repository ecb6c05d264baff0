// Stride-1 CSR conv2d on the CPU as an implicit GEMM: the matmul tile kernels read shifted rows of
// a padded copy of the input, so no im2col matrix and no per-tap GEMM is ever materialized.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

using Cfg = CsrCpuConfig;

// The padded planes the kernels read: hp x wp per channel (see csr_conv2d in csr_matmul.h), one
// every `plane` floats, a multiple of 16 so that tap (c, 0, 0) of a 64-byte aligned tile starts
// on a cache line (1x1 convs: every load aligned, measured 1.46x faster at 7x7 than planes 49
// floats apart). The spare zero row is only read by windows that wrap past a row's end (kw > 1).
struct Padded {
  int64_t hp, wp, plane;
  explicit Padded(const ConvGeometry& g)
      : hp(g.ho + g.dh * (g.kh - 1) + (g.kw > 1 ? 1 : 0)), wp(g.wo + g.dw * (g.kw - 1)),
        plane((hp * wp + 15) / 16 * 16) {}
  // x is already its own padded copy: no padding, no spare row, aligned planes.
  bool is_input(const ConvGeometry& g) const {
    return g.pt == 0 && g.pl == 0 && hp == g.h && wp == g.w && plane == g.h * g.w;
  }
};

// Copies x into the zero-padded planes of xp; returns whether x holds a NaN/Inf (found on the
// way, while each row is in cache). Threads split the (image, padded row) space into contiguous
// static ranges, each row for all channels: the same order in which run_conv's static schedule
// hands out column tiles, so a thread mostly reads the rows it wrote, from its own L2 (split by
// channels instead, half of every tile's X came from the other core: 1.5x scaling from 1 to 2
// threads at 64->64 @56x56).
bool pad_planes(const float* x, const ConvGeometry& g, const Padded& pd, float* xp, int nt) {
  const int64_t rows = g.images * pd.hp;
  int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t img = q / pd.hp, a = q % pd.hp, i = a - g.pt;
    const int64_t lo = std::min(g.pl, pd.wp), n = std::max<int64_t>(0, std::min(g.w, pd.wp - g.pl));
    uint32_t seen = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      const int64_t plane = img * g.channels + c;
      float* row = xp + plane * pd.plane + a * pd.wp;
      if (a + 1 == pd.hp) {  // the alignment padding after the last row
        std::memset(row + pd.wp, 0, sizeof(float) * (pd.plane - pd.hp * pd.wp));
      }
      if (i < 0 || i >= g.h) {
        std::memset(row, 0, sizeof(float) * pd.wp);
        continue;
      }
      std::memset(row, 0, sizeof(float) * lo);
      const uint32_t* in = reinterpret_cast<const uint32_t*>(x + (plane * g.h + i) * g.w);
      uint32_t* out = reinterpret_cast<uint32_t*>(row + lo);
      for (int64_t b = 0; b < n; ++b) {
        out[b] = in[b];
        seen |= (in[b] & 0x7f800000u) == 0x7f800000u;
      }
      std::memset(row + lo + n, 0, sizeof(float) * (pd.wp - lo - n));
    }
    bad |= seen != 0;
  }
  return bad != 0;
}

// Column j of W -> its offset in a padded image: c*plane + r*dh*wp + s*dw, j = (c*kh + r)*kw + s.
// Offsets of every stored weight, in values order: the `cols` the tile kernel reads with ldx = 1.
// Through a per-column table (K entries, no divisions), since nnz can be 10^5 and more.
template <typename I>
void stored_offsets(const I* cols, int64_t nnz, const ConvGeometry& g, const Padded& pd, int32_t* table,
                    int32_t* out) {
  int32_t* t = table;
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t s = 0; s < g.kw; ++s) *t++ = static_cast<int32_t>(c * pd.plane + r * g.dh * pd.wp + s * g.dw);
  for (int64_t j = 0; j < nnz; ++j) out[j] = table[cols[j]];
}

// Copies the computed wide tile (rows x width at p0, wp columns per output row) into the NCHW
// output planes (ld = ho*wo per row), dropping the wrapped columns b >= wo.
void store_tile(const float* tile, int64_t ld_tile, int64_t rows, int64_t p0, int64_t width,
                const ConvGeometry& g, const Padded& pd, float* y, int64_t ld_y) {
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

// Channel blocks (kxk convs): a tile's X rows are the shifted windows of each channel's padded plane, all taps
// of one channel within width + (kh-1)*dh*wp + (kw-1)*dw floats. Every row of a row block sweeps
// all channels, so unless a block of channels stays in L1 each sweep refetches X from L2
// (kL1Bytes: half of a 48 KiB L1 data cache, the other half for W and the accumulators).
constexpr int64_t kL1Bytes = 24 << 10;
constexpr int64_t kTileP = 128;

int64_t channels_per_block(const ConvGeometry& g, const Padded& pd, int64_t width) {
  // 1x1: a channel's row is read by no other tap, so blocks only add accumulator passes
  // (measured 1.9x slower at 512->2048 on 8x8 with 5 blocks).
  if (g.kh * g.kw == 1) return g.channels;
  const int64_t per_channel = 4 * (width + (g.kh - 1) * g.dh * pd.wp + (g.kw - 1) * g.dw);
  return std::max<int64_t>(1, std::min(g.channels, kL1Bytes / per_channel));
}

// starts[b * N + n]: the first stored position of row n whose channel is >= b * cb, b <= blocks.
template <typename I>
void block_starts(const int64_t* ro, int64_t N, const I* cols, const ConvGeometry& g, int64_t cb, int64_t blocks,
                  int64_t* starts) {
  const int64_t per_block = cb * g.kh * g.kw;
  for (int64_t n = 0; n < N; ++n) {
    int64_t j = ro[n];
    for (int64_t b = 0; b < blocks; ++b) {
      while (j < ro[n + 1] && static_cast<int64_t>(cols[j]) < b * per_block) ++j;
      starts[b * N + n] = j;
    }
    starts[blocks * N + n] = ro[n + 1];
  }
}

template <typename T>
void run_conv(const int64_t* ro, int64_t N, const int64_t* starts, int64_t blocks, const int32_t* offs,
              const T* vals, const ConvGeometry& g, const Padded& pd, const float* xp, const float* bias,
              float* y, int nt) {
  const CsrKernels<int32_t, T> kern = csr_kernels<int32_t, T>(active_isa());
  const int64_t P = g.ho * pd.wp, x_image = g.channels * pd.plane;
  // Column tiles of equal width (a multiple of 16, at most kTileP) and, when the tiles do not
  // divide evenly over the threads, row parts too: the static schedule then gives every thread
  // the same work (measured at 256->256 @14x14: tiles of 128 + 96 pixels scaled 1.56x from 1 to 2
  // threads).
  const int64_t ptiles = (P + kTileP - 1) / kTileP;
  const int64_t tile_p = ((P + ptiles - 1) / ptiles + 15) / 16 * 16;
  const int64_t tiles = g.images * ptiles;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(N / 16, nt / std::gcd<int64_t>(tiles, nt)));
  std::vector<int64_t> bounds;
  csr_balanced_rows(ro, N, parts, &bounds);
  const CsrArrays<int32_t, T> a{offs, vals};
  const bool direct = pd.wp == g.wo;
#pragma omp parallel for num_threads(nt) schedule(static)  // see pad_planes
  for (int64_t it = 0; it < tiles * parts; ++it) {
    const int64_t part = it % parts, tile_id = it / parts, img = tile_id / ptiles;
    const int64_t p0 = (tile_id % ptiles) * tile_p, width = std::min(tile_p, P - p0);
    const int64_t r0 = bounds[static_cast<size_t>(part)], r1 = bounds[static_cast<size_t>(part + 1)];
    const float* x = xp + img * x_image + p0;
    for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
      const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
      float* out = y + (img * N + rb) * g.ho * g.wo;
      // No wrapped columns (kw = 1): the tile is the output's; else a scratch tile, then copied.
      float* tile = direct ? out + p0 : scratch(1, Cfg::kRowBlock * kTileP);
      const int64_t ld = direct ? g.ho * g.wo : kTileP;
      for (int64_t b = 0; b < blocks; ++b) {
        kern.tile(a, starts + b * N + rb, starts + (b + 1) * N + rb, rows, x, 1, width,
                  bias ? bias + rb : nullptr, b > 0, tile, ld);
      }
      if (!direct) store_tile(tile, kTileP, rows, p0, width, g, pd, out, g.ho * g.wo);
    }
  }
}

void check_geometry(const CsrMatrix& w, const ConvGeometry& g, const char* op) {
  PYHWP_CHECK(g.images >= 0 && g.channels >= 1 && g.h >= 0 && g.w >= 0 && g.pt >= 0 && g.pl >= 0 && g.kh >= 1 &&
              g.kw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ho >= 0 && g.wo >= 0, op, ": bad geometry");
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, op, ": W has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  const Padded pd(g);
  PYHWP_CHECK(g.channels * pd.plane <= std::numeric_limits<int32_t>::max(), op,
              ": a padded image must hold fewer than 2^31 elements");
  PYHWP_CHECK(w.row_offsets && (w.nnz == 0 || w.col_indices || w.col_indices16), op, ": null CSR array");
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, op, ": row_offsets[-1] != nnz");
}

int64_t block_channels(const ConvGeometry& g) {
  const Padded pd(g);
  return channels_per_block(g, pd, std::min(kTileP, std::max<int64_t>(1, g.ho * pd.wp)));
}

}  // namespace

int64_t csr_conv2d_blocks(const ConvGeometry& g) {
  const int64_t cb = block_channels(g);
  return (g.channels + cb - 1) / cb;
}

void csr_conv2d_plan(const CsrMatrix& w, const ConvGeometry& g, int32_t* offsets, int64_t* starts) {
  check_geometry(w, g, "csr_conv2d_plan");
  PYHWP_CHECK(offsets && starts, "csr_conv2d_plan: null output array");
  const Padded pd(g);
  const int64_t cb = block_channels(g), blocks = (g.channels + cb - 1) / cb;
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  if (w.col_indices16) {
    stored_offsets(w.col_indices16, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices16, g, cb, blocks, starts);
  } else {
    stored_offsets(w.col_indices, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices, g, cb, blocks, starts);
  }
}

bool csr_conv2d(const CsrMatrix& w, const ConvGeometry& g, const int32_t* offsets, const int64_t* starts,
                const float* x, const float* bias, float* y, int num_threads) {
  check_geometry(w, g, "csr_conv2d");
  PYHWP_CHECK(num_threads >= 1, "csr_conv2d: num_threads must be >= 1");
  if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return false;
  PYHWP_CHECK(x && y && offsets && starts && (w.nnz == 0 || w.values), "csr_conv2d: null x, y, values or plan");
  const Padded pd(g);
  const int64_t work = w.nnz * g.images * g.ho * pd.wp;
  const int nt = work < Cfg::kSerialWork ? 1 : num_threads;
  const int64_t x_count = g.images * g.channels * pd.plane;
  const float* xp = x;
  bool bad;
  if (pd.is_input(g)) {  // 1x1 convs without padding
    bad = any_nonfinite(DenseIn{x, 1, x_count, x_count, 1});
  } else {
    float* buf = scratch(3, x_count);  // slots 1-2 are the workers'
    bad = pad_planes(x, g, pd, buf, nt);
    xp = buf;
  }
  run_conv(w.row_offsets, w.rows, starts, csr_conv2d_blocks(g), offsets, w.values, g, pd, xp, bias, y, nt);
  return bad;
}

}  // namespace pyhwp
