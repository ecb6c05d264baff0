// Small AVX-512 helpers shared by the *_avx512.cpp kernels (include only from files built with
// the AVX-512 flags).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pyhwp::avx512 {

// Lanes < count set, for masked loads/stores of a tail; count in [1, 16].
inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// 16 stored values as float32: a load for float, a widening shift for bfloat16 bits (exact).
inline __m512 load16(const float* v) { return _mm512_loadu_ps(v); }
inline __m512 load16(const uint16_t* v) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace pyhwp::avx512
