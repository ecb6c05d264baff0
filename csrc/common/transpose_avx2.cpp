#include <immintrin.h>

#include "common/transpose.h"

namespace pyhwp {

namespace {

// dst 8x8 block = transpose of the src 8x8 block: unpacks within 128-bit lanes, then lane swaps.
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[0..3] hold columns 0, 1, 2, 3 of rows 0-1-2-3 (low lane) and columns 4-7 (high lane).
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t R, int64_t C) {
  if (R == 16 && C == 16) {
    for (int i = 0; i < 16; i += 8)
      for (int j = 0; j < 16; j += 8) transpose8x8(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    return;
  }
  transpose_scalar()(src, ld_src, dst, ld_dst, R, C);  // partial blocks (built without ISA flags)
}

}  // namespace

TransposeFn transpose_avx2() { return &transpose_block; }

}  // namespace pyhwp
