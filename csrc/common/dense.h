// Strided views of the dense operands of y = W x, and the helpers every sparse matmul shares:
// packing x so its batch dimension is contiguous, and dense-exact NaN/Inf propagation.
#pragma once
#include <cstdint>
#include <vector>

#include "common/transpose.h"

namespace pyhwp {

// The dense right-hand side X (K x P) of Y = W X: element (k, p) at data[k*stride_k + p*stride_p].
// For linear, x (P, K) row-major gives stride_k = 1, stride_p = K; for a conv image, X is the
// (C*kh*kw, H*W) patch matrix with stride_k = P, stride_p = 1. Host memory, float32.
struct DenseIn {
  const float* data = nullptr;
  int64_t rows = 0;  // K
  int64_t cols = 0;  // P
  int64_t stride_k = 0;
  int64_t stride_p = 0;
};

// The output Y (N x P): element (n, p) at data[n*stride_n + p*stride_p]. Host memory, float32.
struct DenseOut {
  float* data = nullptr;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // P
  int64_t stride_n = 0;
  int64_t stride_p = 0;
};

// bfloat16 operands (raw bit patterns), same conventions as DenseIn / DenseOut.
struct DenseInBf16 {
  const uint16_t* data = nullptr;
  int64_t rows = 0;  // K
  int64_t cols = 0;  // P
  int64_t stride_k = 0;
  int64_t stride_p = 0;
};
struct DenseOutBf16 {
  uint16_t* data = nullptr;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // P
  int64_t stride_n = 0;
  int64_t stride_p = 0;
};

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// bfloat16 bits -> float32 (exact).
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Boundaries of `parts` runs of consecutive items with about equal work, where the work of items
// [0, i) is prefix[i] + item_cost * i (prefix: non-decreasing, such as CSR row offsets or masked
// tile pointers): run c is items (*bounds)[c] .. (*bounds)[c + 1].
void balanced_runs(const int64_t* prefix, int64_t items, int64_t item_cost, int64_t parts,
                   std::vector<int64_t>* bounds);

// A per-thread scratch buffer that grows and is never shrunk (no allocation per call in the
// steady state). Valid until the next call from the same thread with the same slot.
float* scratch(int slot, int64_t count);

// Packs X (K x P, element (k, p) at x[k*sk + p*sp]; S = float, or uint16_t holding bfloat16
// bits) into float32 panels of L columns (L a multiple of 16) with p contiguous: element (k, p) at
// out[(p / L) * K * L + k * L + p % L], zeros in the columns of the last panel past P. `out`
// must be 64-byte aligned for aligned panel rows. Runs on up to num_threads threads (one for a
// small X); 16x16 register transposes of `isa` when x is k-contiguous float32 (whole blocks
// checked in the same pass where the ISA has a TransposeCheckFn). Returns whether X holds a
// NaN/Inf, found while each packed block is still in cache (no second pass over X).
template <typename S>
bool pack_panels(const S* x, int64_t K, int64_t P, int64_t sk, int64_t sp, int64_t L, float* out,
                 int num_threads, Isa isa);

// True when some element of X is NaN or +-Inf (a vectorisable pass over X).
bool any_nonfinite(const DenseIn& x);

// Dense y = W x gives NaN at (n, p) whenever X(k, p) is NaN/Inf for some k where W(n, k) == 0,
// since 0 * Inf = NaN. A sparse kernel that skips W's zeros does not see those terms, so after it
// ran, this sets Y(n, p) = NaN wherever some non-finite X(k, p) meets a position k that row n
// does not store. `stored_count(n, flags)` returns how many of row n's stored positions k have
// flags[k] != 0. Slow path, only taken when X holds a NaN/Inf. In / Out: DenseIn and DenseOut
// (float32), or DenseInBf16 and DenseOutBf16.
template <typename In, typename Out, typename StoredCount>
void propagate_nonfinite(const In& x, const Out& y, StoredCount stored_count);

}  // namespace pyhwp

#include "common/dense_inl.h"
