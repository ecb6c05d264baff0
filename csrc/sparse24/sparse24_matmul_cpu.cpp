// CPU 2:4 matmul: argument checks, the one ISA dispatch point, and the portable scalar kernels.
// The float32 and bfloat16 entry points share one driver (run_sparse24).
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "common/bf16.h"
#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/transpose.h"
#include "sparse24/sparse24_matmul.h"

namespace pyhwp {

template <typename T>
void sparse24_rows_permute_scalar(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                                  const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t words = sparse24_padded_cols(w.cols) / 32;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const T* vals = w.values + n * words * 16;
    const uint32_t* meta = w.meta + n * words;
    for (int64_t p = 0; p < x.cols; ++p) {
      const float* xr = x.data + p * x.stride_p;
      float acc = 0.f;
      for (int64_t c = 0; c < words; ++c) {
        for (int j = 0; j < 16; ++j) acc += to_float(vals[16 * c + j]) * xr[sparse24_slot_input(meta[c], j, 32 * c)];
      }
      y.data[(n - row_begin) * y.stride_n + p * y.stride_p] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

template <typename T>
void sparse24_rows_tile_scalar(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                               const DenseOut& y, int64_t row_begin, int64_t row_end) {
  const int64_t L = x.stride_k;
  const int64_t K = w.cols, P = x.cols, words = sparse24_padded_cols(K) / 32;
  for (int64_t p0 = 0; p0 < P; p0 += L) {
    const float* panel = x.data + (p0 / L) * K * L;
    const int64_t width = std::min(L, P - p0);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const T* vals = w.values + n * words * 16;
      const uint32_t* meta = w.meta + n * words;
      float* out = y.data + (n - row_begin) * y.stride_n + p0;
      const float b = bias ? bias[n] : 0.f;
      for (int64_t q = 0; q < width; ++q) out[q] = b;
      for (int64_t c = 0; c < words; ++c) {
        for (int j = 0; j < 16; ++j) {
          const int64_t k = sparse24_slot_input(meta[c], j, 32 * c);
          if (k >= K) continue;  // padding slot (value 0); the panel has only K rows
          const float v = to_float(vals[16 * c + j]);
          const float* xr = panel + k * L;
          for (int64_t q = 0; q < width; ++q) out[q] += v * xr[q];
        }
      }
    }
  }
}

void sparse24_rows_conv_scalar(const Sparse24Matrix& w, const float* x, const int32_t* offsets, int64_t width,
                               int64_t /*tile_k*/, const float* bias, float* y, int64_t ldy, int64_t row_begin,
                               int64_t row_end) {
  const int64_t K = w.cols, words = sparse24_padded_cols(K) / 32;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const float* vals = w.values + n * words * 16;
    const uint32_t* meta = w.meta + n * words;
    float* out = y + (n - row_begin) * ldy;
    const float b = bias ? bias[n] : 0.f;
    for (int64_t q = 0; q < width; ++q) out[q] = b;
    for (int64_t c = 0; c < words; ++c) {
      for (int j = 0; j < 16; ++j) {
        const int64_t k = sparse24_slot_input(meta[c], j, 32 * c);
        if (k >= K) continue;  // padding slot (value 0); the table has K entries
        const float v = vals[16 * c + j];
        const float* xr = x + offsets[k];
        for (int64_t q = 0; q < width; ++q) out[q] += v * xr[q];
      }
    }
  }
}

template void sparse24_rows_permute_scalar(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_permute_scalar(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_scalar(const Sparse24Matrix&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template void sparse24_rows_tile_scalar(const Sparse24MatrixBf16&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);

namespace {

template <typename T>
Sparse24RowsFn<T> pick(Isa isa, bool permute) {
  switch (isa) {
#ifdef PYHWP_X86_KERNELS
    case Isa::kAvx512: return permute ? sparse24_rows_permute_avx512<T> : sparse24_rows_tile_avx512<T>;
    case Isa::kAvx2: return permute ? sparse24_rows_permute_avx2<T> : sparse24_rows_tile_avx2<T>;
#endif
    default: return permute ? sparse24_rows_permute_scalar<T> : sparse24_rows_tile_scalar<T>;
  }
}

// X as P columns of Kp contiguous floats, zero beyond K, so the permute kernels read whole
// 32-input chunks without masks. Copies only when x is not already in that form (x_padded: x
// has stride_k 1 and zeros in [K, Kp) of every column).
DenseIn padded_k_contiguous(const DenseIn& x, int64_t kp, bool x_padded) {
  const int64_t K = x.rows, P = x.cols;
  if (x.stride_k == 1 && (K == kp || x_padded)) return x;
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

template <typename T>
void check_args(const Sparse24MatrixT<T>& w, int64_t x_rows, int64_t x_cols, int64_t y_rows, int64_t y_cols,
                int num_threads, const char* op) {
  PYHWP_CHECK(w.rows >= 0 && w.cols >= 0, op, ": negative weight size");
  PYHWP_CHECK(x_rows == w.cols, op, ": x has ", x_rows, " rows, W has ", w.cols, " columns");
  PYHWP_CHECK(y_rows == w.rows && y_cols == x_cols, op, ": y is ", y_rows, "x", y_cols, ", expected ",
              w.rows, "x", x_cols);
  PYHWP_CHECK(num_threads >= 1, op, ": num_threads must be >= 1");
}

// The driver: float32 X (x_padded: see padded_k_contiguous), bias and Y; T-valued W.
template <typename T>
void run_sparse24(const Sparse24MatrixT<T>& w, const DenseIn& x, bool x_padded, const float* bias,
                  const DenseOut& y, int num_threads) {
  using Cfg = Sparse24CpuConfig;
  const int64_t N = w.rows, K = w.cols, P = x.cols, Kp = sparse24_padded_cols(K);
  const int nt = N * (Kp / 2) * P < Cfg::kSerialWork ? 1 : num_threads;
  const Isa isa = vector_isa();

  bool nonfinite = false;
  if (P < Cfg::kPermuteMaxP) {
    nonfinite = K > 0 && any_nonfinite(x);
    const DenseIn xk = K == 0 ? DenseIn{x.data, 0, P, 1, 0} : padded_k_contiguous(x, Kp, x_padded);
    const Sparse24RowsFn<T> fn = pick<T>(isa, /*permute=*/true);
    // One contiguous run of whole row blocks per thread: every row costs the same (Kp/2 slots),
    // and a thread streaming one run of W keeps the hardware prefetchers ahead of it (16-row
    // blocks handed out dynamically: 1.04-1.16x slower at batch 1 on the BERT shapes).
    const int64_t nblocks = (N + Cfg::kRowBlock - 1) / Cfg::kRowBlock;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; ++t) {
      const int64_t r0 = std::min(N, nblocks * t / nt * Cfg::kRowBlock);
      const int64_t r1 = std::min(N, nblocks * (t + 1) / nt * Cfg::kRowBlock);
      if (r0 == r1) continue;
      DenseOut yb = y;
      yb.data = y.data + r0 * y.stride_n;
      fn(w, xk, bias, yb, r0, r1);
    }
  } else {
    const TransposeFn transpose = pick_transpose(isa);
    const int64_t L = sparse24_panel_width(P), npanels = (P + L - 1) / L;
    float* panels = scratch(0, npanels * K * L);
    if (K > 0) nonfinite = pack_panels(x.data, K, P, x.stride_k, x.stride_p, L, panels, nt, isa);
    const Sparse24RowsFn<T> fn = pick<T>(isa, /*permute=*/false);
    const bool direct = y.stride_p == 1;
    // Work items are blocks of kTileRows rows, each over all X panels (its rows of W stay in
    // cache across them), unless there are fewer than two blocks per thread: then each block's
    // panels are split into runs, so that a weight with few rows still spreads over the threads
    // when X has many panels (the im2col matrix of a conv, P = H*W in the thousands).
    const int64_t row_blocks = (N + Cfg::kTileRows - 1) / Cfg::kTileRows;
    const int64_t runs = row_blocks >= 2 * nt ? 1 : std::min(npanels, (2 * nt + row_blocks - 1) / row_blocks);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t b = 0; b < row_blocks * runs; ++b) {
      const int64_t r0 = b / runs * Cfg::kTileRows, r1 = std::min(N, r0 + Cfg::kTileRows);
      const int64_t p0 = b % runs * npanels / runs * L, p1 = std::min(P, (b % runs + 1) * npanels / runs * L);
      const int64_t width = p1 - p0, ld_tile = (width + 15) / 16 * 16;
      const DenseIn xp{K > 0 ? panels + p0 * K : x.data, K, width, L, 1};  // whole panels from p0
      if (direct) {
        DenseOut yb = y;
        yb.data = y.data + r0 * y.stride_n + p0;
        yb.cols = width;
        fn(w, xp, bias, yb, r0, r1);
      } else {
        // Compute the rows with p contiguous, then transpose them into y, so that each thread
        // writes whole 64-byte lines of y (16 consecutive n) and no two threads share a line.
        float* tile = scratch(1, Cfg::kTileRows * ld_tile);
        const DenseOut t{tile, r1 - r0, width, ld_tile, 1};
        fn(w, xp, bias, t, r0, r1);
        for (int64_t i0 = r0; i0 < r1; i0 += 16) {
          const int64_t rows = std::min<int64_t>(16, r1 - i0);
          for (int64_t p = 0; p < width; p += 16) {
            const float* src = tile + (i0 - r0) * ld_tile + p;
            float* dst = y.data + i0 * y.stride_n + (p0 + p) * y.stride_p;
            const int64_t cols = std::min<int64_t>(16, width - p);
            if (y.stride_n == 1) {
              transpose(src, ld_tile, dst, y.stride_p, rows, cols);
            } else {
              for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < cols; ++j) dst[i * y.stride_n + j * y.stride_p] = src[i * ld_tile + j];
            }
          }
        }
      }
    }
  }

  if (nonfinite) {
    propagate_nonfinite(x, y,
                        [&](int64_t n, const unsigned char* flags) { return sparse24_stored_flags(w, n, flags); });
  }
}

}  // namespace

void sparse24_matmul(const Sparse24Matrix& w, const DenseIn& x, const float* bias,
                     const DenseOut& y, int num_threads) {
  check_args(w, x.rows, x.cols, y.rows, y.cols, num_threads, "sparse24_matmul");
  if (w.rows == 0 || x.cols == 0) return;
  PYHWP_CHECK(y.data != nullptr, "sparse24_matmul: null y");
  PYHWP_CHECK(w.cols == 0 || (x.data && w.values && w.meta), "sparse24_matmul: null x, values or meta");
  run_sparse24(w, x, /*x_padded=*/false, bias, y, num_threads);
}

void sparse24_matmul_bf16(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                          const DenseOutBf16& y, int num_threads) {
  check_args(w, x.rows, x.cols, y.rows, y.cols, num_threads, "sparse24_matmul_bf16");
  const int64_t N = w.rows, K = w.cols, P = x.cols, Kp = sparse24_padded_cols(K);
  if (N == 0 || P == 0) return;
  PYHWP_CHECK(y.data != nullptr, "sparse24_matmul_bf16: null y");
  PYHWP_CHECK(K == 0 || (x.data && w.values && w.meta), "sparse24_matmul_bf16: null x, values or meta");
#ifdef PYHWP_AMX_KERNELS
  if (active_isa() == Isa::kAmx && P >= Sparse24CpuConfig::kAmxMinCols) {
    sparse24_matmul_bf16_amx(w, x, bias, y, num_threads);
    return;
  }
  if (active_isa() == Isa::kAvx512Bf16 && P >= Sparse24CpuConfig::kDotMinCols) {
    sparse24_matmul_bf16_dot(w, x, bias, y, num_threads);
    return;
  }
#endif
  // X widened k-contiguous and zero-padded to Kp (what the permute kernels read as is) unless it
  // comes in the conv layout at a batch the tile kernels take; the driver uses slots 0 and 1.
  const bool k_rows = P < Sparse24CpuConfig::kPermuteMaxP || x.stride_k == 1;
  const int64_t ld = k_rows ? Kp : P;
  const DenseIn xf = widen_bf16(x, k_rows, ld, scratch(2, (k_rows ? P : K) * ld + 16), num_threads);
  float* yf = scratch(3, N * P + N + 16);
  const DenseOut yv = float_like(y, yf);
  run_sparse24(w, xf, /*x_padded=*/k_rows, widen_bf16(bias, N, yf + N * P), yv, num_threads);
  round_to_bf16(yv, y, num_threads);
}

}  // namespace pyhwp
