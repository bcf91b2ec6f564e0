// Host-side tests of csrc/core/routing_math.h, the index arithmetic of the CUDA router, permute
// and load-balance kernels: warp lane masks and ranks, expert bins, the permute's tiling,
// histogram slots and scan partition, the row-copy geometry, the load-balance layout. (The
// kernels themselves run on the CPU in tests/test_cuda_emulated_routing.py.) Run through ctest.
#include <cstdint>
#include <initializer_list>
#include <map>
#include <utility>
#include <vector>

#include "core/routing_math.h"
#include "expect.h"

namespace rm = mole_ext::routing_math;

static void test_lanes() {
  EXPECT(rm::lanemask_lt(0) == 0u && rm::lanemask_lt(1) == 1u && rm::lanemask_lt(31) == 0x7fffffffu);
  const uint32_t match = 0b10110100u;  // lanes 2, 4, 5, 7
  EXPECT(rm::rank_in_group(match, 2) == 0 && rm::rank_in_group(match, 4) == 1);
  EXPECT(rm::rank_in_group(match, 5) == 2 && rm::rank_in_group(match, 7) == 3);
  EXPECT(rm::group_leader(match) == 2 && rm::group_leader(0x80000000u) == 31);
  EXPECT(rm::popc32(0xffffffffu) == 32 && rm::popc32(0) == 0);
}

static void test_expert_bin() {
  const int64_t ids[] = {-5, -1, 0, 3, 4, int64_t(1) << 40};
  const int32_t want[] = {4, 4, 0, 3, 4, 4};
  for (int i = 0; i < 6; ++i) EXPECT(rm::expert_bin(ids[i], 4) == want[i]);
}

static void test_permute_tiling() {
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(255), int64_t(256), int64_t(257),
                    int64_t(1025), int64_t(65536), int64_t(1) << 20, (int64_t(1) << 31) - 1}) {
    for (int64_t k : {1, 2, 3, 8, 64, 1024}) {
      const rm::PermuteTiling t = rm::permute_tiling(n, k);
      EXPECT(t.tile_tokens % 32 == 0 && t.tile_tokens >= 64);
      if (n == 0) {
        EXPECT(t.num_tiles == 0);
        continue;
      }
      EXPECT(t.num_tiles == (n + t.tile_tokens - 1) / t.tile_tokens);
      EXPECT((k + 1) * t.num_tiles <= rm::kPermuteMaxHistEntries);  // fits the one-block scan
      int64_t b = -1, e = -1;
      rm::tile_tokens_range(n, t.tile_tokens, 0, &b, &e);
      EXPECT(b == 0);
      rm::tile_tokens_range(n, t.tile_tokens, t.num_tiles - 1, &b, &e);
      EXPECT(e == n);
      rm::tile_tokens_range(n, t.tile_tokens, t.num_tiles, &b, &e);
      EXPECT(b == n && e == n);
    }
  }
}

static void test_permute_uses_tiles() {
  const std::pair<std::pair<int64_t, int64_t>, bool> cases[] = {
      {{1 << 20, 8}, true},     {{8 << 20, 8}, true},      {{1 << 20, 64}, true},
      {{200000, 256}, true},    {{1, 1024}, true},         {{8 << 20, 64}, false},
      {{1 << 20, 256}, false},  {{200000, 1024}, false},   {{5, 1025}, false}};
  for (const auto& [nk, tiles] : cases) {
    const auto [n, k] = nk;
    EXPECT(rm::permute_uses_tiles(n, k) == tiles);
    EXPECT(tiles == (k <= rm::kPermuteMaxTileExperts && rm::permute_tiling(n, k).tile_tokens <= rm::kPermuteMaxTileTokens));
  }
}

// The cases of tests/test_cuda_permute.py's test_permute_large_tiles (GPU): tiles past the base
// 64 tokens, and the path each is meant to take.
static void test_permute_cases_of_the_cuda_tests() {
  const std::pair<std::pair<int64_t, int64_t>, bool> cases[] = {
      {{200000, 256}, true}, {{200000, 1024}, false}, {{3000, 1500}, false}};
  for (const auto& [nk, tiles] : cases) {
    EXPECT(rm::permute_tiling(nk.first, nk.second).tile_tokens > 64);
    EXPECT(rm::permute_uses_tiles(nk.first, nk.second) == tiles);
  }
}

static void test_hist_slot_and_block_partition() {
  int64_t want = 0;
  for (int64_t b = 0; b < 3; ++b) {
    for (int64_t t = 0; t < 5; ++t) EXPECT(rm::hist_slot(b, t, 5) == want++);  // bin-major
  }
  for (int64_t len : {0, 1, 5, 1023, 1024, 1025, 65536, 66560}) {
    for (int64_t parts : {1, 32, 1024}) {
      int64_t prev = 0;
      for (int64_t p = 0; p < parts; ++p) {
        int64_t b = -1, e = -1;
        rm::block_partition(len, parts, p, &b, &e);
        EXPECT(b == prev && b <= e);
        prev = e;
      }
      EXPECT(prev == len);
    }
  }
}

static void test_row_copy() {
  EXPECT(rm::copy_vec_bytes(8192, 0x1000, 0x2000) == 16);
  EXPECT(rm::copy_vec_bytes(8192, 0x1008, 0x2000) == 8);  // src only 8-aligned
  EXPECT(rm::copy_vec_bytes(6, 0x1000, 0x2000) == 2);     // 3 fp16 per row
  EXPECT(rm::copy_vec_bytes(3, 0x1000, 0x2000) == 1);     // 3 int8 per row
  EXPECT(rm::copy_vec_bytes(0, 0x1001, 0x2000) == 1);
  for (int64_t vecs : {1, 2, 3, 4, 31, 64, 255, 256, 512, 100000}) {
    const rm::RowCopyGeometry g = rm::row_copy_geometry(vecs, 256);
    const int tpr = g.threads_per_row;
    EXPECT((tpr & (tpr - 1)) == 0 && tpr * g.rows_per_block == 256);
    EXPECT(tpr >= (vecs < 256 ? vecs : 256));           // one sweep of its threads covers a row ...
    EXPECT(tpr < 2 * (vecs > 1 ? vecs : 1) || tpr == 1);  // ... with at most half of them idle
  }
}

static void test_load_balance_layout() {
  for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000), int64_t(16384), int64_t(1) << 20, int64_t(100000000)}) {
    for (int64_t k : {int64_t(1), int64_t(2), int64_t(3), int64_t(8), int64_t(200), int64_t(256), int64_t(300),
                      int64_t(1) << 20}) {
      const int64_t rows = rm::lb_rows_per_block(n, k);
      const int64_t blocks = (n + rows - 1) / rows;
      EXPECT(rows >= 1 && blocks >= 1 && blocks <= 2048);
      EXPECT(blocks * k <= (k > (int64_t(1) << 22) ? k : int64_t(1) << 22));
    }
  }
  // every element of a [rows, k] block is visited by exactly one active thread
  for (int64_t k : {1, 2, 3, 8, 100, 128, 129, 255, 256, 257, 1000}) {
    const int64_t threads = 256, rows = 7;
    const rm::LbLayout l = rm::lb_layout(k, threads);
    EXPECT(l.active == l.row_lanes * l.col_threads && l.active <= threads);
    std::map<std::pair<int64_t, int64_t>, int> seen;
    for (int64_t tid = 0; tid < l.active; ++tid) {
      if (l.row_lanes == 1) {  // the kernel's whole-column branch
        for (int64_t c = tid; c < k; c += threads) {
          for (int64_t r = 0; r < rows; ++r) ++seen[{r, c}];
        }
      } else {
        const int64_t c = tid % l.col_threads;
        for (int64_t r = tid / l.col_threads; r < rows; r += l.row_lanes) ++seen[{r, c}];
      }
    }
    EXPECT(static_cast<int64_t>(seen.size()) == rows * k);
    for (const auto& [rc, hits] : seen) EXPECT(hits == 1 && rc.second < k);
  }
}

int main() {
  test_lanes();
  test_expert_bin();
  test_permute_tiling();
  test_permute_uses_tiles();
  test_permute_cases_of_the_cuda_tests();
  test_hist_slot_and_block_partition();
  test_row_copy();
  test_load_balance_layout();
  return finish("routing_math");
}
