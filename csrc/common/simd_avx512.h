// Small AVX-512 helpers shared by the *_avx512.cpp kernels (include only from files built with
// the AVX-512 flags).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pyhwp::avx512 {

// Lanes < count set, for masked loads/stores of a tail; count >= 1 (16 or more: every lane).
inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// 16 stored values as float32: a load for float, a widening shift for bfloat16 bits (exact).
inline __m512 load16(const float* v) { return _mm512_loadu_ps(v); }
inline __m512 load16(const uint16_t* v) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Transposes a 16x16 block of floats held in 16 registers (row r in m[r]) in place.
inline void transpose16(__m512 m[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // t: row pairs interleaved within 128-bit lanes
    t[i] = _mm512_unpacklo_ps(m[i], m[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(m[i], m[i + 1]);
  }
  // u[4g + e], lane l: rows 4g..4g+3 of column 4l + e.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // Output row 4l + e takes lane l of u[e], u[4+e], u[8+e], u[12+e]: a 4x4 transpose of lanes.
  for (int e = 0; e < 4; ++e) {
    const __m512 a = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44);
    const __m512 b = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
    m[0 + e] = _mm512_shuffle_f32x4(a, c, 0x88);
    m[4 + e] = _mm512_shuffle_f32x4(a, c, 0xDD);
    m[8 + e] = _mm512_shuffle_f32x4(b, d, 0x88);
    m[12 + e] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

}  // namespace pyhwp::avx512
