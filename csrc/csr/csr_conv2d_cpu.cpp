// CSR conv2d on the CPU as an implicit GEMM: the matmul tile kernels read shifted rows of a padded
// copy of the input (of its stride phases for a strided conv), so no im2col matrix and no per-tap
// GEMM is ever materialized.
#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
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

// The aligned plan (csr_conv2d_aligned): each row's stored weights reordered by (channel block b,
// column s of the tap), stable; offsets[j] = the window's start rounded down to its line (its
// offset less shifts[s] = s*dw mod 16), values[j] the weight; starts[(b * kw + s) * N + n] the
// first position of row n in group (b, s), starts[blocks * kw * N + n] its end.
template <typename I>
void aligned_plan(const CsrMatrix& w, const I* cols, const ConvGeometry& g, const PaddedPlanes& pd, int64_t cb,
                  int64_t blocks, int32_t* offsets, int64_t* starts, float* values) {
  const int64_t N = w.rows, kw = g.kw, taps = g.kh * g.kw, groups = blocks * kw;
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  conv_column_offsets(g, pd, table.data());
  std::vector<int64_t> count(static_cast<size_t>(groups));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r0 = w.row_offsets[n], r1 = w.row_offsets[n + 1];
    auto group = [&](int64_t j) { const int64_t k = cols[j]; return k / taps / cb * kw + k % kw; };
    std::fill(count.begin(), count.end(), 0);
    for (int64_t j = r0; j < r1; ++j) ++count[static_cast<size_t>(group(j))];
    for (int64_t q = 0, at = r0; q < groups; ++q) {
      starts[q * N + n] = at;
      at += count[static_cast<size_t>(q)];
      count[static_cast<size_t>(q)] = starts[q * N + n];  // now the next free position of group q
    }
    starts[groups * N + n] = r1;
    for (int64_t j = r0; j < r1; ++j) {
      const int64_t q = group(j), at = count[static_cast<size_t>(q)]++;
      offsets[at] = table[cols[j]] - static_cast<int32_t>(cols[j] % kw * g.dw % 16);
      values[at] = w.values[j];
    }
  }
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

// The plan and operands every work item of one call shares. groups: starts per channel block (kw
// shifted groups in the aligned plan, else 1), shifts[s] the lanes group s is shifted by.
struct ConvRun {
  CsrKernels<int32_t, float> kern;
  CsrShiftedTileFn shifted;  // the aligned plan's kernel where the ISA has one
  CsrArrays<int32_t, float> a;
  const int64_t* starts;
  int64_t N, blocks, groups;
  std::vector<int32_t> shifts;
  const ConvGeometry& g;
  const PaddedPlanes& pd;
  const float* bias;
  float* y;  // (images, N, ho, wo)
};

// Rows [r0, r1) of one image's output over wide pixels [p0, p0 + width), from its padded planes,
// kRowBlock rows at a time. Without a shifted kernel an aligned plan's groups take the tile
// kernel on x shifted back by their shifts (unaligned loads).
void conv_tile(const ConvRun& c, const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0,
               int64_t width) {
  for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
    const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
    conv_output_tile(c.g, c.pd, c.y, c.N, img, rb, rows, Cfg::kRowBlock, p0, width, [&](float* tile, int64_t ld) {
      const float* bias = c.bias ? c.bias + rb : nullptr;
      for (int64_t b = 0; b < c.blocks; ++b) {
        const int64_t* first = c.starts + b * c.groups * c.N + rb;
        if (c.groups > 1 && c.shifted) {
          c.shifted(c.a.cols, c.a.vals, first, c.N, c.groups, c.shifts.data(), rows, xp_img + p0, width, bias, b > 0,
                    tile, ld);
          continue;
        }
        for (int64_t s = 0; s < c.groups; ++s)
          c.kern.tile(c.a, first + s * c.N, first + (s + 1) * c.N, rows, xp_img + p0 + c.shifts[s], 1, width, bias,
                      b > 0 || s > 0, /*stream_w=*/true, tile, ld);
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

int64_t block_channels(const ConvGeometry& g, const PaddedPlanes& pd) {
  return conv_channels_per_block(g, pd, std::min(kConvTileP, std::max<int64_t>(1, g.ho * pd.wp)));
}

PaddedPlanes planes(const ConvGeometry& g, bool aligned) { return PaddedPlanes(g, 0, 1, aligned); }

}  // namespace

bool csr_conv2d_aligned(const ConvGeometry& g) {
  if (g.kw == 1 || g.sh * g.sw != 1 || vector_isa() < Isa::kAvx512) return false;
  const int64_t plain = g.wo + g.dw * (g.kw - 1), rounded = (plain + 15) / 16 * 16;
  return rounded * 100 <= plain * Cfg::kAlignedRowsPercent && conv_tile_width(g.ho * rounded) >= 64;
}

int64_t csr_conv2d_starts(const ConvGeometry& g, bool aligned) {
  const PaddedPlanes pd = planes(g, aligned);
  const int64_t cb = block_channels(g, pd);
  return (g.channels + cb - 1) / cb * (aligned ? g.kw : 1) + 1;
}

void csr_conv2d_plan(const CsrMatrix& w, const ConvGeometry& g, bool aligned, int32_t* offsets, int64_t* starts,
                     float* values) {
  check_geometry(w, g, "csr_conv2d_plan");
  PYHWP_CHECK((offsets || w.nnz == 0) && starts, "csr_conv2d_plan: null output array");
  PYHWP_CHECK(!aligned || g.sh * g.sw == 1, "csr_conv2d_plan: the aligned plan is stride 1 only");
  PYHWP_CHECK(!aligned || w.nnz == 0 || (values && w.values), "csr_conv2d_plan: the aligned plan needs the values");
  const PaddedPlanes pd = planes(g, aligned);
  const int64_t cb = block_channels(g, pd), blocks = (g.channels + cb - 1) / cb;
  if (aligned) {
    w.col_indices16 ? aligned_plan(w, w.col_indices16, g, pd, cb, blocks, offsets, starts, values)
                    : aligned_plan(w, w.col_indices, g, pd, cb, blocks, offsets, starts, values);
    return;
  }
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  if (w.col_indices16) {
    stored_offsets(w.col_indices16, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices16, g, cb, blocks, starts);
  } else {
    stored_offsets(w.col_indices, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices, g, cb, blocks, starts);
  }
}

bool csr_conv2d(const CsrMatrix& w, const ConvGeometry& g, bool aligned, const int32_t* offsets,
                const int64_t* starts, const float* x, const float* bias, float* y, int num_threads) {
  check_geometry(w, g, "csr_conv2d");
  PYHWP_CHECK(num_threads >= 1, "csr_conv2d: num_threads must be >= 1");
  PYHWP_CHECK(!aligned || g.sh * g.sw == 1, "csr_conv2d: the aligned plan is stride 1 only");
  if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return false;
  PYHWP_CHECK(x && y && starts && (w.nnz == 0 || (offsets && w.values)), "csr_conv2d: null x, y, values or plan");
  const PaddedPlanes pd = planes(g, aligned);
  const int64_t work = w.nnz * g.images * g.ho * pd.wp;
  const int nt = work < Cfg::kSerialWork ? 1 : num_threads;
  const int64_t cb = block_channels(g, pd), groups = aligned ? g.kw : 1;
  ConvRun run{csr_kernels<int32_t, float>(vector_isa()), nullptr, {offsets, w.values}, starts, w.rows,
              (g.channels + cb - 1) / cb, groups, std::vector<int32_t>(static_cast<size_t>(groups)), g, pd, bias, y};
#ifdef PYHWP_X86_KERNELS
  if (vector_isa() >= Isa::kAvx512) run.shifted = csr_shifted_tile_avx512();
#endif
  for (int64_t s = 0; aligned && s < groups; ++s) run.shifts[static_cast<size_t>(s)] = static_cast<int32_t>(s * g.dw % 16);
  return run_implicit_conv(
      g, pd, w.rows, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) { balanced_runs(w.row_offsets, w.rows, Cfg::kRowCost, parts, bounds); },
      [&](const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        conv_tile(run, xp_img, img, r0, r1, p0, width);
      },
      /*whole_vectors=*/aligned);
}

}  // namespace pyhwp
