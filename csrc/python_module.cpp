// The pybind11 side of mole_ext._C: what is not an op. Importing the module also loads the
// operator library registered in torch_bindings.cpp and the backend files.
#include <pybind11/pybind11.h>

#include <string>

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

// A switch of the CUDA kernels as `set_<name>(on)` (docstring `doc`) and `<name>()`; without CUDA
// kernels (set, get null) setting does nothing and the getter returns false.
void def_switch(py::module_& m, const std::string& name, void (*set)(bool), bool (*get)(), const char* doc) {
  m.def(("set_" + name).c_str(), [set](bool on) {
    if (set != nullptr) set(on);
  }, doc);
  m.def(name.c_str(), [get]() { return get != nullptr && get(); });
}

}  // namespace

// The setter and getter of switch `fn` in namespace mole_ext::`ns`, or nulls without CUDA kernels.
#ifdef MOLE_EXT_WITH_CUDA
#define MOLE_EXT_SWITCH(ns, fn) &mole_ext::ns::set_##fn, &mole_ext::ns::fn
#else
#define MOLE_EXT_SWITCH(ns, fn) nullptr, nullptr
#endif

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
  def_switch(m, "cuda_validate", MOLE_EXT_SWITCH(cuda_errors, validate),
             "Validate mode: CUDA routing ops synchronise and raise bad ids in the failing call.");

  // Tuning switches of the CUDA grouped LoRA kernels (csrc/cuda/tuning.h). None changes results
  // except as each says; all read false without CUDA kernels.
  def_switch(m, "grouped_lora_vectorized", MOLE_EXT_SWITCH(tuning, grouped_lora_vectorized),
             "CUDA grouped_lora*: 16-byte global accesses where rows allow (default) or element accesses; "
             "the results are identical.");
  def_switch(m, "grouped_lora_pipelined", MOLE_EXT_SWITCH(tuning, grouped_lora_pipelined),
             "CUDA grouped_lora*, bf16 / fp16: the cp.async pipelined main loop where rows allow (default) or "
             "the plain one; the results are identical.");
  def_switch(m, "grouped_lora_fused_dy", MOLE_EXT_SWITCH(tuning, grouped_lora_fused_dy),
             "CUDA grouped_lora_backward*, bf16 / fp16: G = dY B and dB = dY^T Hs in one pass over dY "
             "(default; in rank chunks of 32 for r > 32) or two; the results agree within rounding (other "
             "summation order).");
  def_switch(m, "grouped_lora_fused_dy_any_rank", MOLE_EXT_SWITCH(tuning, grouped_lora_fused_dy_any_rank),
             "CUDA grouped_lora_backward*, bf16 / fp16 with the fused dY pass on: use it at every rank (an A/B "
             "switch), not only where its fp32 partials of G cost fewer DRAM bytes than a second read of dY "
             "(r < 128, the default).");
}
