// Tile arithmetic of the CUDA grouped LoRA kernels (csrc/cuda/grouped_lora*.cuh), in plain C++
// with __host__ __device__ so the kernels and the CPU tests (csrc/tests/test_lora_tiles.cpp, run
// by ctest: `make host-test`) run the same functions.
//
// Segment tiles without a host sync
// ---------------------------------------------------------------------------------------------
// The grid of a grouped kernel must not depend on the routing (offsets live on the device, and a
// CUDA graph replays the same grid with new offsets), yet no tile may straddle two experts. With
// tiles of `bm` rows, segment s = [o_s, o_{s+1}) gets the tile numbers starting at
//   base(s) = floor(o_s / bm) + s,
// and needs ceil(n_s / bm) of them. base(s+1) - base(s) = floor(o_{s+1}/bm) - floor(o_s/bm) + 1
// >= ceil(n_s / bm), so segment s's tiles fit in [base(s), base(s+1)) and the grid
// base(K) = floor(N / bm) + K (<= ceil(N/bm) + K) covers every segment whatever the routing.
// A block finds its segment by a binary search of base() over s; the few numbers a segment does
// not use (at most one per segment, plus the rounding) are idle blocks. An empty segment owns
// exactly one idle tile, which the weight-gradient partials use to write its zeros.
//
// Offsets that are not a valid CSR list (checked and reported elsewhere) are clamped to [0, N]
// here, so every row a tile names lies in [0, N): bad routing never means an out-of-bounds access.
#pragma once

#include <cstdint>

#include "index_math.h"

namespace mole_ext {
namespace lora_tiles {

// Row tile of a segment: rows [row_begin, row_end) of segment `segment`; idle when empty.
struct SegTile {
  int64_t segment;
  int64_t row_begin;
  int64_t row_end;
};

// Number of tiles (blocks along the row dimension) for n rows in k segments, tiles of bm rows.
MOLE_HD int64_t seg_tile_grid(int64_t n, int64_t k, int64_t bm) { return n / bm + k; }

// offsets[s] clamped to [0, n].
template <typename OffT>
MOLE_HD int64_t clamped_offset(const OffT* offsets, int64_t s, int64_t n) {
  const int64_t o = static_cast<int64_t>(offsets[s]);
  return o < 0 ? 0 : (o > n ? n : o);
}

// First tile number of segment s (s in [0, k]); base(k) = seg_tile_grid for valid offsets.
template <typename OffT>
MOLE_HD int64_t seg_tile_base(const OffT* offsets, int64_t s, int64_t n, int64_t bm) {
  return clamped_offset(offsets, s, n) / bm + s;
}

// The segment owning tile number t: the largest s in [0, k) with base(s) <= t (0 if none).
template <typename OffT>
MOLE_HD int64_t seg_tile_segment(const OffT* offsets, int64_t k, int64_t n, int64_t bm, int64_t t) {
  int64_t lo = 0, hi = k;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (seg_tile_base(offsets, mid, n, bm) <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Tile t -> (segment, rows). Rows are always inside [0, n); the tile is idle when
// row_begin >= row_end (then the rows are unspecified but row_begin == row_end).
template <typename OffT>
MOLE_HD SegTile seg_tile(const OffT* offsets, int64_t k, int64_t n, int64_t bm, int64_t t) {
  const int64_t s = seg_tile_segment(offsets, k, n, bm, t);
  const int64_t o0 = clamped_offset(offsets, s, n);
  int64_t o1 = clamped_offset(offsets, s + 1, n);
  if (o1 < o0) o1 = o0;  // ill-formed (decreasing) offsets: an empty segment
  const int64_t j = t - seg_tile_base(offsets, s, n, bm);
  SegTile r{s, o0, o0};
  if (j < 0) return r;
  const int64_t b = o0 + j * bm;
  if (b >= o1) return r;
  r.row_begin = b;
  r.row_end = b + bm < o1 ? b + bm : o1;
  return r;
}

// Split of a reduction of length `len` into at most `want` pieces whose length is a multiple of
// `align` (the k-step of the kernel): piece p covers [p * chunk, min((p + 1) * chunk, len)).
// Every piece is non-empty; len == 0 gives one empty piece.
struct SplitPlan {
  int64_t chunk;
  int64_t splits;
};

MOLE_HD SplitPlan split_plan(int64_t len, int64_t want, int64_t align) {
  if (want < 1) want = 1;
  if (len <= 0) return SplitPlan{align, 1};
  int64_t chunk = index_math::ceil_div(index_math::ceil_div(len, want), align) * align;
  if (chunk < align) chunk = align;
  return SplitPlan{chunk, index_math::ceil_div(len, chunk)};
}

// How many pieces to split the row GEMMs' reduction into: enough blocks to fill the machine
// (target_blocks, about two per SM) when the row tiles alone do not, but never pieces shorter
// than min_chunk, and at most max_splits (the fp32 partials cost splits * N * cols * 4 bytes).
MOLE_HD int64_t want_splits(int64_t blocks_without_split, int64_t target_blocks, int64_t len, int64_t min_chunk,
                            int64_t max_splits) {
  if (blocks_without_split < 1) blocks_without_split = 1;
  int64_t s = index_math::ceil_div(target_blocks, blocks_without_split);
  const int64_t by_len = len / min_chunk;
  if (s > by_len) s = by_len;
  if (s > max_splits) s = max_splits;
  return s < 1 ? 1 : s;
}

// Rows per chunk of the weight-gradient partials (dA_k, dB_k reduce over a segment's rows):
// about `target_chunks` chunks of N rows plus one per segment, each a multiple of `align` rows
// and at least `min_rows`. The partial workspace is (N / chunk + K) * weight elements.
MOLE_HD int64_t wgrad_chunk_rows(int64_t n, int64_t target_chunks, int64_t align, int64_t min_rows) {
  if (target_chunks < 1) target_chunks = 1;
  int64_t c = index_math::ceil_div(index_math::ceil_div(n, target_chunks), align) * align;
  return c < min_rows ? min_rows : c;
}

// How many row chunks of N to ask wgrad_chunk_rows for, so that the weight-gradient grid, which
// has (chunks + k) * tiles blocks (seg_tile_grid: at most one more chunk per segment; `tiles` =
// output tiles of the gradient), ends in whole waves of `wave` blocks (the occupancy API's resident
// blocks times the SMs): the fewest waves that hold min_chunks chunks, filled with as many chunks
// as they take, at most max_chunks (each chunk costs a partial of the gradient in fp32).
MOLE_HD int64_t wgrad_target_chunks(int64_t tiles, int64_t wave, int64_t k, int64_t min_chunks, int64_t max_chunks) {
  if (tiles < 1) tiles = 1;
  if (wave < 1) wave = 1;
  if (min_chunks < 1) min_chunks = 1;
  const int64_t waves = index_math::ceil_div((min_chunks + k) * tiles, wave);
  int64_t c = waves * wave / tiles - k;
  if (c < min_chunks) c = min_chunks;
  if (c > max_chunks) c = max_chunks;
  return c < 1 ? 1 : c;
}

// ---- the operand layouts of each product (what the CUDA host code passes to its kernels) ----
// Tensors are contiguous: x [N, in], A [K, r, in], B [K, out, r], dY [N, out], H / dH [N, r].

// row_gemm: C[i, n] = sum_k L[i, k] R_s[k, n] over segment rows i. L is [N, lda] with the
// reduction contiguous; R_s starts at s * r_seg, element (k, n) at k * r_sk + n * r_sn.
struct RowGemmShape {
  int64_t lda;
  int64_t r_seg, r_sk, r_sn;
  int64_t ncols, klen;
};
// H = X A_k^T: (k, n) = (c, j) -> A[s, j, c]
MOLE_HD RowGemmShape shrink_shape(int64_t in, int64_t r) { return RowGemmShape{in, r * in, 1, in, r, in}; }
// Y = Hs B_k^T: (k, n) = (j, o) -> B[s, o, j]
MOLE_HD RowGemmShape expand_shape(int64_t r, int64_t out) { return RowGemmShape{r, out * r, 1, r, out, r}; }
// G = dY B_k: (k, n) = (o, j) -> B[s, o, j]
MOLE_HD RowGemmShape dy_b_shape(int64_t out, int64_t r) { return RowGemmShape{out, out * r, r, 1, r, out}; }
// dX = dH A_k: (k, n) = (j, c) -> A[s, j, c]
MOLE_HD RowGemmShape dx_shape(int64_t r, int64_t in) { return RowGemmShape{r, r * in, in, 1, in, r}; }

// wgrad: W_s[m, n] = sum over segment rows i of L[i, m] R[i, n]; L is [N, lda], R is [N, ldb].
struct WgradShape {
  int64_t lda, m_rows;
  int64_t ldb, ncols;
};
// dA_k [r, in] = dH_k^T X_k
MOLE_HD WgradShape grad_a_shape(int64_t r, int64_t in) { return WgradShape{r, r, in, in}; }
// dB_k [out, r] = dY_k^T Hs_k
MOLE_HD WgradShape grad_b_shape(int64_t out, int64_t r) { return WgradShape{out, out, r, r}; }

// ---- the fused dY pass (dy_pass_kernel): G = dY B_k and dB_k = dY_k^T Hs_k in one pass ----
// A block covers a row chunk x a column chunk of dY x a rank chunk of `width` (32) columns of B_k
// and Hs. G[:, c] and dB[:, c] of a rank chunk c need only B_k[:, c] and Hs[:, c], so every rank
// chunk is the r <= width computation on a column slice, writing its own slice of the partials.
// blockIdx.x = (row chunk * col_chunks + column chunk) * rank_chunks + rank chunk: the rank chunks of
// one dY tile are adjacent blocks (as row_gemm's column tiles of a row tile), so they run side by
// side and the tile comes from DRAM once, the other rank chunks hitting L2. With one rank chunk
// (r <= width) this is row chunk * col_chunks + column chunk, the order of the r <= 32 kernel.
// (32-bit divisions: the grid has fewer than 2^31 blocks; a 64-bit one is a called subroutine.)
struct DyPassBlock {
  int64_t row_chunk;
  int64_t col_chunk;
  int64_t rank_chunk;
};

MOLE_HD DyPassBlock dy_pass_block(uint32_t block, uint32_t col_chunks, uint32_t rank_chunks) {
  const uint32_t tile = block / rank_chunks;
  return DyPassBlock{static_cast<int64_t>(tile / col_chunks), static_cast<int64_t>(tile % col_chunks),
                     static_cast<int64_t>(block % rank_chunks)};
}

// Rank chunks of `width` columns over r (at least one, so r = 0 still has its block of zeros).
MOLE_HD int64_t dy_pass_rank_chunks(int64_t r, int64_t width) {
  const int64_t c = index_math::ceil_div(r, width);
  return c < 1 ? 1 : c;
}

// Valid columns of rank chunk `chunk`: width, or what is left of r in the last one.
MOLE_HD int dy_pass_rank_cols(int64_t r, int64_t chunk, int64_t width) {
  const int64_t left = r - chunk * width;
  return static_cast<int>(left < 0 ? 0 : (left < width ? left : width));
}

// Halves of a dy_pass block: 1 for r <= width (256 threads over 256 columns of dY, the r <= 32
// kernel), 2 above (rank chunks; 512 threads over 512 columns, so G's partials cost half as much).
MOLE_HD int dy_pass_halves(int64_t r, int64_t width) { return r <= width ? 1 : 2; }

// Whether the fused pass moves fewer DRAM bytes than two passes: it saves the second read of dY
// (elem_bytes per element of dY) and writes, then reads back, G in fp32 per column chunk of `cols`
// columns (8 r / cols bytes per element of dY). For 16-bit types: r < 64 at 256 columns, r < 128 at
// 512. (Its dB partials cost about what the two-pass weight gradient's do; bench/traffic.py models
// both: at the break-even, r = 128 over 512 columns, two passes move slightly less.)
MOLE_HD bool dy_pass_pays(int64_t r, int64_t cols, int64_t elem_bytes) { return 8 * r < elem_bytes * cols; }

// ---- 16-byte vector access (tile loads and epilogues) ----
// A row of a tile is moved in chunks of v = 16 / element-bytes elements. The chunk at column c0
// (a multiple of v) of a row with cv valid columns holds vec_chunk_valid(c0, v, cv) of them: v
// means one 16-byte access, 1..v-1 element by element (zero-filled), 0 nothing.
MOLE_HD int vec_chunk_valid(int c0, int v, int cv) {
  const int left = cv - c0;
  return left <= 0 ? 0 : (left < v ? left : v);
}

}  // namespace lora_tiles
}  // namespace mole_ext
