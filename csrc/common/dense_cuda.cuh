// Device code shared by the CUDA matmuls: float32 <-> storage conversions, 16-byte vector
// unpacking, the strided 2-D copy (transpose) of dense operands, and the non-finite scan that
// makes NaN/Inf in x propagate exactly as in the dense product. Included by .cu files only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/checks.h"
#include "common/cuda_check.h"
#include "common/dtype.h"

namespace pyhwp {
namespace cuda {

// -- element conversions -------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Unpacks a 16-byte vector of T into kVec16<T> floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* out);
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& v, float* out) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}
// The two halves of a 32-bit word (element 0 in the low bits, as in memory).
__device__ __forceinline__ float half_lo(uint32_t w) { return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))); }
__device__ __forceinline__ float half_hi(uint32_t w) { return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))); }
template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& v, float* out) {
  out[0] = half_lo(v.x), out[1] = half_hi(v.x), out[2] = half_lo(v.y), out[3] = half_hi(v.y);
  out[4] = half_lo(v.z), out[5] = half_hi(v.z), out[6] = half_lo(v.w), out[7] = half_hi(v.w);
}
// bfloat16 is the top half of a float32: widening is a shift.
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& v, float* out) {
  out[0] = __uint_as_float(v.x << 16), out[1] = __uint_as_float(v.x & 0xffff0000u);
  out[2] = __uint_as_float(v.y << 16), out[3] = __uint_as_float(v.y & 0xffff0000u);
  out[4] = __uint_as_float(v.z << 16), out[5] = __uint_as_float(v.z & 0xffff0000u);
  out[6] = __uint_as_float(v.w << 16), out[7] = __uint_as_float(v.w & 0xffff0000u);
}

// Packs kVec16<T> floats into a 16-byte vector of T (round to nearest even), in registers.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                      __float_as_uint(in[3]));
  } else {
    return make_uint4(pack2<T>(in[0], in[1]), pack2<T>(in[2], in[3]), pack2<T>(in[4], in[5]),
                      pack2<T>(in[6], in[7]));
  }
}

__device__ __forceinline__ bool nonfinite(float v) { return !isfinite(v); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// -- non-finite record ---------------------------------------------------------------------
// Layout in the caller's workspace: int32 any; int32 count[P]. `any` is 1 when X holds a NaN or
// Inf anywhere; count[p] is the number of non-finite X(k, p) over k. Zeroed before each call.

inline size_t nonfinite_record_bytes(int64_t p) { return static_cast<size_t>(round_up((p + 1) * 4, 256)); }

__device__ __forceinline__ void record_nonfinite(int* record, int64_t p) {
  atomicAdd(record + 1 + p, 1);
  atomicOr(record, 1);
}

// -- strided 2-D copy ----------------------------------------------------------------------
// dst(r, c) = src(r, c) for r < rows, c < cols, through 32x32 shared-memory tiles, so that both
// the reads and the writes run along whichever dimension has the smaller stride (coalesced
// either way: a plain copy or a transpose). With kCount, every non-finite element read is
// recorded in `record` under its column c (the p of X).
constexpr int kCopyTile = 32;
constexpr int kCopyRowsPerPass = 8;

template <typename T, bool kCount>
__global__ void __launch_bounds__(kCopyTile * kCopyRowsPerPass)
    copy2d_kernel(const T* __restrict__ src, int64_t src_sr, int64_t src_sc, T* __restrict__ dst,
                  int64_t dst_sr, int64_t dst_sc, int64_t rows, int64_t cols, int* record) {
  __shared__ float tile[kCopyTile][kCopyTile + 1];
  const bool src_c_fast = src_sc <= src_sr;
  const bool dst_c_fast = dst_sc <= dst_sr;
  const int64_t tiles_r = (rows + kCopyTile - 1) / kCopyTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCopyTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t tr = blockIdx.y; tr < tiles_r; tr += gridDim.y) {
    const int64_t r0 = tr * kCopyTile;
#pragma unroll
    for (int i = 0; i < kCopyTile; i += kCopyRowsPerPass) {
      // (a, b): a runs along the fast source dimension across the warp.
      const int lr = src_c_fast ? ty + i : tx, lc = src_c_fast ? tx : ty + i;
      const int64_t r = r0 + lr, c = c0 + lc;
      if (r < rows && c < cols) {
        const float v = to_float(src[r * src_sr + c * src_sc]);
        if (kCount && nonfinite(v)) record_nonfinite(record, c);
        tile[lr][lc] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kCopyTile; i += kCopyRowsPerPass) {
      const int lr = dst_c_fast ? ty + i : tx, lc = dst_c_fast ? tx : ty + i;
      const int64_t r = r0 + lr, c = c0 + lc;
      if (r < rows && c < cols) dst[r * dst_sr + c * dst_sc] = from_float<T>(tile[lr][lc]);
    }
    __syncthreads();
  }
}

template <typename T, bool kCount>
void copy2d(const T* src, int64_t src_sr, int64_t src_sc, T* dst, int64_t dst_sr, int64_t dst_sc,
            int64_t rows, int64_t cols, int* record, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t tiles_c = (cols + kCopyTile - 1) / kCopyTile;
  const int64_t tiles_r = (rows + kCopyTile - 1) / kCopyTile;
  PYHWP_CHECK(tiles_c <= INT32_MAX, "copy2d: ", cols, " columns are too many");
  const dim3 grid(static_cast<unsigned>(tiles_c), static_cast<unsigned>(tiles_r < 65535 ? tiles_r : 65535));
  copy2d_kernel<T, kCount><<<grid, dim3(kCopyTile, kCopyRowsPerPass), 0, stream>>>(
      src, src_sr, src_sc, dst, dst_sr, dst_sc, rows, cols, record);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

// -- non-finite scan without a copy --------------------------------------------------------
// Records every non-finite X(k, p) (K x P, any strides) walking X in memory order.
template <typename T>
__global__ void __launch_bounds__(256)
    scan_nonfinite_kernel(const T* __restrict__ x, int64_t K, int64_t P, int64_t sk, int64_t sp,
                          int* record) {
  const bool p_inner = sp <= sk;
  const int64_t outer = p_inner ? K : P, inner = p_inner ? P : K;
  const int64_t so = p_inner ? sk : sp, si = p_inner ? sp : sk;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < inner;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if (nonfinite(to_float(x[o * so + i * si]))) record_nonfinite(record, p_inner ? i : o);
    }
  }
}

template <typename T>
void scan_nonfinite(const T* x, int64_t K, int64_t P, int64_t sk, int64_t sp, int* record,
                    cudaStream_t stream) {
  if (K == 0 || P == 0) return;
  const bool p_inner = sp <= sk;
  const int64_t outer = p_inner ? K : P, inner = p_inner ? P : K;
  const int64_t bx = (inner + 255) / 256;
  const dim3 grid(static_cast<unsigned>(bx < 64 ? bx : 64), static_cast<unsigned>(outer < 65535 ? outer : 65535));
  scan_nonfinite_kernel<T><<<grid, 256, 0, stream>>>(x, K, P, sk, sp, record);
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

// Number of multiprocessors of the current device (a cheap attribute query).
inline int device_sm_count() {
  int dev = 0, sms = 0;
  PYHWP_CUDA_CHECK(cudaGetDevice(&dev));
  PYHWP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Blocks of a grid-stride kernel: `want` (at least 1), capped at `per_sm` per multiprocessor.
inline unsigned capped_grid(int64_t want, int per_sm) {
  const int64_t cap = per_sm * static_cast<int64_t>(device_sm_count());
  return static_cast<unsigned>(want < 1 ? 1 : want < cap ? want : cap);
}

}  // namespace cuda
}  // namespace pyhwp
