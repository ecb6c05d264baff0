// CUDA entry points for the CSR format. Declared torch-free and CUDA-header-free so that
// bindings.cpp compiles with the host compiler; streams travel as void*.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dense_cuda.h"
#include "common/dtype.h"

namespace pyhwp {

// Scatters a CSR matrix (rows x cols; row_offsets int64[rows+1], col_indices int32[nnz],
// values float32[nnz], all device pointers) into dense (float32[rows*cols], device, row-major),
// which it first zero-fills. Runs asynchronously on `stream` (a cudaStream_t); launch errors throw.
void csr_to_dense_cuda(int64_t rows, int64_t cols, const int64_t* row_offsets,
                       const int32_t* col_indices, const float* values, float* dense,
                       void* stream);

// A CSR matrix in device memory (layout as CsrMatrix in csr/csr_matmul.h), values of `dtype`.
// row_order: int32[rows], device, a permutation of 0..rows-1 listing the rows by decreasing
// length (pyhwp computes it once per weight); the kernels give consecutive thread groups rows of
// similar length and start the longest first. nullptr means the identity order.
struct CsrCudaMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int64_t* row_offsets = nullptr;  // device, rows + 1
  const int32_t* col_indices = nullptr;  // device, nnz
  const void* values = nullptr;          // device, nnz elements of dtype
  const int32_t* row_order = nullptr;    // device, rows, or nullptr
};

// Tiling knobs of the CUDA CSR kernels (csr_matmul_cuda.cu).
struct CsrCudaConfig {
  // P (batch) at or below this: one thread group per row splits the row's nonzeros and gathers
  // x directly with its strides (SpMV-like, no copies); above: Sputnik-style row tiles.
  static constexpr int64_t kGatherMaxP = 8;
  // Nonzeros of one row staged in shared memory per pass of the tile kernel.
  static constexpr int kStage = 32;
  // Threads per block of the tile kernel (rows per block = kTileThreads / subwarp width).
  static constexpr int kTileThreads = 64;
  // Threads per block of the gather kernel.
  static constexpr int kGatherThreads = 256;
  static_assert(kGatherMaxP >= 1 && kGatherMaxP <= 8, "the gather kernel keeps <= 8 sums per thread");
  static_assert(kStage % 4 == 0, "staged nonzeros are consumed four at a time");
  static_assert(kTileThreads % 32 == 0 && kGatherThreads % 32 == 0, "whole warps per block");
};

// Device bytes of scratch csr_matmul_cuda needs for these operands (a non-finite record of P+1
// ints, plus a p-contiguous copy of X and/or Y when their strides or alignment do not allow
// 16-byte vector access). Pure host arithmetic; the same arguments must be passed to the call.
size_t csr_matmul_cuda_workspace(const CsrCudaMatrix& w, DType dtype, const DeviceDenseIn& x,
                                 const DeviceDenseOut& y);

// Y (N x P) = W (N x K) X (K x P) + bias, on the GPU, asynchronously on `stream` (a
// cudaStream_t). W, X, bias (N elements or nullptr), Y all of `dtype` (float32, float16 or
// bfloat16; products accumulate in float32), device memory, any strides for X and Y. NaN/Inf
// in X propagate exactly as in the dense product. `workspace` is device memory of at least
// csr_matmul_cuda_workspace(w, dtype, x, y) bytes, 256-byte aligned, not touched by anyone else
// until the stream reaches the end of this call. Y must not overlap X, W or the workspace.
// Throws std::invalid_argument on bad sizes, std::runtime_error on CUDA errors.
void csr_matmul_cuda(const CsrCudaMatrix& w, DType dtype, const DeviceDenseIn& x, const void* bias,
                     const DeviceDenseOut& y, void* workspace, size_t workspace_bytes, void* stream);

struct ConvGeometry;  // common/conv_geometry.h (the CUDA conv: stride 1)

// The padded planes of the CUDA implicit-GEMM conv (as the CPU driver's): hp x wp per channel,
// hp = ho + dh*(kh-1) + 1 (a spare zero row for kw > 1, none for kw == 1), wp = wo + dw*(kw-1),
// one every `plane` elements (hp*wp rounded up to 16). Column j = (c*kh + r)*kw + s of the weight
// reads image element c*plane + r*dh*wp + s*dw + p for wide output pixel p = a*wp + b.
struct ConvPlanes {
  int64_t hp = 0, wp = 0, plane = 0;
};
ConvPlanes csr_conv2d_cuda_planes(const ConvGeometry& g);

// Device bytes of scratch csr_conv2d_cuda needs: a flag and the padded planes of every image.
size_t csr_conv2d_cuda_workspace(const CsrCudaMatrix& w, DType dtype, const ConvGeometry& g);

// Stride-1 conv2d y = conv(x, W) + bias as one implicit GEMM over the batch, asynchronously on
// `stream`: x (images, C, h, w) and y (images, rows, ho, wo) contiguous, device, of `dtype`
// (float32, float16, bfloat16; float32 sums); W (rows x C*kh*kw) CSR of the same dtype, read
// through `offsets` (nnz int32, device: the padded-image offset of every stored weight, see
// ConvPlanes; w.col_indices is not read) in w.row_order. x is copied into zero-padded planes in
// the workspace (pt rows on top, pl columns on the left), the CSR tile kernel runs over all
// images at once (images as grid z) and writes only the output columns b < wo. NaN/Inf in x
// propagate exactly as in the dense convolution (a check kernel that returns at once when x is
// finite; no host sync). Launches: a 4-byte memset, the pad, the tile and the check kernel.
void csr_conv2d_cuda(const CsrCudaMatrix& w, DType dtype, const ConvGeometry& g, const int32_t* offsets,
                     const void* x, const void* bias, void* y, void* workspace, size_t workspace_bytes,
                     void* stream);

}  // namespace pyhwp
