// 2:4 structured-sparse x dense matmul on the CPU: Y = W X (+ bias), W stored as half its values
// plus 2-bit in-group indices.
#pragma once
#include <cstdint>
#include <utility>

#include "common/conv_geometry.h"
#include "common/dense.h"
#include "common/prefetch.h"
#include "common/x_rows.h"

namespace pyhwp {

// Storage layout of a 2:4 weight W (N x K, row-major GEMM form):
//
// - The input dimension k is cut into groups of 4 consecutive positions [4g, 4g+4); each group
//   holds at most 2 nonzeros. K is padded with zero weights to Kp = sparse24_padded_cols(K), a
//   multiple of 32, so that every row is a whole number of 32-input chunks (one metadata word
//   each) and the kernels need no tail handling on the weight side.
// - Every group stores exactly 2 slots: slot 2g and 2g+1 of the row. values[n*Kp/2 + s] is the
//   weight in slot s (float32, row-major (N, Kp/2)). A group with fewer than 2 kept weights is
//   completed with other positions holding the value 0, so every row has exactly Kp/2 slots.
// - meta[n*Kp/32 + c] (uint32, row-major (N, Kp/32)) holds the in-group positions of slots
//   16c .. 16c+15: bits [2j, 2j+1] are the position in [0, 4) of slot 16c+j inside its group
//   8c + j/2. So slot s of row n weights input k = 4*(s/2) + ((meta >> 2*(s%16)) & 3).
// - Invariants (sparse24 format validation, Python side): the two positions of a group strictly
//   increase (so no input is counted twice), and every slot whose k >= K holds 0. The kernels
//   never read x at k >= K: the weight's padding meets zero-padded or skipped x.
// - T is the value type: float, or uint16_t holding bfloat16 bits (the kernels widen them to
//   float32 in registers, exactly).
//
// Bytes per weight: 2 (values) + 0.125 (meta) for float32 values, 1 + 0.125 for bfloat16,
// against 4 (2) for dense.
template <typename T>
struct Sparse24MatrixT {
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K, the logical input dimension (unpadded)
  const T* values = nullptr;  // host, rows * sparse24_padded_cols(cols) / 2
  const uint32_t* meta = nullptr;  // host, rows * sparse24_padded_cols(cols) / 32
};
using Sparse24Matrix = Sparse24MatrixT<float>;
using Sparse24MatrixBf16 = Sparse24MatrixT<uint16_t>;

// Tiling knobs of the CPU 2:4 kernels.
struct Sparse24CpuConfig {
  static constexpr int64_t kGroup = 4;          // inputs per group
  static constexpr int64_t kKeep = 2;           // slots per group
  static constexpr int64_t kChunk = 32;         // inputs per metadata word
  static constexpr int64_t kRowBlock = 16;      // batch < kPermuteMaxP: threads get whole row blocks
  static constexpr int64_t kPermuteMaxP = 8;    // P below this: select x in registers, no packing
  static constexpr int64_t kPermutePrefetch = 32;  // metadata words (64-byte value lines) ahead
  static constexpr int64_t kPanel = 128;        // most columns of X per packed panel (tile kernels)
  static constexpr int64_t kTileBytes = 32 * 1024;  // a K block of a panel fits L1
  // Rows per work item of the tile kernels. 128 rather than 64 (per-process A/B, 2 threads,
  // batch 128): 1536x384 1.12x -> 1.15x dense, 3072x768 1.23x -> 1.30x, 768x3072 1.31x ->
  // 1.38x, 4096x4096 1.39x -> 1.43x; batch 16 within noise except 4096x4096 (1.54x -> 1.69x).
  static constexpr int64_t kTileRows = 128;
  static constexpr int64_t kSerialWork = 1 << 15;  // slots * P below this runs on one thread
  // bfloat16 on AMX (sparse24_matmul_bf16_amx) from this many columns of X, where the permute
  // kernels stop: at 4 columns they beat it (4096x4096 840 against 1455 us), at 8 the AVX-512 tile
  // kernel is 2.2x slower than AMX (3070 against 1390 us).
  static constexpr int64_t kAmxMinCols = kPermuteMaxP;
  // bfloat16 on AVX512-BF16 (sparse24_matmul_bf16_dot, no AMX) from this many columns of X. On a
  // Zen 4 (2 threads, calls alternating with the permute kernels): at 4 columns each wins on
  // some shape (3072x768 115 against 127 us, 4096x4096 1107 against 1069), from 5 the dot product
  // is as fast or faster on every shape (1309 against 1650 us at 4096x4096, 42 against 49 at
  // 1536x384), at 8 2.1-2.5x.
  static constexpr int64_t kDotMinCols = 5;
  static constexpr int64_t kTileRowsAhead = 8;   // tile kernels: rows of W prefetched ahead
  static_assert(kChunk == 32 && kGroup == 4 && kKeep == 2,
                "one uint32 of 2-bit indices covers 16 slots = 8 groups = 32 inputs");
  static_assert(kRowBlock % 16 == 0, "row blocks fill whole 64-byte output lines");
  static_assert(kPanel % 16 == 0, "panels are whole 64-byte lines");
  static_assert(kTileBytes / (kPanel * 4) >= kChunk, "a K block holds at least one metadata word");
  static_assert(kTileRows % kRowBlock == 0, "tile work items are whole row blocks");
  static_assert(kPermuteMaxP >= 1, "the permute path serves at least batch 1");
};

// Input position of slot j (0..15) of metadata word `m`, for a word starting at input `base`:
// slot j belongs to group j / 2 and holds that group's input (m >> 2j) & 3.
inline int64_t sparse24_slot_input(uint32_t m, int j, int64_t base) {
  return base + (4 * (j >> 1) + ((m >> (2 * j)) & 3u));
}

// Kp: K rounded up to a whole number of metadata words.
constexpr int64_t sparse24_padded_cols(int64_t k) {
  return (k + Sparse24CpuConfig::kChunk - 1) / Sparse24CpuConfig::kChunk * Sparse24CpuConfig::kChunk;
}

// How many of row n's stored slots (their inputs below w.cols) have flags[k] != 0: the
// stored_count of propagate_nonfinite for a 2:4 weight.
template <typename T>
int64_t sparse24_stored_flags(const Sparse24MatrixT<T>& w, int64_t n, const unsigned char* flags) {
  const int64_t words = sparse24_padded_cols(w.cols) / 32;
  int64_t count = 0;
  for (int64_t c = 0; c < words; ++c) {
    const uint32_t m = w.meta[n * words + c];
    for (int j = 0; j < 16; ++j) {
      const int64_t k = sparse24_slot_input(m, j, 32 * c);
      if (k < w.cols) count += flags[k];
    }
  }
  return count;
}

// Y (N x P) = W (N x K) X (K x P) + bias (N floats, host, or nullptr), for any strides of X and Y
// (see DenseIn / DenseOut). NaN/Inf in X propagate exactly as in the dense product. Uses up to
// num_threads OpenMP threads. Y must not overlap X or W. Throws std::invalid_argument on sizes
// that do not match. Does not re-check the format invariants (see above).
void sparse24_matmul(const Sparse24Matrix& w, const DenseIn& x, const float* bias,
                     const DenseOut& y, int num_threads);

// Y = W X + bias with bfloat16 W, X, bias and Y: float32 products and sums, one
// round-to-nearest-even conversion of each output (the contract of csr_matmul_bf16). X and Y
// are converted to/from float32 in scratch of the calling thread; W's values stay bfloat16 in
// memory (half the bytes of float32, which is what batch-1 products are bound by). Under
// Isa::kAmx, from kAmxMinCols columns: sparse24_matmul_bf16_amx; under Isa::kAvx512Bf16, from
// kDotMinCols: sparse24_matmul_bf16_dot (below).
void sparse24_matmul_bf16(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                          const DenseOutBf16& y, int num_threads);

// The AMX path of sparse24_matmul_bf16 (sparse24_matmul_amx.cpp), taken when the active ISA is
// kAmx and X has at least kAmxMinCols columns: each panel of 16 rows expanded to dense bfloat16
// blocks for the tile unit. Products exact, sums in float32 in the unit's order, one rounding of
// each output; subnormal inputs read as zero and subnormal sums flushed (DAZ/FTZ, as every AMX
// bfloat16 product). Arguments as sparse24_matmul_bf16, already checked.
void sparse24_matmul_bf16_amx(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads);

// The AVX512-BF16 path of sparse24_matmul_bf16 (sparse24_matmul_amx.cpp), taken when the active
// ISA is kAvx512Bf16 and X has at least kDotMinCols columns: the AMX path's driver, with each
// group's two kept values as one VDPBF16PS pair against the two inputs a byte shuffle picks from
// the group's four (no expansion: half the products of the dense path). Products exact, sums in
// float32 in pairs, one rounding of each output; subnormal inputs read as zero (DAZ), as AMX.
void sparse24_matmul_bf16_dot(const Sparse24MatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                              const DenseOutBf16& y, int num_threads);

// Rows [row_begin, row_end) of Y, one kernel per ISA (sparse24_matmul_{cpu,avx2,avx512}.cpp). Row n
// goes to y.data + (n - row_begin) * y.stride_n; bias may be nullptr.
// `permute` variants select x in registers: x.stride_k == 1 and x.rows == Kp, x zero-padded
// beyond K (column p at x.data + p * x.stride_p). `tile` variants take X packed in panels of
// L = x.stride_k columns (pack_panels: x.rows == K, x.stride_p == 1, panel p / L at
// x.data + (p / L) * K * L) and y.stride_p == 1; they skip slots at k >= K. The driver hands
// them one panel (x.cols <= L) per work item.
// Panel width for P columns: P rounded up to 16, at most kPanel. Narrow panels keep the X rows of
// small batches dense in cache lines.
constexpr int64_t sparse24_panel_width(int64_t p) {
  return (p + 15) / 16 * 16 < Sparse24CpuConfig::kPanel ? (p + 15) / 16 * 16 : Sparse24CpuConfig::kPanel;
}

// Inputs per K block of the tile kernels for panel width `ld`: whole metadata words whose panel
// rows fill at most kTileBytes.
constexpr int64_t sparse24_tile_k(int64_t ld) {
  return Sparse24CpuConfig::kTileBytes / (ld * 4) / Sparse24CpuConfig::kChunk * Sparse24CpuConfig::kChunk;
}

// For the tile kernels over rows [row_begin, row_end) and K blocks of tile_k inputs: row n's
// values and metadata in the K block from k0 into L1, where n past row_end wraps to the start of
// the next K block. A K block touches tile_k/2 values per row, rows a whole row of W apart: too
// many short streams for the hardware prefetcher, so the kernels fetch each row kTileRowsAhead
// rows before they reach it. Measured, against none (batch 128, 2 threads, per-process A/B):
// AVX-512 4096x4096 1.10x -> 1.41x dense, 11008x4096 1.15x -> 1.50x, 768x3072 1.17x -> 1.24x,
// 3072x768 1.17x -> 1.27x, 1536x384 1.05x -> 1.07x; AVX2 (forced on the AVX-512 VM) 1.29x and
// 1.32x faster at 4096x4096 and 11008x4096, the K <= 3072 shapes within noise. (Written with
// _mm_prefetch in a loop, gcc deleted it: see common/prefetch.h.)
template <typename T>
inline void sparse24_prefetch_row(const Sparse24MatrixT<T>& w, int64_t words, int64_t tile_k, int64_t n, int64_t k0,
                                  int64_t row_begin, int64_t row_end) {
  if (n >= row_end) {
    n = row_begin + (n - row_end);
    k0 += tile_k;
  }
  if (k0 >= w.cols || n >= row_end) return;
  prefetch_lines_t0(w.values + n * words * 16 + k0 / 2, tile_k / 2 * static_cast<int64_t>(sizeof(T)));
  prefetch_lines_t0(w.meta + n * words + k0 / 32, 1);
}

// The tile kernels find row k of X (k < K; K blocks of whole metadata words at a time) through
// PanelRows (the matmul) or OffsetRows (the conv): common/x_rows.h.

template <typename T>
using Sparse24RowsFn = void (*)(const Sparse24MatrixT<T>& w, const DenseIn& x, const float* bias,
                                const DenseOut& y, int64_t row_begin, int64_t row_end);
// Each instantiated for T = float and T = uint16_t (bfloat16 bits).
template <typename T> void sparse24_rows_permute_scalar(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template <typename T> void sparse24_rows_tile_scalar(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template <typename T> void sparse24_rows_permute_avx2(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template <typename T> void sparse24_rows_tile_avx2(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template <typename T> void sparse24_rows_permute_avx512(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);
template <typename T> void sparse24_rows_tile_avx512(const Sparse24MatrixT<T>&, const DenseIn&, const float*, const DenseOut&, int64_t, int64_t);

// conv2d (any stride) as an implicit GEMM (common/implicit_conv.h) with the 2:4 float32 (out,
// C*kh*kw) matrix of a conv weight: the tile kernels read row k of X at the offset of column k in
// the padded input (a table of K int32, built per call), in the shifted layout where it computes
// at most 15% more pixels than the plain one and fits L2 (stride 1; see conv_layout). The 2:4 groups run along the flattened
// (c, r, s) inputs, across taps and channels, which the table serves like any other order.
// Returns true when x holds a NaN/Inf, leaving y unspecified: the caller then needs the
// dense-exact propagation of 0 * Inf, which this path does not do.
bool sparse24_conv2d(const Sparse24Matrix& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                     int num_threads);
// The layout sparse24_conv2d reads x in for this call, {segments, bands} of PaddedPlanes
// (common/implicit_conv.h): {0, 1} for the plain padded planes, else the shifted copies.
std::pair<int64_t, int64_t> sparse24_conv2d_layout(const Sparse24Matrix& w, const ConvGeometry& g,
                                                   int num_threads);

// The implicit-GEMM conv's kernel (sparse24_conv2d_cpu.cpp), float32: for rows n in
// [row_begin, row_end), y[(n - row_begin) * ldy + q] = bias[n] (or 0) + sum over W's slots
// (n, k) of value * x[offsets[k] + q], q in [0, width), width <= kPanel. K blocks of tile_k
// inputs (a multiple of kChunk) keep the windows they read in L1; the partial sums stay in y.
using Sparse24ConvRowsFn = void (*)(const Sparse24Matrix& w, const float* x, const int32_t* offsets, int64_t width,
                                    int64_t tile_k, const float* bias, float* y, int64_t ldy, int64_t row_begin,
                                    int64_t row_end);
void sparse24_rows_conv_scalar(const Sparse24Matrix&, const float*, const int32_t*, int64_t, int64_t, const float*, float*, int64_t, int64_t, int64_t);
void sparse24_rows_conv_avx2(const Sparse24Matrix&, const float*, const int32_t*, int64_t, int64_t, const float*, float*, int64_t, int64_t, int64_t);
void sparse24_rows_conv_avx512(const Sparse24Matrix&, const float*, const int32_t*, int64_t, int64_t, const float*, float*, int64_t, int64_t, int64_t);

}  // namespace pyhwp
