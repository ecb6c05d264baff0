// Template bodies for common/dense.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace pyhwp {

namespace detail {
inline bool is_finite_value(float v) { return std::isfinite(v); }
inline bool is_finite_value(uint16_t bf16) { return (bf16 & 0x7f80u) != 0x7f80u; }
inline void quiet_nan(float* v) { *v = std::numeric_limits<float>::quiet_NaN(); }
inline void quiet_nan(uint16_t* bf16) { *bf16 = 0x7fc0u; }
}  // namespace detail

template <typename In, typename Out, typename StoredCount>
void propagate_nonfinite(const In& x, const Out& y, StoredCount stored_count) {
  std::vector<unsigned char> flags(static_cast<size_t>(x.rows));
  for (int64_t p = 0; p < x.cols; ++p) {
    int64_t bad = 0;
    for (int64_t k = 0; k < x.rows; ++k) {
      const bool f = !detail::is_finite_value(x.data[k * x.stride_k + p * x.stride_p]);
      flags[static_cast<size_t>(k)] = f;
      bad += f;
    }
    if (bad == 0) continue;
    for (int64_t n = 0; n < y.rows; ++n) {
      if (stored_count(n, flags.data()) < bad) detail::quiet_nan(&y.data[n * y.stride_n + p * y.stride_p]);
    }
  }
}

}  // namespace pyhwp
