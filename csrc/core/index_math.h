// Index arithmetic shared by the CPU and CUDA kernels: histogram -> offsets (exclusive scan),
// segment lookup, tiling. Plain C++ with __host__ __device__ so the same functions run in
// kernels and are unit-tested on the CPU (csrc/tests/test_index_math.cpp, tests/test_index_math.py).
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

// Which segment holds `row`, given CSR offsets[0..k] (non-decreasing, offsets[0] = 0).
// Empty segments are skipped: the answer is the largest s with offsets[s] <= row < offsets[s+1].
// Returns -1 when row is outside [offsets[0], offsets[k]).
template <typename OffT>
MOLE_HD int64_t segment_of(const OffT* offsets, int64_t k, int64_t row) {
  if (k <= 0 || row < static_cast<int64_t>(offsets[0]) || row >= static_cast<int64_t>(offsets[k])) {
    return -1;
  }
  int64_t lo = 0, hi = k;  // invariant: offsets[lo] <= row < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(offsets[mid]) <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

MOLE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of row tiles of height `tile` needed to cover every segment separately (a tile never
// straddles two experts), and the mapping from a global tile index to (segment, first row).
template <typename OffT>
MOLE_HD int64_t num_segment_tiles(const OffT* offsets, int64_t k, int64_t tile) {
  int64_t total = 0;
  for (int64_t s = 0; s < k; ++s) {
    total += ceil_div(static_cast<int64_t>(offsets[s + 1] - offsets[s]), tile);
  }
  return total;
}

// Maps tile index `t` (0 <= t < num_segment_tiles) to its segment and first row; returns false
// when t is out of range. Linear in k, which is small (experts).
template <typename OffT>
MOLE_HD bool segment_tile(const OffT* offsets, int64_t k, int64_t tile, int64_t t,
                          int64_t* segment, int64_t* row_begin, int64_t* row_end) {
  if (t < 0) return false;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t len = static_cast<int64_t>(offsets[s + 1] - offsets[s]);
    const int64_t n = ceil_div(len, tile);
    if (t < n) {
      *segment = s;
      *row_begin = static_cast<int64_t>(offsets[s]) + t * tile;
      const int64_t end = *row_begin + tile;
      *row_end = end < static_cast<int64_t>(offsets[s + 1]) ? end : static_cast<int64_t>(offsets[s + 1]);
      return true;
    }
    t -= n;
  }
  return false;
}

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
