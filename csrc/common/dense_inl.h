// Template bodies for common/dense.h.
#pragma once
#include <cmath>
#include <limits>
#include <vector>

namespace pyhwp {

template <typename StoredCount>
void propagate_nonfinite(const DenseIn& x, const DenseOut& y, StoredCount stored_count) {
  std::vector<unsigned char> flags(static_cast<size_t>(x.rows));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t p = 0; p < x.cols; ++p) {
    int64_t bad = 0;
    for (int64_t k = 0; k < x.rows; ++k) {
      const bool f = !std::isfinite(x.data[k * x.stride_k + p * x.stride_p]);
      flags[static_cast<size_t>(k)] = f;
      bad += f;
    }
    if (bad == 0) continue;
    for (int64_t n = 0; n < y.rows; ++n) {
      if (stored_count(n, flags.data()) < bad) y.data[n * y.stride_n + p * y.stride_p] = nan;
    }
  }
}

}  // namespace pyhwp
