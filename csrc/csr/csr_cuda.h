// CUDA entry points for the CSR format. Declared torch-free and CUDA-header-free so that
// bindings.cpp compiles with the host compiler; streams travel as void*.
#pragma once
#include <cstdint>

namespace pyhwp {

// Scatters a CSR matrix (rows x cols; row_offsets int64[rows+1], col_indices int32[nnz],
// values float32[nnz], all device pointers) into dense (float32[rows*cols], device, row-major),
// which it first zero-fills. Runs asynchronously on `stream` (a cudaStream_t); launch errors throw.
void csr_to_dense_cuda(int64_t rows, int64_t cols, const int64_t* row_offsets,
                       const int32_t* col_indices, const float* values, float* dense,
                       void* stream);

}  // namespace pyhwp
