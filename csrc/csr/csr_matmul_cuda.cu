// CSR sparse x dense matmul on NVIDIA GPUs: Sputnik-style row tiles (rows in length order,
// 16-byte vector loads of x, subwarps per row) for batches above 8, and a row-splitting gather
// kernel at or below; float32 / float16 / bfloat16 storage with float32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/checks.h"
#include "common/dtype_cuda.cuh"
#include "common/cuda_check.h"
#include "common/dense_cuda.cuh"
#include "csr/csr_cuda.h"

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

// One block = kTileThreads threads = kRows subwarps of kWidth threads. Subwarp `sub` computes
// the row row_order[blockIdx.x * kRows + sub] of Y over the columns [blockIdx.y * kCols, +kCols):
// thread `lane` owns kVecs 16-byte vectors of columns, interleaved so that each vector index is
// one contiguous, coalesced span of x across the subwarp. Rows in one block have nearly equal
// lengths (length order), so no subwarp idles long; there is no block-wide barrier at all.
// The row's (value, column) pairs are staged kStage at a time in shared memory and read back as
// broadcasts; x (K x P, p contiguous, row stride ldx, 16-byte aligned rows) and y (N x P, p
// contiguous, row stride ldy) are touched only by 16-byte vectors, except the last partial one.
template <typename T, int kWidth, int kVecs>
__global__ void __launch_bounds__(Cfg::kTileThreads)
    csr_tile_kernel(int64_t N, int64_t P, const int64_t* __restrict__ row_offsets,
                    const int32_t* __restrict__ col_indices, const T* __restrict__ values,
                    const int32_t* __restrict__ row_order, const T* __restrict__ x, int64_t ldx,
                    const T* __restrict__ bias, T* __restrict__ y, int64_t ldy) {
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
          d[u][v] = ok[v] ? __ldg(reinterpret_cast<const uint4*>(x + cc[u] * ldx + pcol[v]))
                          : make_uint4(0u, 0u, 0u, 0u);
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
        cuda::unpack16<T>(__ldg(reinterpret_cast<const uint4*>(x + off + pcol[v])), f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[v][e] = fmaf(vv, f[e], acc[v][e]);
      }
    }
  }

  const float b = bias ? to_float(bias[n]) : 0.f;
  T* out = y + n * ldy;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (!ok[v]) continue;
    float r[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) r[e] = acc[v][e] + b;
    if (pcol[v] + kVec <= P) {
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

template <typename T, int kWidth, int kVecs>
void launch_tile(const CsrCudaMatrix& w, const T* x, int64_t ldx, const T* bias, T* y, int64_t ldy,
                 int64_t P, cudaStream_t s) {
  constexpr int kRows = Cfg::kTileThreads / kWidth;
  constexpr int kCols = kWidth * kVecs * kVec16<T>;
  const int64_t gx = (w.rows + kRows - 1) / kRows, gy = (P + kCols - 1) / kCols;
  PYHWP_CHECK(gx <= INT32_MAX && gy <= 65535, "csr_matmul_cuda: ", w.rows, " rows x ", P,
              " columns exceed the launch grid");
  csr_tile_kernel<T, kWidth, kVecs><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                                      dim3(kWidth, kRows), 0, s>>>(
      w.rows, P, w.row_offsets, w.col_indices, static_cast<const T*>(w.values), w.row_order, x,
      ldx, bias, y, ldy);
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

  const int64_t want = (N + 7) / 8, cap = 2 * static_cast<int64_t>(cuda::device_sm_count());
  csr_nonfinite_kernel<T><<<static_cast<unsigned>(want < cap ? want : cap), 256, 0, s>>>(
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

}  // namespace pyhwp
