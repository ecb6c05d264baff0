// Argument checks that throw C++ exceptions; pybind11 turns them into Python ValueError.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pyhwp {

template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

}  // namespace pyhwp

// PYHWP_CHECK(cond, "message", values...): throws std::invalid_argument when cond is false.
#define PYHWP_CHECK(cond, ...)                 \
  do {                                         \
    if (!(cond)) ::pyhwp::fail(__VA_ARGS__);   \
  } while (0)
