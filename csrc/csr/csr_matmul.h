// CSR sparse x dense matmul on the CPU: Y = W X (+ bias), W in CSR with int32 column indices.
#pragma once
#include <cstdint>
#include <vector>

#include "common/conv_geometry.h"
#include "common/cpu_features.h"
#include "common/dense.h"

namespace pyhwp {

// A CSR matrix in host memory. Row n stores positions row_offsets[n] .. row_offsets[n+1]-1 of
// col_indices (int32, each in [0, cols)) and values (float32). row_offsets has rows+1 int64
// entries, non-decreasing, from 0 to nnz; column indices strictly increase within a row.
// col_indices16 is an optional copy of col_indices as uint16 (only when cols <= 65536): the
// kernels read it instead, since at batch 1 the index bytes are a third of the traffic. Either
// index array may be null, not both (when nnz > 0). sell is an optional sliced-ELL copy of the
// matrix (csr_sell.h, written by csr_sell_pack from it) that csr_matmul reads instead at batches
// up to CsrCpuConfig::kSellMaxP on AVX-512 CPUs when x is finite (any strides).
struct CsrMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int64_t* row_offsets = nullptr;     // host, rows + 1
  const int32_t* col_indices = nullptr;     // host, nnz
  const float* values = nullptr;            // host, nnz
  const uint16_t* col_indices16 = nullptr;  // host, nnz, or nullptr
  const void* sell = nullptr;               // host blob, or nullptr
  // The caller expects W's arrays to be in cache at this call (pyhwp: the CSR weights alive in the
  // process fit a quarter of the last-level cache). Then the 16-column tile kernel does not
  // prefetch them: from L2 or L3 its prefetches cost about 10%, from DRAM they gain 15-20%
  // (NOTES.md, stop 30). Performance only; the sums are the same.
  bool resident = false;
};

// The same matrix with bfloat16 values (raw bits, round-to-nearest-even from float32), and its
// sliced-ELL copy with bfloat16 values if any.
struct CsrMatrixBf16 {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t nnz = 0;
  const int64_t* row_offsets = nullptr;
  const int32_t* col_indices = nullptr;
  const uint16_t* values = nullptr;  // host, nnz bfloat16 bit patterns
  const uint16_t* col_indices16 = nullptr;
  const void* sell = nullptr;
  bool resident = false;  // as in CsrMatrix
};

// Full structural check (offsets monotonic from 0 to nnz, indices in range). O(nnz); run once
// when a weight is built, not per call. Throws std::invalid_argument naming the first violation.
void csr_validate(const CsrMatrix& w);

// Y (N x P) = W (N x K) X (K x P) + bias (N floats, host, or nullptr), for any strides of X and Y
// (see DenseIn / DenseOut). NaN/Inf in X propagate exactly as in the dense product. Uses up to
// num_threads OpenMP threads. Y must not overlap X or W. Throws std::invalid_argument on sizes
// that do not match.
void csr_matmul(const CsrMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                int num_threads);

// Y (N x P) = W X + bias with bfloat16 W, X, bias and Y: float32 products and sums, one
// round-to-nearest-even conversion of each output. X and Y are converted to/from float32 in
// per-thread scratch; W's values stay bfloat16 in memory (half the bytes of float32).
void csr_matmul_bf16(const CsrMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                     const DenseOutBf16& y, int num_threads);

// -- the per-ISA kernels (csr_matmul_{cpu,avx2,avx512}.cpp), selected in csr_matmul_cpu.cpp ----
//
// The stored arrays of one matrix as a kernel reads them: I is the index type (int32_t or
// uint16_t), T the value type (float, or uint16_t holding bfloat16 bits).
template <typename I, typename T>
struct CsrArrays {
  const I* cols;
  const T* vals;
};

// Gather kernel (small P, x rows contiguous): for rows i in [0, rows), p in [0, P):
// y[i*ldy_n + p*ldy_p] = bias[i] (or 0) + sum_{j in [begin[i], begin[i+1])} vals[j] * x[p*ldx + cols[j]].
// x is float32 (ldx >= K), bias may be nullptr.
template <typename I, typename T>
using CsrGatherFn = void (*)(CsrArrays<I, T> a, const int64_t* begin, int64_t rows, const float* x,
                             int64_t ldx, int64_t P, const float* bias, float* y, int64_t ldy_n,
                             int64_t ldy_p);

// Tile kernel (X with p contiguous: row k at x + k*ldx, any alignment; the matmul driver packs X
// to 64-byte aligned rows, the conv driver reads shifted rows in place): for rows i in [0, rows),
// y[i*ldy + 0:P] = (accumulate ? y[i*ldy + 0:P] : bias[i] or 0)
//                  + sum_{j in [begin[i], end[i])} vals[j] * x[cols[j]*ldx + 0:P].
// P <= kTileP; begin/end are per-row position ranges (a K block of each row). stream_w: W's
// arrays come from DRAM (not CsrMatrix::resident); the kernels that prefetch them do so only then.
template <typename I, typename T>
using CsrTileFn = void (*)(CsrArrays<I, T> a, const int64_t* begin, const int64_t* end, int64_t rows,
                           const float* x, int64_t ldx, int64_t P, const float* bias, bool accumulate,
                           bool stream_w, float* y, int64_t ldy);

template <typename I, typename T>
struct CsrKernels {
  CsrGatherFn<I, T> gather;
  CsrTileFn<I, T> tile;
};

// The CSR conv's tap-row kernel (csr_conv2d_aligned; AVX-512, csr_matmul_avx512.cpp), kw = 2 or 3:
// each entry of `stream` is one row of taps: an int32 offset, whose line x + offset the windows
// x + offset + shifts[s] + 0:P of its columns s share (shifts[0] = 0 < shifts[s] <= 8), then the
// float32 bits of its weights, one for each column in its mask M (bit s), in order. Row i's
// entries with mask M are the stream's words [starts[(M-1)*N + i], starts[M*N + i]); for rows i in
// [0, rows): y[i*ldy + 0:P] = (accumulate ? y[i*ldy + 0:P] : bias[i] or 0)
//   + sum over its entries and their columns s of w_s * x[offset + shifts[s] + 0:P].
// It reads x up to 8 floats past whole vectors of P. P <= kTileP.
using CsrTapTileFn = void (*)(const int32_t* stream, const int64_t* starts, int64_t N, int64_t kw,
                              const int32_t* shifts, int64_t rows, const float* x, int64_t P, const float* bias,
                              bool accumulate, float* y, int64_t ldy);
CsrTapTileFn csr_tap_tile_avx512();

template <typename I, typename T> CsrKernels<I, T> csr_kernels_scalar();
template <typename I, typename T> CsrKernels<I, T> csr_kernels_avx2();
template <typename I, typename T> CsrKernels<I, T> csr_kernels_avx512();
// The one ISA dispatch point of the CSR kernels (defined in csr_matmul_cpu.cpp).
template <typename I, typename T> CsrKernels<I, T> csr_kernels(Isa isa);


// conv2d (any stride) as an implicit GEMM over the tile kernels (no im2col; see
// common/conv_geometry.h and common/implicit_conv.h): W is the (out, C*kh*kw) CSR matrix of a conv
// weight, and the tile kernel runs unchanged (ldx = 1) on the shifted rows of the padded input (of
// its stride phases).
// The kernels read W through a plan derived from W and the geometry (not from `images`), built
// once per weight and input size by csr_conv2d_plan: each stored weight's offset into the padded
// image (nnz int32) and, per block of channels that the driver keeps in L1, where each row's
// stored weights of that block start (csr_conv2d_starts(g, aligned) * rows int64).
// The aligned plan (csr_conv2d_aligned(g): stride 1, kw = 2 or 3 with (kw-1)*dw <= 8, AVX-512,
// where rounding the padded rows up to whole lines adds few pixels) writes instead a stream of
// entries into `offsets` (at most 2 * nnz int32 words; csr_conv2d_plan returns how many): one per
// row of taps (channel c, tap row r) holding a stored weight, its windows' shared line and the
// weights of its stored columns, grouped per row and channel block by the mask of those columns
// (2^kw - 1 runs: starts has blocks * (2^kw - 1) + 1 per row; the layout of CsrTapTileFn).
// csr_conv2d then reads the weights from the stream (w.values may be null). The tap-row kernel
// loads each line once for every weight of its entry.
// csr_conv2d returns true when x holds a NaN/Inf, leaving y unspecified: the caller then needs
// the dense-exact propagation of 0 * Inf (see propagate_nonfinite), which this path does not do.
bool csr_conv2d_aligned(const ConvGeometry& g);
int64_t csr_conv2d_starts(const ConvGeometry& g, bool aligned);
int64_t csr_conv2d_plan(const CsrMatrix& w, const ConvGeometry& g, bool aligned, int32_t* offsets, int64_t* starts);
bool csr_conv2d(const CsrMatrix& w, const ConvGeometry& g, bool aligned, const int32_t* offsets,
                const int64_t* starts, const float* x, const float* bias, float* y, int num_threads);

// Tiling knobs of the CPU CSR kernels.
struct CsrCpuConfig {
  static constexpr int64_t kGatherMaxP = 8;  // P below this: gather from x rows, no packing
  // The same where gathers are slow (slow_gathers(): the gather kernel then takes x's terms by
  // scalar loads). On a Zen 4, 2 threads, 1536x384 90% / 1536x384 70% / 768x3072 90% / 3072x768
  // 90%, the gather path against the tile path: 33 / 57 / 105 / 66 us against 34 / 75 / 133 / 119
  // at 2 columns, 48 / 112 / 176 / 101 against 35 / 78 / 160 / 125 at 3; 4096x4096 90% at 2
  // columns 573-822 against 846-869 (NOTES.md, stop 27): batches 1 and 2.
  static constexpr int64_t kGatherMaxPSlowGathers = 3;
  // Batches up to this read the sliced-ELL copy where there is one (csr_sell.h).
  static constexpr int64_t kSellMaxP = 8;
  static constexpr int64_t kSerialWork = 1 << 15;  // nnz * P below this runs on one thread
  static constexpr int64_t kTileP = 128;     // output columns per register tile (8 zmm)
  static constexpr int64_t kRowBlock = 16;   // rows per output tile before it is transposed
  // Bytes of the X panel (K-block rows x tile columns) that should stay in the L2 cache while
  // every row of the block streams past; beyond it, K is split into blocks and Y accumulates.
  static constexpr int64_t kPanelBytes = 1 << 20;
  static constexpr int64_t kRowCost = 8;     // per-row work in nnz units, for load balance
  // The CSR conv takes the aligned plan (csr_conv2d_aligned) where its rows of whole lines hold
  // at most this percentage of the plain layout's pixels. 90%, batch 1, 1 thread, Zen 4, tap rows
  // against the plain plan: 256->256 @14 (16 = 16 floats a row) 1.22x, 128->128 @28 (32 / 30)
  // 1.05-1.22x, 64->64 @56 (64 / 58, 10% more pixels) 1.10x (NOTES.md, stop 32).
  static constexpr int64_t kAlignedRowsPercent = 115;
  // X with p contiguous but unaligned rows is read in place (unaligned loads) when its rows are
  // used fewer than this many times on average (nnz < kInPlaceReuse * K), else copied to aligned
  // rows first. DLMC ResNet-50 matrices, P = 196 and 49 (NOTES.md, stop 22): in place was 1.7x
  // faster at 13 uses per row, about 1.1x at 26, and 1.1x / 1.4x / 1.6x slower at 51 / 102 / 410.
  static constexpr int64_t kInPlaceReuse = 32;
  // X read in place with many column tiles (conv-like: few rows, large P): threads take groups of
  // consecutive tiles whose panel (K rows x the group's columns) is up to this many bytes, and
  // scan it for NaN/Inf before the kernel reads it, so that the scan's runs along each row are
  // long enough for the hardware prefetchers. DLMC ResNet-50, P = 3136 and 784 (NOTES.md, stop
  // 22): groups of one tile (512-byte runs) 1.2-1.6x slower than 2 MiB, 1 MiB 1.1-1.3x slower,
  // 4 MiB the same.
  static constexpr int64_t kScanGroupBytes = 2 << 20;
  // X of at most this many elements (K * P) that must be packed is packed by every thread into
  // its own scratch inside the kernels' parallel region (run_csr), not once for all of them.
  static constexpr int64_t kPrivatePack = 16384;
  // Bytes ahead of the current position at which the batch-1 gather kernels (and the 16-column
  // tile kernel) prefetch every line of W's index and value streams: at batch 1 they are bound by
  // how fast those arrive (NOTES.md, stop 17: 1, 2, 3 and 4 KiB measured, 2 the best).
  static constexpr int64_t kPrefetchBytes = 2048;
  static_assert(kTileP % 16 == 0 && kTileP <= 128, "tiles are whole zmm vectors, at most 8 per row");
  static_assert(kRowBlock % 16 == 0, "row blocks fill whole 64-byte output lines");
  static_assert(kGatherMaxP >= 1 && kGatherMaxPSlowGathers >= 1, "the gather path serves at least batch 1");
  static_assert(kPanelBytes >= kTileP * 4 * 64, "a K block holds at least 64 rows of X");
};

}  // namespace pyhwp
