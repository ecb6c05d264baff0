// CSR -> dense conversion on the GPU: one warp per row scatters its stored values.
#include <cuda_runtime.h>

#include "common/checks.h"
#include "common/cuda_check.h"
#include "csr/csr_cuda.h"

namespace pyhwp {

namespace {

__global__ void csr_to_dense_kernel(int64_t rows, int64_t cols, const int64_t* __restrict__ row_offsets,
                                    const int32_t* __restrict__ col_indices,
                                    const float* __restrict__ values, float* __restrict__ dense) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {
    float* out = dense + r * cols;
    for (int64_t j = row_offsets[r] + lane; j < row_offsets[r + 1]; j += 32) {
      out[col_indices[j]] = values[j];
    }
  }
}

}  // namespace

void csr_to_dense_cuda(int64_t rows, int64_t cols, const int64_t* row_offsets,
                       const int32_t* col_indices, const float* values, float* dense,
                       void* stream) {
  PYHWP_CHECK(rows >= 0 && cols >= 0, "csr_to_dense_cuda: negative size");
  if (rows == 0 || cols == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  PYHWP_CUDA_CHECK(cudaMemsetAsync(dense, 0, sizeof(float) * rows * cols, s));
  constexpr int kThreads = 256;
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  const int grid = static_cast<int>(blocks < 65535 ? blocks : 65535);
  csr_to_dense_kernel<<<grid, kThreads, 0, s>>>(rows, cols, row_offsets, col_indices, values, dense);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pyhwp
