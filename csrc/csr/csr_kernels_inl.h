// Helpers shared by the per-ISA CSR kernels (included by csr_matmul_{cpu,avx2,avx512}.cpp).
#pragma once
#include <cstdint>
#include <cstring>

namespace pyhwp {

// A stored value as float32: bfloat16 bits widen exactly by a 16-bit shift.
inline float to_float(float v) { return v; }
inline float to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace pyhwp
