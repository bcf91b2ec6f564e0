// The pybind11 side of mole_ext._C: what is not an op. Importing the module also loads the
// operator library registered in torch_bindings.cpp and the backend files.
#include <pybind11/pybind11.h>

#ifdef MOLE_EXT_WITH_CUDA
#include "cuda/error_flags.h"
#include "cuda/tuning.h"
#endif

namespace py = pybind11;

namespace {

bool compiled_with_cuda() {
#ifdef MOLE_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mole_ext compiled core: importing it registers the torch.ops.mole_ext operators.";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in.");

  // Errors reported by CUDA kernels (csrc/cuda/common.cuh). No-ops without CUDA kernels.
  m.def("cuda_check_errors", [](bool synchronize) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::cuda_errors::check_pending(-1, synchronize);
#else
    (void)synchronize;
#endif
  }, py::arg("synchronize") = true,
        "Raise an error a mole_ext CUDA kernel reported (bad expert id, bad sorted_token); "
        "synchronize waits for running kernels first.");
  m.def("set_cuda_validate", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::cuda_errors::set_validate(on);
#else
    (void)on;
#endif
  }, "Validate mode: CUDA routing ops synchronise and raise bad ids in the failing call.");
  m.def("cuda_validate", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::cuda_errors::validate();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_vectorized", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_vectorized(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora*: 16-byte global accesses where rows allow (default) or element accesses; "
     "the results are identical.");
  m.def("grouped_lora_vectorized", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_vectorized();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_pipelined", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_pipelined(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora*, bf16 / fp16: the cp.async pipelined main loop where rows allow (default) or "
     "the plain one; the results are identical.");
  m.def("grouped_lora_pipelined", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_pipelined();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_fused_dy", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_fused_dy(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora_backward*, bf16 / fp16: G = dY B and dB = dY^T Hs in one pass over dY "
     "(default; in rank chunks of 32 for r > 32) or two; the results agree within rounding (other summation order).");
  m.def("grouped_lora_fused_dy", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_fused_dy();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_fused_dy_any_rank", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_fused_dy_any_rank(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora_backward*, bf16 / fp16 with the fused dY pass on: use it at every rank (an A/B "
     "switch), not only where its fp32 partials of G cost fewer DRAM bytes than a second read of dY "
     "(r < 128, the default).");
  m.def("grouped_lora_fused_dy_any_rank", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_fused_dy_any_rank();
#else
    return false;
#endif
  });
}
