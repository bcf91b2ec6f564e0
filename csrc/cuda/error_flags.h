// Host side of the CUDA kernels' error reporting, in plain C++ so python_module.cpp (built by the
// host compiler) can expose it. See common.cuh for the device side and the semantics.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

namespace mole_ext {
namespace cuda_errors {

// What a kernel found wrong. One flag per kind, so concurrent reports never need atomics.
enum Kind : int {
  kPermuteExpert = 0,         // permute: expert id outside [0, num_experts)
  kLoadBalanceExpert = 1,     // load_balance_loss(_backward): expert id outside [0, K)
  kPermuteRowsIndex = 2,      // permute_rows: sorted_token entry outside [0, N)
  kUnpermuteIndex = 3,        // unpermute: sorted_token entry outside [0, N)
  kPermuteRowsDuplicate = 4,  // permute_rows, validate mode: sorted_token not a permutation
  kUnpermuteDuplicate = 5,    // unpermute, validate mode: sorted_token not a permutation
  kGroupedLoraOffsets = 6,    // grouped_lora*: offsets not non-decreasing from 0 to N
  kNumKinds = 7,
};

// The message of one kind, and one report (flag set with value, where, bound) in words. Shared by
// errors.cu and the CPU emulator of the CUDA sources (tests/cuda_emu), so both say the same.
inline const char* kind_message(int kind) {
  switch (kind) {
    case kPermuteExpert:
      return "permute: expert ids must be in [0, num_experts)";
    case kLoadBalanceExpert:
      return "load_balance_loss: expert ids must be in [0, K) (K = probs.size(1))";
    case kPermuteRowsIndex:
      return "permute_rows: sorted_token must be a permutation of [0, N), but an entry is out of range";
    case kUnpermuteIndex:
      return "unpermute: sorted_token must be a permutation of [0, N), but an entry is out of range";
    case kPermuteRowsDuplicate:
      return "permute_rows: sorted_token must be a permutation of [0, N), but a row is hit other than once";
    case kUnpermuteDuplicate:
      return "unpermute: sorted_token must be a permutation of [0, N), but a row is hit other than once";
    case kGroupedLoraOffsets:
      return "grouped_lora: offsets must be non-decreasing with offsets[0] = 0 and offsets[-1] = N (the rows of x)";
    default:
      return "unknown error";
  }
}

inline std::string describe_report(int kind, int64_t value, int64_t where, int64_t bound) {
  std::ostringstream msg;
  msg << kind_message(kind) << ": ";
  if (kind == kPermuteRowsDuplicate || kind == kUnpermuteDuplicate) {
    msg << "row " << where << " of " << bound << " is hit " << value << " times";
  } else if (kind == kGroupedLoraOffsets) {
    msg << "found offsets[" << where << "] = " << value << " (N = " << bound << ")";
  } else {
    msg << "found " << value << " at position " << where << " (valid range [0, " << bound << "))";
  }
  return msg.str();
}

// Raises (TORCH_CHECK) if a kernel on `device` (-1: any device) has reported an error since the
// last check, clearing the report. With synchronize, first waits for the device(s) so every
// kernel launched so far has finished. Without it the check reads host memory only: no sync.
void check_pending(int device, bool synchronize);

// Validate mode: every routing op synchronises its stream after its kernels and raises at once;
// permute_rows / unpermute also verify that sorted_token is a permutation. Off by default; the
// environment variable MOLE_EXT_CUDA_VALIDATE=1 turns it on at start-up.
void set_validate(bool on);
bool validate();

}  // namespace cuda_errors
}  // namespace mole_ext
