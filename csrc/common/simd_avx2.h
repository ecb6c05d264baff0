// Small AVX2 helpers shared by the *_avx2.cpp kernels (include only from files built with -mavx2).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pyhwp::avx2 {

// Lanes < count all-ones, for maskload/maskstore of a tail; count in [1, 8].
inline __m256i tail_mask8(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

// 8 stored values as float32: a load for float, a widening shift for bfloat16 bits (exact).
inline __m256 load8(const float* v) { return _mm256_loadu_ps(v); }
inline __m256 load8(const uint16_t* v) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Horizontal sum of 8 floats.
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

}  // namespace pyhwp::avx2
