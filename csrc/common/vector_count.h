// Run-time vector counts to compile-time ones, for the register-tile kernels.
#pragma once
#include <type_traits>

namespace pyhwp {

// Calls f(std::integral_constant<int, V>{}) with V = nv clamped to [1, Max]: the kernels are
// instantiated once per tile width and picked here, in one place per caller.
template <int Max, typename F>
inline void with_vectors(int nv, F&& f) {
  if constexpr (Max > 1) {
    if (nv >= Max) {
      f(std::integral_constant<int, Max>{});
    } else {
      with_vectors<Max - 1>(nv, f);
    }
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace pyhwp
