// Host switches of the CUDA kernels, in plain C++ so python_module.cpp (built by the host
// compiler) can expose them.
#pragma once

#include <cctype>
#include <cstdlib>

namespace mole_ext {
namespace tuning {

// Whether the text of a switch means "on": 1, true, yes or on, in any letter case (nothing else;
// an unset variable is off). setup.py's _truthy and CMakeLists.txt's mole_env_flag read the build
// switches by the same rule; csrc/tests/test_env_flag.cpp and tests/test_build.py check all three.
inline bool flag_value(const char* text) {
  if (text == nullptr) return false;
  static const char* const kOn[] = {"1", "true", "yes", "on"};
  for (const char* word : kOn) {
    const char* t = text;
    const char* w = word;
    while (*t != '\0' && *w != '\0' && std::tolower(static_cast<unsigned char>(*t)) == *w) {
      ++t;
      ++w;
    }
    if (*t == '\0' && *w == '\0') return true;
  }
  return false;
}

// The start-up value of a switch: the environment variable `name` by flag_value's rule.
inline bool env_flag(const char* name) { return flag_value(std::getenv(name)); }

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
// grouped_lora_backward*, bf16 / fp16 on sm_80+: G = dY B and dB = dY^T Hs in one pass over dY
// (dy_pass_kernel, in rank chunks of 32 for r > 32; on by default, MOLE_EXT_GROUPED_LORA_NO_FUSED_DY=1
// turns it off at start-up) or in two (row_gemm + wgrad). The sums run in another order: the results
// agree within rounding, not bit for bit; each is reproducible run to run.
void set_grouped_lora_fused_dy(bool on);
bool grouped_lora_fused_dy();
// With the fused pass on: use it at every rank, not only where its fp32 partials of G cost fewer
// DRAM bytes than the second read of dY (r < 128 for 16-bit types; lora_tiles.h's dy_pass_pays).
// Off by default (MOLE_EXT_GROUPED_LORA_FUSED_DY_ANY_RANK=1 turns it on at start-up): the A/B switch
// that lets the benchmarks and GPU tests run the fused pass at r = 128 too.
void set_grouped_lora_fused_dy_any_rank(bool on);
bool grouped_lora_fused_dy_any_rank();

}  // namespace tuning
}  // namespace mole_ext
