// The one switch from DType to a CUDA element type, and the workspace check every CUDA op shares.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/checks.h"
#include "common/dense_cuda.h"
#include "common/dtype.h"

namespace pyhwp {

// Calls f(T{}) with T = float, __half or __nv_bfloat16 as `dtype` says.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

// Throws unless `workspace` holds at least `needed` bytes and is 256-byte aligned.
inline void check_workspace(const char* op, const void* workspace, size_t bytes, size_t needed) {
  PYHWP_CHECK(workspace != nullptr && bytes >= needed, op, ": workspace of ", bytes, " bytes, needs ", needed);
  PYHWP_CHECK((reinterpret_cast<uintptr_t>(workspace) & 255u) == 0, op, ": workspace is not 256-byte aligned");
}

// Throws unless `dtype` is known, sizes are non-negative and W (rows x cols), X and Y agree.
inline void check_gemm_sizes(const char* op, DType dtype, int64_t rows, int64_t cols, const DeviceDenseIn& x,
                             const DeviceDenseOut& y) {
  PYHWP_CHECK(dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16, op,
              ": unknown dtype code ", static_cast<int>(dtype));
  PYHWP_CHECK(rows >= 0 && cols >= 0 && x.cols >= 0, op, ": negative size");
  PYHWP_CHECK(x.rows == cols, op, ": x has ", x.rows, " rows, W has ", cols, " columns");
  PYHWP_CHECK(y.rows == rows && y.cols == x.cols, op, ": y is ", y.rows, "x", y.cols, ", expected ", rows, "x",
              x.cols);
}

}  // namespace pyhwp
