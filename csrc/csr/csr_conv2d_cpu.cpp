// CSR conv2d on the CPU as an implicit GEMM: the matmul tile kernels read shifted rows of a padded
// copy of the input (of its stride phases for a strided conv), so no im2col matrix and no per-tap
// GEMM is ever materialized.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/implicit_conv.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

using Cfg = CsrCpuConfig;

// Offsets of every stored weight in a padded image (conv_column_offsets of its column), in
// values order: the `cols` the tile kernel reads with ldx = 1. Through a per-column table (K
// entries, no divisions), since nnz can be 10^5 and more.
template <typename I>
void stored_offsets(const I* cols, int64_t nnz, const ConvGeometry& g, const PaddedPlanes& pd, int32_t* table,
                    int32_t* out) {
  conv_column_offsets(g, pd, table);
  for (int64_t j = 0; j < nnz; ++j) out[j] = table[cols[j]];
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
  int64_t N, blocks;
  const ConvGeometry& g;
  const PaddedPlanes& pd;
  const float* bias;
  float* y;  // (images, N, ho, wo)
};

// Rows [r0, r1) of one image's output over wide pixels [p0, p0 + width), from its padded planes,
// kRowBlock rows at a time.
template <typename T>
void conv_tile(const ConvRun<T>& c, const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0,
               int64_t width) {
  for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
    const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
    conv_output_tile(c.g, c.pd, c.y, c.N, img, rb, rows, Cfg::kRowBlock, p0, width, [&](float* tile, int64_t ld) {
      for (int64_t b = 0; b < c.blocks; ++b) {
        c.kern.tile(c.a, c.starts + b * c.N + rb, c.starts + (b + 1) * c.N + rb, rows, xp_img + p0, 1, width,
                    c.bias ? c.bias + rb : nullptr, b > 0, /*stream_w=*/true, tile, ld);
      }
    });
  }
}

void check_geometry(const CsrMatrix& w, const ConvGeometry& g, const char* op) {
  check_conv_geometry(g, PaddedPlanes(g), op);
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, op, ": W has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  PYHWP_CHECK(w.row_offsets && (w.nnz == 0 || w.col_indices || w.col_indices16), op, ": null CSR array");
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, op, ": row_offsets[-1] != nnz");
}

int64_t block_channels(const ConvGeometry& g) {
  const PaddedPlanes pd(g);
  return conv_channels_per_block(g, pd, std::min(kConvTileP, std::max<int64_t>(1, g.ho * pd.wp)));
}

}  // namespace

int64_t csr_conv2d_blocks(const ConvGeometry& g) {
  const int64_t cb = block_channels(g);
  return (g.channels + cb - 1) / cb;
}

void csr_conv2d_plan(const CsrMatrix& w, const ConvGeometry& g, int32_t* offsets, int64_t* starts) {
  check_geometry(w, g, "csr_conv2d_plan");
  PYHWP_CHECK((offsets || w.nnz == 0) && starts, "csr_conv2d_plan: null output array");
  const PaddedPlanes pd(g);
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
  PYHWP_CHECK(x && y && starts && (w.nnz == 0 || (offsets && w.values)), "csr_conv2d: null x, y, values or plan");
  const PaddedPlanes pd(g);
  const int64_t work = w.nnz * g.images * g.ho * pd.wp;
  const int nt = work < Cfg::kSerialWork ? 1 : num_threads;
  const ConvRun<float> run{csr_kernels<int32_t, float>(vector_isa()), {offsets, w.values}, w.row_offsets, starts,
                           w.rows, csr_conv2d_blocks(g), g, pd, bias, y};
  return run_implicit_conv(
      g, pd, w.rows, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) { balanced_runs(w.row_offsets, w.rows, Cfg::kRowCost, parts, bounds); },
      [&](const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        conv_tile(run, xp_img, img, r0, r1, p0, width);
      });
}

}  // namespace pyhwp
