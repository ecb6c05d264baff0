#include "common/row_copy.h"

#include <cstring>

namespace pyhwp {

namespace {

bool row_copy(const float* in, int64_t lo, int64_t n, int64_t hi, float* out) {
  uint32_t seen = 0;
  for (int64_t i = 0; i < lo; ++i) out[i] = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, in + i, 4);
    std::memcpy(out + lo + i, &bits, 4);
    seen |= (bits & 0x7f800000u) == 0x7f800000u;
  }
  for (int64_t i = 0; i < hi; ++i) out[lo + n + i] = 0.f;
  return seen != 0;
}

}  // namespace

RowCopyFn row_copy_scalar() { return &row_copy; }

}  // namespace pyhwp
