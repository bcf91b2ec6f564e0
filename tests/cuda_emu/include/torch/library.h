// Wrapper of <torch/library.h> for the CPU emulation: the real header, but TORCH_LIBRARY_IMPL
// blocks of the emulated sources compile to unused functions instead of registering kernels (the
// emulated entry points are registered once, as mole_cuda_emu::*, by emu_support.cpp; registering
// them for mole_ext's CUDA key would clash with a mole_ext build that has CUDA kernels).
#pragma once
#include_next <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define MOLE_EMU_CAT2(a, b) a##b
#define MOLE_EMU_CAT(a, b) MOLE_EMU_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void MOLE_EMU_CAT(mole_emu_unregistered_impl_, __COUNTER__)(torch::Library & m)
