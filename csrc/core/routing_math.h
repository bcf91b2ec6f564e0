// Index arithmetic of the CUDA routing kernels (csrc/cuda/permute.cu, load_balance.cu): expert
// bins, the warp-tile layout of the permute counting sort, the (bin, tile) histogram slots, the
// work split of the single-block scan, the row-copy geometry and the load-balance block layout.
// Everything is __host__ __device__ (MOLE_HD) so the kernels and the CPU unit tests
// (csrc/tests/test_routing_math.cpp, run by ctest: `make host-test`) run the same code.
#pragma once

#include <cstdint>

#include "index_math.h"

namespace mole_ext {
namespace routing_math {

constexpr int kWarpSize = 32;

// ---- warp lane masks (the parts of the in-warp stable ranking that are plain arithmetic) ----

MOLE_HD int popc32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Lanes strictly below `lane` (0 <= lane < 32).
MOLE_HD uint32_t lanemask_lt(int lane) { return lane <= 0 ? 0u : (0xffffffffu >> (32 - lane)); }

// Stable rank of `lane` among the lanes of its match group (`match` from __match_any_sync):
// how many lanes with the same key sit below it.
MOLE_HD int rank_in_group(uint32_t match, int lane) { return popc32(match & lanemask_lt(lane)); }

// The lowest lane of a non-empty match group: the one lane that updates the group's counter.
MOLE_HD int group_leader(uint32_t match) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(match)) - 1;
#else
  return __builtin_ctz(match);
#endif
}

// ---- expert bins ----

// Bin of expert id `e` among `k` experts: e itself when 0 <= e < k, else k, the bin of invalid
// ids, which the permute sorts after every valid row so sorted_token stays a permutation.
template <typename IndexT>
MOLE_HD int32_t expert_bin(IndexT e, int64_t k) {
  return (e >= 0 && static_cast<int64_t>(e) < k) ? static_cast<int32_t>(e) : static_cast<int32_t>(k);
}

// ---- permute: tiles of tokens, one warp per tile ----

// Above this many experts the permute uses a stable device sort instead of the tile histogram
// (each warp keeps one counter per bin in shared memory).
constexpr int64_t kPermuteMaxTileExperts = 1024;
constexpr int64_t kPermuteBaseTile = 64;          // tokens per warp tile, a multiple of 32
constexpr int64_t kPermuteMaxHistEntries = 1 << 16;  // bins * tiles, scanned by one block

struct PermuteTiling {
  int64_t tile_tokens;  // tokens per tile (multiple of 32)
  int64_t num_tiles;    // ceil(n / tile_tokens); 0 when n == 0
};

// Tile size for n tokens and k experts: kPermuteBaseTile, grown (in multiples of 32) until the
// (k + 1) x tiles histogram fits kPermuteMaxHistEntries when that is possible (it always is for
// k <= kPermuteMaxTileExperts), so the one-block scan stays short.
MOLE_HD PermuteTiling permute_tiling(int64_t n, int64_t k) {
  PermuteTiling t{kPermuteBaseTile, 0};
  if (n <= 0) return t;
  int64_t max_tiles = kPermuteMaxHistEntries / (k + 1);
  if (max_tiles < 1) max_tiles = 1;
  const int64_t need = index_math::ceil_div(n, max_tiles);
  if (need > t.tile_tokens) t.tile_tokens = index_math::ceil_div(need, kWarpSize) * kWarpSize;
  t.num_tiles = index_math::ceil_div(n, t.tile_tokens);
  return t;
}

// The tile histogram caps (k + 1) x tiles, so for many experts and many tokens its tiles grow and
// only 65536 / (k + 1) warps walk them, each a dependent chain of 32-token steps (K = 1024 at
// N = 1M: 63 warps of 521 steps). Past this many tokens per tile the stable device sort is used.
constexpr int64_t kPermuteMaxTileTokens = 2048;

// Whether permute sorts n tokens over k experts by the tile histogram (else by a device sort).
MOLE_HD bool permute_uses_tiles(int64_t n, int64_t k) {
  return k <= kPermuteMaxTileExperts && permute_tiling(n, k).tile_tokens <= kPermuteMaxTileTokens;
}

// Slot of (bin, tile) in the histogram. Bin-major, so one exclusive scan over the flat array
// gives every (bin, tile) its first output row, in expert order and, inside an expert, in tile
// (= token) order: that is what makes the permute stable.
MOLE_HD int64_t hist_slot(int64_t bin, int64_t tile, int64_t num_tiles) { return bin * num_tiles + tile; }

// Token range [begin, end) of tile `tile`.
MOLE_HD void tile_tokens_range(int64_t n, int64_t tile_tokens, int64_t tile, int64_t* begin, int64_t* end) {
  const int64_t b = tile * tile_tokens;
  const int64_t e = b + tile_tokens;
  *begin = b < n ? b : n;
  *end = e < n ? e : n;
}

// Contiguous split of [0, len) over `parts` workers: worker `part` owns [begin, end), possibly
// empty. Used by the one-block scan (each thread scans a run of the histogram).
MOLE_HD void block_partition(int64_t len, int64_t parts, int64_t part, int64_t* begin, int64_t* end) {
  const int64_t chunk = index_math::ceil_div(len, parts);
  int64_t b = part * chunk;
  if (b > len) b = len;
  int64_t e = b + chunk;
  if (e > len) e = len;
  *begin = b;
  *end = e;
}

// ---- row copies (permute, permute_rows, unpermute) ----

// Widest access in bytes (16, 8, 4, 2 or 1) that divides the row size and both base addresses,
// so every row of both tensors starts aligned to it.
MOLE_HD int copy_vec_bytes(int64_t row_bytes, uint64_t src_addr, uint64_t dst_addr) {
  for (int v = 16; v > 1; v >>= 1) {
    if (row_bytes % v == 0 && src_addr % v == 0 && dst_addr % v == 0) return v;
  }
  return 1;
}

struct RowCopyGeometry {
  int threads_per_row;  // power of two, <= block_threads
  int rows_per_block;   // block_threads / threads_per_row
};

// A block of `block_threads` (a power of two) copies rows_per_block rows at once, each by
// threads_per_row threads: the smallest power of two covering the row's vectors, capped at the
// block, so short rows do not leave most of a block idle.
MOLE_HD RowCopyGeometry row_copy_geometry(int64_t vecs_per_row, int block_threads) {
  int tpr = 1;
  while (tpr < vecs_per_row && tpr < block_threads) tpr *= 2;
  return RowCopyGeometry{tpr, block_threads / tpr};
}

// ---- load balance: partial sums per block of rows ----

constexpr int64_t kLbTargetElems = 2048;    // probs elements per block (8 per thread)
constexpr int64_t kLbMaxBlocks = 2048;
constexpr int64_t kLbMaxPartials = 1 << 22;  // blocks * k partial entries

// Rows per block of the partial-sum kernel. A function of (n, k) alone, never of the GPU, so
// the reduction order, and with it every bit of the result, is the same on every device.
MOLE_HD int64_t lb_rows_per_block(int64_t n, int64_t k) {
  if (n <= 0) return 1;
  int64_t rows = kLbTargetElems / k;
  if (rows < 1) rows = 1;
  int64_t max_blocks = kLbMaxPartials / k;
  if (max_blocks < 1) max_blocks = 1;
  if (max_blocks > kLbMaxBlocks) max_blocks = kLbMaxBlocks;
  if (index_math::ceil_div(n, rows) > max_blocks) rows = index_math::ceil_div(n, max_blocks);
  return rows;
}

struct LbLayout {
  int64_t col_threads;  // min(k, threads): threads that split the columns
  int64_t row_lanes;    // threads / col_threads: threads that split the rows of one column
  int64_t active;       // row_lanes * col_threads; threads >= active only join barriers
};

// Thread tid < active handles row lane tid / col_threads and columns tid % col_threads,
// + col_threads, ... (one column when k <= threads); consecutive threads read consecutive
// elements of a row, so the loads coalesce.
MOLE_HD LbLayout lb_layout(int64_t k, int64_t threads) {
  LbLayout l;
  l.col_threads = k < threads ? k : threads;
  l.row_lanes = threads / l.col_threads;
  l.active = l.row_lanes * l.col_threads;
  return l;
}

}  // namespace routing_math
}  // namespace mole_ext
