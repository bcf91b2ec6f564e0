// Stand-in for <c10/cuda/CUDAException.h> in the CPU emulation: emulated launches throw on failure
// themselves, so the launch check has nothing left to find.
#pragma once
#include <c10/util/Exception.h>

#include "../../cuda_emu.h"

#define C10_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t emu_err_ = (expr);                                                      \
    TORCH_CHECK(emu_err_ == cudaSuccess, "emulated CUDA error: ", cudaGetErrorString(emu_err_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
