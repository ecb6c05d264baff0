// Turns CUDA runtime errors into C++ exceptions (pybind11 raises them as RuntimeError).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>

#include "common/checks.h"

#define PYHWP_CUDA_CHECK(expr)                                                                 \
  do {                                                                                         \
    const cudaError_t pyhwp_err_ = (expr);                                                     \
    if (pyhwp_err_ != cudaSuccess) {                                                           \
      throw std::runtime_error(::pyhwp::message("CUDA error ", cudaGetErrorName(pyhwp_err_), " (", \
                                                cudaGetErrorString(pyhwp_err_), ") at ", __FILE__, \
                                                ":", __LINE__, " in " #expr));                 \
    }                                                                                          \
  } while (0)
