// Conversions between bfloat16 operands and the float32 scratch the kernels compute in.
#include "common/bf16.h"

#include <omp.h>

#include <algorithm>

namespace pyhwp {

DenseIn widen_bf16(const DenseInBf16& x, bool k_contiguous, int64_t ld, float* dst, int num_threads) {
  const int64_t K = x.rows, P = x.cols;
  const int64_t outer = k_contiguous ? P : K, inner = k_contiguous ? K : P;
  const int64_t so = k_contiguous ? x.stride_p : x.stride_k, si = k_contiguous ? x.stride_k : x.stride_p;
  const int nt = K * P > 65536 ? num_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    const uint16_t* src = x.data + o * so;
    float* out = dst + o * ld;
    if (si == 1) {
      for (int64_t i = 0; i < inner; ++i) out[i] = bf16_to_float(src[i]);
    } else {
      for (int64_t i = 0; i < inner; ++i) out[i] = bf16_to_float(src[i * si]);
    }
    std::fill(out + inner, out + ld, 0.f);
  }
  return k_contiguous ? DenseIn{dst, K, P, 1, ld} : DenseIn{dst, K, P, ld, 1};
}

void round_to_bf16(const DenseOut& yf, const DenseOutBf16& y, int num_threads) {
  const int64_t N = y.rows, P = y.cols;
  // Walk y in memory order: n inner when y's n is contiguous (a linear output).
  const bool n_inner = y.stride_n == 1 && y.stride_p != 1;
  const int64_t outer = n_inner ? P : N, inner = n_inner ? N : P;
  const int64_t yo = n_inner ? y.stride_p : y.stride_n, yi = n_inner ? y.stride_n : y.stride_p;
  const int64_t fo = n_inner ? yf.stride_p : yf.stride_n, fi = n_inner ? yf.stride_n : yf.stride_p;
  const int nt = N * P > 65536 ? num_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < outer; ++o) {
    uint16_t* out = y.data + o * yo;
    const float* src = yf.data + o * fo;
    if (yi == 1 && fi == 1) {
      for (int64_t i = 0; i < inner; ++i) out[i] = float_to_bf16(src[i]);
    } else {
      for (int64_t i = 0; i < inner; ++i) out[i * yi] = float_to_bf16(src[i * fi]);
    }
  }
}

DenseOut float_like(const DenseOutBf16& y, float* buf) {
  const int64_t N = y.rows, P = y.cols;
  return y.stride_n == 1 && y.stride_p != 1 ? DenseOut{buf, N, P, 1, N} : DenseOut{buf, N, P, P, 1};
}

const float* widen_bf16(const uint16_t* src, int64_t n, float* dst) {
  if (src == nullptr) return nullptr;
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  return dst;
}

}  // namespace pyhwp
