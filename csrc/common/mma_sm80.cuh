// sm_80 warp-level primitives the tensor-core kernels share: cp.async copies into shared
// memory, ldmatrix loads, the dense mma.m16n8k16 and the sparse mma.sp.m16n8k32. Included by .cu
// files only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pyhwp {
namespace cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies src_bytes (0..16) from global to shared memory and zero-fills the rest of the 16 bytes.
// Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Source bytes for cp_async16 of a chunk of eight 2-byte elements in a row that exists (`row_ok`)
// with `left` elements from the chunk's start to the row's end: 16, the tail's 2 * left, or 0
// (cp_async16 zero-fills the rest).
__device__ __forceinline__ int chunk_bytes16(bool row_ok, int64_t left) {
  return row_ok && left > 0 ? (left >= 8 ? 16 : static_cast<int>(left) * 2) : 0;
}
// Copies 4 bytes (both addresses 4-byte aligned).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, which lands in r[i]:
// lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 (PTX ISA 9.7.14.5.15, ldmatrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The same with each matrix transposed: lane l holds column l/4, rows 2(l%4) and 2(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A B + D for a 16 x 16 A (4 registers), a 16 x 8 B (2 registers) and float32 accumulators
// (PTX ISA 9.7.14.5.8, mma.m16n8k16 with .f16/.bf16): A reg i of lane (g, t) = row g + 8(i%2),
// columns 2t + 8(i/2), +1; B reg j = rows 2t + 8j, +1 of column g.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A B + D for a 16 x 32 2:4-sparse A (4 registers of compressed values), a 32 x 8 B
// (4 registers) and float32 accumulators, metadata `e` from threads 0 and 1 of each quad
// (sparsity selector 0). Layouts: PTX ISA 9.7.14.6.2.2 (sparse mma.m16n8k32, .f16/.bf16).
// ::ordered_metadata (PTX 8.5) promises each group's two indices increase, which the 2:4 format
// guarantees; plain mma.sp may run slower on sm_90 and newer (PTX ISA 9.7.14.6.3).
template <typename T>
__device__ __forceinline__ void mma_sp16832(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e);
template <>
__device__ __forceinline__ void mma_sp16832<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                    uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma_sp16832<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

}  // namespace cuda
}  // namespace pyhwp
