// Stand-in for <cuda_runtime.h> in the CPU emulation of the CUDA kernels (tests/test_cuda_emulated.py).
#pragma once
#include "cuda_emu.h"
