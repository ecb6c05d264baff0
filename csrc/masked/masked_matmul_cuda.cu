// Masked dense matmul on NVIDIA GPUs with all-zero 16x16 tiles of W skipped: tensor cores
// (mma.sync m16n8k16, ldmatrix, cp.async pipeline) for float16/bfloat16, a SIMT kernel for
// float32. Both compute C (M x Ng) = A (M x K) B (K x Ng) in one of two forms:
//   linear form: A = X^T (rows p, k contiguous), B = W (rows n, k contiguous), C(p, n) = Y(n, p)
//   conv form:   A = W, B = X (rows k, p contiguous), C(n, p) = Y(n, p)
// so that x is read in place in both of its usual layouts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "common/checks.h"
#include "common/dtype_cuda.cuh"
#include "common/cuda_check.h"
#include "common/dense_cuda.cuh"
#include "common/mma_sm80.cuh"
#include "masked/masked_matmul.h"
#include "masked/masked_matmul_cuda.h"

namespace pyhwp {

namespace {

using Cfg = MaskedCudaConfig;
static_assert(MaskedCpuConfig::kTileN == Cfg::kTile && MaskedCpuConfig::kTileK == Cfg::kTile,
              "tile storage (MaskedWeight) is read in place: its tiles are the flag tiles");
using cuda::from_float;
using cuda::nonfinite;
using cuda::to_float;
using cuda::chunk_bytes16;
using cuda::cp_async16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;
using cuda::ldmatrix_x4;
using cuda::ldmatrix_x4_trans;
using cuda::mma16816;
using cuda::smem_u32;

// Operands of one launch, by value. Element type erased; the kernels cast.
struct GemmArgs {
  int64_t M = 0, Ng = 0, K = 0;
  const void* a = nullptr;  // A(m, k) at a[m * a_sm + k * a_sk]
  int64_t a_sm = 0, a_sk = 1;
  const void* b = nullptr;  // B(k, n) at b[k * b_sk + n * b_sn]
  int64_t b_sk = 0, b_sn = 0;
  bool w_is_a = false;      // conv form: W is A (rows m), else W is B (rows n)
  int64_t w_rows = 0;       // N
  const uint8_t* flags = nullptr;
  const int32_t* tile_map = nullptr;  // tile storage (MaskedCudaWeight::tile_map): W is read from
                                      // its tiles, flags unused; else W is dense
  int64_t flag_cols = 0;    // ceil(K / 16)
  const void* bias = nullptr;  // indexed by W's row
  void* c = nullptr;        // C(m, n) at c[m * c_sm + n * c_sn]
  int64_t c_sm = 0, c_sn = 0;
  bool pair_store = false;  // c_sn == 1, c_sm even, c 4-byte aligned: store column pairs as one word
};

// Where W's tiles are described: dense flags, the tile map, or whichever g holds (SIMT kernel).
enum class TileSource { kFlags, kMap, kRuntime };

// Whether W's 16x16 tile (fr, fc) may hold non-zeros (flag set, or a stored tile).
template <TileSource kSrc>
__device__ __forceinline__ bool tile_present(const GemmArgs& g, int64_t fr, int64_t fc) {
  const bool map = kSrc == TileSource::kMap || (kSrc == TileSource::kRuntime && g.tile_map);
  return map ? g.tile_map[fr * g.flag_cols + fc] >= 0 : g.flags[fr * g.flag_cols + fc] != 0;
}

// Lists, in order, the k-steps in [win, wend) (of kStepK columns each) where some 16x16 flag of
// the W rows [w0, w0 + w_count) is non-zero. Every thread of the block must call it; returns the
// count, the steps sit in steps[0, count). Ends with a barrier.
template <int kThreads, int kStepK, TileSource kSrc>
__device__ int list_active_steps(const GemmArgs& g, int64_t w0, int w_count, int64_t win,
                                 int64_t wend, int* steps, int* warp_tot, int* total) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kThreads / 32;
  const int64_t flag_rows = (g.w_rows + Cfg::kTile - 1) / Cfg::kTile;
  const int64_t fr0 = w0 / Cfg::kTile;
  const int64_t fr1_raw = (w0 + w_count + Cfg::kTile - 1) / Cfg::kTile;
  const int64_t fr1 = fr1_raw < flag_rows ? fr1_raw : flag_rows;
  if (tid == 0) *total = 0;
  __syncthreads();
  for (int64_t base = win; base < wend; base += kThreads) {
    const int64_t s = base + tid;
    bool act = false;
    if (s < wend) {
      const int64_t fc0 = s * kStepK / Cfg::kTile;
      const int64_t fc1_raw = (s * kStepK + kStepK + Cfg::kTile - 1) / Cfg::kTile;
      const int64_t fc1 = fc1_raw < g.flag_cols ? fc1_raw : g.flag_cols;
      for (int64_t fr = fr0; fr < fr1 && !act; ++fr)
        for (int64_t fc = fc0; fc < fc1; ++fc) act |= tile_present<kSrc>(g, fr, fc);
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, act);
    if (lane == 0) warp_tot[warp] = __popc(ballot);
    __syncthreads();
    int off = *total;
    for (int w = 0; w < warp; ++w) off += warp_tot[w];
    if (act) steps[off + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(s);
    __syncthreads();
    if (tid == 0) {
      int sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_tot[w];
      *total += sum;
    }
    __syncthreads();
  }
  return *total;
}

// -- tensor-core kernel (float16 / bfloat16) ----------------------------------------------

// Shared-memory layouts (16-byte chunks of 8 elements, XOR-swizzled so that both the cp.async
// writes and the ldmatrix reads of 8 rows hit 8 distinct bank groups):
//   k-contiguous tile [rows][kMmaK]: 4 chunks per 64-byte row, chunk c at c ^ ((row >> 1) & 3)
//   n-contiguous tile [kMmaK][BN]:   BN/8 chunks per row,    chunk c at c ^ (row & 7)
__device__ __forceinline__ int swz_k(int row, int chunk) { return row * Cfg::kMmaK + ((chunk ^ ((row >> 1) & 3)) << 3); }
template <int BN>
__device__ __forceinline__ int swz_n(int row, int chunk) { return row * BN + ((chunk ^ (row & 7)) << 3); }

template <int BM, int BN, int kWarpsM, int kWarpsN>
struct MmaShape {
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kWarpTileM = BM / kWarpsM, kWarpTileN = BN / kWarpsN;
  static constexpr int kMi = kWarpTileM / 16;  // m16 fragments per warp
  static constexpr int kNj = kWarpTileN / 16;  // ldmatrix.x4 loads of B per k16 (2 n8 each)
  static constexpr int kSmemBytes = Cfg::kStages * (BM + BN) * Cfg::kMmaK * 2;
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 16 == 0, "warp tiles are whole m16 x n16 blocks");
  static_assert(BN % 64 == 0, "n-contiguous rows hold >= 8 chunks for the swizzle");
};

// Block (blockIdx.x, blockIdx.y) computes C[BM*bx : +BM, BN*by : +BN]. kConv: conv form (B is
// n-contiguous, read with ldmatrix.trans), else linear form (B k-contiguous). kTiled: W comes
// from its stored tiles (g.tile_map), which are n-contiguous: W's operand (A in the conv form, B
// in the linear form) is then staged [kMmaK][rows of W] n-contiguous like the conv form's X and
// read with ldmatrix.trans; a tile that is not stored is zero-filled.
template <typename T, int BM, int BN, int kWarpsM, int kWarpsN, bool kConv, bool kTiled>
__global__ void __launch_bounds__(kWarpsM * kWarpsN * 32)
    masked_mma_kernel(const GemmArgs g) {
  using S = MmaShape<BM, BN, kWarpsM, kWarpsN>;
  constexpr int BK = Cfg::kMmaK, kStages = Cfg::kStages, kThreads = S::kThreads;
  static_assert(!kTiled || (kConv ? BM : BN) % 64 == 0, "n-contiguous W rows hold >= 8 chunks for the swizzle");
  static_assert(BK == 2 * Cfg::kTile, "a k-step spans two tile columns (load_w_tiles)");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + kStages * BM * BK;
  __shared__ int s_steps[Cfg::kStepWindow];
  __shared__ int s_warp_tot[kThreads / 32];
  __shared__ int s_total;

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b);
  const T* W_tiles = kConv ? A : B;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;

  float acc[S::kMi][2 * S::kNj][4];
#pragma unroll
  for (int i = 0; i < S::kMi; ++i)
#pragma unroll
    for (int j = 0; j < 2 * S::kNj; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Tile storage: the (16 k) x (16 W rows) tiles of k-step `step` for the W rows [w0, w0 + BW)
  // into dst, laid out [BK][BW] (row = k within the step, swz_n). A 512-byte tile is 16 rows
  // of 2 chunks; consecutive threads take consecutive chunks, so a warp reads one whole tile.
  auto load_w_tiles = [&](auto bw_tag, T* dst, int64_t w0, int64_t step) {
    constexpr int BW = decltype(bw_tag)::value;
    const int64_t flag_rows = (g.w_rows + Cfg::kTile - 1) / Cfg::kTile;
#pragma unroll
    for (int c = tid; c < BW * 4; c += kThreads) {
      const int half = c & 1, kr = (c >> 1) & (BK - 1), panel = c / (2 * BK);
      const int64_t fr = w0 / Cfg::kTile + panel, fc = step * (BK / Cfg::kTile) + kr / Cfg::kTile;
      const int32_t t = fr < flag_rows && fc < g.flag_cols ? g.tile_map[fr * g.flag_cols + fc] : -1;
      // A tile that is not stored is zero-filled from a valid dummy address (the map itself:
      // values may be empty).
      const T* src = t >= 0 ? W_tiles + static_cast<int64_t>(t) * (Cfg::kTile * Cfg::kTile) +
                                  (kr % Cfg::kTile) * Cfg::kTile + half * 8
                            : reinterpret_cast<const T*>(g.tile_map);
      cp_async16(smem_u32(dst + swz_n<BW>(kr, panel * 2 + half)), src, t >= 0 ? 16 : 0);
    }
  };

  // Issues the cp.async copies of k-step `step` into pipeline buffer `buf`.
  auto load_stage = [&](int buf, int64_t step) {
    const int64_t k0 = step * BK;
    T* a_dst = sA + buf * BM * BK;
    if constexpr (kTiled && kConv) {
      load_w_tiles(std::integral_constant<int, BM>{}, a_dst, m0, step);
    } else {
#pragma unroll
      for (int c = tid; c < BM * 4; c += kThreads) {
        const int row = c >> 2, ch = c & 3;
        const int64_t gm = m0 + row, gk = k0 + ch * 8;
        const int bytes = chunk_bytes16(gm < g.M, g.K - gk);
        cp_async16(smem_u32(a_dst + swz_k(row, ch)), bytes ? A + gm * g.a_sm + gk : A, bytes);
      }
    }
    T* b_dst = sB + buf * BN * BK;
    if constexpr (kTiled && !kConv) {
      load_w_tiles(std::integral_constant<int, BN>{}, b_dst, n0, step);
    } else if constexpr (kConv) {
      constexpr int kChunks = BN / 8;
#pragma unroll
      for (int c = tid; c < BK * kChunks; c += kThreads) {
        const int row = c / kChunks, ch = c % kChunks;
        const int64_t gk = k0 + row, gn = n0 + ch * 8;
        const int bytes = chunk_bytes16(gk < g.K, g.Ng - gn);
        cp_async16(smem_u32(b_dst + swz_n<BN>(row, ch)), bytes ? B + gk * g.b_sk + gn : B, bytes);
      }
    } else {
#pragma unroll
      for (int c = tid; c < BN * 4; c += kThreads) {
        const int row = c >> 2, ch = c & 3;
        const int64_t gn = n0 + row, gk = k0 + ch * 8;
        const int bytes = chunk_bytes16(gn < g.Ng, g.K - gk);
        cp_async16(smem_u32(b_dst + swz_k(row, ch)), bytes ? B + gn * g.b_sn + gk : B, bytes);
      }
    }
  };

  // Two k16 halves of a k-step from pipeline buffer `buf`: ldmatrix fragments, then the MMAs.
  auto compute_stage = [&](int buf) {
    const T* a_src = sA + buf * BM * BK;
    const T* b_src = sB + buf * BN * BK;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[S::kMi][4];
      uint32_t bf[2 * S::kNj][2];
#pragma unroll
      for (int mi = 0; mi < S::kMi; ++mi) {
        if constexpr (kTiled && kConv) {
          // A stored [k][m]: matrices (m 0-7 | 8-15) x (k 0-7 | 8-15) in a0..a3 order, each
          // transposed so lane (g, t) gets row m = g, columns k = 2t, 2t + 1.
          const int krow = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int ch = (warp_m * S::kWarpTileM + mi * 16) / 8 + ((lane >> 3) & 1);
          ldmatrix_x4_trans(af[mi], smem_u32(a_src + swz_n<BM>(krow, ch)));
        } else {
          const int row = warp_m * S::kWarpTileM + mi * 16 + (lane & 15);
          ldmatrix_x4(af[mi], smem_u32(a_src + swz_k(row, ks * 2 + (lane >> 4))));
        }
      }
#pragma unroll
      for (int nj = 0; nj < S::kNj; ++nj) {
        uint32_t r[4];
        if constexpr (kConv || kTiled) {
          const int krow = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int ch = (warp_n * S::kWarpTileN + nj * 16) / 8 + (lane >> 4);
          ldmatrix_x4_trans(r, smem_u32(b_src + swz_n<BN>(krow, ch)));
        } else {
          const int row = warp_n * S::kWarpTileN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(r, smem_u32(b_src + swz_k(row, ks * 2 + ((lane >> 3) & 1))));
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
        for (int nb = 0; nb < 2 * S::kNj; ++nb) mma16816<T>(acc[mi][nb], af[mi], bf[nb][0], bf[nb][1]);
    }
  };

  const int64_t nsteps = (g.K + BK - 1) / BK;
  const int64_t w0 = kConv ? m0 : n0;
  for (int64_t win = 0; win < nsteps; win += Cfg::kStepWindow) {
    const int64_t wend = win + Cfg::kStepWindow < nsteps ? win + Cfg::kStepWindow : nsteps;
    constexpr TileSource kSrc = kTiled ? TileSource::kMap : TileSource::kFlags;
    const int nact = list_active_steps<kThreads, BK, kSrc>(g, w0, kConv ? BM : BN, win, wend, s_steps,
                                                           s_warp_tot, &s_total);
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < nact) load_stage(st, s_steps[st]);
      cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
    }
    for (int i = 0; i < nact; ++i) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage i landed for all threads; stage i-1's buffer is free
      const int nxt = i + kStages - 1;
      if (nxt < nact) load_stage(nxt % kStages, s_steps[nxt]);
      cp_async_commit();
      compute_stage(i % kStages);
    }
    cp_async_wait<0>();
    __syncthreads();  // buffers and the step list are reused by the next window
  }

  // Epilogue: C fragment (m16 x n8): c0, c1 at row lane/4, columns 2*(lane%4) + {0, 1};
  // c2, c3 eight rows below.
  const T* bias = static_cast<const T*>(g.bias);
  T* C = static_cast<T*>(g.c);
#pragma unroll
  for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
    for (int nb = 0; nb < 2 * S::kNj; ++nb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t gm = m0 + warp_m * S::kWarpTileM + mi * 16 + (lane >> 2) + h * 8;
        const int64_t gn = n0 + warp_n * S::kWarpTileN + nb * 8 + (lane & 3) * 2;
        if (gm >= g.M || gn >= g.Ng) continue;
        float v0 = acc[mi][nb][2 * h], v1 = acc[mi][nb][2 * h + 1];
        if (bias) {
          if (kConv) {
            const float b = to_float(bias[gm]);
            v0 += b;
            v1 += b;
          } else {
            v0 += to_float(bias[gn]);
            if (gn + 1 < g.Ng) v1 += to_float(bias[gn + 1]);
          }
        }
        T* out = C + gm * g.c_sm + gn * g.c_sn;
        if (g.pair_store && gn + 1 < g.Ng) {
          *reinterpret_cast<uint32_t*>(out) = cuda::pack2<T>(v0, v1);
        } else {
          out[0] = from_float<T>(v0);
          if (gn + 1 < g.Ng) out[g.c_sn] = from_float<T>(v1);
        }
      }
}

// -- SIMT kernel (float32) -----------------------------------------------------------------
// 256 threads as 16 x 16; thread (tx, ty) owns rows ty*TM.. and columns tx*TN.. of the block
// tile. A and B are staged k-major in shared memory (double buffered, filled from registers so
// that any strides coalesce: each operand is read along whichever of its strides is 1).
template <int BM, int BN>
__global__ void __launch_bounds__(256) masked_simt_kernel(const GemmArgs g) {
  constexpr int BK = Cfg::kSimtK, TM = BM / 16, TN = BN / 16;
  constexpr int kPad = 4;
  constexpr int kALoads = BM * BK / 256, kBLoads = BN * BK / 256;
  static_assert(TM % 4 == 0 && TN % 4 == 0, "thread tiles are read as float4");
  static_assert(BM * BK % 256 == 0 && BN * BK % 256 == 0, "tiles split evenly over 256 threads");
  __shared__ __align__(16) float sA[2][BK][BM + kPad];
  __shared__ __align__(16) float sB[2][BK][BN + kPad];
  __shared__ int s_steps[Cfg::kStepWindow];
  __shared__ int s_warp_tot[8];
  __shared__ int s_total;

  const float* A = static_cast<const float*>(g.a);
  const float* B = static_cast<const float*>(g.b);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  // Tile storage keeps 16 rows of W contiguous: read W's operand rows-fastest.
  const bool tiled = g.tile_map != nullptr;
  const bool a_k_fast = tiled && g.w_is_a ? false : g.a_sk <= g.a_sm;
  const bool b_k_fast = tiled && !g.w_is_a ? false : g.b_sk <= g.b_sn;
  // W(n, k) from its stored tile (0 where the tile is not stored); n < N, k < K.
  auto w_tiled = [&](const float* tiles, int64_t n, int64_t k) {
    const int32_t t = g.tile_map[(n / Cfg::kTile) * g.flag_cols + k / Cfg::kTile];
    return t < 0 ? 0.f : __ldg(tiles + static_cast<int64_t>(t) * (Cfg::kTile * Cfg::kTile) +
                                   (k % Cfg::kTile) * Cfg::kTile + n % Cfg::kTile);
  };

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  float ra[kALoads], rb[kBLoads];

  // Element q of a tile of R rows x BK: (row, k) with k fastest across threads when that
  // dimension has stride 1 in global memory, rows fastest otherwise.
  auto load_regs = [&](int64_t step) {
    const int64_t k0 = step * BK;
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      const int q = i * 256 + tid;
      const int r = a_k_fast ? q / BK : q % BM, k = a_k_fast ? q % BK : q / BM;
      const int64_t gm = m0 + r, gk = k0 + k;
      ra[i] = gm < g.M && gk < g.K ? (tiled && g.w_is_a ? w_tiled(A, gm, gk) : __ldg(A + gm * g.a_sm + gk * g.a_sk))
                                   : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      const int q = i * 256 + tid;
      const int r = b_k_fast ? q / BK : q % BN, k = b_k_fast ? q % BK : q / BN;
      const int64_t gn = n0 + r, gk = k0 + k;
      rb[i] = gn < g.Ng && gk < g.K ? (tiled && !g.w_is_a ? w_tiled(B, gn, gk) : __ldg(B + gk * g.b_sk + gn * g.b_sn))
                                    : 0.f;
    }
  };
  auto store_smem = [&](int buf) {
#pragma unroll
    for (int i = 0; i < kALoads; ++i) {
      const int q = i * 256 + tid;
      const int r = a_k_fast ? q / BK : q % BM, k = a_k_fast ? q % BK : q / BM;
      sA[buf][k][r] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < kBLoads; ++i) {
      const int q = i * 256 + tid;
      const int r = b_k_fast ? q / BK : q % BN, k = b_k_fast ? q % BK : q / BN;
      sB[buf][k][r] = rb[i];
    }
  };
  auto compute = [&](int buf) {
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&sA[buf][k][ty * TM + i]);
        a[i] = v.x, a[i + 1] = v.y, a[i + 2] = v.z, a[i + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < TN; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&sB[buf][k][tx * TN + j]);
        b[j] = v.x, b[j + 1] = v.y, b[j + 2] = v.z, b[j + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  };

  const int64_t nsteps = (g.K + BK - 1) / BK;
  const int64_t w0 = g.w_is_a ? m0 : n0;
  for (int64_t win = 0; win < nsteps; win += Cfg::kStepWindow) {
    const int64_t wend = win + Cfg::kStepWindow < nsteps ? win + Cfg::kStepWindow : nsteps;
    const int nact = list_active_steps<256, BK, TileSource::kRuntime>(g, w0, g.w_is_a ? BM : BN, win, wend,
                                                                      s_steps, s_warp_tot, &s_total);
    if (nact == 0) continue;
    load_regs(s_steps[0]);
    store_smem(0);
    __syncthreads();
    for (int i = 0; i < nact; ++i) {
      if (i + 1 < nact) load_regs(s_steps[i + 1]);  // global loads in flight during the FMAs
      compute(i & 1);
      if (i + 1 < nact) store_smem((i + 1) & 1);
      __syncthreads();
    }
  }

  const float* bias = static_cast<const float*>(g.bias);
  float* C = static_cast<float*>(g.c);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + ty * TM + i;
    if (gm >= g.M) continue;
    const float bm = bias && g.w_is_a ? bias[gm] : 0.f;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tx * TN + j;
      if (gn >= g.Ng) continue;
      const float b = bias && !g.w_is_a ? bias[gn] : bm;
      C[gm * g.c_sm + gn * g.c_sn] = acc[i][j] + b;
    }
  }
}

// -- non-finite propagation ------------------------------------------------------------------
// Dense y = W x is NaN at (n, p) when a non-finite X(k, p) meets W(n, k) == 0. Inside computed
// tiles the products 0 * Inf happen for real; a tile flagged zero may have been skipped, so for
// every (16-row tile row, p) with a non-finite value in column p, rows whose flagged-zero tiles
// cover such a k get NaN. Returns at once when the scan found X all finite.
template <typename T>
__global__ void __launch_bounds__(256)
    masked_nonfinite_kernel(const int* __restrict__ record, int64_t N, int64_t K, int64_t P,
                            const uint8_t* __restrict__ flags, const int32_t* __restrict__ tile_map,
                            int64_t flag_cols, const T* __restrict__ x, int64_t sk, int64_t sp, T* __restrict__ y,
                            int64_t ysn, int64_t ysp) {
  if (record[0] == 0) return;
  const int* count = record + 1;
  const int64_t flag_rows = (N + Cfg::kTile - 1) / Cfg::kTile;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < flag_rows * P; i += stride) {
    const int64_t tr = i / P, p = i % P;
    if (count[p] == 0) continue;
    bool hit = false;
    for (int64_t kt = 0; kt < flag_cols && !hit; ++kt) {
      if (tile_map ? tile_map[tr * flag_cols + kt] >= 0 : flags[tr * flag_cols + kt] != 0) continue;
      const int64_t k1 = (kt + 1) * Cfg::kTile < K ? (kt + 1) * Cfg::kTile : K;
      for (int64_t k = kt * Cfg::kTile; k < k1; ++k)
        if (nonfinite(to_float(x[k * sk + p * sp]))) {
          hit = true;
          break;
        }
    }
    if (!hit) continue;
    const int64_t n1 = (tr + 1) * Cfg::kTile < N ? (tr + 1) * Cfg::kTile : N;
    for (int64_t n = tr * Cfg::kTile; n < n1; ++n) y[n * ysn + p * ysp] = from_float<T>(__int_as_float(0x7fc00000));
  }
}

// -- planning and launch -------------------------------------------------------------------

struct Plan {
  bool simt = false;
  bool conv_form = false;
  bool x_direct = true, w_direct = true;
  int64_t ldk = 0;  // row stride of the padded copies (elements)
  size_t off_x = 0, off_w = 0, bytes = 0;
};

Plan make_plan(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x) {
  Plan pl;
  const int64_t K = x.rows, P = x.cols, N = w.rows;
  size_t off = cuda::nonfinite_record_bytes(P);
  if (dtype == DType::kFloat32) {
    pl.simt = true;
    pl.conv_form = x.stride_p == 1 && x.stride_k != 1;
  } else {
    pl.ldk = cuda::round_up(K, 8);
    pl.w_direct = w.tile_map != nullptr || (w.ld % 8 == 0 && cuda::aligned16(w.values));
    const bool x_ok = cuda::aligned16(x.data);
    if (x.stride_k == 1 && x.stride_p % 8 == 0 && x_ok) {
      pl.conv_form = false;
    } else if (x.stride_p == 1 && x.stride_k % 8 == 0 && x_ok) {
      pl.conv_form = true;
    } else {
      pl.conv_form = false;  // copy x into the linear form: (P, ldk) rows, k contiguous
      pl.x_direct = false;
      pl.off_x = off;
      off += static_cast<size_t>(cuda::round_up(P * pl.ldk * 2, 256));
    }
    if (!pl.w_direct) {
      pl.off_w = off;
      off += static_cast<size_t>(cuda::round_up(N * pl.ldk * 2, 256));
    }
  }
  pl.bytes = off;
  return pl;
}

template <typename T, int BM, int BN, int kWarpsM, int kWarpsN, bool kConv, bool kTiled>
void launch_mma(const GemmArgs& g, cudaStream_t s) {
  using S = MmaShape<BM, BN, kWarpsM, kWarpsN>;
  auto kernel = masked_mma_kernel<T, BM, BN, kWarpsM, kWarpsN, kConv, kTiled>;
  PYHWP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes));
  const int64_t gx = (g.M + BM - 1) / BM, gy = (g.Ng + BN - 1) / BN;
  PYHWP_CHECK(gx <= INT32_MAX && gy <= 65535, "masked_matmul_cuda: ", g.M, " x ", g.Ng, " output exceeds the launch grid");
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), S::kThreads, S::kSmemBytes, s>>>(g);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

template <int BM, int BN>
void launch_simt(const GemmArgs& g, cudaStream_t s) {
  const int64_t gx = (g.M + BM - 1) / BM, gy = (g.Ng + BN - 1) / BN;
  PYHWP_CHECK(gx <= INT32_MAX && gy <= 65535, "masked_matmul_cuda: ", g.M, " x ", g.Ng, " output exceeds the launch grid");
  masked_simt_kernel<BM, BN><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), 256, 0, s>>>(g);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

// The big tile when it still gives every multiprocessor at least one block.
bool use_big_tile(int64_t M, int64_t Ng, int bm, int bn) {
  return ((M + bm - 1) / bm) * ((Ng + bn - 1) / bn) >= cuda::device_sm_count();
}

template <typename T>
void run(const MaskedCudaWeight& w, const DeviceDenseIn& xv, const T* bias, const DeviceDenseOut& yv,
         const Plan& pl, char* ws, cudaStream_t s) {
  const int64_t K = xv.rows, P = xv.cols, N = yv.rows;
  const T* x = static_cast<const T*>(xv.data);
  T* y = static_cast<T*>(yv.data);
  int* record = reinterpret_cast<int*>(ws);
  PYHWP_CUDA_CHECK(cudaMemsetAsync(record, 0, sizeof(int) * static_cast<size_t>(P + 1), s));

  const T* xa = x;  // x as read by the GEMM
  int64_t x_sk = xv.stride_k, x_sp = xv.stride_p;
  if (pl.x_direct) {
    cuda::scan_nonfinite(x, K, P, x_sk, x_sp, record, s);
  } else {
    T* xw = reinterpret_cast<T*>(ws + pl.off_x);
    cuda::copy2d<T, true>(x, x_sk, x_sp, xw, 1, pl.ldk, K, P, record, s);
    xa = xw;
    x_sk = 1;
    x_sp = pl.ldk;
  }
  const T* wv = static_cast<const T*>(w.values);
  int64_t ldw = w.ld;
  if (!pl.w_direct) {
    T* ww = reinterpret_cast<T*>(ws + pl.off_w);
    cuda::copy2d<T, false>(wv, w.ld, 1, ww, pl.ldk, 1, N, K, nullptr, s);
    wv = ww;
    ldw = pl.ldk;
  }

  GemmArgs g;
  g.K = K;
  g.w_rows = N;
  g.flags = w.tile_flags;
  g.tile_map = w.tile_map;
  g.flag_cols = (K + Cfg::kTile - 1) / Cfg::kTile;
  g.bias = bias;
  g.c = y;
  g.w_is_a = pl.conv_form;
  if (pl.conv_form) {  // C(n, p) = W(n, :) . X(:, p)
    g.M = N, g.Ng = P;
    g.a = wv, g.a_sm = ldw, g.a_sk = 1;
    g.b = xa, g.b_sk = x_sk, g.b_sn = x_sp;
    g.c_sm = yv.stride_n, g.c_sn = yv.stride_p;
  } else {  // C(p, n) = X(:, p) . W(n, :)
    g.M = P, g.Ng = N;
    g.a = xa, g.a_sm = x_sp, g.a_sk = x_sk;
    g.b = wv, g.b_sk = 1, g.b_sn = ldw;
    g.c_sm = yv.stride_p, g.c_sn = yv.stride_n;
  }
  g.pair_store = g.c_sn == 1 && g.c_sm % 2 == 0 && (reinterpret_cast<uintptr_t>(y) & 3u) == 0;

  if constexpr (sizeof(T) == 4) {
    if (use_big_tile(g.M, g.Ng, 128, 128)) launch_simt<128, 128>(g, s);
    else launch_simt<64, 64>(g, s);
  } else {
    const bool big = use_big_tile(g.M, g.Ng, Cfg::kBigM, Cfg::kBigN);
    const auto go = [&](auto conv, auto tiled) {
      constexpr bool kC = decltype(conv)::value, kT = decltype(tiled)::value;
      if (big) launch_mma<T, Cfg::kBigM, Cfg::kBigN, 2, 4, kC, kT>(g, s);
      else launch_mma<T, Cfg::kSmallM, Cfg::kSmallN, 2, 2, kC, kT>(g, s);
    };
    using On = std::true_type;
    using Off = std::false_type;
    if (g.tile_map) {
      if (pl.conv_form) go(On{}, On{});
      else go(Off{}, On{});
    } else {
      if (pl.conv_form) go(On{}, Off{});
      else go(Off{}, Off{});
    }
  }

  const int64_t work = ((N + Cfg::kTile - 1) / Cfg::kTile) * P;
  masked_nonfinite_kernel<T><<<cuda::capped_grid((work + 255) / 256, 2), 256, 0, s>>>(
      record, N, K, P, w.tile_flags, w.tile_map, g.flag_cols, x, xv.stride_k, xv.stride_p, y, yv.stride_n,
      yv.stride_p);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

void check_args(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x, const DeviceDenseOut& y) {
  check_gemm_sizes("masked_matmul_cuda", dtype, w.rows, w.cols, x, y);
  PYHWP_CHECK(w.tile_map || w.ld >= w.cols || w.rows <= 1, "masked_matmul_cuda: values row stride ", w.ld,
              " is below the ", w.cols, " columns");
}

}  // namespace

size_t masked_matmul_cuda_workspace(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x,
                                    const DeviceDenseOut& y) {
  check_args(w, dtype, x, y);
  return make_plan(w, dtype, x).bytes;
}

void masked_matmul_cuda(const MaskedCudaWeight& w, DType dtype, const DeviceDenseIn& x,
                        const void* bias, const DeviceDenseOut& y, void* workspace,
                        size_t workspace_bytes, void* stream) {
  check_args(w, dtype, x, y);
  const Plan pl = make_plan(w, dtype, x);
  if (w.rows == 0 || x.cols == 0) return;
  PYHWP_CHECK(y.data != nullptr, "masked_matmul_cuda: null y");
  // Tile storage of an all-zero weight stores no tile: values may then be empty (null).
  PYHWP_CHECK(x.rows == 0 || (x.data && (w.tile_map || (w.values && w.tile_flags))),
              "masked_matmul_cuda: null x, values or tile_flags / tile_map");
  PYHWP_CHECK(x.rows == 0 || !w.tile_map || cuda::aligned16(w.values),
              "masked_matmul_cuda: stored tiles must be 16-byte aligned");
  check_workspace("masked_matmul_cuda", workspace, workspace_bytes, pl.bytes);
  char* ws = static_cast<char*>(workspace);
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run<T>(w, x, static_cast<const T*>(bias), y, pl, ws, s);
  });
}

}  // namespace pyhwp
