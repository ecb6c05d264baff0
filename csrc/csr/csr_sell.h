// A sliced-ELL copy of a float32 or bfloat16 CSR matrix for small batches on AVX-512 CPUs ("SELL-16"
// with 32-column windows), and its kernel.
//
// Why: at batch 1 the CSR kernels spend about a cycle per stored weight (a scalar load of x's term
// or a 16-lane gather, then a horizontal sum per row). Here 16 rows go in the 16 lanes of a
// vector, and x's terms come from a two-register permute (VPERMI2PS) of a 32-float window of x
// held in registers: one permute and one FMA serve 16 stored weights. The price is padding: in a
// window every row of the slice takes as many slots as the slice's longest row there (at 90%
// random sparsity half the lanes hold a stored weight: 10 bytes per stored weight with float32
// values, 6 with bfloat16, against CSR's 6 and 4). The kernel is bound by those bytes, not by its
// instructions (NOTES.md, stop 29).
//
// Layout: one 64-byte aligned blob (`csr_sell_bytes`), written by `csr_sell_pack`:
//   CsrSellHeader (64 bytes)
//   int64 slice_slots[slices + 1]   slot offset of each slice's first slot (slices = ceil(rows/16))
//   uint8 counts[slices * windows]  slots of slice s in window w (windows = ceil(cols/32)), <= 32
//   T values[16 * slots]            slot t: 16 values, lane r for row 16*s + r (0 in padding);
//                                   T float32, or bfloat16 bits for a bfloat16 matrix
//   uint8 lanes[16 * slots]         slot t: lane r's column minus 32*w, in [0, 32) (0 in padding)
// each section starting on a 64-byte boundary. A slice's slots run window by window; within a
// window a row's stored weights take its slots in column order.
#pragma once
#include <cstdint>

#include "csr/csr_matmul.h"

namespace pyhwp {

struct CsrSellHeader {
  int64_t magic;  // kCsrSellMagic
  int64_t rows, cols, slices, windows, slots;
  int64_t value_bytes;  // 4 (float32) or 2 (bfloat16)
  int64_t reserved;
};
static_assert(sizeof(CsrSellHeader) == 64, "the header fills one line");
inline constexpr int64_t kCsrSellMagic = 0x5345'4c4c'3136'0001;  // "SELL16", version 1

// The arrays of a packed blob, as the kernel reads them.
struct CsrSell {
  int64_t rows = 0, cols = 0, slices = 0, windows = 0, slots = 0;
  const int64_t* slice_slots = nullptr;
  const uint8_t* counts = nullptr;
  const void* values = nullptr;  // float, or bfloat16 bits when bf16
  bool bf16 = false;
  const uint8_t* lanes = nullptr;
};

// Bytes of the blob for W with values of value_bytes (4: float32, 2: bfloat16) (one O(nnz) pass
// over its indices; W's values are not read).
int64_t csr_sell_bytes(const CsrMatrix& w, int64_t value_bytes);
// Writes the blob of W into `blob` (csr_sell_bytes bytes, 64-byte aligned).
void csr_sell_pack(const CsrMatrix& w, void* blob);
void csr_sell_pack(const CsrMatrixBf16& w, void* blob);
// The arrays of a blob written by csr_sell_pack for a rows x cols matrix with values of
// value_bytes; throws std::invalid_argument when it is not one (misaligned, wrong magic, sizes
// or value type).
CsrSell csr_sell_view(const void* blob, int64_t rows, int64_t cols, int64_t value_bytes);

// Kernel (AVX-512): slices [s0, s1), P <= kCsrSellMaxNp columns of float32 x (column p at x +
// p*ldx, k contiguous), y[n*ldy_n + p*ldy_p] = bias[n] (or 0) + sum over stored weights (float32
// products and sums for either value type). x must be finite (padding multiplies 0 by some x
// term).
inline constexpr int64_t kCsrSellMaxNp = 4;
using CsrSellFn = void (*)(const CsrSell& s, int64_t s0, int64_t s1, const float* x, int64_t ldx, int64_t P,
                           const float* bias, float* y, int64_t ldy_n, int64_t ldy_p);
CsrSellFn csr_sell_kernel_avx512();

}  // namespace pyhwp
