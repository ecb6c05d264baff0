// CPU 2:4 matmul: argument checks, the one ISA dispatch point, and the portable scalar kernels.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

namespace {

// Input position of slot j (0..15) of metadata word `m` of a word starting at input `base`.
inline int64_t slot_input(uint32_t m, int j, int64_t base) {
  return base + 4 * (j >> 1) + ((m >> (2 * j)) & 3u);
}

}  // namespace

void sparse24_rows_permute_scalar(const Sparse24Matrix& w, const DenseIn& x, const float* bias,
                                  const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t words = sparse24_padded_cols(w.cols) / 32;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const float* vals = w.values + n * words * 16;
    const uint32_t* meta = w.meta + n * words;
    for (int64_t p = 0; p < x.cols; ++p) {
      const float* xr = x.data + p * x.stride_p;
      float acc = 0.f;
      for (int64_t c = 0; c < words; ++c) {
        for (int j = 0; j < 16; ++j) acc += vals[16 * c + j] * xr[slot_input(meta[c], j, 32 * c)];
      }
      y.data[(n - row_begin) * y.stride_n + p * y.stride_p] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void sparse24_rows_tile_scalar(const Sparse24Matrix& w, const DenseIn& x, const float* bias,
                               const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t L = x.stride_k;
  const int64_t K = w.cols, P = x.cols, words = sparse24_padded_cols(K) / 32;
  for (int64_t p0 = 0; p0 < P; p0 += L) {
    const float* panel = x.data + (p0 / L) * K * L;
    const int64_t width = std::min(L, P - p0);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const float* vals = w.values + n * words * 16;
      const uint32_t* meta = w.meta + n * words;
      float* out = y.data + (n - row_begin) * y.stride_n + p0;
      const float b = bias ? bias[n] : 0.f;
      for (int64_t q = 0; q < width; ++q) out[q] = b;
      for (int64_t c = 0; c < words; ++c) {
        for (int j = 0; j < 16; ++j) {
          const int64_t k = slot_input(meta[c], j, 32 * c);
          if (k >= K) continue;  // padding slot (value 0); the panel has only K rows
          const float v = vals[16 * c + j];
          const float* xr = panel + k * L;
          for (int64_t q = 0; q < width; ++q) out[q] += v * xr[q];
        }
      }
    }
  }
}

const float* sparse24_pack_panels(const DenseIn& x, int num_threads) {
  constexpr int64_t kBlock = 16;
  const int64_t K = x.rows, P = x.cols, L = sparse24_panel_width(P), panels = (P + L - 1) / L;
  float* out = scratch(0, panels * K * L);
  const int64_t kblocks = (K + kBlock - 1) / kBlock;
  // 16 x 16 blocks so that both the strided reads and the writes stay in cache.
#pragma omp parallel for num_threads(num_threads) schedule(static) if (K * P > 65536)
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t k0 = kb * kBlock, k1 = std::min(K, k0 + kBlock);
    for (int64_t t = 0; t < panels; ++t) {
      float* dst = out + t * K * L;
      for (int64_t q0 = 0; q0 < L; q0 += kBlock) {
        const int64_t p0 = t * L + q0, p1 = std::min(P, p0 + kBlock);
        for (int64_t k = k0; k < k1; ++k) {
          const float* src = x.data + k * x.stride_k;
          float* d = dst + k * L + q0;
          int64_t q = 0;
          for (; p0 + q < p1; ++q) d[q] = src[(p0 + q) * x.stride_p];
          for (; q < kBlock; ++q) d[q] = 0.f;
        }
      }
    }
  }
  return out;
}

namespace {

Sparse24RowsFn pick(Isa isa, bool permute) {
  switch (isa) {
    case Isa::kAvx512: return permute ? sparse24_rows_permute_avx512 : sparse24_rows_tile_avx512;
    case Isa::kAvx2: return permute ? sparse24_rows_permute_avx2 : sparse24_rows_tile_avx2;
    default: return permute ? sparse24_rows_permute_scalar : sparse24_rows_tile_scalar;
  }
}

// X as P columns of Kp contiguous floats, zero beyond K, so the permute kernels read whole
// 32-input chunks without masks. Copies only when x is not already in that form.
DenseIn padded_k_contiguous(const DenseIn& x, int64_t kp) {
  const int64_t K = x.rows, P = x.cols;
  if (x.stride_k == 1 && K == kp) return x;
  float* buf = scratch(0, P * kp);
  for (int64_t p = 0; p < P; ++p) {
    float* dst = buf + p * kp;
    const float* src = x.data + p * x.stride_p;
    if (x.stride_k == 1) {
      std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(K));
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k * x.stride_k];
    }
    std::memset(dst + K, 0, sizeof(float) * static_cast<size_t>(kp - K));
  }
  return DenseIn{buf, kp, P, 1, kp};
}

}  // namespace

void sparse24_matmul(const Sparse24Matrix& w, const DenseIn& x, const float* bias,
                     const DenseOut& y, int num_threads) {
  using Cfg = Sparse24CpuConfig;
  PYHWP_CHECK(w.rows >= 0 && w.cols >= 0, "sparse24_matmul: negative weight size");
  PYHWP_CHECK(x.rows == w.cols, "sparse24_matmul: x has ", x.rows, " rows, W has ", w.cols,
              " columns");
  PYHWP_CHECK(y.rows == w.rows && y.cols == x.cols, "sparse24_matmul: y is ", y.rows, "x", y.cols,
              ", expected ", w.rows, "x", x.cols);
  PYHWP_CHECK(num_threads >= 1, "sparse24_matmul: num_threads must be >= 1");
  const int64_t N = w.rows, K = w.cols, P = x.cols, Kp = sparse24_padded_cols(K);
  if (N == 0 || P == 0) return;
  PYHWP_CHECK(y.data != nullptr, "sparse24_matmul: null y");
  PYHWP_CHECK(K == 0 || (x.data && w.values && w.meta), "sparse24_matmul: null x, values or meta");

  const int nt = N * (Kp / 2) * P < Cfg::kSerialWork ? 1 : num_threads;
  const Isa isa = active_isa();

  if (P < Cfg::kPermuteMaxP) {
    const DenseIn xk = K == 0 ? DenseIn{x.data, 0, P, 1, 0} : padded_k_contiguous(x, Kp);
    const Sparse24RowsFn fn = pick(isa, /*permute=*/true);
    const int64_t nblocks = (N + Cfg::kRowBlock - 1) / Cfg::kRowBlock;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r0 = b * Cfg::kRowBlock, r1 = std::min(N, r0 + Cfg::kRowBlock);
      DenseOut yb = y;
      yb.data = y.data + r0 * y.stride_n;
      fn(w, xk, bias, yb, r0, r1);
    }
  } else {
    const DenseIn xp{K > 0 ? sparse24_pack_panels(x, nt) : x.data, K, P, sparse24_panel_width(P), 1};
    const Sparse24RowsFn fn = pick(isa, /*permute=*/false);
    const bool direct = y.stride_p == 1;
    const int64_t ld_tile = (P + 15) / 16 * 16;
    const int64_t items = (N + Cfg::kTileRows - 1) / Cfg::kTileRows;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < items; ++b) {
      const int64_t r0 = b * Cfg::kTileRows, r1 = std::min(N, r0 + Cfg::kTileRows);
      if (direct) {
        DenseOut yb = y;
        yb.data = y.data + r0 * y.stride_n;
        fn(w, xp, bias, yb, r0, r1);
      } else {
        // Compute the rows with p contiguous, then transpose them into y, so that each thread
        // writes whole 64-byte lines of y (16 consecutive n) and no two threads share a line.
        float* tile = scratch(1, Cfg::kTileRows * ld_tile);
        const DenseOut t{tile, r1 - r0, P, ld_tile, 1};
        fn(w, xp, bias, t, r0, r1);
        for (int64_t p = 0; p < P; ++p) {
          float* dst = y.data + r0 * y.stride_n + p * y.stride_p;
          for (int64_t i = 0; i < r1 - r0; ++i) dst[i * y.stride_n] = tile[i * ld_tile + p];
        }
      }
    }
  }

  if (K > 0 && any_nonfinite(x)) {
    const int64_t words = Kp / 32;
    propagate_nonfinite(x, y, [&](int64_t n, const unsigned char* flags) {
      int64_t count = 0;
      for (int64_t c = 0; c < words; ++c) {
        const uint32_t m = w.meta[n * words + c];
        for (int j = 0; j < 16; ++j) {
          const int64_t k = slot_input(m, j, 32 * c);
          if (k < K) count += flags[k];
        }
      }
      return count;
    });
  }
}

}  // namespace pyhwp
