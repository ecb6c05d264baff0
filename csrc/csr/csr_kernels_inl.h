// Helpers shared by the per-ISA CSR kernels (included by csr_matmul_{cpu,avx2,avx512}.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/bf16.h"  // to_float: a stored value (float32 or bfloat16 bits) as float32
#include "common/prefetch.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

// The lines of W's index or value stream that hold kElements elements from p on, prefetched
// kPrefetchBytes ahead. Every line: prefetching one of the two lines that 32 float32 values span,
// 4 KiB ahead, was 1.16-1.18x slower at 11008x4096 70% from DRAM (AVX-512, 1 and 2 threads); from
// DRAM at batch 1 the AVX2 kernels went from 1.41-1.46x to 1.93-2.06x dense at 11008x4096 70% and
// from 3.41-3.55x to 4.45-4.55x at 4096x4096 90% with it.
template <int64_t kElements, typename E>
inline void prefetch_ahead(const E* p) {
  prefetch_lines_t0(reinterpret_cast<const char*>(p) + CsrCpuConfig::kPrefetchBytes, kElements * int64_t{sizeof(E)});
}

// cols[0..U) as 64-bit integers. Where they fill whole 64-bit words (four uint16 or two int32 to
// a word) each word is one load, split by shifts: fewer loads where loads are what a loop runs
// out of (the gather kernel by scalar loads; the tile kernel at 16 columns, where a stored weight
// is one FMA: on a Zen 4, 1 thread, 1536x384 / 768x3072 / 3072x768 at 90%, batch 5 47-49 /
// 179-181 / 167-169 -> 42-44 / 175-177 / 152-154 us, batch 16 44-45 / 169-171 / 162-164 -> 41 /
// 167 / 149-151). Otherwise one load each. Indices are non-negative. With kShift, each index
// comes shifted left by kShift (a byte offset where rows of X are 2^kShift bytes apart), in the
// same shift-and-mask the split takes anyway.
template <int U, int kShift = 0, typename I>
inline void load_cols(const I* cols, uint64_t (&c)[U]) {
  constexpr int kPerWord = 8 / static_cast<int>(sizeof(I));
  if constexpr (U % kPerWord == 0) {
    constexpr uint64_t kMask = sizeof(I) == 2 ? 0xFFFF : 0xFFFFFFFF;
#pragma GCC unroll 8
    for (int w = 0; w < U / kPerWord; ++w) {
      uint64_t q;
      std::memcpy(&q, cols + w * kPerWord, 8);
#pragma GCC unroll 4
      for (int e = 0; e < kPerWord; ++e) {
        constexpr int64_t kBits = 8 * sizeof(I);
        const int64_t right = kBits * e - kShift;  // the shift that puts index e at bit kShift
        c[w * kPerWord + e] = (right >= 0 ? q >> right : q << -right) & (kMask << kShift);
      }
    }
  } else {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) c[u] = static_cast<uint64_t>(cols[u]) << kShift;
  }
}

}  // namespace pyhwp
