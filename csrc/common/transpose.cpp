#include "common/transpose.h"

namespace pyhwp {

namespace {

void transpose_block_scalar(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

}  // namespace

TransposeFn transpose_scalar() { return &transpose_block_scalar; }

}  // namespace pyhwp
