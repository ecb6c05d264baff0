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

// Copies padded row `a` of every channel of one image (x_img: its (C, h, w) input) into the
// image's padded planes at xp_img; returns whether that input row holds a NaN/Inf.
bool pad_row(const float* x_img, const ConvGeometry& g, const Padded& pd, float* xp_img, int64_t a) {
  const int64_t i = a - g.pt;
  const int64_t lo = std::min(g.pl, pd.wp), n = std::max<int64_t>(0, std::min(g.w, pd.wp - g.pl));
  const int64_t hi = pd.wp - lo - n;
  // The side pads are a float or two: stores, not memset calls (measured: the calls were a third
  // of this pass). A zero the compiler cannot see keeps it from turning the loops into calls.
  float zero = 0.f;
  asm("" : "+x"(zero));
  uint32_t seen = 0;
  for (int64_t c = 0; c < g.channels; ++c) {
    float* row = xp_img + c * pd.plane + a * pd.wp;
    if (a + 1 == pd.hp) {  // the alignment padding after the last row
      for (int64_t b = pd.wp; b < pd.plane - (pd.hp - 1) * pd.wp; ++b) row[b] = zero;
    }
    if (i < 0 || i >= g.h) {
      std::memset(row, 0, sizeof(float) * pd.wp);
      continue;
    }
    for (int64_t b = 0; b < lo; ++b) row[b] = zero;
    const uint32_t* in = reinterpret_cast<const uint32_t*>(x_img + (c * g.h + i) * g.w);
    uint32_t* out = reinterpret_cast<uint32_t*>(row + lo);
    for (int64_t b = 0; b < n; ++b) {
      out[b] = in[b];
      seen |= (in[b] & 0x7f800000u) == 0x7f800000u;
    }
    for (int64_t b = 0; b < hi; ++b) row[lo + n + b] = zero;
  }
  return seen != 0;
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

// The plan and operands every work item of one call shares.
template <typename T>
struct ConvRun {
  CsrKernels<int32_t, T> kern;
  CsrArrays<int32_t, T> a;
  const int64_t* ro;
  const int64_t* starts;
  int64_t N, blocks, P;
  const ConvGeometry& g;
  const Padded& pd;
  const float* bias;
  float* y;  // (images, N, ho, wo)
};

// Rows [r0, r1) of one image's output over wide pixels [p0, p0 + width), from its padded planes.
template <typename T>
void conv_tile(const ConvRun<T>& c, const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0,
               int64_t width) {
  const ConvGeometry& g = c.g;
  const bool direct = c.pd.wp == g.wo;  // no wrapped columns (kw = 1): the tile is the output's
  for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
    const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
    float* out = c.y + (img * c.N + rb) * g.ho * g.wo;
    float* tile = direct ? out + p0 : scratch(1, Cfg::kRowBlock * kTileP);
    const int64_t ld = direct ? g.ho * g.wo : kTileP;
    for (int64_t b = 0; b < c.blocks; ++b) {
      c.kern.tile(c.a, c.starts + b * c.N + rb, c.starts + (b + 1) * c.N + rb, rows, xp_img + p0, 1, width,
                  c.bias ? c.bias + rb : nullptr, b > 0, tile, ld);
    }
    if (!direct) store_tile(tile, kTileP, rows, p0, width, g, c.pd, out, g.ho * g.wo);
  }
}

// Pads x (unless it is read in place) and runs every tile; returns whether x holds a NaN/Inf.
// Column tiles have equal widths (a multiple of 16, at most kTileP).
template <typename T>
bool run_conv(const ConvRun<T>& c, const float* x, int nt) {
  const ConvGeometry& g = c.g;
  const Padded& pd = c.pd;
  const int64_t ptiles = (c.P + kTileP - 1) / kTileP;
  const int64_t tile_p = ((c.P + ptiles - 1) / ptiles + 15) / 16 * 16;
  const int64_t x_image = g.channels * pd.plane, in_image = g.channels * g.h * g.w;
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
      for (int64_t a = 0; a < pd.hp; ++a) bad |= pad_row(x + img * in_image, g, pd, xp, a);
      for (int64_t t = 0; t < ptiles; ++t) conv_tile(c, xp, img, 0, c.N, t * tile_p, std::min(tile_p, c.P - t * tile_p));
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
      bad |= pad_row(x + (q / pd.hp) * in_image, g, pd, buf + (q / pd.hp) * x_image, q % pd.hp);
    xp = buf;
  }
  const int64_t tiles = g.images * ptiles;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(c.N / 16, nt / std::gcd<int64_t>(tiles, nt)));
  std::vector<int64_t> bounds;
  balanced_runs(c.ro, c.N, Cfg::kRowCost, parts, &bounds);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t it = 0; it < tiles * parts; ++it) {
    const int64_t part = it % parts, tile_id = it / parts, img = tile_id / ptiles;
    const int64_t p0 = (tile_id % ptiles) * tile_p;
    conv_tile(c, xp + img * x_image, img, bounds[static_cast<size_t>(part)], bounds[static_cast<size_t>(part + 1)],
              p0, std::min(tile_p, c.P - p0));
  }
  return bad != 0;
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
  const ConvRun<float> run{csr_kernels<int32_t, float>(active_isa()), {offsets, w.values}, w.row_offsets, starts,
                           w.rows, csr_conv2d_blocks(g), g.ho * pd.wp, g, pd, bias, y};
  return run_conv(run, x, nt);
}

}  // namespace pyhwp
