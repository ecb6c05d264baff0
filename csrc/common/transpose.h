// Small-block transposes that move a tile computed with p contiguous into an output with n
// contiguous (the (P, N) layout of linear layers), one implementation per ISA.
#pragma once
#include <cstdint>

#include "common/cpu_features.h"

namespace pyhwp {

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < R, c < C, R and C at most 16.
using TransposeFn = void (*)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t R,
                             int64_t C);
TransposeFn transpose_scalar();  // common/transpose.cpp
TransposeFn transpose_avx2();    // common/transpose_avx2.cpp: whole 16x16 blocks as four 8x8
TransposeFn transpose_avx512();  // common/transpose_avx512.cpp: whole 16x16 blocks in registers

// A whole 16x16 block (R = C = 16) as a TransposeFn moves it, returning whether any of its values
// is NaN or +-Inf, found in the registers the block passes through (no second pass over it).
using TransposeCheckFn = bool (*)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);
TransposeCheckFn transpose_check_avx512();  // common/transpose_avx512.cpp

inline TransposeFn pick_transpose([[maybe_unused]] Isa isa) {
#ifdef PYHWP_X86_KERNELS
  if (isa == Isa::kAvx512) return transpose_avx512();
  if (isa == Isa::kAvx2) return transpose_avx2();
#endif
  return transpose_scalar();
}

// The ISA's TransposeCheckFn, or nullptr where it has none (callers then check separately).
inline TransposeCheckFn pick_transpose_check([[maybe_unused]] Isa isa) {
#ifdef PYHWP_X86_KERNELS
  if (isa == Isa::kAvx512) return transpose_check_avx512();
#endif
  return nullptr;
}

}  // namespace pyhwp
