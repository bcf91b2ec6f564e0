// grouped_lora's kernels, built from the tile primitives of grouped_lora_tile.cuh: the two block-
// tiled GEMMs (row_gemm: output rows are segment rows; wgrad: the reduction runs over a chunk of a
// segment's rows), the deterministic per-segment reduction of the weight-gradient partials, the
// elementwise finishing steps, and the offsets check. Launched by grouped_lora_launch.cuh.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../core/index_math.h"
#include "../core/lora_tiles.h"
#include "common.cuh"
#include "error_flags.h"
#include "grouped_lora_tile.cuh"

namespace mole_ext {
namespace cuda {
namespace glora {

// ---- row_gemm: output rows are segment rows ----

enum class Epi { kPartial, kStore, kAdd };

template <typename S>
struct RowGemmArgs {
  const S* a;          // [N, lda] left operand, row i = segment row i, reduction contiguous
  int64_t lda;
  const S* b;          // right operand of segment s at b + s * b_seg: element (k, n) at k * b_sk + n * b_sn
  int64_t b_seg, b_sk, b_sn;
  const int64_t* offsets;  // [K+1] device
  int64_t k_seg, n, ncols, klen, kchunk;
  int64_t n_tiles;     // column tiles, ceil(ncols / BN): blockIdx.x = row tile * n_tiles + column tile
  void* out;           // kPartial: Acc [splits, N, ncols]; else S [N, ldo]
  int64_t ldo;
  bool a_vec, b_vec, out_vec;  // 16-byte accesses to a, b, out (every row 16-byte aligned)
  int pipe;                    // Pipe: the cp.async main loop and b's layout for it, or kPipeNone
};

// Shared memory of a row_gemm or wgrad block (PipeSmem is instantiated for the pipelined 16-bit
// kernels only).
template <typename S, typename Acc, int PIPE>
constexpr size_t row_gemm_smem() {
  if constexpr (PIPE == kPipeNone) {
    return TileSmem<S, Acc>::kBytes;
  } else {
    return PipeSmem<S>::kBytes;
  }
}

template <typename S, typename Acc, bool TC, Epi EPI, int PIPE = kPipeNone>
__global__ void __launch_bounds__(kThreads) row_gemm_kernel(const RowGemmArgs<S> p) {
  __shared__ __align__(128) unsigned char smem[row_gemm_smem<S, Acc, PIPE>()];
  // The column tiles of a row tile are consecutive blocks, so they run side by side and its rows of
  // the left operand (x, dY, Hs or dH) come from DRAM once, the other column tiles hitting L2
  // (with r > 64 the shrink and G have two or more column tiles over the same rows).
  // (32-bit division: grid_dim bounds blockIdx.x by 2^31 - 1; a 64-bit one is a called
  // subroutine whose stack frame bench/sass_check.py finds as local memory.)
  const unsigned col_tiles = static_cast<unsigned>(p.n_tiles);
  const unsigned row_tile = blockIdx.x / col_tiles;
  const lt::SegTile st = lt::seg_tile(p.offsets, p.k_seg, p.n, BM, static_cast<int64_t>(row_tile));
  if (st.row_begin >= st.row_end) return;  // idle tile: the whole block leaves before any barrier
  const int mv = static_cast<int>(st.row_end - st.row_begin);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % col_tiles) * BN;
  const int nv = static_cast<int>(p.ncols - n0 < BN ? p.ncols - n0 : BN);
  const int64_t kbeg = static_cast<int64_t>(blockIdx.z) * p.kchunk;
  const int64_t kend = kbeg + p.kchunk < p.klen ? kbeg + p.kchunk : p.klen;
  const Operand<S> A{p.a + st.row_begin * p.lda + kbeg, p.lda, 1, /*j_fast=*/true, p.a_vec};
  const Operand<S> B{p.b + st.segment * p.b_seg + kbeg * p.b_sk + n0 * p.b_sn, p.b_sk, p.b_sn,
                     /*j_fast=*/p.b_sn == 1, p.b_vec && p.b_sn == 1};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kPipelined = PIPE != kPipeNone && TC && kIs16Bit<S> && std::is_same_v<Acc, float>;
#else
  constexpr bool kPipelined = false;  // no cp.async before sm_80 (the host never asks for it there)
#endif
  if constexpr (kPipelined) {
    block_mma_pipelined<S, PIPE>(smem, A, B, mv, nv, kend > kbeg ? kend - kbeg : 0);
  } else {
    block_mma<S, Acc, TC>(smem, A, B, mv, nv, kend > kbeg ? kend - kbeg : 0);
  }
  const Acc* sC = reinterpret_cast<const Acc*>(smem);
  using OutT = std::conditional_t<EPI == Epi::kPartial, Acc, S>;
  if (p.out_vec) {  // 16-byte chunks of a row: the same values as the loop below, fewer accesses
    constexpr int V = 16 / static_cast<int>(sizeof(OutT));
    static_assert(BN % V == 0, "an output tile row holds whole vectors");
    for (int idx = threadIdx.x; idx < BM * (BN / V); idx += kThreads) {
      const int m = idx / (BN / V), c0 = (idx % (BN / V)) * V;
      const int valid = m < mv ? lt::vec_chunk_valid(c0, V, nv) : 0;
      if (valid == 0) continue;
      const int64_t row = st.row_begin + m;
      OutT* o = EPI == Epi::kPartial
                    ? static_cast<OutT*>(p.out) + (static_cast<int64_t>(blockIdx.z) * p.n + row) * p.ncols + n0 + c0
                    : static_cast<OutT*>(p.out) + row * p.ldo + n0 + c0;
      const Acc* c = sC + m * TileSmem<S, Acc>::LDC + c0;
      alignas(16) OutT buf[V];
      if (EPI == Epi::kAdd && valid == V) *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(o);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (i >= valid) break;
        if constexpr (EPI == Epi::kPartial) {
          buf[i] = c[i];
        } else if constexpr (EPI == Epi::kStore) {
          buf[i] = from_acc<S, Acc>(c[i]);
        } else {
          buf[i] = from_acc<S, Acc>(to_acc<Acc>(valid == V ? buf[i] : o[i]) + c[i]);
        }
      }
      if (valid == V) {
        store16_global(o, *reinterpret_cast<const uint4*>(buf));
      } else {
        for (int i = 0; i < valid; ++i) o[i] = buf[i];
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int m = idx / BN, c = idx % BN;
    if (m >= mv || c >= nv) continue;
    const Acc v = sC[m * TileSmem<S, Acc>::LDC + c];
    const int64_t row = st.row_begin + m, col = n0 + c;
    if constexpr (EPI == Epi::kPartial) {
      static_cast<Acc*>(p.out)[(static_cast<int64_t>(blockIdx.z) * p.n + row) * p.ncols + col] = v;
    } else if constexpr (EPI == Epi::kStore) {
      static_cast<S*>(p.out)[row * p.ldo + col] = from_acc<S, Acc>(v);
    } else {
      S* o = static_cast<S*>(p.out) + row * p.ldo + col;
      *o = from_acc<S, Acc>(to_acc<Acc>(*o) + v);
    }
  }
}

// ---- wgrad: the reduction runs over a chunk of a segment's rows ----

template <typename S>
struct WgradArgs {
  const S* a;       // [N, lda]: element (m, row) at row * lda + m   (m < M)
  int64_t lda;
  const S* b;       // [N, ldb]: element (row, c) at row * ldb + c   (c < ncols)
  int64_t ldb;
  const int64_t* offsets;
  int64_t k_seg, n, chunk_rows, m_rows, ncols, m_tiles, n_tiles;
  bool m_fast;      // blockIdx.x = (chunk, tiles): the m tile varies fastest, else the n tile
  bool a_vec;       // 16-byte loads of a, along m (every row 16-byte aligned)
  bool b_vec;       // 16-byte loads of b (every row 16-byte aligned)
  bool out_vec;     // 16-byte stores of the partials (every row 16-byte aligned)
  float* out_f;     // partials [chunks, M, ncols] in Acc (out_f or out_d)
  double* out_d;
};

// PIPE: kPipeBRow runs the cp.async main loop (16-bit types on tensor cores, sm_80+; both operands
// in 16-byte row chunks: the host's a_vec and b_vec), the same products in the same order as
// block_mma, so the same bits; kPipeNone the plain one.
template <typename S, typename Acc, bool TC, int PIPE = kPipeNone>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs<S> p) {
  __shared__ __align__(128) unsigned char smem[row_gemm_smem<S, Acc, PIPE>()];
  // blockIdx.x = chunk * (m_tiles * n_tiles) + tile, the tiles of a chunk consecutive and within
  // them the narrower side fastest (m_fast; in real shapes the rank side: m for dA = dH^T X, n for
  // dB = dY^T Hs): the blocks that read the same rows of the wide operand (X for dA, dY for dB)
  // run side by side, so with r > 64 that operand still comes from DRAM once.
  // (32-bit divisions, as row_gemm_kernel: the grid is below 2^31 blocks)
  const unsigned m_tiles = static_cast<unsigned>(p.m_tiles), n_tiles = static_cast<unsigned>(p.n_tiles);
  const unsigned tiles = m_tiles * n_tiles;
  const int64_t chunk = blockIdx.x / tiles;
  const unsigned tile = blockIdx.x % tiles;
  const lt::SegTile st = lt::seg_tile(p.offsets, p.k_seg, p.n, p.chunk_rows, chunk);
  const int64_t m0 = static_cast<int64_t>(p.m_fast ? tile % m_tiles : tile / n_tiles) * BM;
  const int64_t n0 = static_cast<int64_t>(p.m_fast ? tile / m_tiles : tile % n_tiles) * BN;
  const int mv = static_cast<int>(p.m_rows - m0 < BM ? p.m_rows - m0 : BM);
  const int nv = static_cast<int>(p.ncols - n0 < BN ? p.ncols - n0 : BN);
  const int64_t rows = st.row_end - st.row_begin;  // 0 for an idle chunk: its partial is zeros
  const Operand<S> A{p.a + st.row_begin * p.lda + m0, 1, p.lda, /*j_fast=*/false, p.a_vec};
  const Operand<S> B{p.b + st.row_begin * p.ldb + n0, p.ldb, 1, /*j_fast=*/true, p.b_vec};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kPipelined = PIPE == kPipeBRow && TC && kIs16Bit<S> && std::is_same_v<Acc, float>;
#else
  constexpr bool kPipelined = false;  // no cp.async before sm_80 (the host never asks for it there)
#endif
  if constexpr (kPipelined) {
    block_mma_pipelined<S, kPipeBRow, /*AT=*/true>(smem, A, B, mv, nv, rows > 0 ? rows : 0);
  } else {
    block_mma<S, Acc, TC, /*AT=*/true>(smem, A, B, mv, nv, rows > 0 ? rows : 0);
  }
  const Acc* sC = reinterpret_cast<const Acc*>(smem);
  Acc* out = nullptr;
  if constexpr (std::is_same_v<Acc, double>) {
    out = p.out_d;
  } else {
    out = p.out_f;
  }
  if (p.out_vec) {  // 16-byte chunks of a row (as row_gemm's epilogue): the same values, fewer stores
    constexpr int V = 16 / static_cast<int>(sizeof(Acc));
    static_assert(BN % V == 0 && (TileSmem<S, Acc>::LDC * sizeof(Acc)) % 16 == 0, "whole, aligned vectors");
    for (int idx = threadIdx.x; idx < BM * (BN / V); idx += kThreads) {
      const int m = idx / (BN / V), c0 = (idx % (BN / V)) * V;
      const int valid = m < mv ? lt::vec_chunk_valid(c0, V, nv) : 0;
      if (valid == 0) continue;
      Acc* o = out + (chunk * p.m_rows + m0 + m) * p.ncols + n0 + c0;
      const Acc* c = sC + m * TileSmem<S, Acc>::LDC + c0;
      if (valid == V) {
        store16_global(o, *reinterpret_cast<const uint4*>(c));
      } else {
        for (int i = 0; i < valid; ++i) o[i] = c[i];
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int m = idx / BN, c = idx % BN;
    if (m >= mv || c >= nv) continue;
    out[(chunk * p.m_rows + m0 + m) * p.ncols + n0 + c] = sC[m * TileSmem<S, Acc>::LDC + c];
  }
}

// ---- dy_pass: G = dY B_k and dB_k = dY_k^T Hs_k in one pass over dY (16-bit types) ----
//
// One block per (row chunk of a segment, chunk of kDyPassCols columns of dY (twice that with two
// halves, r > 32), rank chunk of kDyPassRank columns of B_k and Hs; lt::dy_pass_block: the rank
// chunks of a dY tile adjacent, so with r > 32 the tile comes from DRAM once and from L2 for the
// other rank chunks). It walks the chunk's rows in steps of BK and each step's columns in kDyPassSub
// sub-steps of 64 per half: one dY tile in shared
// memory feeds both products. dB's accumulators (64 columns x 32 per sub-step) stay in registers
// over all of the chunk's rows and are written once as an fp32 partial per row chunk (reduced by
// wgrad_reduce, as wgrad's); G's (BK rows x 32) accumulate over the block's columns and are written
// per row step as an fp32 partial per column chunk (summed by finish_bwd, as the split G's). The
// rank is padded to 32 with zero-filled columns of Hs and B_k. Fixed partition, fixed order, no
// atomics: every run gives the same bits. A rank chunk reads and writes only its own columns of Hs,
// B_k and the partials: with r <= 32 (one rank chunk) the kernel is the r <= 32 one, bit for bit.
constexpr int kDyPassSub = 4;                  // 64-column sub-steps per block
constexpr int kDyPassCols = 256;               // columns of dY per block (per half)
static_assert(kDyPassCols == 64 * kDyPassSub, "a block's columns are its 64-column sub-steps");
static_assert(BK == 32, "dy_pass_kernel's row step is two 16-row fragments");
constexpr int kDyPassRank = 32;                // columns of a rank chunk (the last one padded to it)
constexpr int kDyPassStages = 2;               // the cp.async pipeline's depth (double buffering)

template <typename S>
struct DyPassArgs {
  const S* dy;        // [N, out]
  const S* hs;        // [N, r]
  const S* b;         // lora_b [K, out, r]
  const int64_t* offsets;
  int64_t k_seg, n, out, r, chunk_rows, col_chunks;
  int64_t rank_chunks;  // ceil(r / kDyPassRank): blockIdx.x = (row chunk * col_chunks + col chunk) * rank_chunks + rank chunk
  float* gp;          // [col_chunks, N, r]: G over each column chunk
  float* dbp;         // [row chunks, out, r]: dB over each row chunk
  bool dy_vec, hs_vec, b_vec;  // 16-byte loads (every row 16-byte aligned)
  bool out_vec;                // 16-byte stores of the partials (r a multiple of 4: every row and rank chunk aligned)
};

// rows x rv of an fp32 tile staged in shared memory (ld LDC) to global memory at o (row stride
// ld = r; rv columns: a rank chunk's) by NT threads: 16-byte stores where `vec` (rows 16-byte
// aligned), else element by element. SUM2: the tile is sC + sC2 (two halves' G, added in that order).
template <int ROWS, int LDC, int NT = kThreads, bool SUM2 = false>
__device__ __forceinline__ void store_rank_tile(float* o, const float* sC, int rows, int64_t ld, int rv, bool vec,
                                                const float* sC2 = nullptr) {
  if (vec) {
    for (int idx = threadIdx.x; idx < ROWS * (kDyPassRank / 4); idx += NT) {
      const int m = idx / (kDyPassRank / 4), c0 = (idx % (kDyPassRank / 4)) * 4;
      const int valid = m < rows ? lt::vec_chunk_valid(c0, 4, rv) : 0;
      if (valid == 4) {
        float4 v = *reinterpret_cast<const float4*>(sC + m * LDC + c0);
        if constexpr (SUM2) {
          const float4 w = *reinterpret_cast<const float4*>(sC2 + m * LDC + c0);
          v.x += w.x;
          v.y += w.y;
          v.z += w.z;
          v.w += w.w;
        }
        store16_global(o + m * ld + c0, *reinterpret_cast<const uint4*>(&v));
      } else {
        for (int i = 0; i < valid; ++i) {
          float v = sC[m * LDC + c0 + i];
          if constexpr (SUM2) v += sC2[m * LDC + c0 + i];
          o[m * ld + c0 + i] = v;
        }
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < ROWS * kDyPassRank; idx += NT) {
    const int m = idx / kDyPassRank, j = idx % kDyPassRank;
    if (m < rows && j < rv) {
      float v = sC[m * LDC + j];
      if constexpr (SUM2) v += sC2[m * LDC + j];
      o[m * ld + j] = v;
    }
  }
}

// HALVES: 1 (r <= 32: 256 threads, 256 columns of dY per block) or 2 (r > 32, rank chunks: 512
// threads, two halves of 8 warps side by side over 512 columns, each half the 256-thread block's
// work on its 64 of each 128-column sub-step; the halves' G fragments are added in the block
// before the partial is written, so G's partials cost half as much: 8 r / 512 bytes per element).
template <typename S, int HALVES = 1>
struct DyPassSmem {
  static constexpr int kTileCols = 64 * HALVES;    // dY columns of a sub-step
  static constexpr int LDY = kTileCols + 8;        // dY tile [BK rows][LDY]
  static constexpr int LDR = kDyPassRank + 8;      // B_k tile [kTileCols][LDR], Hs tile [BK rows][LDR]
  static constexpr int LDC = kDyPassRank + 4;      // fp32 staging of the epilogues
  static constexpr size_t kY = sizeof(S) * BK * LDY;
  static constexpr size_t kB = sizeof(S) * kTileCols * LDR;
  static constexpr size_t kH = sizeof(S) * BK * LDR;
  static constexpr size_t kStage = kY + kB + kH;   // one step's tiles
  // after the stages: one half, [64][LDC] for both epilogues; two halves, [BK][LDC] for the first
  // half's G (the second's goes to its step's stage; dB's [kTileCols][LDC] reuses the stages once the
  // last step is done: kEnd bytes)
  static constexpr size_t kC = sizeof(float) * (HALVES == 1 ? 64 : BK) * LDC;
  static constexpr size_t kEnd = sizeof(float) * kTileCols * LDC;
  // kDyPassStages stages with the cp.async pipeline, one without; the epilogues' staging area after them
  static constexpr size_t bytes(bool pipelined) { return (pipelined ? kDyPassStages : 1) * kStage + kC; }
  static_assert(HALVES == 1 || HALVES == 2, "one or two halves");
  static_assert(HALVES == 1 ? kEnd == kC : (kEnd <= kStage && sizeof(float) * BK * LDC <= kStage),
                "dB's staging fits its area, the second half's G a stage");
  static_assert(kY % 32 == 0 && (kY + kB) % 32 == 0 && kStage % 128 == 0, "tiles start 32-byte aligned");
  static_assert((sizeof(S) * 16 * LDY) % 32 == 0 && (sizeof(S) * 16 * LDR) % 32 == 0 &&
                    (sizeof(float) * 16 * LDC) % 32 == 0 && (sizeof(S) * LDY) % 16 == 0 &&
                    (sizeof(S) * LDR) % 16 == 0,
                "fragment pointers 32-byte aligned, rows in 16-byte chunks");
  static_assert(kDyPassStages * kStage + kC <= 48 * 1024, "static shared memory limit");
  static_assert((LDC * sizeof(float)) % 16 == 0, "staged rows in 16-byte chunks");
};

// PIPE: the tiles of the next kDyPassStages - 1 steps are in flight (cp.async, sm_80+; dY, Hs and B_k
// rows 16-byte aligned: the host's dy_vec, hs_vec, b_vec) while a step multiplies; else each step
// loads, waits at a barrier, multiplies. The same products in the same order: the same bits.
template <typename S, bool PIPE, int HALVES = 1>
__global__ void __launch_bounds__(kThreads * HALVES) dy_pass_kernel(const DyPassArgs<S> p) {
  using L = DyPassSmem<S, HALVES>;
  __shared__ __align__(128) unsigned char smem[L::bytes(PIPE)];
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int NT = kThreads * HALVES;  // threads of the block
  constexpr int TC = L::kTileCols;       // dY columns of a sub-step (64 per half)
  constexpr int kNumStages = PIPE ? kDyPassStages : 1;
  float* sC = reinterpret_cast<float*>(smem + kNumStages * L::kStage);
  // blockIdx.x = (row chunk * col_chunks + column chunk) * rank_chunks + rank chunk (lt::dy_pass_block:
  // the rank chunks of a dY tile adjacent, so it comes from DRAM once; the column chunks of a row
  // chunk adjacent, so its rows of Hs do)
  const lt::DyPassBlock blk = lt::dy_pass_block(blockIdx.x, static_cast<uint32_t>(p.col_chunks),
                                                static_cast<uint32_t>(p.rank_chunks));
  const int64_t chunk = blk.row_chunk;
  const int64_t c0 = blk.col_chunk * (kDyPassCols * HALVES);
  const int64_t j0 = blk.rank_chunk * kDyPassRank;  // this block's columns of B_k, Hs, G and dB
  const lt::SegTile st = lt::seg_tile(p.offsets, p.k_seg, p.n, p.chunk_rows, chunk);
  const int rv_all = lt::dy_pass_rank_cols(p.r, blk.rank_chunk, kDyPassRank);
  const S* bseg = p.b + st.segment * p.out * p.r + j0;
  const int warp = threadIdx.x / kWarp;
  const int half = warp / 8, wh = warp % 8;  // the half (of 8 warps) and the warp within it
  const int mf = wh % 4, nf = wh / 4;  // dB fragment of this warp in a sub-step: 4 x 2 of 16 x 16 per half
  const int gm = wh % 2, gn = wh / 2;  // G fragment (warps 0-3 of a half): 2 x 2 of 16 x 16
  const int hc = half * 64;            // the half's first column of the sub-step's tile
  // step t: rows [row_begin + (t / kDyPassSub) * BK, + BK), columns c0 + TC * (t % kDyPassSub)
  const int64_t nrows = st.row_end > st.row_begin ? st.row_end - st.row_begin : 0;
  // (32-bit step numbers: a row chunk holds far fewer than 2^31 / kDyPassSub * BK rows, and 64-bit
  // division or modulo by 3 would be a called subroutine with a stack frame, local memory)
  const int steps = static_cast<int>(index_math::ceil_div(nrows, static_cast<int64_t>(BK))) * kDyPassSub;
  auto stage = [&](int t) { return smem + (PIPE ? static_cast<unsigned>(t) % kDyPassStages : 0u) * L::kStage; };
  // Loads step t's tiles (dY [rows x TC], B_k [TC x r], Hs [rows x r]) into its stage, zero-filled;
  // pipelined, commits a group either way (nothing past the last step).
  auto load = [&](int t) {
    if (t < steps) {
      const int64_t row0 = st.row_begin + static_cast<int64_t>(t / kDyPassSub) * BK;
      const int rows = static_cast<int>(st.row_end - row0 < BK ? st.row_end - row0 : BK);
      const int64_t col = c0 + TC * (t % kDyPassSub);
      const int cols = static_cast<int>(p.out - col < TC ? (p.out - col > 0 ? p.out - col : 0) : TC);
      S* y = reinterpret_cast<S*>(stage(t));
      S* b = reinterpret_cast<S*>(stage(t) + L::kY);
      S* h = reinterpret_cast<S*>(stage(t) + L::kY + L::kB);
      const S* ysrc = p.dy + row0 * p.out + (cols > 0 ? col : 0);
      const S* bsrc = bseg + (cols > 0 ? col : 0) * p.r;
      const S* hsrc = p.hs + row0 * p.r + j0;
      if constexpr (PIPE) {
        async_tile<S, BK, TC, L::LDY, NT>(y, ysrc, p.out, rows, cols);
        async_tile<S, TC, kDyPassRank, L::LDR, NT>(b, bsrc, p.r, cols, rv_all);
        async_tile<S, BK, kDyPassRank, L::LDR, NT>(h, hsrc, p.r, rows, rv_all);
      } else {
        load_tile<S, BK, TC, L::LDY, NT>(y, ysrc, p.out, 1, rows, cols, true, p.dy_vec);
        load_tile<S, TC, kDyPassRank, L::LDR, NT>(b, bsrc, p.r, 1, cols, rv_all, true, p.b_vec);
        load_tile<S, BK, kDyPassRank, L::LDR, NT>(h, hsrc, p.r, 1, rows, rv_all, true, p.hs_vec);
      }
    }
    if constexpr (PIPE) cp_async_commit();
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> db[kDyPassSub];
#pragma unroll
  for (int s = 0; s < kDyPassSub; ++s) wmma::fill_fragment(db[s], 0.0f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> g;
  if constexpr (PIPE) {
#pragma unroll
    for (int t = 0; t < kDyPassStages - 1; ++t) load(t);
  }
  // Not unrolled over the sub-steps (an unrolled loop of loads kept up to 240 registers live): the
  // sub-step's dB accumulator is picked by the predicated, unrolled selection below, so db[] keeps
  // static indices (registers, no local memory).
  for (int t = 0; t < steps; ++t) {
    if constexpr (PIPE) {
      cp_async_wait<kDyPassStages - 2>();
      __syncthreads();  // step t's tiles landed for every thread; every thread is done with t - 1
      load(t + kDyPassStages - 1);
    } else {
      load(t);
      __syncthreads();
    }
    const int s = t % kDyPassSub;
    const S* sY = reinterpret_cast<const S*>(stage(t));
    const S* sB = reinterpret_cast<const S*>(stage(t) + L::kY);
    const S* sH = reinterpret_cast<const S*>(stage(t) + L::kY + L::kB);
    if (s == 0) wmma::fill_fragment(g, 0.0f);
    {  // dB[cols, :] += dY^T Hs over this step's rows (k = 0, then 16)
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::col_major> fa0, fa1;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb0, fb1;
      load_frag_shared(fa0, sY + hc + mf * 16, L::LDY);
      load_frag_shared(fb0, sH + nf * 16, L::LDR);
      load_frag_shared(fa1, sY + 16 * L::LDY + hc + mf * 16, L::LDY);
      load_frag_shared(fb1, sH + 16 * L::LDR + nf * 16, L::LDR);
#pragma unroll
      for (int si = 0; si < kDyPassSub; ++si) {
        if (si == s) {
          wmma::mma_sync(db[si], fa0, fb0, db[si]);
          wmma::mma_sync(db[si], fa1, fb1, db[si]);
        }
      }
    }
    if (wh < 4) {
      // (two k-steps at a time: fully unrolled, the pipelined fp16 variant spilled 8 bytes at 128
      // registers)
#pragma unroll 2
      for (int kk = 0; kk < 64; kk += 16) {  // G[rows, :] += dY B_k over this half's columns of the sub-step
        wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb;
        load_frag_shared(fa, sY + gm * 16 * L::LDY + hc + kk, L::LDY);
        load_frag_shared(fb, sB + (hc + kk) * L::LDR + gn * 16, L::LDR);
        wmma::mma_sync(g, fa, fb, g);
      }
    }
    if (s == kDyPassSub - 1) {  // the row step's G over this block's columns: an fp32 partial
      const int64_t row0 = st.row_begin + static_cast<int64_t>(t / kDyPassSub) * BK;
      const int rows = static_cast<int>(st.row_end - row0 < BK ? st.row_end - row0 : BK);
      float* o = p.gp + (blk.col_chunk * p.n + row0) * p.r + j0;
      if constexpr (HALVES == 1) {
        if (warp < 4) wmma::store_matrix_sync(sC + gm * 16 * L::LDC + gn * 16, g, L::LDC, wmma::mem_row_major);
        __syncthreads();
        store_rank_tile<BK, L::LDC>(o, sC, rows, p.r, rv_all, p.out_vec);
      } else {
        // the second half's G is staged in this step's stage, free once every warp is done with its
        // tiles (the barrier; refilled only past the next step's barrier), the first half's in sC;
        // the partial is their sum, first half + second half
        float* sG1 = reinterpret_cast<float*>(stage(t));
        __syncthreads();
        if (wh < 4) wmma::store_matrix_sync((half == 0 ? sC : sG1) + gm * 16 * L::LDC + gn * 16, g, L::LDC,
                                            wmma::mem_row_major);
        __syncthreads();
        store_rank_tile<BK, L::LDC, NT, true>(o, sC, rows, p.r, rv_all, p.out_vec, sG1);
      }
      // sC is written again kDyPassSub steps later, past their barriers
    }
    if constexpr (!PIPE) __syncthreads();  // the stage is loaded again next step
  }
  if constexpr (PIPE) cp_async_wait<0>();  // only empty groups are left; none may outlive the block
  __syncthreads();  // the last G partial is read out of sC (and, two halves, the last step's tiles)
  // dB partial of this row chunk (zeros for an idle chunk: an empty segment's gradient is +0); two
  // halves stage it in the stages' memory, [TC][LDC]
  float* sE = HALVES == 1 ? sC : reinterpret_cast<float*>(smem);
  float* dout = p.dbp + chunk * p.out * p.r + j0;
#pragma unroll
  for (int s = 0; s < kDyPassSub; ++s) {
    const int64_t col = c0 + TC * s;
    wmma::store_matrix_sync(sE + (hc + mf * 16) * L::LDC + nf * 16, db[s], L::LDC, wmma::mem_row_major);
    __syncthreads();
    const int cols = static_cast<int>(p.out - col < TC ? (p.out - col > 0 ? p.out - col : 0) : TC);
    store_rank_tile<TC, L::LDC, NT>(dout + (cols > 0 ? col : 0) * p.r, sE, cols, p.r, rv_all, p.out_vec);
    __syncthreads();
  }
#endif
}

// grad[s, e] = sum of the partials of segment s's chunks, in chunk order (deterministic); an
// empty segment owns one idle chunk of zeros, so its gradient is exactly zero.
template <typename S, typename Acc>
__global__ void __launch_bounds__(kEltThreads) wgrad_reduce_kernel(const Acc* __restrict__ partial,
                                                                   const int64_t* __restrict__ offsets, int64_t k_seg,
                                                                   int64_t n, int64_t chunk_rows, int64_t elems,
                                                                   S* __restrict__ grad) {
  const int64_t blocks_per_seg = index_math::ceil_div(elems, kEltThreads);
  const int64_t s = blockIdx.x / blocks_per_seg;
  const int64_t e = (blockIdx.x % blocks_per_seg) * kEltThreads + threadIdx.x;
  if (e >= elems) return;
  const int64_t t0 = lt::seg_tile_base(offsets, s, n, chunk_rows);
  const int64_t t1 = lt::seg_tile_base(offsets, s + 1, n, chunk_rows);
  Acc sum = Acc(0);
  for (int64_t t = t0; t < t1; ++t) sum += partial[t * elems + e];
  grad[s * elems + e] = from_acc<S, Acc>(sum);
}

// ---- elementwise steps ----

// Hs[i, j] = dtype(m_i * sum_split Hp[split, i, j]), m_i = scaling * row_scale[i]. With h_out
// (grouped_lora_h, lora_linear_h) the unscaled sum h is stored there too: the value finish_bwd
// would recompute from the same partials in the same order, so a backward given it is bit-identical.
template <typename S, typename Acc>
__global__ void __launch_bounds__(kEltThreads) finish_h_kernel(const Acc* __restrict__ hp, int64_t splits, int64_t n,
                                                               int64_t r, const Acc* __restrict__ row_scale,
                                                               Acc scaling, S* __restrict__ hs,
                                                               Acc* __restrict__ h_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
  if (idx >= n * r) return;
  Acc h = Acc(0);
  for (int64_t sp = 0; sp < splits; ++sp) h += hp[sp * n * r + idx];
  if (h_out != nullptr) h_out[idx] = h;
  const Acc m = row_scale ? scaling * row_scale[idx / r] : scaling;
  hs[idx] = from_acc<S, Acc>(m * h);
}

// One warp per row: h = sum Hp, g = sum Gp; dH = m g, Hs = m h (in the input dtype) and
// d row_scale[i] = scaling * <g, h> (fixed lane order, then warp_sum: deterministic). With the
// forward's saved h, hp is that [N, r] tensor and h_splits 1: h = 0 + h, the same value.
template <typename S, typename Acc>
__global__ void __launch_bounds__(kEltThreads) finish_bwd_kernel(const Acc* __restrict__ hp, int64_t h_splits,
                                                                 const Acc* __restrict__ gp, int64_t g_splits,
                                                                 int64_t n, int64_t r,
                                                                 const Acc* __restrict__ row_scale, Acc scaling,
                                                                 S* __restrict__ dh, S* __restrict__ hs,
                                                                 Acc* __restrict__ grad_rs) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kEltThreads / kWarp) + threadIdx.x / kWarp;
  if (row >= n) return;  // whole warps leave: no warp-level call is left half-populated
  const Acc m = row_scale ? scaling * row_scale[row] : scaling;
  Acc dot = Acc(0);
  for (int64_t j = lane; j < r; j += kWarp) {
    const int64_t idx = row * r + j;
    Acc h = Acc(0), g = Acc(0);
    for (int64_t sp = 0; sp < h_splits; ++sp) h += hp[sp * n * r + idx];
    for (int64_t sp = 0; sp < g_splits; ++sp) g += gp[sp * n * r + idx];
    dot += g * h;
    dh[idx] = from_acc<S, Acc>(m * g);
    hs[idx] = from_acc<S, Acc>(m * h);
  }
  dot = warp_sum(dot);
  if (grad_rs != nullptr && lane == 0) grad_rs[row] = scaling * dot;
}

// offsets (int32 / int64) -> int64 copy; reports a list that is not 0 = o_0 <= ... <= o_K = N.
template <typename OffT>
__global__ void __launch_bounds__(kOffsetThreads) prepare_offsets_kernel(const OffT* __restrict__ in, int64_t k,
                                                                         int64_t n, int64_t* __restrict__ out,
                                                                         ErrorSlots* slots) {
  for (int64_t s = threadIdx.x; s <= k; s += kOffsetThreads) {
    const int64_t v = static_cast<int64_t>(in[s]);
    out[s] = v;
    const bool bad = v < 0 || v > n || (s == 0 && v != 0) || (s == k && v != n) ||
                     (s > 0 && v < static_cast<int64_t>(in[s - 1]));
    if (bad) report_error(slots, cuda_errors::kGroupedLoraOffsets, v, s, n);
  }
}

}  // namespace glora
}  // namespace cuda
}  // namespace mole_ext
