// CUDA entry point of the masked-dense pattern: Y = W X (+ bias) with W dense in memory and a
// flag per 16x16 tile saying which tiles may hold non-zeros; tiles flagged zero are skipped.
// Torch-free and CUDA-header-free (bindings.cpp includes it); streams travel as void*.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dense_cuda.h"
#include "common/dtype.h"

namespace pyhwp {

// W (rows x cols) for the CUDA masked kernel, device memory.
//   values:     rows x cols, row-major with row stride `ld` elements (ld >= cols), of the call's
//               dtype. Every row stride a multiple of 8 elements and a 16-byte aligned base let
//               the tensor-core kernels read W in place; otherwise W is first copied into the
//               workspace (correct, slower: store W that way).
//   tile_flags: uint8, ceil(rows/16) x ceil(cols/16), row-major (row stride ceil(cols/16)):
//               tile_flags[i * ceil(cols/16) + j] == 0 promises that W[16i:16i+16, 16j:16j+16]
//               is all zeros. The kernel may skip such a tile or compute it (same result); it
//               never reads a flag as a promise of non-zeros. (pyhwp's CPU masked format stores
//               exactly the non-zero 16x16 tiles, so its tile list maps onto these flags.)
//
// Or, when tile_map is not null, W in pyhwp's masked tile storage (MaskedWeight) read in place:
//   tile_map:   int32, ceil(rows/16) x ceil(cols/16), row-major: the index t of the stored tile
//               W[16i:16i+16, 16j:16j+16], or -1 where that tile is not stored (all zeros).
//   values:     the stored tiles, (ntiles, 16, 16) contiguous, each k-major: element (c, r) of
//               tile t is W[16i + r, 16j + c] (16 rows of one column contiguous); zeros at the
//               padding past rows / cols. 16-byte aligned. ld and tile_flags are ignored.
// The tensor-core kernels then stage W n-contiguous in shared memory and read it with
// ldmatrix.trans; the float32 SIMT kernel looks each element up through the map.
struct MaskedCudaWeight {
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K
  const void* values = nullptr;
  int64_t ld = 0;
  const uint8_t* tile_flags = nullptr;
  const int32_t* tile_map = nullptr;
};

// Tiling knobs of the CUDA masked kernels (masked_matmul_cuda.cu).
//
// float16 / bfloat16 run on tensor cores: mma.sync m16n8k16 (float32 accumulators) fed by
// ldmatrix from XOR-swizzled shared memory, filled by a kStages-deep cp.async pipeline (sm_80+).
// Block tiles are kBigM x kBigN (8 warps) when they give every multiprocessor a block, else
// kSmallM x kSmallN (4 warps). Skipping works per block and k-step: a block first lists the
// k-steps whose W tiles are not all flagged zero and pipelines over that list only.
// float32 runs a SIMT path (FFMA, exact float32 products and sums like cuBLAS without TF32),
// 128x128 or 64x64 block tiles over k-steps of kSimtK, with the same skipping.
struct MaskedCudaConfig {
  static constexpr int kTile = 16;       // flag granularity (rows and columns of W)
  static constexpr int kMmaK = 32;       // k-step of the tensor-core kernels
  static constexpr int kStages = 4;      // cp.async pipeline depth
  static constexpr int kBigM = 128, kBigN = 128;
  static constexpr int kSmallM = 64, kSmallN = 64;
  static constexpr int kSimtK = 8;       // k-step of the float32 SIMT kernel
  static constexpr int kStepWindow = 1024;  // k-steps listed per pass (longer K: several passes)
  static_assert(kMmaK % kTile == 0 && kMmaK == 32, "a k-step covers whole flag tiles; 4 16-byte chunks per row");
  static_assert(kTile % kSimtK == 0, "a SIMT k-step lies inside one flag tile column");
  static_assert(kStages >= 2, "a pipeline needs at least double buffering");
  static_assert(kBigM % 64 == 0 && kBigN % 64 == 0 && kSmallM % 32 == 0 && kSmallN % 32 == 0,
                "block tiles split into whole warp tiles");
};

// Device bytes of scratch masked_matmul_cuda needs (a non-finite record of P+1 ints, plus
// padded copies of X and/or W when their strides or alignment do not suit 16-byte cp.async).
size_t masked_matmul_cuda_workspace(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x,
                                    const DeviceDenseOut& y);

// Y (N x P) = W (N x K) X (K x P) + bias, asynchronously on `stream` (a cudaStream_t). W, X,
// bias (N elements or nullptr) and Y share `dtype`; any strides for X and Y; float32
// accumulation. NaN/Inf in X propagate exactly as in the dense product (also through skipped
// tiles). `workspace`: device memory of at least masked_matmul_cuda_workspace(...) bytes,
// 256-byte aligned. float16/bfloat16 need a GPU of compute capability >= 8.0. Throws
// std::invalid_argument on bad sizes, std::runtime_error on CUDA errors.
void masked_matmul_cuda(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x,
                        const void* bias, const DeviceDenseOut& y, void* workspace,
                        size_t workspace_bytes, void* stream);

}  // namespace pyhwp
