// Masked dense matmul on the CPU: Y = W X (+ bias) with W stored as its non-zero 16x16 tiles.
#pragma once
#include <cstdint>

#include "common/conv_geometry.h"
#include "common/dense.h"

namespace pyhwp {

// Tiling knobs of the CPU masked kernels.
struct MaskedCpuConfig {
  // A tile is kTileN output rows x kTileK input columns. kTileN = 16 float32 = one 512-bit
  // register, so one tile row of k is one vector load; kTileK = 16 makes a tile 1 KiB (16 cache
  // lines) and the skip granularity fine enough that 75% zero 16x16 blocks skip 75% of the work.
  static constexpr int64_t kTileN = 16;
  static constexpr int64_t kTileK = 16;
  static constexpr int64_t kTileSize = kTileN * kTileK;
  // Register block of the micro-kernels: 16 rows x kMr columns of Y (p, the batch). AVX-512 keeps
  // kMr accumulators + 1 weight vector in its 32 zmm registers; AVX2 needs two ymm per 16 rows,
  // so 2 * 6 accumulators + 2 weight vectors + 1 broadcast fill its 16 registers.
  static constexpr int kMrAvx512 = 28;
  static constexpr int kMrAvx2 = 6;
  static constexpr int kMrScalar = 8;
  // Above kMrAvx512 columns (where the narrow block would need two passes over the weights),
  // AVX-512 switches to the wide register block: 8 rows x kNvAvx512 vectors of 16 columns (24
  // accumulators). Each weight broadcast then feeds kNvAvx512 FMAs instead of each x broadcast
  // feeding one, so loads per FMA drop from (kMr + 1) / kMr to (8 + kNvAvx512) / (8 kNvAvx512):
  // measured +10% at 128 columns. Below, one narrow pass (weights read once) wins.
  static constexpr int kNvAvx512 = 3;
  static constexpr int64_t kWideMinP = kMrAvx512 + 1;
  // Tiles per group in the wide path: both row halves replay the group's x (16 x 48 floats =
  // 3 KiB a tile) from L1.
  static constexpr int64_t kWideGroupTiles = 8;
  // K is processed in chunks whose packed x (the columns of one work item) takes at most this
  // many bytes, so it stays in the 2 MiB L2 of each core while the output panels stream past it.
  static constexpr int64_t kXChunkBytes = int64_t{1024} << 10;
  // Within a chunk a panel's tiles are replayed for every p-block in groups of at most this many
  // tiles (kWGroupTiles KiB), so they come from the 48 KiB L1d rather than from L2.
  static constexpr int64_t kWGroupTiles = 24;
  // The AVX-512 kernels prefetch the weights this many tiles (of 1 KiB) ahead: at 16 columns a tile
  // is ~130 cycles of FMAs, and streaming the weights from DRAM at batch 16 measured 1.5x faster
  // with 8 tiles ahead than with 2 (4096x4096, 75% zero tiles). At batch 1 a tile is only 16
  // FMAs: 16 ahead measured 0.91-0.94x -> 0.99-1.00x dense at 4096x4096 with no zero tiles (8 vs
  // 16; 32 was worse, 0.85x), batch 16 unchanged.
  static constexpr int64_t kPrefetchTiles = 16;
  // The narrow kernel also touches the weights kPageAhead and 2 kPageAhead bytes ahead once per
  // tile, into L2: at batch 1 from DRAM (4096x4096, no zero tiles, 256 MiB read between calls)
  // measured 0.70-0.79x -> 0.87-0.93x dense on one thread, 0.78-0.84x -> 0.89-0.92x on two.
  // 32 KiB steps gave the same within noise, touches on two lines per tile were slower.
  static constexpr int64_t kPageAhead = int64_t{64} << 10;
  // Parallel work items per thread when panels are too few (conv: few outputs, many pixels).
  static constexpr int64_t kItemsPerThread = 4;
  // Multiply-adds below this run on one thread (a fork costs a few microseconds).
  static constexpr int64_t kSerialWork = int64_t{1} << 16;
  // bfloat16 on AMX (masked_matmul_bf16_amx) from this many columns of X: a TDPBF16PS takes as
  // long for 1 column as for 16.
  static constexpr int64_t kAmxMinCols = 8;
  // bfloat16 on AVX512-BF16 (masked_matmul_bf16_dot, no AMX) from this many columns of X. On a
  // Zen 4 (2 threads, no zero tiles, calls alternating with the widening kernels): at 4 columns
  // those are 1.06-1.14x faster, at 6 1.2x at 4096x4096 and level on 3072x768 and 1536x384, at 8
  // the dot product is 1.1-1.3x faster (1285 against 1417 us at 4096x4096, 140 against 185 us
  // at 3072x768).
  static constexpr int64_t kDotMinCols = 8;

  static_assert(kTileN == 16, "the AVX-512 kernel holds one tile row in one zmm register");
  static_assert(kTileK >= 1 && kTileK % 4 == 0, "tile rows of k are unrolled by 4");
  static_assert(kMrAvx512 >= 1 && kMrAvx512 + 2 <= 32, "accumulators + weight + spare fit 32 zmm");
  static_assert(2 * kMrAvx2 + 3 <= 16, "accumulators + 2 weight + 1 broadcast fit 16 ymm");
  static_assert(kMrScalar >= 1, "the scalar kernel serves at least one column");
  static_assert(8 * kNvAvx512 + kNvAvx512 + 1 <= 32, "wide accumulators + x + broadcast fit 32 zmm");
  static_assert(kWideMinP >= 16, "the wide block is at least one vector wide");
  static_assert(kXChunkBytes >= kTileK * kMrAvx512 * 4, "a chunk holds at least one tile row of x");
  static_assert(kWGroupTiles >= 1, "a group holds at least one tile");
  static_assert(kPrefetchTiles >= 1, "prefetch at least the next tile");
  static_assert(kMrAvx512 <= 2 * kTileK, "two x lines are prefetched per k step");
  static_assert(kTileN * 4 == 64, "one tile row of k is one cache line (prefetched one per k)");
  static_assert(kTileK * 4 == 64, "a packed x block holds mr lines per tile (two prefetched per k)");
};

// W (rows x cols) in the masked tile layout, host memory. Rows are grouped into
// ceil(rows/16) panels of 16 and columns into ceil(cols/16) k-tiles of 16; only tiles holding a
// kept weight are stored. Panel j stores tiles tile_ptr[j] .. tile_ptr[j+1]-1, in increasing
// k-tile order tile_idx[t] (int32). Tile t is 256 floats at values + 256 t, laid out k-major:
// element (row 16 j + r, column 16 tile_idx[t] + c) at values[256 t + 16 c + r]. Positions past
// rows or cols (the padding of the last panel or k-tile) hold zeros. T is the value type: float,
// or uint16_t holding bfloat16 bits (widened to float32 in registers, exactly).
template <typename T>
struct MaskedMatrixT {
  int64_t rows = 0;                  // N
  int64_t cols = 0;                  // K
  int64_t ntiles = 0;                // stored tiles
  const int64_t* tile_ptr = nullptr;  // host, ceil(rows/16) + 1, from 0 to ntiles, non-decreasing
  const int32_t* tile_idx = nullptr;  // host, ntiles, each in [0, ceil(cols/16))
  const T* values = nullptr;         // host, 256 * ntiles
};
using MaskedMatrix = MaskedMatrixT<float>;
using MaskedMatrixBf16 = MaskedMatrixT<uint16_t>;

// How many of row n's stored positions (the columns below w.cols of its panel's stored tiles) have
// flags[k] != 0: the stored_count of propagate_nonfinite for a masked weight.
template <typename T>
int64_t masked_stored_flags(const MaskedMatrixT<T>& w, int64_t n, const unsigned char* flags) {
  const int64_t panel = n / MaskedCpuConfig::kTileN;
  int64_t count = 0;
  for (int64_t t = w.tile_ptr[panel]; t < w.tile_ptr[panel + 1]; ++t) {
    const int64_t k0 = int64_t{w.tile_idx[t]} * MaskedCpuConfig::kTileK;
    const int64_t k1 = k0 + MaskedCpuConfig::kTileK < w.cols ? k0 + MaskedCpuConfig::kTileK : w.cols;
    for (int64_t k = k0; k < k1; ++k) count += flags[k];
  }
  return count;
}

// Structural check of tile_ptr and tile_idx (monotonic, in range, strictly increasing per
// panel). O(panels + ntiles). Throws std::invalid_argument naming the first violation.
void masked_validate(const MaskedMatrix& w);

// Y (N x P) = W (N x K) X (K x P) + bias (N floats, host, or nullptr), for any strides of X and Y
// (see DenseIn / DenseOut): linear passes x (P, K) row-major, conv a (K, P) patch matrix.
// Skipped tiles cost nothing; NaN/Inf in X propagate exactly as in the dense product. Uses up to
// num_threads OpenMP threads. Y must not overlap X or W. Throws std::invalid_argument on sizes
// that do not match.
void masked_matmul(const MaskedMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                   int num_threads);

// Y = W X + bias with bfloat16 W, X, bias and Y: float32 products and sums, one
// round-to-nearest-even conversion of each output (the contract of csr_matmul_bf16). X and Y
// are converted to/from float32 in scratch of the calling thread; the tiles stay bfloat16 in
// memory (512 instead of 1024 bytes each). Under Isa::kAmx, from kAmxMinCols columns:
// masked_matmul_bf16_amx; under Isa::kAvx512Bf16, from kDotMinCols: masked_matmul_bf16_dot (below).
void masked_matmul_bf16(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                        const DenseOutBf16& y, int num_threads);

// The AMX path of masked_matmul_bf16 (masked_matmul_amx.cpp), taken when the active ISA is kAmx
// and X has at least kAmxMinCols columns. The tile unit multiplies 16x16 bfloat16 tiles into
// float32 accumulator tiles (TDPBF16PS): products exact, sums in float32 in the unit's own order,
// one rounding of each output as on the other paths. Like every AMX bfloat16 product (oneDNN's,
// so torch's dense one on this CPU), it reads subnormal bfloat16 inputs as zero and flushes
// subnormal float32 sums to zero (DAZ/FTZ). Arguments as masked_matmul_bf16, already checked.
void masked_matmul_bf16_amx(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                            const DenseOutBf16& y, int num_threads);

// The AVX512-BF16 path of masked_matmul_bf16 (masked_matmul_amx.cpp), taken when the active ISA is
// kAvx512Bf16 and X has at least kDotMinCols columns: the AMX path's driver and layouts, multiplied
// by VDPBF16PS (common/amx_bf16.h's DotUnit), with the same numerics (DAZ/FTZ included).
void masked_matmul_bf16_dot(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                            const DenseOutBf16& y, int num_threads);

// One micro-kernel call: a 16-row panel times one packed block of mr columns of X, over `count`
// consecutive stored tiles of the panel. The packed block holds X(k, p0 + i) at xp[k * mr + i]
// for k in [0, 16 * ceil(K/16)) (zeros past K). The 16 x mr result goes to acc[16 i + r] (row r,
// column i; 64-byte aligned), replacing or, with accumulate, adding to what acc holds.
template <typename T>
struct MaskedBlockT {
  const T* tiles = nullptr;        // count tiles of 256 values
  const int32_t* tidx = nullptr;   // their k-tile indices
  int64_t count = 0;
  const float* xp = nullptr;
  int mr = 0;                      // 1 .. the ISA's kMr
  float* acc = nullptr;            // 16 * mr floats
  bool accumulate = false;
};

// The wide micro-kernel (AVX-512, large P): rows 8 half .. 8 half + 7 of a panel times a packed
// block of 16 nv columns (X(k, p0 + i) at xp[k * 16 nv + i], zero past P and past K), over
// `count` stored tiles. Row r of the result goes to acc[r * ld .. r * ld + 16 nv) (64-byte
// aligned), replacing or, with accumulate, adding to it.
template <typename T>
struct MaskedWideBlockT {
  const T* tiles = nullptr;
  const int32_t* tidx = nullptr;
  int64_t count = 0;
  const float* xp = nullptr;
  int nv = 0;                      // 1 .. kNvAvx512
  int half = 0;                    // 0: rows 0..7, 1: rows 8..15
  float* acc = nullptr;            // row 0 of the panel; this call writes its half
  int64_t ld = 0;                  // floats between rows of acc, a multiple of 16
  bool accumulate = false;
};

// conv2d (any stride) of the contiguous (images, C, h, w) float32 input x with the masked (out,
// C*kh*kw) matrix of a conv weight, as an implicit GEMM (masked_conv2d_cpu.cpp, geometry and layout
// as common/conv_geometry.h): the wide micro-kernel reads each stored tile's 16 rows of X from a
// padded copy of x through a table of offsets (masked_wide_conv_avx512, masked_block_conv_avx2),
// so no im2col matrix is built. y is the contiguous (images, out, ho, wo) output; bias may be
// nullptr. values_bf16, when given, holds w's values as bfloat16 (a bfloat16 conv run on float32
// copies of x, the values and the bias): under Isa::kAvx512Bf16 the wide kernel then multiplies k
// pairs of them on VDPBF16PS (masked_wide_conv_dot: products exact, float32 sums in pairs,
// subnormal inputs read as zero, as the other VDPBF16PS and AMX paths).
enum class MaskedConvStatus : int {
  kDone = 0,         // y written
  kNonfinite = 1,    // x holds a NaN/Inf (skipped tiles would drop 0 * Inf = NaN): y unspecified
  kUnavailable = 2,  // neither the AVX-512 nor the AVX2 kernels are in use here: y untouched
};
MaskedConvStatus masked_conv2d(const MaskedMatrix& w, const ConvGeometry& g, const float* x, const float* bias,
                               float* y, int num_threads, const uint16_t* values_bf16 = nullptr);

// One kernel per ISA (masked_matmul_{cpu,avx2,avx512}.cpp); masked_matmul picks one. Each is
// instantiated for T = float and T = uint16_t (bfloat16 bits).
template <typename T> using MaskedBlockFn = void (*)(const MaskedBlockT<T>& b);
template <typename T> void masked_block_scalar(const MaskedBlockT<T>& b);
template <typename T> void masked_block_avx2(const MaskedBlockT<T>& b);
template <typename T> void masked_block_avx512(const MaskedBlockT<T>& b);
template <typename T> void masked_wide_avx512(const MaskedWideBlockT<T>& b);
// The kernels of masked_conv2d: row k of k-tile t's x at b.xp + offsets[16 t + k] (a padded conv
// input, unaligned) instead of the packed block.
void masked_wide_conv_avx512(const MaskedWideBlockT<float>& b, const int32_t* offsets);
// The same on VDPBF16PS over bfloat16 tiles (masked_conv2d_dot.cpp, AMX builds only), x float32.
void masked_wide_conv_dot(const MaskedWideBlockT<uint16_t>& b, const int32_t* offsets);
void masked_block_conv_avx2(const MaskedBlockT<float>& b, const int32_t* offsets);

// Writes a finished accumulator tile to Y: Y(r, p) = y[r * sn + p * sp] for r < rows, p < cols
// becomes acc[16 p + r] + bias[r] (bias may be nullptr), or with accumulate, Y(r, p) + acc[16 p + r].
using MaskedStoreFn = void (*)(const float* acc, int64_t cols, int rows, const float* bias,
                               bool accumulate, float* y, int64_t sn, int64_t sp);
void masked_store_scalar(const float* acc, int64_t cols, int rows, const float* bias,
                         bool accumulate, float* y, int64_t sn, int64_t sp);
void masked_store_avx512(const float* acc, int64_t cols, int rows, const float* bias,
                         bool accumulate, float* y, int64_t sn, int64_t sp);
// The same for a wide accumulator tile: row r, column p at acc[r * ld + p].
void masked_store_wide_avx512(const float* acc, int64_t ld, int64_t cols, int rows,
                              const float* bias, bool accumulate, float* y, int64_t sn, int64_t sp);

// Packs rows [k0, k1) of X's columns [p0, p0 + width) into dst: X(k, p0 + i) at dst[k * ld + i],
// zeros at i in [width, ld). Returns the largest IEEE exponent field among the packed values
// (0x7f800000: a NaN or Inf), so non-finite inputs are found without a second pass over x.
using MaskedPackFn = uint32_t (*)(const DenseIn& x, int64_t p0, int width, int ld, int64_t k0,
                                  int64_t k1, float* dst);
uint32_t masked_pack_scalar(const DenseIn& x, int64_t p0, int width, int ld, int64_t k0, int64_t k1,
                            float* dst);
uint32_t masked_pack_avx512(const DenseIn& x, int64_t p0, int width, int ld, int64_t k0, int64_t k1,
                            float* dst);

}  // namespace pyhwp
