// Helpers shared by the per-ISA CSR kernels (included by csr_matmul_{cpu,avx2,avx512}.cpp).
#pragma once

#include "common/bf16.h"  // to_float: a stored value (float32 or bfloat16 bits) as float32
