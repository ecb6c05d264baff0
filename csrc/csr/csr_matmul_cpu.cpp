// CPU CSR matmul: validation, the one ISA dispatch point, and the portable scalar kernels.
#include <omp.h>

#include <algorithm>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

void csr_validate(const CsrMatrix& w) {
  PYHWP_CHECK(w.rows >= 0 && w.cols >= 0 && w.nnz >= 0, "CSR sizes must be non-negative");
  PYHWP_CHECK(w.cols <= INT32_MAX, "CSR: ", w.cols, " columns do not fit int32 column indices");
  PYHWP_CHECK(w.row_offsets != nullptr, "CSR: row_offsets is null");
  PYHWP_CHECK(w.nnz == 0 || (w.col_indices && w.values), "CSR: indices or values are null");
  PYHWP_CHECK(w.row_offsets[0] == 0, "CSR: row_offsets[0] is ", w.row_offsets[0], ", expected 0");
  for (int64_t n = 0; n < w.rows; ++n) {
    PYHWP_CHECK(w.row_offsets[n + 1] >= w.row_offsets[n], "CSR: row_offsets decrease at row ", n);
  }
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, "CSR: row_offsets[-1] is ", w.row_offsets[w.rows],
              ", expected nnz = ", w.nnz);
  for (int64_t n = 0; n < w.rows; ++n) {
    for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) {
      const int32_t c = w.col_indices[j];
      PYHWP_CHECK(c >= 0 && c < w.cols, "CSR: column index ", c, " at position ", j,
                  " is outside [0, ", w.cols, ")");
      PYHWP_CHECK(j == w.row_offsets[n] || c > w.col_indices[j - 1], "CSR: column indices of row ",
                  n, " are not strictly increasing at position ", j);
    }
  }
}

void csr_rows_gather_scalar(const CsrMatrix& w, const DenseIn& x, const float* bias,
                            const DenseOut& y, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    const int64_t begin = w.row_offsets[n], end = w.row_offsets[n + 1];
    for (int64_t p = 0; p < x.cols; ++p) {
      const float* xr = x.data + p * x.stride_p;
      float acc = 0.f;
      for (int64_t j = begin; j < end; ++j) acc += w.values[j] * xr[w.col_indices[j]];
      y.data[(n - row_begin) * y.stride_n + p * y.stride_p] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void csr_rows_tile_scalar(const CsrMatrix& w, const DenseIn& x, const float* bias,
                          const DenseOut& y, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) {
    float* out = y.data + (n - row_begin) * y.stride_n;
    const float b = bias ? bias[n] : 0.f;
    for (int64_t p = 0; p < x.cols; ++p) out[p] = b;
    for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) {
      const float v = w.values[j];
      const float* xr = x.data + static_cast<int64_t>(w.col_indices[j]) * x.stride_k;
      for (int64_t p = 0; p < x.cols; ++p) out[p] += v * xr[p];
    }
  }
}

namespace {

CsrRowsFn pick(Isa isa, bool gather) {
  switch (isa) {
    case Isa::kAvx512: return gather ? csr_rows_gather_avx512 : csr_rows_tile_avx512;
    case Isa::kAvx2: return gather ? csr_rows_gather_avx2 : csr_rows_tile_avx2;
    default: return gather ? csr_rows_gather_scalar : csr_rows_tile_scalar;
  }
}

}  // namespace

void csr_matmul(const CsrMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                int num_threads) {
  using Cfg = CsrCpuConfig;
  PYHWP_CHECK(x.rows == w.cols, "csr_matmul: x has ", x.rows, " rows, W has ", w.cols, " columns");
  PYHWP_CHECK(y.rows == w.rows && y.cols == x.cols, "csr_matmul: y is ", y.rows, "x", y.cols,
              ", expected ", w.rows, "x", x.cols);
  PYHWP_CHECK(num_threads >= 1, "csr_matmul: num_threads must be >= 1");
  PYHWP_CHECK(w.row_offsets && (w.nnz == 0 || (w.col_indices && w.values)),
              "csr_matmul: null CSR array");
  PYHWP_CHECK(w.row_offsets[w.rows] == w.nnz, "csr_matmul: row_offsets[-1] != nnz");
  const int64_t N = w.rows, P = x.cols;
  if (N == 0 || P == 0) return;
  PYHWP_CHECK(x.data && y.data, "csr_matmul: null x or y");

  const int nt = w.nnz * P < Cfg::kSerialWork ? 1 : num_threads;
  const int64_t nblocks = (N + Cfg::kRowBlock - 1) / Cfg::kRowBlock;
  const Isa isa = active_isa();

  if (P < Cfg::kGatherMaxP && x.stride_k == 1) {
    const CsrRowsFn fn = pick(isa, /*gather=*/true);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r0 = b * Cfg::kRowBlock, r1 = std::min(N, r0 + Cfg::kRowBlock);
      DenseOut yb = y;
      yb.data = y.data + r0 * y.stride_n;
      fn(w, x, bias, yb, r0, r1);
    }
  } else {
    DenseIn xp = x;
    if (x.stride_p != 1) {
      int64_t ld = 0;
      xp.data = pack_p_contiguous(x, &ld, nt);
      xp.stride_k = ld;
      xp.stride_p = 1;
    }
    const CsrRowsFn fn = pick(isa, /*gather=*/false);
    const bool direct = y.stride_p == 1;
    const int64_t ld_tile = (P + 15) / 16 * 16;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r0 = b * Cfg::kRowBlock, r1 = std::min(N, r0 + Cfg::kRowBlock);
      if (direct) {
        DenseOut yb = y;
        yb.data = y.data + r0 * y.stride_n;
        fn(w, xp, bias, yb, r0, r1);
      } else {
        // Compute the block with p contiguous, then transpose it into y, so that each thread
        // writes whole 64-byte lines of y (16 consecutive n) and no two threads share a line.
        float* tile = scratch(1, Cfg::kRowBlock * ld_tile);
        const DenseOut t{tile, r1 - r0, P, ld_tile, 1};
        fn(w, xp, bias, t, r0, r1);
        for (int64_t p = 0; p < P; ++p) {
          float* dst = y.data + r0 * y.stride_n + p * y.stride_p;
          for (int64_t i = 0; i < r1 - r0; ++i) dst[i * y.stride_n] = tile[i * ld_tile + p];
        }
      }
    }
  }

  if (any_nonfinite(x)) {
    propagate_nonfinite(x, y, [&](int64_t n, const unsigned char* flags) {
      int64_t c = 0;
      for (int64_t j = w.row_offsets[n]; j < w.row_offsets[n + 1]; ++j) c += flags[w.col_indices[j]];
      return c;
    });
  }
}

}  // namespace pyhwp
