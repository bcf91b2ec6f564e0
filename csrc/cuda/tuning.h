// Host switches of the CUDA kernels, in plain C++ so python_module.cpp (built by the host
// compiler) can expose them.
#pragma once

#include <cstdlib>
#include <cstring>

namespace mole_ext {
namespace tuning {

// Whether the environment variable `name` is "1" or "true": the start-up value of a switch.
inline bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && (std::strcmp(e, "1") == 0 || std::strcmp(e, "true") == 0);
}

// grouped_lora*: 16-byte global loads / stores where rows are 16-byte aligned (on by default;
// MOLE_EXT_GROUPED_LORA_SCALAR=1 turns it off at start-up). Results are identical either way;
// the switch is for cross-checks and side-by-side benchmarks.
void set_grouped_lora_vectorized(bool on);
bool grouped_lora_vectorized();
// grouped_lora*, bf16 / fp16 row GEMMs: the cp.async pipelined main loop where both operands'
// rows are 16-byte aligned and vector accesses are on (on by default; MOLE_EXT_GROUPED_LORA_NO_PIPELINE=1
// turns it off at start-up). Results are identical either way.
void set_grouped_lora_pipelined(bool on);
bool grouped_lora_pipelined();

}  // namespace tuning
}  // namespace mole_ext
