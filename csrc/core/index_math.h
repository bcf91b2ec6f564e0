// Index arithmetic shared by the CPU and CUDA kernels: histogram -> offsets (exclusive scan),
// offsets validation, ceil_div. (The segment tile map of the grouped kernels, which needs no host
// sync, is core/lora_tiles.h; the routing kernels' arithmetic is core/routing_math.h.) Plain C++ with __host__ __device__ so the same functions run in
// kernels and are unit-tested on the CPU (csrc/tests/test_index_math.cpp, run by ctest).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOLE_HD __host__ __device__ __forceinline__
#else
#define MOLE_HD inline
#endif

namespace mole_ext {
namespace index_math {

// Exclusive scan of `counts[0..k)` into `offsets[0..k]`; offsets[0] = 0, offsets[k] = total.
template <typename CountT, typename OffT>
MOLE_HD void exclusive_scan(const CountT* counts, int64_t k, OffT* offsets) {
  OffT running = 0;
  for (int64_t i = 0; i < k; ++i) {
    offsets[i] = running;
    running += static_cast<OffT>(counts[i]);
  }
  offsets[k] = running;
}

MOLE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when offsets[0..k] is a valid CSR boundary list over n rows.
template <typename OffT>
MOLE_HD bool valid_offsets(const OffT* offsets, int64_t k, int64_t n) {
  if (k < 1 || offsets[0] != 0 || static_cast<int64_t>(offsets[k]) != n) return false;
  for (int64_t s = 0; s < k; ++s) {
    if (offsets[s + 1] < offsets[s]) return false;
  }
  return true;
}

}  // namespace index_math
}  // namespace mole_ext
