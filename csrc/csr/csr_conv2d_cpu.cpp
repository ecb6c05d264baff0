// CSR conv2d on the CPU as an implicit GEMM: the matmul tile kernels read shifted rows of a padded
// copy of the input (of its stride phases for a strided conv), so no im2col matrix and no per-tap
// GEMM is ever materialized.
#include <algorithm>
#include <cstring>
#include <limits>
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

// Runs of an aligned plan per channel block: one per nonempty mask of kw kernel columns.
constexpr int64_t tap_runs(int64_t kw) { return (int64_t{1} << kw) - 1; }

// The aligned plan (csr_conv2d_aligned, csr_matmul.h): per row n, one entry per tap row t = c*kh + r
// holding a stored weight, in runs by channel block b and mask M (bit s: column s stored), in
// `stream`: the line of the tap row's windows (its column 0's offset), then the weights of the
// columns in M in order (float bits; stored duplicates summed). starts[(b * runs + M - 1) * N + n]
// is where the run starts in the stream, starts[blocks * runs * N + n] where the row ends. Returns
// the stream's length (at most 2 * nnz words).
template <typename I>
int64_t tap_row_plan(const CsrMatrix& w, const I* cols, const ConvGeometry& g, const PaddedPlanes& pd, int64_t cb,
                     int64_t blocks, int32_t* stream, int64_t* starts) {
  const int64_t N = w.rows, kw = g.kw, tap_rows = g.channels * g.kh, runs = tap_runs(kw);
  const int64_t groups = blocks * runs;
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  conv_column_offsets(g, pd, table.data());
  std::vector<int64_t> slot(static_cast<size_t>(tap_rows), -1), next(static_cast<size_t>(groups));
  std::vector<int64_t> touched;  // this row's tap rows, in first-seen order
  std::vector<int32_t> mask;
  std::vector<float> weights;  // 3 per touched tap row
  auto words = [](int32_t m) { return int64_t{1} + ((m & 1) + (m >> 1 & 1) + (m >> 2 & 1)); };
  int64_t at = 0;
  for (int64_t n = 0; n < N; ++n) {
    touched.clear(), mask.clear(), weights.clear();
    for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) {
      const int64_t t = static_cast<int64_t>(cols[j]) / kw, s = static_cast<int64_t>(cols[j]) % kw;
      int64_t& i = slot[static_cast<size_t>(t)];
      if (i < 0) {
        i = static_cast<int64_t>(touched.size());
        touched.push_back(t), mask.push_back(0), weights.insert(weights.end(), 3, 0.f);
      }
      mask[static_cast<size_t>(i)] |= 1 << s;
      weights[static_cast<size_t>(3 * i + s)] += w.values[j];
    }
    auto group = [&](size_t i) { return static_cast<size_t>(touched[i] / g.kh / cb * runs + mask[i] - 1); };
    std::fill(next.begin(), next.end(), 0);
    for (size_t i = 0; i < touched.size(); ++i) next[group(i)] += words(mask[i]);
    for (int64_t q = 0; q < groups; ++q) {
      starts[q * N + n] = at;
      at += next[static_cast<size_t>(q)];
      next[static_cast<size_t>(q)] = starts[q * N + n];  // now where run q's next entry goes
    }
    starts[groups * N + n] = at;
    for (size_t i = 0; i < touched.size(); ++i) {
      int64_t& to = next[group(i)];
      stream[to++] = table[static_cast<size_t>(touched[i] * kw)];
      for (int64_t s = 0; s < kw; ++s)
        if (mask[i] >> s & 1) std::memcpy(stream + to++, &weights[3 * i + static_cast<size_t>(s)], sizeof(float));
      slot[static_cast<size_t>(touched[i])] = -1;
    }
  }
  return at;
}

// The tap-row kernel's sums in portable code, for an aligned plan run where the ISA has no
// tap-row kernel (the ISA cap lowered after the plan was made): as CsrTapTileFn.
void tap_tile_portable(const int32_t* stream, const int64_t* starts, int64_t N, int64_t kw, const int32_t* shifts,
                       int64_t rows, const float* x, int64_t P, const float* bias, bool accumulate, float* y,
                       int64_t ldy) {
  const int64_t runs = tap_runs(kw);
  for (int64_t i = 0; i < rows; ++i) {
    float* out = y + i * ldy;
    if (!accumulate) std::fill(out, out + P, bias ? bias[i] : 0.f);
    for (int64_t m = 1; m <= runs; ++m)
      for (int64_t e = starts[(m - 1) * N + i]; e < starts[m * N + i];) {
        const float* line = x + stream[e++];
        for (int64_t s = 0; s < kw; ++s) {
          if (!(m >> s & 1)) continue;
          float v;
          std::memcpy(&v, stream + e++, sizeof(float));
          for (int64_t p = 0; p < P; ++p) out[p] += v * line[shifts[s] + p];
        }
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

// The plan and operands every work item of one call shares. An aligned plan (runs > 0: 2^kw - 1
// runs per channel block) takes the tap-row kernel, whose shifts[s] = s*dw.
struct ConvRun {
  CsrKernels<int32_t, float> kern;
  CsrTapTileFn tap_tile;
  CsrArrays<int32_t, float> a;
  const int64_t* starts;
  int64_t N, blocks, runs;
  int32_t shifts[3];
  const ConvGeometry& g;
  const PaddedPlanes& pd;
  const float* bias;
  float* y;  // (images, N, ho, wo)
};

// Rows [r0, r1) of one image's output over wide pixels [p0, p0 + width), from its padded planes,
// kRowBlock rows at a time.
void conv_tile(const ConvRun& c, const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0,
               int64_t width) {
  for (int64_t rb = r0; rb < r1; rb += Cfg::kRowBlock) {
    const int64_t rows = std::min(Cfg::kRowBlock, r1 - rb);
    conv_output_tile(c.g, c.pd, c.y, c.N, img, rb, rows, Cfg::kRowBlock, p0, width, [&](float* tile, int64_t ld) {
      const float* bias = c.bias ? c.bias + rb : nullptr;
      for (int64_t b = 0; b < c.blocks; ++b) {
        if (c.runs > 0) {
          c.tap_tile(c.a.cols, c.starts + b * c.runs * c.N + rb, c.N, c.g.kw, c.shifts, rows, xp_img + p0, width,
                     bias, b > 0, tile, ld);
        } else {
          c.kern.tile(c.a, c.starts + b * c.N + rb, c.starts + (b + 1) * c.N + rb, rows, xp_img + p0, 1, width, bias,
                      b > 0, /*stream_w=*/true, tile, ld);
        }
      }
    });
  }
}

PaddedPlanes planes(const ConvGeometry& g, bool aligned) { return PaddedPlanes(g, 0, 1, aligned); }

bool aligned_fits(const ConvGeometry& g) {
  return g.sh * g.sw == 1 && g.kw >= 2 && g.kw <= 3 && (g.kw - 1) * g.dw <= 8;
}

// The checks of W and the geometry every entry point shares: an aligned plan only where it applies,
// and the layout's offsets within int32.
void check_geometry(const CsrMatrix& w, const ConvGeometry& g, bool aligned, const char* op) {
  PYHWP_CHECK(!aligned || aligned_fits(g), op,
              ": the aligned plan is for stride-1 convs with kw = 2 or 3 and (kw - 1) * dw <= 8");
  check_conv_geometry(g, planes(g, aligned), op);
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, op, ": W has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  PYHWP_CHECK(w.row_offsets && (w.nnz == 0 || w.col_indices || w.col_indices16), op, ": null CSR array");
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, op, ": row_offsets[-1] != nnz");
}

int64_t block_channels(const ConvGeometry& g, const PaddedPlanes& pd) {
  return conv_channels_per_block(g, pd, std::min(kConvTileP, std::max<int64_t>(1, g.ho * pd.wp)));
}

int64_t channel_blocks(const ConvGeometry& g, int64_t cb) { return (g.channels + cb - 1) / cb; }

}  // namespace

bool csr_conv2d_aligned(const ConvGeometry& g) {
  if (!aligned_fits(g) || vector_isa() < Isa::kAvx512) return false;
  const int64_t plain = g.wo + g.dw * (g.kw - 1), rounded = (plain + 15) / 16 * 16;
  return rounded * 100 <= plain * Cfg::kAlignedRowsPercent && conv_tile_width(g.ho * rounded) >= 64 &&
         planes(g, true).group_floats() <= std::numeric_limits<int32_t>::max();
}

int64_t csr_conv2d_starts(const ConvGeometry& g, bool aligned) {
  PYHWP_CHECK(!aligned || aligned_fits(g), "csr_conv2d_starts: no aligned plan for this geometry");
  const PaddedPlanes pd = planes(g, aligned);
  return channel_blocks(g, block_channels(g, pd)) * (aligned ? tap_runs(g.kw) : 1) + 1;
}

int64_t csr_conv2d_plan(const CsrMatrix& w, const ConvGeometry& g, bool aligned, int32_t* offsets, int64_t* starts) {
  check_geometry(w, g, aligned, "csr_conv2d_plan");
  PYHWP_CHECK((offsets || w.nnz == 0) && starts, "csr_conv2d_plan: null output array");
  PYHWP_CHECK(!aligned || w.nnz == 0 || w.values, "csr_conv2d_plan: the aligned plan needs the values");
  const PaddedPlanes pd = planes(g, aligned);
  const int64_t cb = block_channels(g, pd), blocks = channel_blocks(g, cb);
  if (aligned)
    return w.col_indices16 ? tap_row_plan(w, w.col_indices16, g, pd, cb, blocks, offsets, starts)
                           : tap_row_plan(w, w.col_indices, g, pd, cb, blocks, offsets, starts);
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  if (w.col_indices16) {
    stored_offsets(w.col_indices16, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices16, g, cb, blocks, starts);
  } else {
    stored_offsets(w.col_indices, w.nnz, g, pd, table.data(), offsets);
    block_starts(w.row_offsets, w.rows, w.col_indices, g, cb, blocks, starts);
  }
  return w.nnz;
}

bool csr_conv2d(const CsrMatrix& w, const ConvGeometry& g, bool aligned, const int32_t* offsets,
                const int64_t* starts, const float* x, const float* bias, float* y, int num_threads) {
  check_geometry(w, g, aligned, "csr_conv2d");
  PYHWP_CHECK(num_threads >= 1, "csr_conv2d: num_threads must be >= 1");
  if (w.rows == 0 || g.images == 0 || g.ho == 0 || g.wo == 0) return false;
  PYHWP_CHECK(x && y && starts && (w.nnz == 0 || (offsets && (aligned || w.values))),
              "csr_conv2d: null x, y, values or plan");
  const PaddedPlanes pd = planes(g, aligned);
  const int64_t work = w.nnz * g.images * g.ho * pd.wp;
  const int nt = work < Cfg::kSerialWork ? 1 : num_threads;
  ConvRun run{csr_kernels<int32_t, float>(vector_isa()), &tap_tile_portable, {offsets, w.values}, starts, w.rows,
              channel_blocks(g, block_channels(g, pd)), aligned ? tap_runs(g.kw) : 0, {0, 0, 0}, g, pd, bias, y};
#ifdef PYHWP_X86_KERNELS
  if (vector_isa() >= Isa::kAvx512) run.tap_tile = csr_tap_tile_avx512();
#endif
  for (int64_t s = 0; aligned && s < g.kw; ++s) run.shifts[s] = static_cast<int32_t>(s * g.dw);
  return run_implicit_conv(
      g, pd, w.rows, x, nt,
      [&](int64_t parts, std::vector<int64_t>* bounds) { balanced_runs(w.row_offsets, w.rows, Cfg::kRowCost, parts, bounds); },
      [&](const float* xp_img, int64_t img, int64_t r0, int64_t r1, int64_t p0, int64_t width) {
        conv_tile(run, xp_img, img, r0, r1, p0, width);
      },
      /*whole_vectors=*/aligned);
}

}  // namespace pyhwp
