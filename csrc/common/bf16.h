// bfloat16 operands of the float32 kernels: stored values widened in registers, X widened and Y
// rounded through float32 scratch.
#pragma once
#include <cstdint>

#include "common/dense.h"

namespace pyhwp {

// A stored value as float32: float32 as is, bfloat16 bits widened exactly by a 16-bit shift.
inline float to_float(float v) { return v; }
inline float to_float(uint16_t bits) { return bf16_to_float(bits); }

// Widens bfloat16 X (K x P, any strides) into float32 dst (exact), in one of two layouts:
// k_contiguous: P rows of ld >= K floats, X(k, p) at dst[p * ld + k], zeros in [K, ld) (the
// layout of a linear input, and of the 2:4 permute kernels' zero-padded K); otherwise K rows of
// ld >= P floats, X(k, p) at dst[k * ld + p] (the layout of a conv patch matrix). Returns dst as
// a float32 view of X. Runs on up to num_threads threads.
DenseIn widen_bf16(const DenseInBf16& x, bool k_contiguous, int64_t ld, float* dst, int num_threads);

// Y = the float32 yf (N x P, any strides) rounded to bfloat16, nearest even, once per element.
void round_to_bf16(const DenseOut& yf, const DenseOutBf16& y, int num_threads);

// Float32 scratch for a bfloat16 output: N x P laid out like y (n contiguous when y is, the
// linear layout; else p contiguous), in `buf` (N * P floats).
DenseOut float_like(const DenseOutBf16& y, float* buf);

// n bfloat16 values as float32 (nullptr for a null src, e.g. no bias).
const float* widen_bf16(const uint16_t* src, int64_t n, float* dst);

}  // namespace pyhwp
