// Argument checks that throw C++ exceptions; pybind11 turns them into Python ValueError.
#pragma once
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pyhwp {

namespace detail {

// Message pieces appended without std::ostream: its number formatting goes through locale facets,
// and on the GPU machine (g++ 13.3 host compiler, torch 2.11) the facet lookup from inside the
// extension crashed (SIGSEGV in ostream::_M_insert<long> on the first error message with a number).
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <typename T>
std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>> append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T>
std::enable_if_t<std::is_floating_point_v<T>> append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  s += buf;
}

}  // namespace detail

// The pieces of a message, concatenated.
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

template <typename... Args>
[[noreturn]] inline void fail(const Args&... args) {
  throw std::invalid_argument(message(args...));
}

}  // namespace pyhwp

// PYHWP_CHECK(cond, "message", values...): throws std::invalid_argument when cond is false.
#define PYHWP_CHECK(cond, ...)                 \
  do {                                         \
    if (!(cond)) ::pyhwp::fail(__VA_ARGS__);   \
  } while (0)
