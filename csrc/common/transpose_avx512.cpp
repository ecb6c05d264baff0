#include "common/simd_avx512.h"
#include "common/transpose.h"

namespace pyhwp {

namespace {

// A whole 16x16 block through 16 registers; with kCheck, whether it holds a NaN/Inf (vfpclassps
// on the loaded rows: QNaN, +Inf, -Inf, SNaN).
template <bool kCheck>
inline bool whole_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 m[16];
  __mmask16 hits = 0;
  for (int r = 0; r < 16; ++r) {
    m[r] = _mm512_loadu_ps(src + r * ld_src);
    if constexpr (kCheck) hits |= _mm512_fpclass_ps_mask(m[r], 0x01 | 0x08 | 0x10 | 0x80);
  }
  avx512::transpose16(m);
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * ld_dst, m[c]);
  return hits != 0;
}

void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t R, int64_t C) {
  if (R == 16 && C == 16) {
    whole_block<false>(src, ld_src, dst, ld_dst);
    return;
  }
  transpose_scalar()(src, ld_src, dst, ld_dst, R, C);  // partial blocks (built without ISA flags)
}

bool transpose_check_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  return whole_block<true>(src, ld_src, dst, ld_dst);
}

}  // namespace

TransposeFn transpose_avx512() { return &transpose_block; }
TransposeCheckFn transpose_check_avx512() { return &transpose_check_block; }

}  // namespace pyhwp
