// Packing and non-finite scanning of the dense operand shared by all sparse matmul kernels.
#include "common/dense.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

namespace pyhwp {

namespace {
struct ScratchBuffer {
  std::unique_ptr<float[]> data;
  int64_t capacity = 0;
};
constexpr int kScratchSlots = 4;
}  // namespace

float* scratch(int slot, int64_t count) {
  thread_local ScratchBuffer buffers[kScratchSlots];
  ScratchBuffer& b = buffers[slot];
  if (b.capacity < count) {
    // 64-byte aligned rows: allocate a little more and let callers use multiples of 16 floats.
    b.data.reset(new float[static_cast<size_t>(count) + 16]);
    b.capacity = count;
  }
  const auto addr = reinterpret_cast<std::uintptr_t>(b.data.get());
  return reinterpret_cast<float*>((addr + 63) & ~std::uintptr_t{63});
}

namespace {

// 1 when one of n floats at v (with stride si) is NaN or +-Inf: all exponent bits set. The loop
// ORs 0/1 flags, which gcc vectorises with one OR per vector on the carried chain. (A running
// maximum of the exponents carried a 5-instruction chain, about 4 bytes a cycle, which made this
// scan half of a CSR call that reads X in place: NOTES.md, stop 22.)
inline uint32_t nonfinite_flag(const float* v, int64_t n, int64_t si) {
  constexpr uint32_t kExp = 0x7f800000u;
  uint32_t hits = 0;
  if (si == 1) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, v + i, 4);
      hits |= (bits & kExp) == kExp;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, v + i * si, 4);
      hits |= (bits & kExp) == kExp;
    }
  }
  return hits;
}

}  // namespace

// Elements of X above which both threads pack it: at 64 KiB instead of 256 KiB, batch 16 at
// 768x3072 (one thread's serial pack was a third of the call) measured 144-149 -> 125-135 us and
// batch 128 at 1536x384 195-209 -> 179-190 us on 2 threads (CSR); the other quick-suite shapes
// were unchanged.
constexpr int64_t kParallelPack = 16384;

template <typename S>
bool pack_panels(const S* x, int64_t K, int64_t P, int64_t sk, int64_t sp, int64_t L, float* out,
                 int nt, Isa isa) {
  const TransposeFn transpose = pick_transpose(isa);
  const TransposeCheckFn transpose_check = pick_transpose_check(isa);
  constexpr int64_t kB = 16;
  const int64_t kblocks = (K + kB - 1) / kB, panels = (P + L - 1) / L;
  int bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad) if (K * P > kParallelPack)
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t k0 = kb * kB, k1 = std::min(K, k0 + kB);
    uint32_t hits = 0;
    for (int64_t t = 0; t < panels; ++t) {
      const int64_t q0 = t * L, width = std::min(L, P - q0);
      float* dst = out + t * K * L + k0 * L;
      if constexpr (std::is_same_v<S, float>) {
        if (sk == 1 && transpose_check && width == L && k1 - k0 == kB) {  // whole blocks, checked
          for (int64_t q = 0; q < width; q += 16) {
            hits |= transpose_check(x + (q0 + q) * sp + k0, sp, dst + q, L) ? 1u : 0u;
          }
          continue;
        }
        if (sk == 1) {  // x rows are p: transpose 16x16 blocks
          for (int64_t q = 0; q < width; q += 16) {
            transpose(x + (q0 + q) * sp + k0, sp, dst + q, L, std::min<int64_t>(16, width - q), k1 - k0);
          }
        } else if (sp == 1) {  // p contiguous but unaligned rows: copy them
          for (int64_t k = k0; k < k1; ++k) {
            std::memcpy(dst + (k - k0) * L, x + k * sk + q0, sizeof(float) * static_cast<size_t>(width));
          }
        } else {
          for (int64_t k = k0; k < k1; ++k)
            for (int64_t q = 0; q < width; ++q) dst[(k - k0) * L + q] = x[k * sk + (q0 + q) * sp];
        }
      } else {
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t q = 0; q < width; ++q) dst[(k - k0) * L + q] = bf16_to_float(x[k * sk + (q0 + q) * sp]);
      }
      if (width == L) {  // whole rows: the block is one run
        hits |= nonfinite_flag(dst, (k1 - k0) * L, 1);
      } else {
        for (int64_t k = k0; k < k1; ++k) {
          float* row = dst + (k - k0) * L;
          for (int64_t q = width; q < L; ++q) row[q] = 0.f;
          hits |= nonfinite_flag(row, width, 1);
        }
      }
    }
    bad |= hits != 0;
  }
  return bad != 0;
}

template bool pack_panels(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int, Isa);
template bool pack_panels(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int, Isa);

bool any_nonfinite(const DenseIn& x) {
  // Walk X in memory order.
  const bool k_inner = x.stride_k == 1 && x.stride_p != 1;
  const int64_t outer = k_inner ? x.cols : x.rows, inner = k_inner ? x.rows : x.cols;
  const int64_t so = k_inner ? x.stride_p : x.stride_k, si = k_inner ? x.stride_k : x.stride_p;
  uint32_t hits = 0;
  for (int64_t o = 0; o < outer; ++o) hits |= nonfinite_flag(x.data + o * so, inner, si);
  return hits != 0;
}

void balanced_runs(const int64_t* prefix, int64_t items, int64_t item_cost, int64_t parts,
                   std::vector<int64_t>* bounds) {
  bounds->assign(static_cast<size_t>(parts + 1), items);
  (*bounds)[0] = 0;
  const double total = static_cast<double>(prefix[items]) + static_cast<double>(item_cost) * items;
  int64_t n = 0;
  for (int64_t c = 1; c < parts; ++c) {
    const double target = total * c / parts;
    // the first item n with work(n) >= target (work is non-decreasing in n)
    int64_t lo = n, hi = items;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(prefix[mid]) + static_cast<double>(item_cost) * mid < target) lo = mid + 1;
      else hi = mid;
    }
    n = lo;
    (*bounds)[static_cast<size_t>(c)] = n;
  }
}

}  // namespace pyhwp
