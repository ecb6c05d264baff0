// 2:4 sparse x dense matmul on sparse tensor cores: mma.sp.m16n8k32 (float16 / bfloat16, float32
// accumulation) fed by ldmatrix from a cp.async pipeline. W is always the sparse A operand (its
// rows are the instruction's m), X the dense B operand (its columns p are the instruction's n8),
// so C(n, p) = Y(n, p) and batches of 1-8 columns fill one n8 tile without padding. X is read in
// place in either of its usual layouts:
//   linear form: X(k, p) at x[p * x_sp + k] (x of a linear layer, k contiguous) -> ldmatrix
//   conv form:   X(k, p) at x[k * x_sk + p] (a conv patch matrix, p contiguous) -> ldmatrix.trans
// Anything else is first copied into the linear form in the workspace.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_check.h"
#include "common/dense_cuda.cuh"
#include "common/dtype_cuda.cuh"
#include "common/mma_sm80.cuh"
#include "sparse24/sparse24_matmul_cuda.h"

namespace pyhwp {

namespace {

using Cfg = Sparse24CudaConfig;
using cuda::from_float;
using cuda::nonfinite;
using cuda::to_float;

// A metadata word that is valid for mma.sp (every group: positions 0 and 1). Stored in place of
// the rows of a W tile beyond N: zero-filled metadata (0b0000 per group) is undefined behaviour
// for the instruction (PTX ISA 9.7.14.6.1), even for rows whose results are never stored.
constexpr uint32_t kPadMeta = 0x44444444u;

// Operands of one launch, by value. Element type erased; the kernels cast.
struct Args {
  int64_t N = 0, P = 0, K = 0;
  int64_t words = 0;          // Kp / 32: meta words per row, also the number of mma k-substeps
  int64_t steps = 0;          // ceil(Kp / kStepK)
  int64_t steps_per_split = 0;
  const void* values = nullptr;  // W values, row stride Kp / 2 elements
  const uint32_t* meta = nullptr;  // row stride `words`
  const void* x = nullptr;
  int64_t x_sk = 0, x_sp = 0;  // linear form: x_sk == 1; conv form: x_sp == 1
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t y_sn = 0, y_sp = 0;
  bool pair_store = false;  // y_sp == 1, y_sn even, y 4-byte aligned: store column pairs as one word
  float* partial = nullptr;  // split-K: float32 partial sums [split][N][P] (no bias), else nullptr
  int* counts = nullptr;     // non-finite X(k, p) per [split][P] over the split's k range
};

// Exponent fields of two packed 16-bit floats: a half is NaN/Inf exactly when its field is all ones.
template <typename T>
constexpr uint32_t kExpMask2 = std::is_same_v<T, __half> ? 0x7c007c00u : 0x7f807f80u;

// How many non-finite X(k, p) sit at row n's stored positions (both slots of every group, k < K):
// the tensor cores multiply exactly these. The dense product is NaN at (n, p) when the column
// holds more non-finite inputs than that (0 * Inf at a position the row does not store).
template <typename T>
__device__ __forceinline__ int stored_nonfinite(const uint32_t* __restrict__ meta, int64_t words, int64_t K,
                                                const T* __restrict__ x, int64_t sk, int64_t sp, int64_t n,
                                                int64_t p) {
  int seen = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t m = meta[n * words + w];
    for (int j = 0; j < 16; ++j) {
      const int64_t k = 32 * w + 4 * (j >> 1) + ((m >> (2 * j)) & 3u);
      if (k < K && nonfinite(to_float(x[k * sk + p * sp]))) ++seen;
    }
  }
  return seen;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <int BM, int BN, int kWarpsM, int kWarpsN>
struct Shape {
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kWarpTileM = BM / kWarpsM, kWarpTileN = BN / kWarpsN;
  static constexpr int kMi = kWarpTileM / 16;  // m16 tiles per warp
  static constexpr int kNj = kWarpTileN / 8;   // n8 tiles per warp
  // Per stage: W values BM x 32 (64 bytes a row), meta BM x 2 words, X BN x kStepK.
  static constexpr int kAElems = BM * (Cfg::kStepK / 2);
  static constexpr int kMetaWords = BM * (Cfg::kStepK / Cfg::kMmaK);
  static constexpr int kBElems = BN * Cfg::kStepK;
  static constexpr int kStageBytes = kAElems * 2 + kMetaWords * 4 + kBElems * 2;
  static constexpr int kSmemBytes = Cfg::kStages * kStageBytes;
  static constexpr int kBChunks = BN / 8;  // 16-byte chunks per X row of the conv form
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 8 == 0, "warp tiles are whole m16 x n8 blocks");
  static_assert((kAElems * 2) % 16 == 0 && (kMetaWords * 4) % 16 == 0 && kStageBytes % 16 == 0,
                "every stage part starts 16-byte aligned (cp.async, ldmatrix)");
  static_assert(kBChunks >= 1 && (kBChunks & (kBChunks - 1)) == 0, "X rows are a power of two of chunks");
};

// Shared-memory layouts, in elements, of 16-byte chunks (8 elements) XOR-swizzled so that the
// 8 row addresses of one ldmatrix matrix fall in 8 distinct bank groups:
//   W values [BM][32]:      4 chunks a row, chunk c at c ^ ((row >> 1) & 3)
//   X linear [BN][64]:      8 chunks a row, chunk c at c ^ (row & 7)
//   X conv   [64][BN]:      C = BN / 8 chunks a row, chunk c at c ^ s(row), s spreading 8
//                           consecutive rows over 8 bank groups (rows of C chunks: 8 / C per 128 B)
__device__ __forceinline__ int swz_a(int row, int chunk) { return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3); }
__device__ __forceinline__ int swz_bl(int row, int chunk) { return row * 64 + ((chunk ^ (row & 7)) << 3); }
template <int C>
__device__ __forceinline__ int swz_bc(int row, int chunk) {
  const int s = C >= 8 ? (row & 7) : ((row * C / 8) & (C - 1));
  return row * (C * 8) + ((chunk ^ s) << 3);
}

// Block (x, y, z) computes Y[BM*x : +BM, BN*y : +BN] over the k-steps of split z.
// Blocks per SM asked of the register allocator (<= 128 registers a thread either way): what the
// shared memory allows, 2 of the 256-thread 128x128 tile, 4 of the 128-thread tiles (the split-K
// heuristic aims at 4 decode blocks per SM). Without the hint the 128x128 conv-form kernel took
// 153-156 registers once the non-finite count was added (1 block per SM).
template <typename T, int BM, int BN, int kWarpsM, int kWarpsN, bool kConv>
__global__ void __launch_bounds__(kWarpsM * kWarpsN * 32, kWarpsM * kWarpsN * 32 >= 256 ? 2 : 4)
    sparse24_mma_kernel(const Args g) {
  using S = Shape<BM, BN, kWarpsM, kWarpsN>;
  constexpr int kStages = Cfg::kStages, kThreads = S::kThreads;
  constexpr int kSub = Cfg::kStepK / Cfg::kMmaK;  // mma k-substeps per stage (2)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // s_bad[c]: non-finite X(k, p0 + c) over this block's k range, counted from each landed stage
  // in shared memory (every loaded X element exactly once), so NaN/Inf propagation needs no scan
  // of X. Only blocks of grid column 0 count (the others load the same X): they publish it as
  // counts[z][p] for the split-K reduce or the non-finite kernel, which patch the outputs.
  __shared__ int s_bad[BN];

  const T* V = static_cast<const T*>(g.values);
  const T* X = static_cast<const T*>(g.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, p0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t ldv = g.words * 16;  // Kp / 2
  const int64_t s_begin = static_cast<int64_t>(blockIdx.z) * g.steps_per_split;
  const int64_t s_end_raw = s_begin + g.steps_per_split;
  const int nsteps = static_cast<int>((s_end_raw < g.steps ? s_end_raw : g.steps) - s_begin);
  const bool counting = blockIdx.x == 0;  // block-uniform
  for (int i = tid; i < BN; i += kThreads) s_bad[i] = 0;  // published by the loop's first barrier

  auto stage_a = [&](int buf) { return reinterpret_cast<T*>(smem_raw + buf * S::kStageBytes); };
  auto stage_meta = [&](int buf) {
    return reinterpret_cast<uint32_t*>(smem_raw + buf * S::kStageBytes + S::kAElems * 2);
  };
  auto stage_b = [&](int buf) {
    return reinterpret_cast<T*>(smem_raw + buf * S::kStageBytes + S::kAElems * 2 + S::kMetaWords * 4);
  };

  float acc[S::kMi][S::kNj][4];
#pragma unroll
  for (int i = 0; i < S::kMi; ++i)
#pragma unroll
    for (int j = 0; j < S::kNj; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Counts the non-finite X elements of buffer `buf` (landed) into s_bad: one 16-byte chunk per
  // thread at a time, in storage order (conflict-free). Padding is zero-filled, so finite.
  // Linear form: a chunk is 8 inputs of one column (its row). Conv form: 8 columns of one input,
  // stored at chunk position ch ^ s(row) of the row, so column = 8 (position ^ s(row)) + i.
  auto count_stage = [&](int buf) {
    const uint4* b_src = reinterpret_cast<const uint4*>(stage_b(buf));
#pragma unroll 1
    for (int c = tid; c < BN * 8; c += kThreads) {
      const uint4 v = b_src[c];
      const uint32_t hit = __vcmpeq2(v.x & kExpMask2<T>, kExpMask2<T>) | __vcmpeq2(v.y & kExpMask2<T>, kExpMask2<T>) |
                           __vcmpeq2(v.z & kExpMask2<T>, kExpMask2<T>) | __vcmpeq2(v.w & kExpMask2<T>, kExpMask2<T>);
      if (hit == 0) continue;  // the normal case
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t h = (words[i >> 1] >> (16 * (i & 1))) & 0xffffu;
        if ((h & (kExpMask2<T> & 0xffffu)) != (kExpMask2<T> & 0xffffu)) continue;
        int col;
        if constexpr (kConv) {
          constexpr int C = S::kBChunks;
          const int row = c / C, pos = c % C;
          const int sw = C >= 8 ? (row & 7) : ((row * C / 8) & (C - 1));
          col = ((pos ^ sw) << 3) + i;
        } else {
          col = c >> 3;
        }
        atomicAdd(&s_bad[col], 1);
      }
    }
  };

  // Issues the copies of k-step `step` (inputs [64 step, 64 step + 64)) into buffer `buf`.
  auto load_stage = [&](int buf, int64_t step) {
    T* a_dst = stage_a(buf);
    const int64_t c0 = step * (Cfg::kStepK / 2);  // first compressed column of the step
#pragma unroll
    for (int c = tid; c < BM * 4; c += kThreads) {
      const int row = c >> 2, ch = c & 3;
      const int64_t gn = n0 + row, gc = c0 + ch * 8;
      const bool ok = gn < g.N && gc < ldv;  // ldv is a multiple of 16: chunks are all in or out
      cuda::cp_async16(cuda::smem_u32(a_dst + swz_a(row, ch)), ok ? V + gn * ldv + gc : V, ok ? 16 : 0);
    }
    uint32_t* m_dst = stage_meta(buf);
#pragma unroll
    for (int c = tid; c < BM * kSub; c += kThreads) {
      const int row = c / kSub, w = c % kSub;
      const int64_t gn = n0 + row, gw = step * kSub + w;
      if (gn < g.N && gw < g.words) cuda::cp_async4(cuda::smem_u32(m_dst + c), g.meta + gn * g.words + gw);
      else m_dst[c] = kPadMeta;
    }
    T* b_dst = stage_b(buf);
    const int64_t k0 = step * Cfg::kStepK;
    if constexpr (kConv) {
      constexpr int C = S::kBChunks;
#pragma unroll
      for (int c = tid; c < Cfg::kStepK * C; c += kThreads) {
        const int row = c / C, ch = c % C;
        const int64_t gk = k0 + row, gp = p0 + ch * 8;
        const int bytes = cuda::chunk_bytes16(gk < g.K, g.P - gp);
        cuda::cp_async16(cuda::smem_u32(b_dst + swz_bc<C>(row, ch)), bytes ? X + gk * g.x_sk + gp : X, bytes);
      }
    } else {
#pragma unroll
      for (int c = tid; c < BN * 8; c += kThreads) {
        const int row = c >> 3, ch = c & 7;
        const int64_t gp = p0 + row, gk = k0 + ch * 8;
        const int bytes = cuda::chunk_bytes16(gp < g.P, g.K - gk);
        cuda::cp_async16(cuda::smem_u32(b_dst + swz_bl(row, ch)), bytes ? X + gp * g.x_sp + gk : X, bytes);
      }
    }
  };

  // The mma k-substeps of buffer `buf` (k-step `step`). Fragment layouts: PTX ISA 9.7.14.6.2.2.
  //   A (compressed 16 x 16 of a 16 x 32 tile): a0,a1 row g, compressed columns 2t, 2t+1;
  //     a2,a3 row g+8; a4..a7 the same 8 columns on (g = lane/4, t = lane%4). That is the dense
  //     m16n8k16 A fragment of the compressed tile: one ldmatrix.x4 over (rows 0-7 | 8-15) x
  //     (columns 0-7 | 8-15).
  //   B (32 x 8): register j holds k = 8j + 2t, 8j + 2t + 1 of column g: ldmatrix.x4 over the
  //     four 8 x 8 k-blocks (non-transposed from the p-major linear form, .trans from conv).
  //   Metadata (Figure 122; CUTLASS's ColumnMajorInterleaved<2> reorder builds the same words):
  //     with selector 0, thread 4g holds row g's groups 0-3 (inputs 0-15) in bits 0-15 and row
  //     g+8's groups 0-3 in bits 16-31; thread 4g+1 holds groups 4-7 (inputs 16-31) of the same
  //     rows. Each of our meta words is one row's 8 groups, groups 0-3 in its low half, so the
  //     register is two 16-bit halves of the words of rows g and g+8 (one byte permute).
  auto compute_stage = [&](int buf, int64_t step) {
    const T* a_src = stage_a(buf);
    const uint32_t* m_src = stage_meta(buf);
    const T* b_src = stage_b(buf);
    const uint32_t half_sel = (lane & 1) ? 0x7632u : 0x5410u;
#pragma unroll
    for (int ks = 0; ks < kSub; ++ks) {
      if (step * kSub + ks >= g.words) break;  // the last step of a K with Kp % 64 == 32
      uint32_t af[S::kMi][4], ef[S::kMi];
      uint32_t bf[S::kNj][4];
#pragma unroll
      for (int mi = 0; mi < S::kMi; ++mi) {
        const int r0 = warp_m * S::kWarpTileM + mi * 16;
        cuda::ldmatrix_x4(af[mi], cuda::smem_u32(a_src + swz_a(r0 + (lane & 15), ks * 2 + (lane >> 4))));
        const uint32_t lo = m_src[(r0 + (lane >> 2)) * kSub + ks];
        const uint32_t hi = m_src[(r0 + (lane >> 2) + 8) * kSub + ks];
        ef[mi] = __byte_perm(lo, hi, half_sel);
      }
#pragma unroll
      for (int nj = 0; nj < S::kNj; ++nj) {
        const int c0 = warp_n * S::kWarpTileN + nj * 8;
        if constexpr (kConv) {
          const int krow = ks * 32 + ((lane >> 3) << 3) + (lane & 7);
          cuda::ldmatrix_x4_trans(bf[nj], cuda::smem_u32(b_src + swz_bc<S::kBChunks>(krow, c0 >> 3)));
        } else {
          cuda::ldmatrix_x4(bf[nj], cuda::smem_u32(b_src + swz_bl(c0 + (lane & 7), ks * 4 + (lane >> 3))));
        }
      }
#pragma unroll
      for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
        for (int nj = 0; nj < S::kNj; ++nj) cuda::mma_sp16832<T>(acc[mi][nj], af[mi], bf[nj], ef[mi]);
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nsteps) load_stage(st, s_begin + st);
    cuda::cp_async_commit();
  }
  for (int i = 0; i < nsteps; ++i) {
    cuda::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; buffer (i - 1) % kStages is free
    const int nxt = i + kStages - 1;
    if (nxt < nsteps) load_stage(nxt % kStages, s_begin + nxt);
    cuda::cp_async_commit();
    if (counting) count_stage(i % kStages);
    compute_stage(i % kStages, s_begin + i);
  }
  cuda::cp_async_wait<0>();
  __syncthreads();  // s_bad is complete
  if (counting) {
    for (int i = tid; i < BN; i += kThreads)
      if (p0 + i < g.P) g.counts[static_cast<int64_t>(blockIdx.z) * g.P + p0 + i] = s_bad[i];
  }

  // Epilogue. Accumulator fragment (m16 x n8, PTX ISA 9.7.14.5.8): c0, c1 at row g, columns
  // 2t, 2t+1; c2, c3 eight rows below.
  const T* bias = static_cast<const T*>(g.bias);
  T* Y = static_cast<T*>(g.y);
#pragma unroll
  for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
    for (int nj = 0; nj < S::kNj; ++nj)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t gn = n0 + warp_m * S::kWarpTileM + mi * 16 + (lane >> 2) + h * 8;
        const int64_t gp = p0 + warp_n * S::kWarpTileN + nj * 8 + (lane & 3) * 2;
        if (gn >= g.N || gp >= g.P) continue;
        float v0 = acc[mi][nj][2 * h], v1 = acc[mi][nj][2 * h + 1];
        const bool two = gp + 1 < g.P;
        if (g.partial) {
          float* out = g.partial + (static_cast<int64_t>(blockIdx.z) * g.N + gn) * g.P + gp;
          out[0] = v0;
          if (two) out[1] = v1;
          continue;
        }
        if (bias) {
          const float b = to_float(bias[gn]);
          v0 += b;
          v1 += b;
        }
        T* out = Y + gn * g.y_sn + gp * g.y_sp;
        if (g.pair_store && two) {
          *reinterpret_cast<uint32_t*>(out) = cuda::pack2<T>(v0, v1);
        } else {
          out[0] = from_float<T>(v0);
          if (two) out[g.y_sp] = from_float<T>(v1);
        }
      }
}

// Y(n, p) = bias(n) + the sum of the split-K partials, in split order; NaN where the column's
// non-finite inputs (summed over the splits' counts) are not all at row n's stored positions.
template <typename T>
__global__ void __launch_bounds__(256) sparse24_reduce_kernel(const Args g, int splits) {
  const int64_t N = g.N, P = g.P, total = N * P, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T* bias = static_cast<const T*>(g.bias);
  T* y = static_cast<T*>(g.y);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t n = i / P, p = i % P;
    float s = 0.f;
    int need = 0;
    for (int z = 0; z < splits; ++z) {
      s += g.partial[z * total + i];
      need += g.counts[z * P + p];
    }
    if (need && stored_nonfinite(g.meta, g.words, g.K, static_cast<const T*>(g.x), g.x_sk, g.x_sp, n, p) < need)
      s = quiet_nan();
    if (bias) s += to_float(bias[n]);
    y[n * g.y_sn + p * g.y_sp] = from_float<T>(s);
  }
}

// Without split-K: Y(n, p) becomes NaN where column p's non-finite inputs are not all at row n's
// stored positions. Every thread returns after one load of counts[p] when X is finite.
template <typename T>
__global__ void __launch_bounds__(256) sparse24_nonfinite_kernel(const Args g) {
  const int64_t N = g.N, P = g.P, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T* y = static_cast<T*>(g.y);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * P; i += stride) {
    const int64_t n = i / P, p = i % P;
    const int need = g.counts[p];
    if (need && stored_nonfinite(g.meta, g.words, g.K, static_cast<const T*>(g.x), g.x_sk, g.x_sp, n, p) < need)
      y[n * g.y_sn + p * g.y_sp] = from_float<T>(quiet_nan());
  }
}

// -- planning and launch -------------------------------------------------------------------

enum class Tile { kDecode8, kDecode16, kSmall, kBig };

struct Plan {
  Tile tile = Tile::kBig;
  bool conv_form = false;
  bool x_direct = true;
  int64_t ldk = 0;  // row stride of the padded copy of X (elements)
  int64_t steps = 0, steps_per_split = 0;
  int splits = 1;
  size_t off_x = 0, off_partial = 0, off_counts = 0, bytes = 0;
};

int tile_m(Tile t) { return t == Tile::kBig ? Cfg::kBigM : t == Tile::kSmall ? Cfg::kSmallM : Cfg::kDecodeM; }
int tile_n(Tile t) { return t == Tile::kBig ? Cfg::kBigN : t == Tile::kSmall ? Cfg::kSmallN : t == Tile::kDecode16 ? 16 : 8; }

Plan make_plan(const Sparse24CudaWeight& w, const DeviceDenseIn& x) {
  Plan pl;
  const int64_t K = x.rows, P = x.cols, N = w.rows;
  const int64_t words = (K + 31) / 32;
  size_t off = 0;
  const bool x_ok = cuda::aligned16(x.data);
  if (x.stride_k == 1 && (x.stride_p % 8 == 0 || P == 1) && x_ok) {
    pl.conv_form = false;
  } else if (x.stride_p == 1 && (x.stride_k % 8 == 0 || K == 1) && x_ok) {
    pl.conv_form = true;
  } else {  // copy X into the linear form: (P, ldk) rows, k contiguous
    pl.x_direct = false;
    pl.ldk = cuda::round_up(K > 0 ? K : 1, 8);
    pl.off_x = off;
    off += static_cast<size_t>(cuda::round_up(P * pl.ldk * 2, 256));
  }
  const int sms = cuda::device_sm_count();
  if (P <= 8) pl.tile = Tile::kDecode8;
  else if (P <= Cfg::kDecodeMaxP) pl.tile = Tile::kDecode16;
  else {
    const int64_t big = ((N + Cfg::kBigM - 1) / Cfg::kBigM) * ((P + Cfg::kBigN - 1) / Cfg::kBigN);
    pl.tile = big >= sms ? Tile::kBig : Tile::kSmall;
  }
  pl.steps = (words * 32 + Cfg::kStepK - 1) / Cfg::kStepK;
  // Split K when the grid leaves multiprocessors idle (decode: N / 64 blocks): aim at 4 blocks
  // per SM, never fewer than kMinStepsPerSplit k-steps per block.
  const int64_t blocks = ((N + tile_m(pl.tile) - 1) / tile_m(pl.tile)) * ((P + tile_n(pl.tile) - 1) / tile_n(pl.tile));
  int64_t splits = 1;
  if (pl.tile != Tile::kBig && blocks > 0 && blocks < 2 * static_cast<int64_t>(sms)) {
    const int64_t want = (4 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
    const int64_t most = pl.steps / Cfg::kMinStepsPerSplit;
    splits = want < most ? want : most;
    if (splits < 1) splits = 1;
    if (splits > 65535) splits = 65535;
  }
  pl.steps_per_split = splits > 1 ? (pl.steps + splits - 1) / splits : pl.steps;
  if (splits > 1) splits = (pl.steps + pl.steps_per_split - 1) / pl.steps_per_split;  // none empty
  pl.splits = static_cast<int>(splits);
  if (pl.splits > 1) {
    pl.off_partial = off;
    off += static_cast<size_t>(cuda::round_up(static_cast<int64_t>(pl.splits) * N * P * 4, 256));
  }
  pl.off_counts = off;
  off += static_cast<size_t>(cuda::round_up(static_cast<int64_t>(pl.splits) * P * 4, 256));
  pl.bytes = off;
  return pl;
}

template <typename T, int BM, int BN, int kWarpsM, int kWarpsN, bool kConv>
void launch(const Args& g, int splits, cudaStream_t s) {
  using S = Shape<BM, BN, kWarpsM, kWarpsN>;
  auto kernel = sparse24_mma_kernel<T, BM, BN, kWarpsM, kWarpsN, kConv>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (the decode tiles stay below and
  // skip the host call: decode launches are a few microseconds).
  if (S::kSmemBytes > 48 * 1024)
    PYHWP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes));
  const int64_t gx = (g.N + BM - 1) / BM, gy = (g.P + BN - 1) / BN;
  PYHWP_CHECK(gx <= INT32_MAX && gy <= 65535, "sparse24_matmul_cuda: ", g.N, " x ", g.P,
              " output exceeds the launch grid");
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits)), S::kThreads,
           S::kSmemBytes, s>>>(g);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

template <typename T, bool kConv>
void launch_tile(Tile t, const Args& g, int splits, cudaStream_t s) {
  switch (t) {
    case Tile::kDecode8: launch<T, Cfg::kDecodeM, 8, 4, 1, kConv>(g, splits, s); break;
    case Tile::kDecode16: launch<T, Cfg::kDecodeM, 16, 4, 1, kConv>(g, splits, s); break;
    case Tile::kSmall: launch<T, Cfg::kSmallM, Cfg::kSmallN, 2, 2, kConv>(g, splits, s); break;
    case Tile::kBig: launch<T, Cfg::kBigM, Cfg::kBigN, 2, 4, kConv>(g, splits, s); break;
  }
}

template <typename T>
void run(const Sparse24CudaWeight& w, const DeviceDenseIn& xv, const T* bias, const DeviceDenseOut& yv,
         const Plan& pl, char* ws, cudaStream_t s) {
  const int64_t K = xv.rows, P = xv.cols, N = yv.rows;
  const T* x = static_cast<const T*>(xv.data);
  T* y = static_cast<T*>(yv.data);
  // Two launches: the mma kernel, then the split-K reduce or the non-finite kernel (plus a copy of
  // X first when its layout does not suit cp.async). Every workspace byte read is written earlier
  // in the same call (counts by the blocks of grid column 0), so nothing is zeroed: no memset.
  Args g;
  g.N = N, g.P = P, g.K = K;
  g.words = (K + 31) / 32;
  g.steps = pl.steps, g.steps_per_split = pl.steps_per_split;
  g.values = w.values, g.meta = w.meta;
  g.bias = bias, g.y = y, g.y_sn = yv.stride_n, g.y_sp = yv.stride_p;
  g.pair_store = yv.stride_p == 1 && yv.stride_n % 2 == 0 && (reinterpret_cast<uintptr_t>(y) & 3u) == 0;
  if (pl.x_direct) {
    g.x = x, g.x_sk = xv.stride_k, g.x_sp = xv.stride_p;
  } else {
    T* xw = reinterpret_cast<T*>(ws + pl.off_x);
    cuda::copy2d<T, false>(x, xv.stride_k, xv.stride_p, xw, 1, pl.ldk, K, P, nullptr, s);
    g.x = xw, g.x_sk = 1, g.x_sp = pl.ldk;
  }
  if (pl.splits > 1) g.partial = reinterpret_cast<float*>(ws + pl.off_partial);
  g.counts = reinterpret_cast<int*>(ws + pl.off_counts);

  if (pl.conv_form) launch_tile<T, true>(pl.tile, g, pl.splits, s);
  else launch_tile<T, false>(pl.tile, g, pl.splits, s);

  if (pl.splits > 1) sparse24_reduce_kernel<T><<<cuda::capped_grid((N * P + 255) / 256, 4), 256, 0, s>>>(g, pl.splits);
  else sparse24_nonfinite_kernel<T><<<cuda::capped_grid((N * P + 255) / 256, 4), 256, 0, s>>>(g);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

void check_args(const Sparse24CudaWeight& w, DType dtype, const DeviceDenseIn& x, const DeviceDenseOut& y) {
  check_gemm_sizes("sparse24_matmul_cuda", dtype, w.rows, w.cols, x, y);
  PYHWP_CHECK(dtype != DType::kFloat32, "sparse24_matmul_cuda: the sparse tensor-core kernel takes float16 or "
              "bfloat16 (float32 has no 2:4 mma.sp; torch stores float32 semi-structured weights as 1:2)");
}

}  // namespace

size_t sparse24_matmul_cuda_workspace(const Sparse24CudaWeight& w, DType dtype, const DeviceDenseIn& x,
                                      const DeviceDenseOut& y) {
  check_args(w, dtype, x, y);
  return make_plan(w, x).bytes;
}

void sparse24_matmul_cuda(const Sparse24CudaWeight& w, DType dtype, const DeviceDenseIn& x, const void* bias,
                          const DeviceDenseOut& y, void* workspace, size_t workspace_bytes, void* stream) {
  check_args(w, dtype, x, y);
  if (w.rows == 0 || x.cols == 0) return;
  const Plan pl = make_plan(w, x);
  PYHWP_CHECK(y.data != nullptr, "sparse24_matmul_cuda: null y");
  PYHWP_CHECK(x.rows == 0 || (x.data && w.values && w.meta), "sparse24_matmul_cuda: null x, values or meta");
  PYHWP_CHECK(x.rows == 0 || cuda::aligned16(w.values), "sparse24_matmul_cuda: values must be 16-byte aligned");
  PYHWP_CHECK(x.rows == 0 || (reinterpret_cast<uintptr_t>(w.meta) & 3u) == 0,
              "sparse24_matmul_cuda: meta must be 4-byte aligned");
  check_workspace("sparse24_matmul_cuda", workspace, workspace_bytes, pl.bytes);
  char* ws = static_cast<char*>(workspace);
  const auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat16) run<__half>(w, x, static_cast<const __half*>(bias), y, pl, ws, s);
  else run<__nv_bfloat16>(w, x, static_cast<const __nv_bfloat16*>(bias), y, pl, ws, s);
}

}  // namespace pyhwp
