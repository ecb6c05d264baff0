// Strided views of the dense operands of Y = W X in device memory (the CUDA twins of
// common/dense.h's DenseIn / DenseOut, with the element type carried separately as a DType).
#pragma once
#include <cstdint>

namespace pyhwp {

// X (K x P): element (k, p) at data[k*stride_k + p*stride_p], device memory. Linear layers pass
// x (P, K) row-major (stride_k = 1, stride_p = K); conv passes the patch matrix (stride_p = 1).
struct DeviceDenseIn {
  const void* data = nullptr;
  int64_t rows = 0;  // K
  int64_t cols = 0;  // P
  int64_t stride_k = 0;
  int64_t stride_p = 0;
};

// Y (N x P): element (n, p) at data[n*stride_n + p*stride_p], device memory.
struct DeviceDenseOut {
  void* data = nullptr;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // P
  int64_t stride_n = 0;
  int64_t stride_p = 0;
};

}  // namespace pyhwp
