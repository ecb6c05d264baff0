// A software prefetch of a run of cache lines that the optimiser keeps.
#pragma once
#include <cstdint>

namespace pyhwp {

// gcc (12, C++: -ffinite-loops by default) deletes a loop whose only effect is __builtin_prefetch
// (_mm_prefetch), such as one over the lines of a run of runtime length: the 2:4 tile kernel's
// weight-row prefetches compiled to nothing that way. A volatile asm statement is never deleted.
// Prefetches do not fault, so the run may extend past the end of an allocation. Into L1 (T0).
inline void prefetch_lines_t0(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    const char* line = static_cast<const char*>(p) + b;
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 (%0)" : : "r"(line));
#elif defined(__aarch64__)
    asm volatile("prfm pldl1keep, [%0]" : : "r"(line));
#else
    __builtin_prefetch(line, 0, 3);
    asm volatile("" : : "r"(line));  // keeps the loop
#endif
  }
}

}  // namespace pyhwp
