// Packing and non-finite scanning of the dense operand shared by all sparse matmul kernels.
#include "common/dense.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>

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

const float* pack_p_contiguous(const DenseIn& x, int64_t* ld, int num_threads) {
  const int64_t K = x.rows, P = x.cols;
  const int64_t stride = (P + 15) / 16 * 16;
  *ld = stride;
  float* out = scratch(0, K * stride);
  constexpr int64_t kBlock = 32;  // transpose in 32x32 blocks so both sides stay in cache
  const int64_t kblocks = (K + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (K * P > 65536)
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t k0 = kb * kBlock, k1 = std::min(K, k0 + kBlock);
    for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
      const int64_t p1 = std::min(P, p0 + kBlock);
      for (int64_t k = k0; k < k1; ++k) {
        const float* src = x.data + k * x.stride_k;
        float* dst = out + k * stride;
        for (int64_t p = p0; p < p1; ++p) dst[p] = src[p * x.stride_p];
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      std::memset(out + k * stride + P, 0, sizeof(float) * static_cast<size_t>(stride - P));
    }
  }
  return out;
}

bool any_nonfinite(const DenseIn& x) {
  // Walk X in memory order. A float is NaN or Inf exactly when its exponent bits are all ones.
  const bool k_inner = x.stride_k == 1 && x.stride_p != 1;
  const int64_t outer = k_inner ? x.cols : x.rows, inner = k_inner ? x.rows : x.cols;
  const int64_t so = k_inner ? x.stride_p : x.stride_k, si = k_inner ? x.stride_k : x.stride_p;
  uint32_t worst = 0;
  for (int64_t o = 0; o < outer; ++o) {
    const float* row = x.data + o * so;
    if (si == 1) {
      for (int64_t i = 0; i < inner; ++i) {
        uint32_t bits;
        std::memcpy(&bits, row + i, 4);
        const uint32_t e = bits & 0x7f800000u;
        worst = e > worst ? e : worst;
      }
    } else {
      for (int64_t i = 0; i < inner; ++i) {
        uint32_t bits;
        std::memcpy(&bits, row + i * si, 4);
        const uint32_t e = bits & 0x7f800000u;
        worst = e > worst ? e : worst;
      }
    }
  }
  return worst == 0x7f800000u;
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
