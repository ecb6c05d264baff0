// CPU masked matmul: validation, packing of x, the one ISA dispatch point, the loop nest and the
// portable scalar kernel. The float32 and bfloat16 entry points share one driver (run_masked).
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/checks.h"
#include "common/cpu_features.h"
#include "masked/masked_matmul.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCpuConfig;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int MR, typename T>
void block_scalar(const MaskedBlockT<T>& b) {
  float c[MR][Cfg::kTileN] = {};
  const T* w = b.tiles;
  for (int64_t j = 0; j < b.count; ++j, w += Cfg::kTileSize) {
    const float* xt = b.xp + static_cast<int64_t>(b.tidx[j]) * (Cfg::kTileK * MR);
    for (int k = 0; k < Cfg::kTileK; ++k) {
      for (int i = 0; i < MR; ++i) {
        const float xv = xt[k * MR + i];
        for (int r = 0; r < Cfg::kTileN; ++r) c[i][r] += to_float(w[Cfg::kTileN * k + r]) * xv;
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* out = b.acc + Cfg::kTileN * i;
    for (int r = 0; r < Cfg::kTileN; ++r) out[r] = c[i][r] + (b.accumulate ? out[r] : 0.f);
  }
}

template <typename T, int... I>
constexpr std::array<MaskedBlockFn<T>, sizeof...(I)> scalar_table(std::integer_sequence<int, I...>) {
  return {&block_scalar<I + 1, T>...};
}

template <typename T>
constexpr auto kScalarBlocks = scalar_table<T>(std::make_integer_sequence<int, Cfg::kMrScalar>{});

template <typename T>
struct IsaKernel {
  MaskedBlockFn<T> fn;
  MaskedPackFn pack;
  MaskedStoreFn store;
  int mr_max;
  void (*wide)(const MaskedWideBlockT<T>&) = nullptr;  // the large-P kernel, where the ISA has one
  void (*store_wide)(const float*, int64_t, int64_t, int, const float*, bool, float*, int64_t,
                     int64_t) = nullptr;
};

// The one ISA dispatch of this op. AVX2 packs and stores with the portable code: its blocks are 6
// wide, too narrow for register transposes to pay.
template <typename T>
IsaKernel<T> pick(Isa isa) {
  switch (isa) {
#ifdef PYHWP_X86_KERNELS
    case Isa::kAvx512:
      return {masked_block_avx512<T>, masked_pack_avx512, masked_store_avx512, Cfg::kMrAvx512,
              masked_wide_avx512<T>, masked_store_wide_avx512};
    case Isa::kAvx2: return {masked_block_avx2<T>, masked_pack_scalar, masked_store_scalar, Cfg::kMrAvx2};
#endif
    default: return {masked_block_scalar<T>, masked_pack_scalar, masked_store_scalar, Cfg::kMrScalar};
  }
}

inline uint32_t exponent(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits & 0x7f800000u;
}

}  // namespace

void masked_store_scalar(const float* acc, int64_t cols, int rows, const float* bias,
                         bool accumulate, float* y, int64_t sn, int64_t sp) {
  float b[Cfg::kTileN] = {};
  if (bias) std::copy(bias, bias + rows, b);
  if (sn == 1) {
    for (int64_t p = 0; p < cols; ++p) {
      float* out = y + p * sp;
      const float* a = acc + p * Cfg::kTileN;
      if (accumulate) {
        for (int r = 0; r < rows; ++r) out[r] += a[r];
      } else {
        for (int r = 0; r < rows; ++r) out[r] = a[r] + b[r];
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    float* out = y + r * sn;
    if (accumulate) {
      for (int64_t p = 0; p < cols; ++p) out[p * sp] += acc[p * Cfg::kTileN + r];
    } else {
      for (int64_t p = 0; p < cols; ++p) out[p * sp] = acc[p * Cfg::kTileN + r] + b[r];
    }
  }
}

template <typename T>
void masked_block_scalar(const MaskedBlockT<T>& b) { kScalarBlocks<T>[b.mr - 1](b); }
template void masked_block_scalar(const MaskedBlockT<float>&);
template void masked_block_scalar(const MaskedBlockT<uint16_t>&);

uint32_t masked_pack_scalar(const DenseIn& x, int64_t p0, int width, int ld, int64_t k0, int64_t k1,
                            float* dst) {
  uint32_t worst = 0;
  if (x.stride_k == 1 && x.stride_p != 1) {
    // Linear layout: each batch row is contiguous in k; read rows, write the transpose.
    for (int i = 0; i < width; ++i) {
      const float* src = x.data + (p0 + i) * x.stride_p;
      for (int64_t k = k0; k < k1; ++k) worst = std::max(worst, exponent(src[k]));
      for (int64_t k = k0; k < k1; ++k) dst[k * ld + i] = src[k];
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      const float* src = x.data + k * x.stride_k + p0 * x.stride_p;
      for (int i = 0; i < width; ++i) {
        dst[k * ld + i] = src[i * x.stride_p];
        worst = std::max(worst, exponent(src[i * x.stride_p]));
      }
    }
  }
  for (int64_t k = k0; k < k1; ++k) std::fill(dst + k * ld + width, dst + (k + 1) * ld, 0.f);
  return worst;
}

void masked_validate(const MaskedMatrix& w) {
  PYHWP_CHECK(w.rows >= 0 && w.cols >= 0 && w.ntiles >= 0, "masked: sizes must be non-negative");
  const int64_t npanels = ceil_div(w.rows, Cfg::kTileN), ktiles = ceil_div(w.cols, Cfg::kTileK);
  PYHWP_CHECK(ktiles <= INT32_MAX, "masked: ", ktiles, " k-tiles do not fit int32 tile indices");
  PYHWP_CHECK(w.tile_ptr != nullptr, "masked: tile_ptr is null");
  PYHWP_CHECK(w.ntiles == 0 || (w.tile_idx && w.values), "masked: tile_idx or values are null");
  PYHWP_CHECK(w.tile_ptr[0] == 0, "masked: tile_ptr[0] is ", w.tile_ptr[0], ", expected 0");
  for (int64_t j = 0; j < npanels; ++j) {
    PYHWP_CHECK(w.tile_ptr[j + 1] >= w.tile_ptr[j], "masked: tile_ptr decreases at panel ", j);
  }
  PYHWP_CHECK(w.tile_ptr[npanels] == w.ntiles, "masked: tile_ptr[-1] is ", w.tile_ptr[npanels],
              ", expected the number of tiles ", w.ntiles);
  for (int64_t j = 0; j < npanels; ++j) {
    for (int64_t t = w.tile_ptr[j]; t < w.tile_ptr[j + 1]; ++t) {
      const int32_t c = w.tile_idx[t];
      PYHWP_CHECK(c >= 0 && c < ktiles, "masked: tile index ", c, " at position ", t,
                  " is outside [0, ", ktiles, ")");
      PYHWP_CHECK(t == w.tile_ptr[j] || c > w.tile_idx[t - 1], "masked: tile indices of panel ",
                  j, " are not strictly increasing at position ", t);
    }
  }
}

namespace {

template <typename T>
void check_args(const MaskedMatrixT<T>& w, int64_t x_rows, int64_t x_cols, int64_t y_rows, int64_t y_cols,
                int num_threads, const char* op) {
  PYHWP_CHECK(x_rows == w.cols, op, ": x has ", x_rows, " rows, W has ", w.cols, " columns");
  PYHWP_CHECK(y_rows == w.rows && y_cols == x_cols, op, ": y is ", y_rows, "x", y_cols, ", expected ",
              w.rows, "x", x_cols);
  PYHWP_CHECK(num_threads >= 1, op, ": num_threads must be >= 1");
  PYHWP_CHECK(w.tile_ptr && (w.ntiles == 0 || (w.tile_idx && w.values)), op, ": null tile array");
  PYHWP_CHECK(w.tile_ptr[ceil_div(w.rows, Cfg::kTileN)] == w.ntiles, op, ": tile_ptr[-1] != ntiles");
}

// The driver: float32 X, bias and Y (any strides); T-valued tiles. Uses scratch slots 2 and 3.
template <typename T>
void run_masked(const MaskedMatrixT<T>& w, const DenseIn& x, const float* bias, const DenseOut& y,
                int num_threads) {
  const int64_t N = w.rows, K = w.cols, P = x.cols;
  const int64_t npanels = ceil_div(N, Cfg::kTileN), ktiles = ceil_div(K, Cfg::kTileK);

  const IsaKernel<T> isa = pick<T>(vector_isa());
  const int64_t kp = ktiles * Cfg::kTileK;  // packed rows of x, zero past K
  // Columns are split into p-blocks of (nearly) equal width, one register block each. Narrow
  // blocks are 1..mr_max columns: 128 columns on AVX-512 make 5 blocks of 26 or 24, not 4 of 28 and
  // one of 16. Wide blocks are 1..kNvAvx512 vectors of 16 columns, zero-padded past P.
  const bool wide = isa.wide != nullptr && P >= Cfg::kWideMinP;
  int64_t nblocks, step;  // step: columns between block starts (the widest block)
  if (wide) {
    const int64_t nvec = ceil_div(P, 16);
    nblocks = ceil_div(nvec, Cfg::kNvAvx512);
    step = 16 * ceil_div(nvec, nblocks);
  } else {
    nblocks = ceil_div(P, isa.mr_max);
    step = ceil_div(P, nblocks);
  }
  // Packed width of block bi: its columns, rounded up to whole vectors in the wide layout.
  auto block_ld = [&](int64_t bi) {
    const int64_t width = std::min(step, P - bi * step);
    return wide ? 16 * ceil_div(width, 16) : width;
  };
  // Work items are (panel, group of p-blocks); split p only when panels are too few to share.
  const int nt = w.ntiles * Cfg::kTileSize * P < Cfg::kSerialWork ? 1 : num_threads;
  const int64_t want_items = nt > 1 ? nt * Cfg::kItemsPerThread : 1;
  const int64_t groups0 = npanels >= want_items ? 1 : std::min(nblocks, ceil_div(want_items, npanels));
  const int64_t blocks_per_group = ceil_div(nblocks, groups0);
  const int64_t groups = ceil_div(nblocks, blocks_per_group);
  const int64_t group_cols = std::min(P, blocks_per_group * step);
  const int64_t acc_ld = 16 * ceil_div(blocks_per_group * step, 16);  // wide accumulator rows
  const int64_t chunk_tiles =
      std::max<int64_t>(1, Cfg::kXChunkBytes / (group_cols * Cfg::kTileK * int64_t{sizeof(float)}));
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(ktiles, chunk_tiles));
  // Tiles per replay group: a single block (or row half) streams its tiles once, no need to cut.
  const int64_t sub_tiles = wide ? Cfg::kWideGroupTiles
                                 : blocks_per_group > 1 ? Cfg::kWGroupTiles : INT64_MAX;

  // With one item per panel, each thread takes a fixed contiguous run of panels, balanced by their
  // tiles (+1 for the store), the same run in every chunk and on every call: its weights, output
  // rows and accumulators then stay in its own L2 from call to call, where guided scheduling sent
  // a panel to either core (1536x384, batch 128, 75% zero tiles, 2 threads: 192 -> 161 us).
  const bool fixed = groups == 1 && nt > 1;
  std::vector<int64_t> runs;
  if (fixed) balanced_runs(w.tile_ptr, npanels, 1, nt, &runs);
  float* xp = scratch(2, nblocks * step * kp + 16);
  constexpr int64_t kPackRows = 256;
  const int64_t pack_units = nblocks * std::max<int64_t>(1, ceil_div(kp, kPackRows));
  uint32_t worst = 0;  // largest exponent field in x: all ones means NaN or Inf somewhere

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static) reduction(max : worst)
    for (int64_t u = 0; u < pack_units; ++u) {
      const int64_t bi = u % nblocks, k0 = (u / nblocks) * kPackRows;
      const int64_t p0 = bi * step;
      const int width = static_cast<int>(std::min(step, P - p0));
      const int ld = static_cast<int>(block_ld(bi));
      float* dst = xp + bi * step * kp;
      const int64_t k1 = std::min(kp, k0 + kPackRows);
      worst = std::max(worst, isa.pack(x, p0, width, ld, k0, std::min(K, k1), dst));
      for (int64_t k = std::max(k0, K); k < k1; ++k) std::fill(dst + k * ld, dst + (k + 1) * ld, 0.f);
    }

    // Each item accumulates its 16 x group_cols outputs in a contiguous thread-local tile (narrow:
    // [p][16], wide: [16][acc_ld]; L1-resident) and writes y once per chunk: y's own rows lie N
    // floats apart, so replaying partial sums there would touch P lines that share one L1 set.
    float* acc = scratch(3, wide ? 16 * acc_ld : group_cols * Cfg::kTileN);
    for (int64_t c = 0; c < nchunks; ++c) {
      const int32_t kt0 = static_cast<int32_t>(c * chunk_tiles);
      const int32_t kt1 = static_cast<int32_t>(std::min(ktiles, (c + 1) * chunk_tiles));
      auto run_item = [&](int64_t item) {
        const int64_t panel = item / groups, g = item % groups;
        const int32_t* first = w.tile_idx + w.tile_ptr[panel];
        const int32_t* last = w.tile_idx + w.tile_ptr[panel + 1];
        const int64_t t0 = std::lower_bound(first, last, kt0) - w.tile_idx;
        const int64_t t1 = std::lower_bound(first, last, kt1) - w.tile_idx;
        if (c > 0 && t0 == t1) return;
        const int64_t n0 = panel * Cfg::kTileN;
        const int64_t b0 = g * blocks_per_group, b1 = std::min(nblocks, b0 + blocks_per_group);
        const int64_t p0 = b0 * step, cols = std::min(P, b1 * step) - p0;
        // A panel without tiles in the first chunk still runs once over zero tiles: its bias.
        int64_t s = t0;
        do {
          const int64_t count = std::min(sub_tiles, t1 - s);
          for (int64_t bi = b0; bi < b1; ++bi) {
            if (wide) {
              MaskedWideBlockT<T> blk;
              blk.tiles = w.values + s * Cfg::kTileSize;
              blk.tidx = w.tile_idx + s;
              blk.count = count;
              blk.xp = xp + bi * step * kp;
              blk.nv = static_cast<int>(block_ld(bi) / 16);
              blk.acc = acc + (bi - b0) * step;
              blk.ld = acc_ld;
              blk.accumulate = s > t0;
              for (blk.half = 0; blk.half < 2; ++blk.half) isa.wide(blk);
            } else {
              MaskedBlockT<T> blk;
              blk.tiles = w.values + s * Cfg::kTileSize;
              blk.tidx = w.tile_idx + s;
              blk.count = count;
              blk.mr = static_cast<int>(block_ld(bi));
              blk.xp = xp + bi * step * kp;
              blk.acc = acc + (bi - b0) * step * Cfg::kTileN;
              blk.accumulate = s > t0;
              isa.fn(blk);
            }
          }
          s += count;
        } while (s < t1);
        const int rows = static_cast<int>(std::min<int64_t>(Cfg::kTileN, N - n0));
        const float* b = bias && c == 0 ? bias + n0 : nullptr;
        float* yt = y.data + n0 * y.stride_n + p0 * y.stride_p;
        if (wide) {
          isa.store_wide(acc, acc_ld, cols, rows, b, c > 0, yt, y.stride_n, y.stride_p);
        } else {
          isa.store(acc, cols, rows, b, c > 0, yt, y.stride_n, y.stride_p);
        }
      };
      if (fixed && omp_get_num_threads() == nt) {  // (a runtime that gave fewer threads: guided)
        const int t = omp_get_thread_num();
        for (int64_t item = runs[t]; item < runs[t + 1]; ++item) run_item(item);
      } else {
#pragma omp for schedule(guided)
        for (int64_t item = 0; item < npanels * groups; ++item) run_item(item);
      }
    }
  }

  if (worst == 0x7f800000u) {
    // Stored tiles multiply every x in their 16 columns (a kept or pruned zero times Inf is NaN
    // there as in dense); skipped tiles are what propagate_nonfinite has to make up for.
    propagate_nonfinite(x, y, [&](int64_t n, const unsigned char* flags) {
      return masked_stored_flags(w, n, flags);
    });
  }
}

}  // namespace

void masked_matmul(const MaskedMatrix& w, const DenseIn& x, const float* bias, const DenseOut& y,
                   int num_threads) {
  check_args(w, x.rows, x.cols, y.rows, y.cols, num_threads, "masked_matmul");
  if (w.rows == 0 || x.cols == 0) return;
  PYHWP_CHECK(y.data && (w.cols == 0 || x.data), "masked_matmul: null x or y");
  run_masked(w, x, bias, y, num_threads);
}

void masked_matmul_bf16(const MaskedMatrixBf16& w, const DenseInBf16& x, const uint16_t* bias,
                        const DenseOutBf16& y, int num_threads) {
  check_args(w, x.rows, x.cols, y.rows, y.cols, num_threads, "masked_matmul_bf16");
  const int64_t N = w.rows, K = w.cols, P = x.cols;
  if (N == 0 || P == 0) return;
  PYHWP_CHECK(y.data && (K == 0 || x.data), "masked_matmul_bf16: null x or y");
#ifdef PYHWP_AMX_KERNELS
  if (active_isa() == Isa::kAmx && P >= Cfg::kAmxMinCols) {
    masked_matmul_bf16_amx(w, x, bias, y, num_threads);
    return;
  }
  if (active_isa() == Isa::kAvx512Bf16 && P >= Cfg::kDotMinCols) {
    masked_matmul_bf16_dot(w, x, bias, y, num_threads);
    return;
  }
#endif
  // X widened in its own layout (the packing reads both fast); the driver uses slots 2 and 3.
  const bool k_rows = x.stride_k == 1 && x.stride_p != 1;
  const int64_t ld = k_rows ? K : P;
  const DenseIn xf = widen_bf16(x, k_rows, ld, scratch(0, (k_rows ? P : K) * ld + 16), num_threads);
  float* yf = scratch(1, N * P + N + 16);
  const DenseOut yv = float_like(y, yf);
  run_masked(w, xf, widen_bf16(bias, N, yf + N * P), yv, num_threads);
  round_to_bf16(yv, y, num_threads);
}

}  // namespace pyhwp
