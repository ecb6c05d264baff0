#include <immintrin.h>

#include "common/row_copy.h"

namespace pyhwp {

namespace {

// Lanes [0, m) of 8 as a maskload/maskstore mask, m clamped to [0, 8].
inline __m256i first_lanes(int64_t m) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int c = static_cast<int>(m < 0 ? 0 : m > 8 ? 8 : m);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), iota);
}

// As the AVX-512 form, 8 lanes a vector; masked loads and stores (slow on AMD) only at the ends.
bool row_copy(const float* in, int64_t lo, int64_t n, int64_t hi, float* out) {
  const __m256i exp = _mm256_set1_epi32(0x7f800000);
  const int64_t total = lo + n + hi;
  __m256i seen = _mm256_setzero_si256();
  for (int64_t q = 0; q < total; q += 8) {
    const int* src = reinterpret_cast<const int*>(in + (q - lo));
    const __m256i v = q >= lo && q + 8 <= lo + n
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                          : _mm256_maskload_epi32(src, _mm256_andnot_si256(first_lanes(lo - q), first_lanes(lo + n - q)));
    if (total - q >= 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q), v);
    } else {
      _mm256_maskstore_epi32(reinterpret_cast<int*>(out + q), first_lanes(total - q), v);
    }
    seen = _mm256_or_si256(seen, _mm256_cmpeq_epi32(_mm256_and_si256(v, exp), exp));  // zeros never match
  }
  return !_mm256_testz_si256(seen, seen);
}

}  // namespace

RowCopyFn row_copy_avx2() { return &row_copy; }

}  // namespace pyhwp
