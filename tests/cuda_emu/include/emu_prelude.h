// First line of every emulated CUDA source (the transform in tests/test_cuda_emulated.py puts
// `#include "emu_prelude.h"` on top; then a #line directive restores the real file's line numbers).
//
// It includes the real csrc/cuda/common.cuh (found through the include path; #pragma once makes
// the source's own #include of it a no-op) and then redefines ONE host-side macro: the input check
// MOLE_CHECK_CUDA_TENSOR accepts the emulated device's tensors, which are CPU tensors. Nothing in
// the kernels changes.
#pragma once
#include "cuda_emu.h"
#include "common.cuh"

#undef MOLE_CHECK_CUDA_TENSOR
#define MOLE_CHECK_CUDA_TENSOR(t, name) \
  TORCH_CHECK((t).is_cpu(), name, " must be a tensor of the emulated CUDA device (a CPU tensor), got one on ", (t).device())
