// Element types the CUDA kernels take, as a plain enum that crosses the binding as an int.
#pragma once

namespace pyhwp {

// Storage type of values, x, bias and y; the CUDA kernels accumulate in float32 for all three.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace pyhwp
