// The one switch from DType to a CUDA element type, and the workspace check every CUDA op shares.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/checks.h"
#include "common/dtype.h"

namespace pyhwp {

// Calls f(T{}) with T = float, __half or __nv_bfloat16 as `dtype` says.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

// Throws unless `workspace` holds at least `needed` bytes and is 256-byte aligned.
inline void check_workspace(const char* op, const void* workspace, size_t bytes, size_t needed) {
  PYHWP_CHECK(workspace != nullptr && bytes >= needed, op, ": workspace of ", bytes, " bytes, needs ", needed);
  PYHWP_CHECK((reinterpret_cast<uintptr_t>(workspace) & 255u) == 0, op, ": workspace is not 256-byte aligned");
}

}  // namespace pyhwp
