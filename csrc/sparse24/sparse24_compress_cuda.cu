// On-device compression of a dense 2:4 weight into the values + meta layout of
// sparse24_matmul_cuda.h (the CPU layout), with the first group that breaks 2:4 reported.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "common/checks.h"
#include "common/cuda_check.h"
#include "common/dense_cuda.cuh"
#include "common/dtype_cuda.cuh"
#include "sparse24/sparse24_matmul_cuda.h"

namespace pyhwp {

namespace {

// One thread per (row, 32-input word): 8 groups -> 16 values and one meta word. Rows are read
// with neighbouring threads 64 bytes apart (a 2-byte dtype), all of each sector used across the warp.
template <typename T>
__global__ void __launch_bounds__(256)
    sparse24_compress_kernel(int64_t N, int64_t K, const T* __restrict__ dense, int64_t ld, T* __restrict__ values,
                             uint32_t* __restrict__ meta, long long* __restrict__ bad) {
  const int64_t words = (K + 31) / 32, groups = words * 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T zero = cuda::from_float<T>(0.f);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N * words; i += stride) {
    const int64_t n = i / words, c = i % words;
    const T* row = dense + n * ld;
    T* out = values + n * (words * 16) + c * 16;
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t k0 = 32 * c + 4 * j;
      T v[4];
      unsigned keep = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[q] = k0 + q < K ? row[k0 + q] : zero;
        if (cuda::to_float(v[q]) != 0.f) keep |= 1u << q;  // -0.0 == 0; NaN != 0
      }
      const int count = __popc(keep);
      if (count > 2) atomicMin(bad, static_cast<long long>(n * groups + 8 * c + j));
      // The kept positions completed with the lowest unused ones, increasing (Sparse24Weight):
      // 0 kept -> (0, 1); 1 kept at q -> (q, lowest other) sorted; 2 kept -> those.
      int first = 0, second = 1;
      if (count == 1) {
        const int q = __ffs(keep) - 1;  // the lowest unused position is 1 when q == 0, else 0
        second = q == 0 ? 1 : q;
      } else if (count == 2) {
        first = __ffs(keep) - 1;
        second = 31 - __clz(keep);
      }
      // Selects rather than v[first]: a dynamic index would put v in local memory.
      const T vf = first == 0 ? v[0] : first == 1 ? v[1] : v[2];
      const T vs = second == 1 ? v[1] : second == 2 ? v[2] : v[3];
      out[2 * j] = (keep >> first) & 1u ? vf : zero;
      out[2 * j + 1] = (keep >> second) & 1u ? vs : zero;
      word |= static_cast<uint32_t>(first | (second << 2)) << (4 * j);
    }
    meta[n * words + c] = word;
  }
}

}  // namespace

void sparse24_compress_cuda(int64_t rows, int64_t cols, const void* dense, int64_t ld, DType dtype, void* values,
                            uint32_t* meta, int64_t* bad, void* stream) {
  PYHWP_CHECK(rows >= 0 && cols >= 0, "sparse24_compress_cuda: negative size");
  PYHWP_CHECK(ld >= cols || rows <= 1, "sparse24_compress_cuda: row stride ", ld, " below ", cols, " columns");
  const int64_t work = rows * ((cols + 31) / 32);
  if (work == 0) return;
  PYHWP_CHECK(dense && values && meta && bad, "sparse24_compress_cuda: null pointer");
  const unsigned grid = cuda::capped_grid((work + 255) / 256, 8);
  const auto s = static_cast<cudaStream_t>(stream);
  auto* bad_ll = reinterpret_cast<long long*>(bad);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sparse24_compress_kernel<T><<<grid, 256, 0, s>>>(rows, cols, static_cast<const T*>(dense), ld,
                                                     static_cast<T*>(values), meta, bad_ll);
  });
  PYHWP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace pyhwp
