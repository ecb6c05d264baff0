// CSR sparse x dense matmul on the CPU: Y = W X (+ bias), W in CSR with int32 column indices.
#pragma once
#include <cstdint>

#include "common/dense.h"

namespace pyhwp {

// A CSR matrix in host memory. Row n stores positions row_offsets[n] .. row_offsets[n+1]-1 of
// col_indices (int32, each in [0, cols)) and values (float32). row_offsets has rows+1 int64
// entries, non-decreasing, from 0 to nnz; column indices strictly increase within a row.
struct CsrMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int64_t* row_offsets = nullptr;  // host, rows + 1
  const int32_t* col_indices = nullptr;  // host, nnz
  const float* values = nullptr;         // host, nnz
};

// Full structural check (offsets monotonic from 0 to nnz, indices in range). O(nnz); run once
// when a weight is built, not per call. Throws std::invalid_argument naming the first violation.
void csr_validate(const CsrMatrix& w);

// Y (N x P) = W (N x K) X (K x P) + bias (N floats, host, or nullptr), for any strides of X and Y
// (see DenseIn / DenseOut). NaN/Inf in X propagate exactly as in the dense product. Uses up to
// num_threads OpenMP threads. Y must not overlap X or W. Throws std::invalid_argument on sizes
// that do not match.
void csr_matmul(const CsrMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                int num_threads);

// Rows [row_begin, row_end) of Y, one kernel per ISA (csr_matmul_{cpu,avx2,avx512}.cpp). Row n
// goes to y.data + (n - row_begin) * y.stride_n; bias may be nullptr. `gather` variants need
// x.stride_k == 1 (x rows contiguous, small P); `tile` variants need x.stride_p == 1 and
// y.stride_p == 1.
using CsrRowsFn = void (*)(const CsrMatrix& w, const DenseIn& x, const float* bias,
                           const DenseOut& y, int64_t row_begin, int64_t row_end);
void csr_rows_gather_scalar(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
void csr_rows_tile_scalar(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
void csr_rows_gather_avx2(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
void csr_rows_tile_avx2(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
void csr_rows_gather_avx512(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
void csr_rows_tile_avx512(const CsrMatrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);

// Tiling knobs of the CPU CSR kernels.
struct CsrCpuConfig {
  static constexpr int64_t kRowBlock = 16;   // rows per parallel work item and per output tile
  static constexpr int64_t kGatherMaxP = 8;  // P below this: gather from x rows, no packing
  static constexpr int64_t kSerialWork = 1 << 15;  // nnz * P below this runs on one thread
  static_assert(kRowBlock % 16 == 0, "row blocks fill whole 64-byte output lines");
  static_assert(kGatherMaxP >= 1, "the gather path serves at least batch 1");
};

}  // namespace pyhwp
