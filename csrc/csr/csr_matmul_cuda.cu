// CSR sparse x dense matmul on NVIDIA GPUs: Sputnik-style row tiles (rows in length order,
// 16-byte vector loads of x, subwarps per row) for batches above 8, and a row-splitting gather
// kernel at or below; float32 / float16 / bfloat16 storage with float32 accumulation. Also the
// stride-1 implicit-GEMM conv2d: the same tile kernel reading shifted rows of padded planes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/checks.h"
#include "common/dtype_cuda.cuh"
#include "common/cuda_check.h"
#include "common/dense_cuda.cuh"
#include "csr/csr_cuda.h"
#include "csr/csr_matmul.h"

namespace pyhwp {

namespace {

using Cfg = CsrCudaConfig;
using cuda::from_float;
using cuda::kVec16;
using cuda::nonfinite;
using cuda::to_float;

// Lanes [base, base + width) of this thread's warp, where the subwarp of `width` consecutive
// threads (width a power of two <= 32) starts at `base`.
__device__ __forceinline__ unsigned subwarp_mask(int linear_tid, int width) {
  if (width >= 32) return 0xffffffffu;
  const int base = (linear_tid & 31) & ~(width - 1);
  return ((1u << width) - 1u) << base;
}

// The implicit-GEMM conv mode of the tile kernel (csr_conv2d_cuda): image blockIdx.z reads x at
// x + z * x_image (its padded planes; the column "indices" are the per-nnz offsets of the plan,
// ldx = 1) and writes output pixel p = a * wp + b of row n to y[z * y_image + n * ho * wo +
// a * wo + b], dropping the wrapped columns b >= wo.
struct ConvTile {
  int64_t x_image = 0, y_image = 0, wp = 0, wo = 0, ho = 0;
};

// A 16-byte vector of x at p. Conv offsets are arbitrary, so that mode loads element by element
// and stops at the row's `left` valid columns (the padded planes end right after the last one).
template <typename T, bool kConv>
__device__ __forceinline__ uint4 load_x(const T* p, int64_t left) {
  if constexpr (!kConv) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else if constexpr (sizeof(T) == 4) {
    const unsigned* q = reinterpret_cast<const unsigned*>(p);
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = e < left ? __ldg(q + e) : 0u;
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t lo = 2 * e < left ? __ldg(q + 2 * e) : 0u, hi = 2 * e + 1 < left ? __ldg(q + 2 * e + 1) : 0u;
      w[e] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// One block = kTileThreads threads = kRows subwarps of kWidth threads. Subwarp `sub` computes
// the row row_order[blockIdx.x * kRows + sub] of Y over the columns [blockIdx.y * kCols, +kCols):
// thread `lane` owns kVecs 16-byte vectors of columns, interleaved so that each vector index is
// one contiguous, coalesced span of x across the subwarp. Rows in one block have nearly equal
// lengths (length order), so no subwarp idles long; there is no block-wide barrier at all.
// The row's (value, column) pairs are staged kStage at a time in shared memory and read back as
// broadcasts; x (K x P, p contiguous, row stride ldx, 16-byte aligned rows) and y (N x P, p
// contiguous, row stride ldy) are touched only by 16-byte vectors, except the last partial one.
template <typename T, int kWidth, int kVecs, bool kConv = false>
__global__ void __launch_bounds__(Cfg::kTileThreads)
    csr_tile_kernel(int64_t N, int64_t P, const int64_t* __restrict__ row_offsets,
                    const int32_t* __restrict__ col_indices, const T* __restrict__ values,
                    const int32_t* __restrict__ row_order, const T* __restrict__ x, int64_t ldx,
                    const T* __restrict__ bias, T* __restrict__ y, int64_t ldy, const ConvTile cv) {
  constexpr int kRows = Cfg::kTileThreads / kWidth;
  constexpr int kVec = kVec16<T>;
  constexpr int kCols = kWidth * kVecs * kVec;
  constexpr int kStage = Cfg::kStage;
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "subwarps are powers of two");
  static_assert(Cfg::kTileThreads % kWidth == 0, "whole subwarps per block");
  __shared__ __align__(16) float s_val[kRows][kStage];
  __shared__ __align__(16) int s_col[kRows][kStage];

  const int lane = threadIdx.x, sub = threadIdx.y;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kRows + sub;
  if (slot >= N) return;  // whole subwarps leave together; only subwarp-local syncs follow
  const unsigned mask = subwarp_mask(sub * kWidth + lane, kWidth);
  const int64_t n = row_order ? row_order[slot] : slot;
  if constexpr (kConv) x += static_cast<int64_t>(blockIdx.z) * cv.x_image;

  int64_t pcol[kVecs];
  bool ok[kVecs];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    pcol[v] = static_cast<int64_t>(blockIdx.y) * kCols + (v * kWidth + lane) * kVec;
    ok[v] = pcol[v] < P;
  }

  float acc[kVecs][kVec];
#pragma unroll
  for (int v = 0; v < kVecs; ++v)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[v][e] = 0.f;

  float* sv = s_val[sub];
  int* sc = s_col[sub];
  const int64_t begin = row_offsets[n], end = row_offsets[n + 1];
  for (int64_t j0 = begin; j0 < end; j0 += kStage) {
    const int cnt = static_cast<int>(end - j0 < kStage ? end - j0 : kStage);
    __syncwarp(mask);  // the previous stage has been read by every thread of the subwarp
    for (int i = lane; i < cnt; i += kWidth) {
      sv[i] = to_float(values[j0 + i]);
      sc[i] = col_indices[j0 + i];
    }
    __syncwarp(mask);
    int i = 0;
    // Four nonzeros at a time: 4 * kVecs independent 16-byte loads in flight before the FMAs.
    for (; i + 4 <= cnt; i += 4) {
      const float4 v4 = *reinterpret_cast<const float4*>(sv + i);
      const int4 c4 = *reinterpret_cast<const int4*>(sc + i);
      const float vv[4] = {v4.x, v4.y, v4.z, v4.w};
      const int cc[4] = {c4.x, c4.y, c4.z, c4.w};
      uint4 d[4][kVecs];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < kVecs; ++v)
          d[u][v] = ok[v] ? load_x<T, kConv>(x + cc[u] * ldx + pcol[v], P - pcol[v]) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          float f[kVec];
          cuda::unpack16<T>(d[u][v], f);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[v][e] = fmaf(vv[u], f[e], acc[v][e]);
        }
    }
    for (; i < cnt; ++i) {
      const float vv = sv[i];
      const int64_t off = sc[i] * ldx;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        if (!ok[v]) continue;
        float f[kVec];
        cuda::unpack16<T>(load_x<T, kConv>(x + off + pcol[v], P - pcol[v]), f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[v][e] = fmaf(vv, f[e], acc[v][e]);
      }
    }
  }

  const float b = bias ? to_float(bias[n]) : 0.f;
  T* out = y + n * ldy;
  if constexpr (kConv) out = y + static_cast<int64_t>(blockIdx.z) * cv.y_image + n * cv.ho * cv.wo;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (!ok[v]) continue;
    float r[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) r[e] = acc[v][e] + b;
    if constexpr (kConv) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t p = pcol[v] + e, a = p / cv.wp, c = p - a * cv.wp;
        if (p < P && c < cv.wo) out[a * cv.wo + c] = from_float<T>(r[e]);
      }
    } else if (pcol[v] + kVec <= P) {
      *reinterpret_cast<uint4*>(out + pcol[v]) = cuda::pack16<T>(r);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (pcol[v] + e < P) out[pcol[v] + e] = from_float<T>(r[e]);
    }
  }
}

// Small batches (P <= kGatherMaxP): a subwarp of kLanes threads per row splits the row's
// nonzeros (coalesced loads of values and indices) and gathers X(col, p) for every p with X's
// own strides, so neither x nor y is copied; kP >= P sums per thread, reduced by shuffles.
// kLanes follows the mean row length: short rows get narrow subwarps, so lanes stay busy.
template <typename T, int kLanes, int kP>
__global__ void __launch_bounds__(Cfg::kGatherThreads)
    csr_gather_kernel(int64_t N, int P, const int64_t* __restrict__ row_offsets,
                      const int32_t* __restrict__ col_indices, const T* __restrict__ values,
                      const int32_t* __restrict__ row_order, const T* __restrict__ x, int64_t sk,
                      int64_t sp, const T* __restrict__ bias, T* __restrict__ y, int64_t ysn,
                      int64_t ysp) {
  constexpr int kRows = Cfg::kGatherThreads / kLanes;
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "subwarps are powers of two");
  const int lane = threadIdx.x % kLanes, sub = threadIdx.x / kLanes;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kRows + sub;
  if (slot >= N) return;
  const unsigned mask = subwarp_mask(threadIdx.x, kLanes);
  const int64_t n = row_order ? row_order[slot] : slot;

  float acc[kP];
#pragma unroll
  for (int p = 0; p < kP; ++p) acc[p] = 0.f;
  const int64_t end = row_offsets[n + 1];
#pragma unroll 2
  for (int64_t j = row_offsets[n] + lane; j < end; j += kLanes) {
    const float v = to_float(values[j]);
    const T* xc = x + static_cast<int64_t>(col_indices[j]) * sk;
#pragma unroll
    for (int p = 0; p < kP; ++p)
      if (p < P) acc[p] = fmaf(v, to_float(xc[p * sp]), acc[p]);
  }
#pragma unroll
  for (int p = 0; p < kP; ++p)
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) acc[p] += __shfl_xor_sync(mask, acc[p], o);

  const float b = bias ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int p = 0; p < kP; ++p)
    if (p < P && lane == p % kLanes) y[n * ysn + p * ysp] = from_float<T>(acc[p] + b);
}

// Dense-exact NaN/Inf propagation (see common/dense.h propagate_nonfinite): when the scan found
// non-finite values in X, Y(n, p) becomes NaN wherever some non-finite X(k, p) meets a position
// k that row n does not store (0 * Inf = NaN in the dense product). One warp per row; returns at
// once, for every block, when X was all finite (the normal case, one flag read).
template <typename T>
__global__ void __launch_bounds__(256)
    csr_nonfinite_kernel(const int* __restrict__ record, int64_t N, int64_t P,
                         const int64_t* __restrict__ row_offsets,
                         const int32_t* __restrict__ col_indices, const T* __restrict__ x,
                         int64_t sk, int64_t sp, T* __restrict__ y, int64_t ysn, int64_t ysp) {
  if (record[0] == 0) return;
  const int* count = record + 1;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; n < N;
       n += nwarps) {
    const int64_t b = row_offsets[n], e = row_offsets[n + 1];
    for (int64_t p = 0; p < P; ++p) {
      const int bad = count[p];
      if (bad == 0) continue;
      int c = 0;
      for (int64_t j = b + lane; j < e; j += 32)
        c += nonfinite(to_float(x[static_cast<int64_t>(col_indices[j]) * sk + p * sp]));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
      if (lane == 0 && c < bad) y[n * ysn + p * ysp] = from_float<T>(__int_as_float(0x7fc00000));
    }
  }
}

// Which kernels run and where their operands live; computed identically by the workspace query
// and by the call.
struct Plan {
  bool gather = false;
  bool x_direct = true;  // tile path reads x in place (p contiguous, 16-byte aligned rows)
  bool y_direct = true;  // tile path writes y in place
  int64_t ldx = 0, ldy = 0;
  size_t off_x = 0, off_y = 0, bytes = 0;
};

Plan make_plan(DType dtype, const DeviceDenseIn& x, const DeviceDenseOut& y) {
  Plan pl;
  const int64_t K = x.rows, P = x.cols, N = y.rows;
  const int es = dtype_size(dtype), vec = 16 / es;
  size_t off = cuda::nonfinite_record_bytes(P);
  pl.gather = P <= Cfg::kGatherMaxP;
  if (!pl.gather) {
    pl.x_direct = x.stride_p == 1 && x.stride_k % vec == 0 && P % vec == 0 && cuda::aligned16(x.data);
    pl.ldx = pl.x_direct ? x.stride_k : cuda::round_up(P, vec);
    if (!pl.x_direct) {
      pl.off_x = off;
      off += static_cast<size_t>(cuda::round_up(K * pl.ldx * es, 256));
    }
    pl.y_direct = y.stride_p == 1 && y.stride_n % vec == 0 && P % vec == 0 && cuda::aligned16(y.data);
    pl.ldy = pl.y_direct ? y.stride_n : cuda::round_up(P, vec);
    if (!pl.y_direct) {
      pl.off_y = off;
      off += static_cast<size_t>(cuda::round_up(N * pl.ldy * es, 256));
    }
  }
  pl.bytes = off;
  return pl;
}

template <typename T, int kWidth, int kVecs, bool kConv = false>
void launch_tile(const CsrCudaMatrix& w, const T* x, int64_t ldx, const T* bias, T* y, int64_t ldy,
                 int64_t P, cudaStream_t s, int64_t images = 1, const ConvTile& cv = ConvTile{}) {
  constexpr int kRows = Cfg::kTileThreads / kWidth;
  constexpr int kCols = kWidth * kVecs * kVec16<T>;
  const int64_t gx = (w.rows + kRows - 1) / kRows, gy = (P + kCols - 1) / kCols;
  PYHWP_CHECK(gx <= INT32_MAX && gy <= 65535 && images <= 65535, "csr_matmul_cuda: ", w.rows, " rows x ", P,
              " columns x ", images, " images exceed the launch grid");
  csr_tile_kernel<T, kWidth, kVecs, kConv>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(images)),
         dim3(kWidth, kRows), 0, s>>>(w.rows, P, w.row_offsets, w.col_indices, static_cast<const T*>(w.values),
                                      w.row_order, x, ldx, bias, y, ldy, cv);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kLanes, int kP>
void launch_gather(const CsrCudaMatrix& w, const T* x, const DeviceDenseIn& xv, const T* bias,
                   T* y, const DeviceDenseOut& yv, cudaStream_t s) {
  constexpr int kRows = Cfg::kGatherThreads / kLanes;
  const int64_t g = (w.rows + kRows - 1) / kRows;
  PYHWP_CHECK(g <= INT32_MAX, "csr_matmul_cuda: ", w.rows, " rows exceed the launch grid");
  csr_gather_kernel<T, kLanes, kP><<<static_cast<unsigned>(g), Cfg::kGatherThreads, 0, s>>>(
      w.rows, static_cast<int>(xv.cols), w.row_offsets, w.col_indices,
      static_cast<const T*>(w.values), w.row_order, x, xv.stride_k, xv.stride_p, bias, y,
      yv.stride_n, yv.stride_p);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kLanes>
void launch_gather_p(const CsrCudaMatrix& w, const T* x, const DeviceDenseIn& xv, const T* bias,
                     T* y, const DeviceDenseOut& yv, cudaStream_t s) {
  const int64_t P = xv.cols;
  if (P == 1) return launch_gather<T, kLanes, 1>(w, x, xv, bias, y, yv, s);
  if (P == 2) return launch_gather<T, kLanes, 2>(w, x, xv, bias, y, yv, s);
  if (P <= 4) return launch_gather<T, kLanes, 4>(w, x, xv, bias, y, yv, s);
  return launch_gather<T, kLanes, 8>(w, x, xv, bias, y, yv, s);
}

template <typename T>
void run(const CsrCudaMatrix& w, const DeviceDenseIn& xv, const T* bias, const DeviceDenseOut& yv,
         const Plan& pl, char* ws, cudaStream_t s) {
  const int64_t K = xv.rows, P = xv.cols, N = yv.rows;
  const T* x = static_cast<const T*>(xv.data);
  T* y = static_cast<T*>(yv.data);
  int* record = reinterpret_cast<int*>(ws);
  PYHWP_CUDA_CHECK(cudaMemsetAsync(record, 0, sizeof(int) * static_cast<size_t>(P + 1), s));

  if (pl.gather) {
    cuda::scan_nonfinite(x, K, P, xv.stride_k, xv.stride_p, record, s);
    const int64_t mean = w.rows ? w.nnz / w.rows : 0;
    if (mean <= 8) launch_gather_p<T, 4>(w, x, xv, bias, y, yv, s);
    else if (mean <= 32) launch_gather_p<T, 8>(w, x, xv, bias, y, yv, s);
    else if (mean <= 128) launch_gather_p<T, 16>(w, x, xv, bias, y, yv, s);
    else launch_gather_p<T, 32>(w, x, xv, bias, y, yv, s);
  } else {
    const T* xt = x;
    if (pl.x_direct) {
      cuda::scan_nonfinite(x, K, P, xv.stride_k, xv.stride_p, record, s);
    } else {
      T* xw = reinterpret_cast<T*>(ws + pl.off_x);
      cuda::copy2d<T, true>(x, xv.stride_k, xv.stride_p, xw, pl.ldx, 1, K, P, record, s);
      xt = xw;
    }
    T* yt = pl.y_direct ? y : reinterpret_cast<T*>(ws + pl.off_y);
    if constexpr (sizeof(T) == 4) {
      if (P <= 16) launch_tile<T, 4, 1>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
      else if (P <= 32) launch_tile<T, 8, 1>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
      else launch_tile<T, 8, 2>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
    } else {
      if (P <= 16) launch_tile<T, 2, 1>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
      else if (P <= 32) launch_tile<T, 4, 1>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
      else launch_tile<T, 8, 1>(w, xt, pl.ldx, bias, yt, pl.ldy, P, s);
    }
    if (!pl.y_direct) cuda::copy2d<T, false>(yt, pl.ldy, 1, y, yv.stride_n, yv.stride_p, N, P, nullptr, s);
  }

  csr_nonfinite_kernel<T><<<cuda::capped_grid((N + 7) / 8, 2), 256, 0, s>>>(
      record, N, P, w.row_offsets, w.col_indices, x, xv.stride_k, xv.stride_p, y, yv.stride_n,
      yv.stride_p);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

// Sizes and dtype only: the workspace query passes no arrays.
void check_sizes(const CsrCudaMatrix& w, DType dtype, const DeviceDenseIn& x, const DeviceDenseOut& y) {
  check_gemm_sizes("csr_matmul_cuda", dtype, w.rows, w.cols, x, y);
  PYHWP_CHECK(w.nnz >= 0, "csr_matmul_cuda: negative nnz");
}

}  // namespace

size_t csr_matmul_cuda_workspace(const CsrCudaMatrix& w, DType dtype, const DeviceDenseIn& x,
                                 const DeviceDenseOut& y) {
  check_sizes(w, dtype, x, y);
  return make_plan(dtype, x, y).bytes;
}

void csr_matmul_cuda(const CsrCudaMatrix& w, DType dtype, const DeviceDenseIn& x, const void* bias,
                     const DeviceDenseOut& y, void* workspace, size_t workspace_bytes, void* stream) {
  check_sizes(w, dtype, x, y);
  PYHWP_CHECK(w.row_offsets != nullptr, "csr_matmul_cuda: row_offsets is null");
  PYHWP_CHECK(w.nnz == 0 || (w.col_indices && w.values), "csr_matmul_cuda: null CSR array");
  const Plan pl = make_plan(dtype, x, y);
  if (w.rows == 0 || x.cols == 0) return;
  PYHWP_CHECK(y.data != nullptr && (x.data != nullptr || x.rows == 0), "csr_matmul_cuda: null x or y");
  check_workspace("csr_matmul_cuda", workspace, workspace_bytes, pl.bytes);
  char* ws = static_cast<char*>(workspace);
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run<T>(w, x, static_cast<const T*>(bias), y, pl, ws, s);
  });
}

// -- stride-1 implicit-GEMM conv2d ------------------------------------------------------------

namespace {

// Padded planes: ConvPlanes in csr_cuda.h (the CPU driver's Padded, csr_conv2d_cpu.cpp).
ConvPlanes conv_planes(const ConvGeometry& g) {
  ConvPlanes pl;
  pl.hp = g.ho + g.dh * (g.kh - 1) + (g.kw > 1 ? 1 : 0);
  pl.wp = g.wo + g.dw * (g.kw - 1);
  pl.plane = (pl.hp * pl.wp + 15) / 16 * 16;
  return pl;
}

// xp[q][a][b] (q = image * C + c, plane elements per q) = x[q][a - pt][b - pl] inside x, else 0
// (borders, the spare row, the plane's tail); flag |= 1 when x holds a NaN/Inf.
template <typename T>
__global__ void __launch_bounds__(256)
    csr_conv2d_pad_kernel(const T* __restrict__ x, int64_t planes, int64_t h, int64_t w, int64_t pt, int64_t pl,
                          int64_t hp, int64_t wp, int64_t plane, T* __restrict__ xp, int* flag) {
  const int64_t total = planes * plane, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t q = i / plane, o = i - q * plane, a = o / wp, b = o - a * wp, r = a - pt, c = b - pl;
    T v = from_float<T>(0.f);
    if (a < hp && r >= 0 && r < h && c >= 0 && c < w) {
      v = x[(q * h + r) * w + c];
      if (nonfinite(to_float(v))) atomicOr(flag, 1);
    }
    xp[i] = v;
  }
}

// Dense-exact NaN/Inf (see csr_nonfinite_kernel): y(i, n, a, b) becomes NaN when the window of
// output pixel (a, b) holds more non-finite inputs than sit at row n's stored taps. One thread per
// output; every thread returns at once when the pad kernel found x all finite.
template <typename T>
__global__ void __launch_bounds__(256)
    csr_conv2d_nonfinite_kernel(const int* __restrict__ flag, ConvGeometry g, ConvPlanes pd, int64_t N,
                                const int64_t* __restrict__ row_offsets, const int32_t* __restrict__ offsets,
                                const T* __restrict__ xp, T* __restrict__ y) {
  if (*flag == 0) return;
  const int64_t total = g.images * N * g.ho * g.wo, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t b = i % g.wo, a = (i / g.wo) % g.ho, n = (i / (g.wo * g.ho)) % N, img = i / (g.wo * g.ho * N);
    const T* xi = xp + img * g.channels * pd.plane + a * pd.wp + b;
    int need = 0;
    for (int64_t c = 0; c < g.channels; ++c)
      for (int64_t r = 0; r < g.kh; ++r)
        for (int64_t s = 0; s < g.kw; ++s)
          need += nonfinite(to_float(xi[c * pd.plane + r * g.dh * pd.wp + s * g.dw]));
    if (need == 0) continue;
    int seen = 0;
    for (int64_t j = row_offsets[n]; j < row_offsets[n + 1]; ++j) seen += nonfinite(to_float(xi[offsets[j]]));
    if (seen < need) y[i] = from_float<T>(__int_as_float(0x7fc00000));
  }
}

void check_conv(const CsrCudaMatrix& w, const ConvGeometry& g) {
  PYHWP_CHECK(g.images >= 0 && g.channels > 0 && g.h > 0 && g.w > 0 && g.kh > 0 && g.kw > 0 && g.dh > 0 &&
                  g.dw > 0 && g.ho > 0 && g.wo > 0 && g.pt >= 0 && g.pl >= 0,
              "csr_conv2d_cuda: bad geometry");
  PYHWP_CHECK(w.cols == g.channels * g.kh * g.kw, "csr_conv2d_cuda: weight has ", w.cols, " columns, expected C*kh*kw = ",
              g.channels * g.kh * g.kw);
  const ConvPlanes pd = conv_planes(g);
  PYHWP_CHECK(g.pt + g.h <= pd.hp && g.pl + g.w <= pd.wp,
              "csr_conv2d_cuda: the input does not fit its padded planes (stride-1 geometry expected)");
  PYHWP_CHECK(g.channels * pd.plane <= INT32_MAX, "csr_conv2d_cuda: ", g.channels, " padded planes of ", pd.plane,
              " elements exceed int32 offsets");
}

size_t conv_flag_bytes() { return 256; }

}  // namespace

ConvPlanes csr_conv2d_cuda_planes(const ConvGeometry& g) { return conv_planes(g); }

size_t csr_conv2d_cuda_workspace(const CsrCudaMatrix& w, DType dtype, const ConvGeometry& g) {
  check_conv(w, g);
  const ConvPlanes pd = conv_planes(g);
  return conv_flag_bytes() +
         static_cast<size_t>(cuda::round_up(g.images * g.channels * pd.plane * dtype_size(dtype), 256));
}

void csr_conv2d_cuda(const CsrCudaMatrix& w, DType dtype, const ConvGeometry& g, const int32_t* offsets,
                     const void* x, const void* bias, void* y, void* workspace, size_t workspace_bytes,
                     void* stream) {
  check_conv(w, g);
  PYHWP_CHECK(w.row_offsets != nullptr && (w.nnz == 0 || (offsets && w.values)), "csr_conv2d_cuda: null CSR array");
  if (g.images == 0 || w.rows == 0) return;
  PYHWP_CHECK(x != nullptr && y != nullptr, "csr_conv2d_cuda: null x or y");
  check_workspace("csr_conv2d_cuda", workspace, workspace_bytes, csr_conv2d_cuda_workspace(w, dtype, g));
  const ConvPlanes pd = conv_planes(g);
  const auto s = static_cast<cudaStream_t>(stream);
  int* flag = static_cast<int*>(workspace);
  char* planes = static_cast<char*>(workspace) + conv_flag_bytes();
  // Launches: flag memset, pad, the tile kernel over all images, the non-finite check.
  PYHWP_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int), s));
  CsrCudaMatrix wc = w;
  wc.col_indices = offsets;  // the tile kernel reads x rows at the plan's offsets (ldx = 1)
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* xp = reinterpret_cast<T*>(planes);
    const int64_t total = g.images * g.channels * pd.plane;
    csr_conv2d_pad_kernel<T><<<cuda::capped_grid((total + 255) / 256, 8), 256, 0, s>>>(
        static_cast<const T*>(x), g.images * g.channels, g.h, g.w, g.pt, g.pl, pd.hp, pd.wp, pd.plane, xp, flag);
    PYHWP_CUDA_CHECK(cudaGetLastError());
    ConvTile cv;
    cv.x_image = g.channels * pd.plane, cv.y_image = w.rows * g.ho * g.wo, cv.wp = pd.wp, cv.wo = g.wo, cv.ho = g.ho;
    const int64_t P = g.ho * pd.wp;
    const T* b = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if constexpr (sizeof(T) == 4) {
      if (P <= 16) launch_tile<T, 4, 1, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
      else if (P <= 32) launch_tile<T, 8, 1, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
      else launch_tile<T, 8, 2, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
    } else {
      if (P <= 16) launch_tile<T, 2, 1, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
      else if (P <= 32) launch_tile<T, 4, 1, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
      else launch_tile<T, 8, 1, true>(wc, xp, 1, b, yt, 0, P, s, g.images, cv);
    }
    const int64_t outs = g.images * w.rows * g.ho * g.wo;
    csr_conv2d_nonfinite_kernel<T><<<cuda::capped_grid((outs + 255) / 256, 4), 256, 0, s>>>(
        flag, g, pd, w.rows, w.row_offsets, offsets, xp, yt);
    PYHWP_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace pyhwp
