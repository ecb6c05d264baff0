// CUDA entry points of the 2:4 pattern: Y = W X (+ bias) on sparse tensor cores (mma.sp), and the
// on-device compression of a dense 2:4 weight. Torch-free and CUDA-header-free (bindings.cpp
// includes it); streams travel as void*.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dense_cuda.h"
#include "common/dtype.h"

namespace pyhwp {

// A 2:4 weight W (N x K) in device memory, in THE SAME layout as the CPU format
// (sparse24/sparse24_matmul.h, Sparse24Matrix), with values of the call's dtype:
//   values: (N, Kp/2) row-major, Kp = K rounded up to 32; slots 2g, 2g+1 of a row hold the two
//           stored weights of group g (inputs 4g..4g+3), the lower position first.
//   meta:   (N, Kp/32) uint32 row-major; bits [4j, 4j+3] of word c are group 8c+j's two 2-bit
//           positions, the first in the low two bits; the two positions strictly increase.
// Why no separate GPU layout: for mma.sp.m16n8k32 with .f16/.bf16 (PTX ISA 9.7.14.6.2.2) the
// compressed A fragment of a 16 x 32 tile is the m16n8k16 A fragment of the 16 x 16 compressed
// tile (values in this order, the element of the lower metadata index in the lower half), and a
// metadata register is two 16-bit halves of this meta word: see sparse24_matmul_cuda.cu. Every
// nibble has first < second, so it is valid metadata (0b0000, 0b0101, 0b1010, 0b1111 are not)
// and sorted, as mma.sp::ordered_metadata requires.
struct Sparse24CudaWeight {
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K (unpadded)
  const void* values = nullptr;  // device, rows * Kp/2 elements of dtype, 16-byte aligned
  const uint32_t* meta = nullptr;  // device, rows * Kp/32, 4-byte aligned
};

// Tiling knobs of the CUDA 2:4 kernels (sparse24_matmul_cuda.cu).
//
// One mma.sp.m16n8k32 multiplies a 16-row W tile (32 inputs, 16 stored values per row) by an
// 8-column X tile. A block computes BM rows of W x BN columns of X over k-steps of kStepK inputs
// (kStepK / 32 mma k-substeps), fed by a kStages-deep cp.async pipeline; the n8 side of the
// instruction is the batch, so batches of 1-8 use BN = 8 and 9-16 BN = 16 with no padding to
// 32 rows (kDecodeM rows of W per block; split-K across blocks when that leaves SMs idle).
struct Sparse24CudaConfig {
  static constexpr int kGroupsPerWord = 8;   // a meta word covers 32 inputs
  static constexpr int kMmaK = 32;           // inputs per mma.sp
  static constexpr int kStepK = 64;          // inputs per pipeline stage
  static constexpr int kStages = 4;
  static constexpr int kDecodeM = 64;        // W rows per block, BN = 8 / 16
  static constexpr int kSmallM = 64, kSmallN = 64;
  static constexpr int kBigM = 128, kBigN = 128;
  static constexpr int kMinStepsPerSplit = 4;  // split-K never gives a block fewer k-steps
  static constexpr int kDecodeMaxP = 16;
  static_assert(kStepK % kMmaK == 0 && kStepK == 64,
                "a stage row of W is 64 bytes of values (4 chunks) and 2 meta words");
  static_assert(kStages >= 2, "a pipeline needs at least double buffering");
  static_assert(kDecodeM % 16 == 0 && kSmallM % 32 == 0 && kBigM % 64 == 0, "whole m16 tiles per warp");
};

// Device bytes of scratch sparse24_matmul_cuda needs (a padded copy of X when its strides or
// alignment do not suit 16-byte cp.async; with split-K, float32 partials and per-split counts
// of non-finite X; 0 otherwise). The call writes every scratch byte it reads: the workspace
// needs no zeroing. Pure host arithmetic apart from one cached device
// attribute query (the SM count); pass the same arguments to the call.
size_t sparse24_matmul_cuda_workspace(const Sparse24CudaWeight& w, DType dtype, const DeviceDenseIn& x,
                                      const DeviceDenseOut& y);

// Y (N x P) = W (N x K) X (K x P) + bias, asynchronously on `stream` (a cudaStream_t). W values,
// X, bias (N elements or nullptr) and Y share `dtype`, float16 or bfloat16 (float32 products and
// sums); any strides for X and Y. NaN/Inf in X propagate exactly as in the dense product.
// Launches: one kernel, or two with split-K (the mma kernel counts non-finite X while it loads
// X and patches the dense 0 * Inf = NaN outputs in its epilogue, or in the split-K reduce), plus
// one copy of X when its layout does not suit cp.async.
// `workspace`: device memory of at least sparse24_matmul_cuda_workspace(...) bytes, 256-byte
// aligned. Needs compute capability >= 8.0. Y must not overlap X, W or the workspace. Throws
// std::invalid_argument on bad sizes or dtypes, std::runtime_error on CUDA errors.
void sparse24_matmul_cuda(const Sparse24CudaWeight& w, DType dtype, const DeviceDenseIn& x,
                          const void* bias, const DeviceDenseOut& y, void* workspace,
                          size_t workspace_bytes, void* stream);

// Compresses dense W (N x K, row stride ld elements, unit column stride, device, of `dtype`:
// float32, float16 or bfloat16) into the layout above: values (N x Kp/2, same dtype) and meta
// (N x Kp/32). -0.0 counts as zero, NaN as non-zero. A group keeping fewer than 2 weights is
// completed with its lowest unused positions, holding +0.0 (bit-identical to the CPU
// Sparse24Weight.from_dense). `bad` (one int64, device) must hold INT64_MAX before the call;
// afterwards it holds the smallest n * (Kp/4) + g over groups g of rows n with more than 2
// non-zeros (INT64_MAX when W is 2:4). Asynchronous on `stream`.
void sparse24_compress_cuda(int64_t rows, int64_t cols, const void* dense, int64_t ld, DType dtype,
                            void* values, uint32_t* meta, int64_t* bad, void* stream);

}  // namespace pyhwp
