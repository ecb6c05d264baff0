#include "common/simd_avx512.h"
#include "common/transpose.h"

namespace pyhwp {

namespace {

void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t R, int64_t C) {
  if (R == 16 && C == 16) {
    __m512 m[16];
    for (int r = 0; r < 16; ++r) m[r] = _mm512_loadu_ps(src + r * ld_src);
    avx512::transpose16(m);
    for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * ld_dst, m[c]);
    return;
  }
  transpose_scalar()(src, ld_src, dst, ld_dst, R, C);  // partial blocks (built without ISA flags)
}

}  // namespace

TransposeFn transpose_avx512() { return &transpose_block; }

}  // namespace pyhwp
