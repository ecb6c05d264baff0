// The rows of a conv's padded input copies (common/implicit_conv.cpp): a run of input floats
// between zeros, checked for NaN and infinities on the way, one implementation per ISA.
#pragma once
#include <cstdint>

#include "common/cpu_features.h"

namespace pyhwp {

// out[0, lo) = 0, out[lo, lo + n) = in[0, n) bit for bit, out[lo + n, lo + n + hi) = 0; returns
// whether any of in[0, n) is NaN or +-Inf. The vector forms store whole vectors from `out` on
// (aligned where out is: the padded planes' rows), shifting the run into place.
using RowCopyFn = bool (*)(const float* in, int64_t lo, int64_t n, int64_t hi, float* out);
RowCopyFn row_copy_scalar();  // common/row_copy.cpp
RowCopyFn row_copy_avx2();    // common/row_copy_avx2.cpp
RowCopyFn row_copy_avx512();  // common/row_copy_avx512.cpp

inline RowCopyFn pick_row_copy([[maybe_unused]] Isa isa) {
#ifdef PYHWP_X86_KERNELS
  if (isa >= Isa::kAvx512) return row_copy_avx512();
  if (isa == Isa::kAvx2) return row_copy_avx2();
#endif
  return row_copy_scalar();
}

}  // namespace pyhwp
