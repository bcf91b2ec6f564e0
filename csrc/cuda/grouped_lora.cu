// CUDA kernels for grouped_lora, grouped_lora_add_out and grouped_lora_backward: segmented
// GEMMs over expert segments of expert-sorted rows, with the segment of each tile found on the
// device (csrc/core/lora_tiles.h), so no launch reads `offsets` on the host: no host sync, and
// the ops can be captured in a CUDA graph and replayed with new routing.
//
// Every product is one of two block-tiled GEMM kernels (BM x BN output tile, BK reduction step,
// 256 threads, operands staged through shared memory with bounds-checked, zero-filled loads):
//   row_gemm   rows of the output are segment rows (tile map over BM-row tiles); the reduction
//              (in, out or r) can be split over blockIdx.z into fp32 partials.
//   wgrad      the reduction runs over a segment's rows (dA_k, dB_k): each block reduces one
//              chunk of rows into an fp32 partial; wgrad_reduce sums a segment's chunks in a
//              fixed order. No float atomics anywhere: every result is bit-reproducible.
// bf16 / fp16 multiply on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulate); fp32 and fp64
// use a SIMT inner product with the same tiling. MOLE_EXT_GROUPED_LORA_SIMT=1 forces the SIMT
// path for bf16 / fp16 as well (a cross-check of the tensor-core path). Global memory is read and
// written in 16-byte vectors where every row of a matrix starts 16-byte aligned (tile loads of
// row-contiguous operands, the epilogues; wgrad's left operand, dH or dY read along its rows of
// tokens, is staged k-major for that, block_mma's AT); MOLE_EXT_GROUPED_LORA_SCALAR=1 or
// mole_ext._C.set_grouped_lora_vectorized(False) turns that off (element accesses, the same
// results bit for bit: a cross-check and an A/B switch for the benchmarks). With vector accesses,
// the bf16 / fp16 row GEMMs run a cp.async pipelined main loop (block_mma_pipelined, sm_80+; the
// same products in the same order, so again identical results; set_grouped_lora_pipelined(False)
// or MOLE_EXT_GROUPED_LORA_NO_PIPELINE=1 turns it off).
//
// Forward (y = scaling * row_scale * B_k (A_k x)):
//   1. row_gemm<PARTIAL>: Hp[split] = X A_k^T over a piece of `in`          [splits, N, r] fp32
//   2. finish_h: Hs = dtype(m_i * sum_split Hp), m_i = scaling * row_scale[i]   [N, r] x's dtype
//   3. row_gemm<STORE | ADD>: y (+)= Hs B_k^T                                 [N, out]
// Backward: H again (1.), G = dY B_k (row_gemm<PARTIAL> split over out); finish_bwd gives
// dH = m_i G, Hs = m_i H and d row_scale[i] = scaling <G_i, H_i>; then dA_k = dH_k^T X_k and
// dB_k = dY_k^T Hs_k (wgrad + wgrad_reduce), and last dX = dH A_k (row_gemm: last, so that an
// accumulating grad_x may share memory with x or grad_y, as the CPU kernel allows).
// Rounding: Hs and dH are rounded once to the input dtype before the second GEMM (PyTorch's
// bf16 LoRA rounds the same intermediates), everything else accumulates in fp32 (fp64 for fp64).
//
// Offsets: a first kernel copies them to int64 and checks them (non-decreasing, 0 .. N); a bad
// list is reported like permute's bad ids (common.cuh: lazily or, in validate mode, in this call).
// The tile map clamps every offset to [0, N], so a bad list never causes an out-of-bounds access;
// the results are then unspecified.
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../core/lora_tiles.h"
#include "../core/routing_math.h"
#include "../ops.h"
#include "common.cuh"
#include "tuning.h"

namespace mole_ext {
namespace cuda {
namespace {

namespace lt = lora_tiles;

constexpr int kThreads = 256;
constexpr int BM = 64;  // output tile rows
constexpr int BN = 64;  // output tile columns
constexpr int BK = 32;  // reduction step
constexpr int kMinSplitChunk = 256;   // shortest piece of a split reduction
constexpr int kMaxSplits = 16;
constexpr int kWgradChunks = 8;       // target row chunks of the weight-gradient partials
constexpr int kOffsetThreads = 256;
constexpr int kEltThreads = 256;

// ---- element types: ATen's -> CUDA's (same bits), conversions to / from the accumulator ----

template <typename T>
struct Native {
  using type = T;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct Native<at::Half> {
  using type = __half;
};

template <typename S>
constexpr bool kIs16Bit = std::is_same_v<S, __nv_bfloat16> || std::is_same_v<S, __half>;

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) { return v; }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return __half2float(v); }

template <typename S, typename Acc>
__device__ __forceinline__ S from_acc(Acc v) {
  if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<S, __half>) {
    return __float2half_rn(v);
  } else {
    return static_cast<S>(v);
  }
}

template <typename S>
__device__ __forceinline__ S zero_of() {
  return from_acc<S, float>(0.0f);
}

// ---- the block tile: shared memory layout and the main loop ----

template <typename S, typename Acc>
struct TileSmem {
  // Leading dimensions padded to a multiple of 8 16-bit elements (wmma's ldm rule) and off the
  // 32-bank period; fragment pointers stay 32-byte aligned (checked by static_assert below).
  static constexpr int LDA = BK + 8;
  static constexpr int LDAT = BM + 8;  // the A tile stored k-major (block_mma's AT)
  static constexpr int LDB = BN + 8;
  static constexpr int LDC = BN + 4;
  static constexpr size_t kA = sizeof(S) * BM * LDA;
  static constexpr size_t kB = sizeof(S) * BK * LDB;
  static constexpr size_t kC = sizeof(Acc) * BM * LDC;
  static constexpr size_t kBytes = (kA + kB) > kC ? (kA + kB) : kC;
  static_assert(kA % 32 == 0, "the B tile must start 32-byte aligned");
  static_assert((sizeof(S) * 16 * LDA) % 32 == 0 && (sizeof(S) * 16 * LDB) % 32 == 0, "fragment rows");
  static_assert(sizeof(S) * BK * LDAT <= kA && (sizeof(S) * 16 * LDAT) % 32 == 0, "the k-major A tile");
  static_assert((sizeof(Acc) * 16 * LDC) % 32 == 0, "accumulator fragment rows");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// dst[r * LD + c] = src[r * s_r + c * s_c] for r < rv, c < cv, else 0. `c_fast`: consecutive
// threads take consecutive c (coalesced when s_c == 1), else consecutive r (when s_r == 1).
// `vec` (only with c_fast and s_c == 1; the host sets it when every source row starts 16-byte
// aligned, vec_rows below): 16-byte loads and stores of 16 / sizeof(S) elements, the
// ragged end of a row element by element. The same values land in the same places either way.
template <typename S, int R, int C, int LD>
__device__ __forceinline__ void load_tile(S* __restrict__ dst, const S* __restrict__ src, int64_t s_r, int64_t s_c,
                                          int rv, int cv, bool c_fast, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  static_assert(C % V == 0 && (LD * sizeof(S)) % 16 == 0, "tile rows must hold whole 16-byte vectors");
  if (vec && c_fast && s_c == 1) {
    for (int idx = threadIdx.x; idx < R * (C / V); idx += kThreads) {
      const int r = idx / (C / V), c0 = (idx % (C / V)) * V;
      const int valid = r < rv ? lt::vec_chunk_valid(c0, V, cv) : 0;
      const S* from = src + static_cast<int64_t>(r) * s_r + c0;
      uint4 v;
      if (valid == V) {
        v = *reinterpret_cast<const uint4*>(from);
      } else {
        alignas(16) S part[V];
#pragma unroll
        for (int i = 0; i < V; ++i) part[i] = i < valid ? from[i] : zero_of<S>();
        v = *reinterpret_cast<const uint4*>(part);
      }
      *reinterpret_cast<uint4*>(dst + r * LD + c0) = v;
    }
    return;
  }
  for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
    const int r = c_fast ? idx / C : idx % R;
    const int c = c_fast ? idx % C : idx / R;
    S v = zero_of<S>();
    if (r < rv && c < cv) v = src[static_cast<int64_t>(r) * s_r + static_cast<int64_t>(c) * s_c];
    dst[r * LD + c] = v;
  }
}

// One operand of the block product: element (i, j) of the tile at p[i * s_i + j * s_j]; for the
// left operand (i, j) = (m, k), for the right one (k, n). `j_fast`: the load walks j fastest.
template <typename S>
struct Operand {
  const S* p;
  int64_t s_i;
  int64_t s_j;
  bool j_fast;
  bool vec;  // 16-byte loads (load_tile)
};

// The k-step of A starting at k0 into shared memory: m-major (sA[m * LDA + k]) or, with AT,
// k-major (sA[k * LDAT + m], A.s_i == 1: rows of the source are k, columns m).
template <typename S, typename Acc, bool AT>
__device__ __forceinline__ void load_a_tile(S* sA, const Operand<S>& A, int64_t k0, int mv, int kv) {
  using L = TileSmem<S, Acc>;
  if constexpr (AT) {
    load_tile<S, BK, BM, L::LDAT>(sA, A.p + k0 * A.s_j, A.s_j, A.s_i, kv, mv, /*c_fast=*/true, A.vec);
  } else {
    load_tile<S, BM, BK, L::LDA>(sA, A.p + k0 * A.s_j, A.s_i, A.s_j, mv, kv, A.j_fast, A.vec);
  }
}

// C[BM x BN] = sum_k A[m, k] B[k, n] over k in [0, klen), m < mv, n < nv (zero elsewhere),
// left in shared memory sC (ld TileSmem::LDC, accumulator type) for the epilogue. Every thread
// of the block must call it (it has barriers).
// AT: A is m-contiguous in memory (A.s_i == 1: the weight gradients' dY / dH, read along a row of
// tokens) and its tile is stored k-major, sA[k * LDAT + m], so that the load walks m with 16-byte
// vectors where A.vec allows (and with conflict-free shared stores either way); the tensor cores
// read it through col_major fragments. The same products in the same order as the m-major tile.
template <typename S, typename Acc, bool TC, bool AT = false>
__device__ __forceinline__ void block_mma(unsigned char* smem, const Operand<S>& A, const Operand<S>& B, int mv,
                                          int nv, int64_t klen) {
  using L = TileSmem<S, Acc>;
  S* sA = reinterpret_cast<S*>(smem);
  S* sB = reinterpret_cast<S*>(smem + L::kA);
  Acc* sC = reinterpret_cast<Acc*>(smem);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kTensorCores = TC && kIs16Bit<S>;
#else
  constexpr bool kTensorCores = false;
#endif
  if constexpr (kTensorCores) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / kWarp;
    const int fm = warp % 4;        // fragment row (16 rows each) of this warp
    const int fn0 = (warp / 4) * 2; // its two fragment columns
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
    wmma::fill_fragment(c[0], 0.0f);
    wmma::fill_fragment(c[1], 0.0f);
    using ALayout = std::conditional_t<AT, wmma::col_major, wmma::row_major>;
    for (int64_t k0 = 0; k0 < klen; k0 += BK) {
      const int kv = static_cast<int>(klen - k0 < BK ? klen - k0 : BK);
      load_a_tile<S, Acc, AT>(sA, A, k0, mv, kv);
      load_tile<S, BK, BN, L::LDB>(sB, B.p + k0 * B.s_i, B.s_i, B.s_j, kv, nv, B.j_fast, B.vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, S, ALayout> fa;
        if constexpr (AT) {
          wmma::load_matrix_sync(fa, sA + kk * L::LDAT + fm * 16, L::LDAT);
        } else {
          wmma::load_matrix_sync(fa, sA + fm * 16 * L::LDA + kk, L::LDA);
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, sB + kk * L::LDB + (fn0 + q) * 16, L::LDB);
          wmma::mma_sync(c[q], fa, fb, c[q]);
        }
      }
      __syncthreads();  // the tiles are overwritten next step (and sC aliases them)
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      wmma::store_matrix_sync(sC + fm * 16 * L::LDC + (fn0 + q) * 16, c[q], L::LDC, wmma::mem_row_major);
    }
    __syncthreads();
  } else {
    // 16 x 16 threads, each 4 x 4 outputs strided by 16 (conflict-free shared reads).
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
    Acc acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
    }
    for (int64_t k0 = 0; k0 < klen; k0 += BK) {
      const int kv = static_cast<int>(klen - k0 < BK ? klen - k0 : BK);
      load_a_tile<S, Acc, AT>(sA, A, k0, mv, kv);
      load_tile<S, BK, BN, L::LDB>(sB, B.p + k0 * B.s_i, B.s_i, B.s_j, kv, nv, B.j_fast, B.vec);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        Acc a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = to_acc<Acc>(AT ? sA[kk * L::LDAT + tm + 16 * i] : sA[(tm + 16 * i) * L::LDA + kk]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_acc<Acc>(sB[kk * L::LDB + tn + 16 * j]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) sC[(tm + 16 * i) * L::LDC + tn + 16 * j] = acc[i][j];
    }
    __syncthreads();
  }
}

// ---- the pipelined main loop (16-bit types on tensor cores, sm_80+) ----
//
// block_mma above loads a k-step's tiles, waits at a barrier, multiplies, and only then loads the
// next: the memory system idles while the tensor cores work and the other way round. This
// variant keeps kStages k-steps in flight with cp.async (global -> shared without registers,
// zero-filled past the valid bytes), so a block's next tiles arrive while it multiplies. It
// needs both operands in 16-byte row chunks (every row 16-byte aligned: the host's vec_rows) and
// takes the right operand in its stored layout: n-major rows ("B col": element (k, n) at
// p[n * s_j + k], k contiguous; lora_a in the shrink, lora_b in the expand) through wmma's
// col_major fragments, or k-major rows ("B row": k * s_i + n, n contiguous; lora_b in G, lora_a in
// dX) through row_major ones. The multiplications are block_mma's, in the same order, on the
// same zero-filled tiles: the results are identical bit for bit (a CUDA test checks it).

constexpr int kStages = 3;
enum Pipe : int { kPipeNone = 0, kPipeBRow = 1, kPipeBCol = 2 };

template <typename S>
struct PipeSmem {
  static constexpr int LDA = BK + 8;                 // A stage [BM][LDA]
  static constexpr int LDB_ROW = BN + 8;             // B row stage [BK][LDB_ROW]
  static constexpr int LDB_COL = BK + 8;             // B col stage [BN][LDB_COL]
  static constexpr size_t kA = sizeof(S) * BM * LDA;
  static constexpr size_t kB = sizeof(S) * (BK * LDB_ROW > BN * LDB_COL ? BK * LDB_ROW : BN * LDB_COL);
  static constexpr size_t kStage = kA + kB;
  static constexpr size_t kC = sizeof(float) * BM * (BN + 4);  // the epilogue's tile (TileSmem's LDC)
  static constexpr size_t kBytes = kStages * kStage > kC ? kStages * kStage : kC;
  static_assert(kA % 128 == 0 && kStage % 128 == 0, "stages keep 128-byte alignment");
  static_assert((sizeof(S) * LDA) % 16 == 0 && (sizeof(S) * LDB_ROW) % 16 == 0 && (sizeof(S) * LDB_COL) % 16 == 0,
                "16-byte chunks land 16-byte aligned");
  static_assert((sizeof(S) * 16 * LDA) % 32 == 0 && (sizeof(S) * 16 * LDB_ROW) % 32 == 0 &&
                    (sizeof(S) * 16 * LDB_COL) % 32 == 0,
                "fragment pointers stay 32-byte aligned");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// 16 bytes global -> shared, asynchronously; bytes past src_bytes (0..16) are zero-filled and not
// read. Both addresses 16-byte aligned. Without sm_80 (or in a host-side emulation of the
// kernels) a synchronous copy with the same effect.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
#else
  unsigned char* o = static_cast<unsigned char*>(dst);
  const unsigned char* i = static_cast<const unsigned char*>(src);
  for (int b = 0; b < 16; ++b) o[b] = b < src_bytes ? i[b] : static_cast<unsigned char>(0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// dst[r * LD + c] = src[r * s_r + c] for r < rv, c < cv, else 0, in 16-byte chunks (rows of src
// 16-byte aligned), asynchronously. A chunk with nothing valid reads nothing (its source address
// is the tile's first row, which exists).
template <typename S, int R, int C, int LD>
__device__ __forceinline__ void async_tile(S* __restrict__ dst, const S* __restrict__ src, int64_t s_r, int rv,
                                           int cv) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  static_assert(C % V == 0, "tile rows hold whole 16-byte chunks");
  for (int idx = threadIdx.x; idx < R * (C / V); idx += kThreads) {
    const int r = idx / (C / V), c0 = (idx % (C / V)) * V;
    const int valid = r < rv ? lt::vec_chunk_valid(c0, V, cv) : 0;
    const S* from = valid > 0 ? src + static_cast<int64_t>(r) * s_r + c0 : src;
    cp_async16(dst + r * LD + c0, from, valid * static_cast<int>(sizeof(S)));
  }
}

// block_mma<S, float, true> with the kStages cp.async pipeline. A: element (m, k) at
// A.p[m * A.s_i + k]; B as PIPE says (B row: B.p[k * B.s_i + n]; B col: B.p[n * B.s_j + k]).
// Leaves C in shared memory (ld TileSmem<S, float>::LDC) like block_mma. Every thread of the
// block must call it.
template <typename S, int PIPE>
__device__ __forceinline__ void block_mma_pipelined(unsigned char* smem, const Operand<S>& A, const Operand<S>& B,
                                                    int mv, int nv, int64_t klen) {
  using P = PipeSmem<S>;
  using L = TileSmem<S, float>;
  namespace wmma = nvcuda::wmma;
  constexpr bool kBCol = PIPE == kPipeBCol;
  using BLayout = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
  const int warp = threadIdx.x / kWarp;
  const int fm = warp % 4;         // fragment row of this warp (as block_mma)
  const int fn0 = (warp / 4) * 2;  // its two fragment columns
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.0f);
  wmma::fill_fragment(c[1], 0.0f);
  const int64_t steps = index_math::ceil_div(klen, static_cast<int64_t>(BK));
  auto stage_a = [&](int64_t t) { return reinterpret_cast<S*>(smem + (t % kStages) * P::kStage); };
  auto stage_b = [&](int64_t t) { return reinterpret_cast<S*>(smem + (t % kStages) * P::kStage + P::kA); };
  // Issues k-step t's tiles (nothing past the last step) and commits a group either way, so that
  // "at most kStages - 2 groups in flight" always means "step t's tiles have landed".
  auto issue = [&](int64_t t) {
    if (t < steps) {
      const int64_t k0 = t * BK;
      const int kv = static_cast<int>(klen - k0 < BK ? klen - k0 : BK);
      async_tile<S, BM, BK, P::LDA>(stage_a(t), A.p + k0, A.s_i, mv, kv);
      if constexpr (kBCol) {
        async_tile<S, BN, BK, P::LDB_COL>(stage_b(t), B.p + k0, B.s_j, nv, kv);
      } else {
        async_tile<S, BK, BN, P::LDB_ROW>(stage_b(t), B.p + k0 * B.s_i, B.s_i, kv, nv);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);
  for (int64_t t = 0; t < steps; ++t) {
    cp_async_wait<kStages - 2>();
    // step t's tiles are visible to every thread, and every thread is done with step t - 1,
    // whose stage the next issue overwrites
    __syncthreads();
    issue(t + kStages - 1);
    const S* sa = stage_a(t);
    const S* sb = stage_b(t);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sa + fm * 16 * P::LDA + kk, P::LDA);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, BLayout> fb;
        if constexpr (kBCol) {
          wmma::load_matrix_sync(fb, sb + (fn0 + q) * 16 * P::LDB_COL + kk, P::LDB_COL);
        } else {
          wmma::load_matrix_sync(fb, sb + kk * P::LDB_ROW + (fn0 + q) * 16, P::LDB_ROW);
        }
        wmma::mma_sync(c[q], fa, fb, c[q]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every stage consumed (and no copy in flight) before sC overwrites them
  float* sC = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    wmma::store_matrix_sync(sC + fm * 16 * L::LDC + (fn0 + q) * 16, c[q], L::LDC, wmma::mem_row_major);
  }
  __syncthreads();
}

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
  void* out;           // kPartial: Acc [splits, N, ncols]; else S [N, ldo]
  int64_t ldo;
  bool a_vec, b_vec, out_vec;  // 16-byte accesses to a, b, out (every row 16-byte aligned)
  int pipe;                    // Pipe: the cp.async main loop and b's layout for it, or kPipeNone
};

// Shared memory of a row_gemm block (PipeSmem is instantiated for the pipelined 16-bit kernels only).
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
  const lt::SegTile st = lt::seg_tile(p.offsets, p.k_seg, p.n, BM, static_cast<int64_t>(blockIdx.x));
  if (st.row_begin >= st.row_end) return;  // idle tile: the whole block leaves before any barrier
  const int mv = static_cast<int>(st.row_end - st.row_begin);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
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
        *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(buf);
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
  int64_t k_seg, n, chunk_rows, m_rows, ncols, n_tiles;
  bool a_vec;       // 16-byte loads of a, along m (every row 16-byte aligned)
  bool b_vec;       // 16-byte loads of b (every row 16-byte aligned)
  float* out_f;     // partials [chunks, M, ncols] in Acc (out_f or out_d)
  double* out_d;
};

template <typename S, typename Acc, bool TC>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs<S> p) {
  __shared__ __align__(128) unsigned char smem[TileSmem<S, Acc>::kBytes];
  const int64_t chunk = blockIdx.x;
  const lt::SegTile st = lt::seg_tile(p.offsets, p.k_seg, p.n, p.chunk_rows, chunk);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y / p.n_tiles) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y % p.n_tiles) * BN;
  const int mv = static_cast<int>(p.m_rows - m0 < BM ? p.m_rows - m0 : BM);
  const int nv = static_cast<int>(p.ncols - n0 < BN ? p.ncols - n0 : BN);
  const int64_t rows = st.row_end - st.row_begin;  // 0 for an idle chunk: its partial is zeros
  const Operand<S> A{p.a + st.row_begin * p.lda + m0, 1, p.lda, /*j_fast=*/false, p.a_vec};
  const Operand<S> B{p.b + st.row_begin * p.ldb + n0, p.ldb, 1, /*j_fast=*/true, p.b_vec};
  block_mma<S, Acc, TC, /*AT=*/true>(smem, A, B, mv, nv, rows > 0 ? rows : 0);
  const Acc* sC = reinterpret_cast<const Acc*>(smem);
  Acc* out = nullptr;
  if constexpr (std::is_same_v<Acc, double>) {
    out = p.out_d;
  } else {
    out = p.out_f;
  }
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int m = idx / BN, c = idx % BN;
    if (m >= mv || c >= nv) continue;
    out[(chunk * p.m_rows + m0 + m) * p.ncols + n0 + c] = sC[m * TileSmem<S, Acc>::LDC + c];
  }
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

// Hs[i, j] = dtype(m_i * sum_split Hp[split, i, j]), m_i = scaling * row_scale[i].
template <typename S, typename Acc>
__global__ void __launch_bounds__(kEltThreads) finish_h_kernel(const Acc* __restrict__ hp, int64_t splits, int64_t n,
                                                               int64_t r, const Acc* __restrict__ row_scale,
                                                               Acc scaling, S* __restrict__ hs) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kEltThreads + threadIdx.x;
  if (idx >= n * r) return;
  Acc h = Acc(0);
  for (int64_t sp = 0; sp < splits; ++sp) h += hp[sp * n * r + idx];
  const Acc m = row_scale ? scaling * row_scale[idx / r] : scaling;
  hs[idx] = from_acc<S, Acc>(m * h);
}

// One warp per row: h = sum Hp, g = sum Gp; dH = m g, Hs = m h (in the input dtype) and
// d row_scale[i] = scaling * <g, h> (fixed lane order, then warp_sum: deterministic).
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

// ---- host side ----

// Every row of a [rows, ld] matrix of T at p starts 16-byte aligned (permute's row-copy rule,
// routing_math::copy_vec_bytes), and vector accesses are on.
template <typename T>
bool vec_rows(const void* p, int64_t ld) {
  const auto addr = reinterpret_cast<uint64_t>(p);
  return tuning::grouped_lora_vectorized() &&
         routing_math::copy_vec_bytes(ld * static_cast<int64_t>(sizeof(T)), addr, addr) == 16;
}

bool force_simt() {
  static const bool on = tuning::env_flag("MOLE_EXT_GROUPED_LORA_SIMT");
  return on;
}

int64_t target_blocks() {
  return 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// Grid dimension `what` ("x": up to 2^31 - 1 blocks, "y" / "z": up to 65535).
unsigned grid_dim(int64_t v, const char* what) {
  const int64_t limit = what[0] == 'x' ? INT32_MAX : 65535;
  TORCH_CHECK(v >= 1 && v <= limit, "grouped_lora: the CUDA grid needs ", v, " blocks along ", what,
              " (at most ", limit, "); the shapes are too large for this kernel");
  return static_cast<unsigned>(v);
}

struct Prepared {
  at::Tensor x, lora_a, lora_b, offsets, row_scale;  // contiguous; offsets int64; row_scale in Acc
  int64_t n, in, k, r, out;
  int device;
  ErrorSlots* slots;
  cudaStream_t stream;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                 const std::optional<at::Tensor>& row_scale) {
  Prepared p;
  p.x = x.contiguous();
  p.lora_a = lora_a.contiguous();
  p.lora_b = lora_b.contiguous();
  p.n = x.size(0);
  p.in = x.size(1);
  p.k = lora_a.size(0);
  p.r = lora_a.size(1);
  p.out = lora_b.size(1);
  p.device = x.get_device();
  p.slots = error_slots(p.device);
  p.stream = at::cuda::getCurrentCUDAStream();
  const auto acc = acc_type_for(x.scalar_type());
  if (row_scale.has_value()) p.row_scale = row_scale->to(acc).contiguous();
  const at::Tensor off_in = offsets.contiguous();
  p.offsets = at::empty({p.k + 1}, off_in.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(off_in.scalar_type(), "grouped_lora_offsets", [&] {
    prepare_offsets_kernel<index_t><<<1, kOffsetThreads, 0, p.stream>>>(
        off_in.const_data_ptr<index_t>(), p.k, p.n, p.offsets.mutable_data_ptr<int64_t>(), p.slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

// Arguments of one row GEMM from its layout (lora_tiles.h, unit-tested on the CPU).
template <typename S>
RowGemmArgs<S> row_args(const lt::RowGemmShape& sh, const at::Tensor& left, const at::Tensor& right,
                        const at::Tensor& offsets, int64_t k_seg, int64_t n) {
  RowGemmArgs<S> a{};
  a.a = reinterpret_cast<const S*>(left.const_data_ptr());
  a.lda = sh.lda;
  a.b = reinterpret_cast<const S*>(right.const_data_ptr());
  a.b_seg = sh.r_seg;
  a.b_sk = sh.r_sk;
  a.b_sn = sh.r_sn;
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.k_seg = k_seg;
  a.n = n;
  a.ncols = sh.ncols;
  a.klen = sh.klen;
  a.kchunk = sh.klen;
  a.a_vec = vec_rows<S>(a.a, a.lda);
  a.b_vec = vec_rows<S>(a.b, a.b_sk) && (a.b_seg * static_cast<int64_t>(sizeof(S))) % 16 == 0;
  a.pipe = kPipeNone;
  if (kIs16Bit<S> && tuning::grouped_lora_pipelined() && a.a_vec) {
    if (a.b_sn == 1 && a.b_vec) {
      a.pipe = kPipeBRow;  // rows of b are k: n contiguous, every row 16-byte aligned
    } else if (a.b_sk == 1 && vec_rows<S>(a.b, a.b_sn) &&
               (a.b_seg * static_cast<int64_t>(sizeof(S))) % 16 == 0) {
      a.pipe = kPipeBCol;  // rows of b are n: k contiguous
    }
  }
  return a;
}

template <typename S, typename Acc, Epi EPI>
void launch_row_gemm(const RowGemmArgs<S>& args, int64_t splits, bool tc, cudaStream_t stream) {
  if (args.ncols == 0) return;
  const dim3 grid(grid_dim(lt::seg_tile_grid(args.n, args.k_seg, BM), "x"),
                  grid_dim(index_math::ceil_div(args.ncols, BN), "y"), grid_dim(splits, "z"));
  // The tensor-core variant exists for 16-bit types only (fp32 / fp64 would compile the SIMT
  // loop twice).
  if constexpr (kIs16Bit<S>) {
    if (tc && args.pipe == kPipeBRow) {
      row_gemm_kernel<S, Acc, true, EPI, kPipeBRow><<<grid, kThreads, 0, stream>>>(args);
    } else if (tc && args.pipe == kPipeBCol) {
      row_gemm_kernel<S, Acc, true, EPI, kPipeBCol><<<grid, kThreads, 0, stream>>>(args);
    } else if (tc) {
      row_gemm_kernel<S, Acc, true, EPI><<<grid, kThreads, 0, stream>>>(args);
    } else {
      row_gemm_kernel<S, Acc, false, EPI><<<grid, kThreads, 0, stream>>>(args);
    }
  } else {
    row_gemm_kernel<S, Acc, false, EPI><<<grid, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Hp [splits, N, r] (Acc) = X A_k^T over pieces of `in`.
template <typename S, typename Acc>
at::Tensor shrink_partials(const Prepared& p, bool tc, int64_t* splits_out) {
  const int64_t blocks = lt::seg_tile_grid(p.n, p.k, BM) * index_math::ceil_div(p.r, BN);
  const lt::SplitPlan plan =
      lt::split_plan(p.in, lt::want_splits(blocks, target_blocks(), p.in, kMinSplitChunk, kMaxSplits), BK);
  at::Tensor hp = at::empty({plan.splits, p.n, p.r}, p.x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  RowGemmArgs<S> a = row_args<S>(lt::shrink_shape(p.in, p.r), p.x, p.lora_a, p.offsets, p.k, p.n);
  a.kchunk = plan.chunk;
  a.out = hp.mutable_data_ptr();
  a.out_vec = vec_rows<Acc>(a.out, a.ncols);
  launch_row_gemm<S, Acc, Epi::kPartial>(a, plan.splits, tc, p.stream);
  *splits_out = plan.splits;
  return hp;
}

// y (+)= Hs B_k^T, y [N, out] contiguous in S.
template <typename S, typename Acc, Epi EPI>
void expand(const Prepared& p, const at::Tensor& hs, at::Tensor& y, bool tc) {
  RowGemmArgs<S> a = row_args<S>(lt::expand_shape(p.r, p.out), hs, p.lora_b, p.offsets, p.k, p.n);
  a.out = y.mutable_data_ptr();
  a.ldo = p.out;
  a.out_vec = vec_rows<S>(a.out, a.ldo);
  launch_row_gemm<S, Acc, EPI>(a, 1, tc, p.stream);
}

template <typename S, typename Acc>
void forward_typed(const Prepared& p, double scaling, at::Tensor& y, bool accumulate) {
  const bool tc = kIs16Bit<S> && !force_simt();
  int64_t splits = 1;
  const at::Tensor hp = shrink_partials<S, Acc>(p, tc, &splits);
  at::Tensor hs = at::empty({p.n, p.r}, p.x.options());
  const int64_t elems = p.n * p.r;
  finish_h_kernel<S, Acc><<<grid_dim(index_math::ceil_div(elems, kEltThreads), "x"), kEltThreads, 0, p.stream>>>(
      hp.const_data_ptr<Acc>(), splits, p.n, p.r, p.row_scale.defined() ? p.row_scale.const_data_ptr<Acc>() : nullptr,
      static_cast<Acc>(scaling), reinterpret_cast<S*>(hs.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (accumulate) {
    expand<S, Acc, Epi::kAdd>(p, hs, y, tc);
  } else {
    expand<S, Acc, Epi::kStore>(p, hs, y, tc);
  }
}

void run_forward(const Prepared& p, double scaling, at::Tensor& y, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "grouped_lora_cuda", [&] {
    using S = typename Native<scalar_t>::type;
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_typed<S, Acc>(p, scaling, y, accumulate);
  });
}

// Partials of a weight gradient over row chunks, then the per-segment reduction into grad [K, M, ncols].
template <typename S, typename Acc>
void weight_grad(const Prepared& p, const lt::WgradShape& sh, const at::Tensor& left, const at::Tensor& right,
                 at::Tensor& grad, bool tc) {
  const int64_t lda = sh.lda, m_rows = sh.m_rows, ldb = sh.ldb, ncols = sh.ncols;
  const int64_t chunk_rows = lt::wgrad_chunk_rows(p.n, kWgradChunks, BK, BM);
  const int64_t chunks = lt::seg_tile_grid(p.n, p.k, chunk_rows);
  const int64_t elems = m_rows * ncols;
  if (elems == 0) return;
  at::Tensor part = at::empty({chunks, m_rows, ncols}, p.x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  WgradArgs<S> a{};
  a.a = reinterpret_cast<const S*>(left.const_data_ptr());
  a.lda = lda;
  a.b = reinterpret_cast<const S*>(right.const_data_ptr());
  a.ldb = ldb;
  a.offsets = p.offsets.const_data_ptr<int64_t>();
  a.k_seg = p.k;
  a.n = p.n;
  a.chunk_rows = chunk_rows;
  a.m_rows = m_rows;
  a.ncols = ncols;
  a.n_tiles = index_math::ceil_div(ncols, BN);
  a.a_vec = vec_rows<S>(a.a, a.lda);
  a.b_vec = vec_rows<S>(a.b, a.ldb);
  if constexpr (std::is_same_v<Acc, double>) {
    a.out_d = part.mutable_data_ptr<double>();
  } else {
    a.out_f = part.mutable_data_ptr<float>();
  }
  const dim3 grid(grid_dim(chunks, "x"), grid_dim(index_math::ceil_div(m_rows, BM) * a.n_tiles, "y"));
  if constexpr (kIs16Bit<S>) {
    if (tc) {
      wgrad_kernel<S, Acc, true><<<grid, kThreads, 0, p.stream>>>(a);
    } else {
      wgrad_kernel<S, Acc, false><<<grid, kThreads, 0, p.stream>>>(a);
    }
  } else {
    wgrad_kernel<S, Acc, false><<<grid, kThreads, 0, p.stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 rgrid(grid_dim(index_math::ceil_div(elems, kEltThreads) * p.k, "x"));
  wgrad_reduce_kernel<S, Acc><<<rgrid, kEltThreads, 0, p.stream>>>(
      part.const_data_ptr<Acc>(), p.offsets.const_data_ptr<int64_t>(), p.k, p.n, chunk_rows, elems,
      reinterpret_cast<S*>(grad.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename Acc>
void backward_typed(const Prepared& p, const at::Tensor& gy, double scaling, at::Tensor& grad_x, bool accumulate_dx,
                    at::Tensor& grad_a, at::Tensor& grad_b, at::Tensor& grad_rs) {
  const bool tc = kIs16Bit<S> && !force_simt();
  int64_t h_splits = 1;
  const at::Tensor hp = shrink_partials<S, Acc>(p, tc, &h_splits);
  // G = dY B_k, split over `out`
  const int64_t blocks = lt::seg_tile_grid(p.n, p.k, BM) * index_math::ceil_div(p.r, BN);
  const lt::SplitPlan plan =
      lt::split_plan(p.out, lt::want_splits(blocks, target_blocks(), p.out, kMinSplitChunk, kMaxSplits), BK);
  at::Tensor gp = at::empty({plan.splits, p.n, p.r}, hp.options());
  {
    RowGemmArgs<S> a = row_args<S>(lt::dy_b_shape(p.out, p.r), gy, p.lora_b, p.offsets, p.k, p.n);
    a.kchunk = plan.chunk;
    a.out = gp.mutable_data_ptr();
    a.out_vec = vec_rows<Acc>(a.out, a.ncols);
    if (p.out == 0) {
      gp.zero_();  // an empty reduction: no block would write the partials
    } else {
      launch_row_gemm<S, Acc, Epi::kPartial>(a, plan.splits, tc, p.stream);
    }
  }
  at::Tensor dh = at::empty({p.n, p.r}, p.x.options());
  at::Tensor hs = at::empty({p.n, p.r}, p.x.options());
  const int rows_per_block = kEltThreads / kWarp;
  finish_bwd_kernel<S, Acc><<<grid_dim(index_math::ceil_div(p.n, rows_per_block), "x"), kEltThreads, 0, p.stream>>>(
      hp.const_data_ptr<Acc>(), h_splits, gp.const_data_ptr<Acc>(), plan.splits, p.n, p.r,
      p.row_scale.defined() ? p.row_scale.const_data_ptr<Acc>() : nullptr, static_cast<Acc>(scaling),
      reinterpret_cast<S*>(dh.mutable_data_ptr()), reinterpret_cast<S*>(hs.mutable_data_ptr()),
      grad_rs.numel() ? grad_rs.mutable_data_ptr<Acc>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // dA_k = dH_k^T X_k  [r, in];  dB_k = dY_k^T Hs_k  [out, r]. Before dX: grad_x may share
  // memory with x or grad_y (the CPU kernel allows it), and these read both.
  weight_grad<S, Acc>(p, lt::grad_a_shape(p.r, p.in), dh, p.x, grad_a, tc);
  weight_grad<S, Acc>(p, lt::grad_b_shape(p.out, p.r), gy, hs, grad_b, tc);
  // dX (+)= dH A_k; accumulating, the sum with the base path's dX is rounded once in the epilogue
  {
    RowGemmArgs<S> a = row_args<S>(lt::dx_shape(p.r, p.in), dh, p.lora_a, p.offsets, p.k, p.n);
    a.out = grad_x.mutable_data_ptr();
    a.ldo = p.in;
    a.out_vec = vec_rows<S>(a.out, a.ldo);
    if (accumulate_dx) {
      launch_row_gemm<S, Acc, Epi::kAdd>(a, 1, tc, p.stream);
    } else {
      launch_row_gemm<S, Acc, Epi::kStore>(a, 1, tc, p.stream);
    }
  }
}

void check_cuda_inputs(const at::Tensor& x) { MOLE_CHECK_CUDA_TENSOR(x, "x"); }

}  // namespace

// x [N, in], lora_a [K, r, in], lora_b [K, out, r] (x's dtype), offsets [K+1] int32/int64,
// row_scale [N] float or None -> y [N, out] in x's dtype
at::Tensor grouped_lora_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  check_cuda_inputs(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  begin_op(x.get_device());
  at::Tensor y = at::empty({x.size(0), lora_b.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const Prepared p = prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (x.size(0) > 0) run_forward(p, scaling, y, /*accumulate=*/false);
  end_op(p.device, p.stream);
  return y;
}

// out [N, out_features] (x's dtype) += grouped_lora(x, ...), in place, rounded once.
void grouped_lora_add_out_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& offsets, double scaling,
                               const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora_add_out(out, x, lora_a, lora_b, offsets, row_scale);
  mark_written(out);
  check_cuda_inputs(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  begin_op(x.get_device());
  const Prepared p = prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (x.size(0) == 0) {
    end_op(p.device, p.stream);
    return;
  }
  if (out.is_contiguous()) {
    run_forward(p, scaling, out, /*accumulate=*/true);
  } else {
    at::Tensor tmp = out.contiguous();
    run_forward(p, scaling, tmp, /*accumulate=*/true);
    out.copy_(tmp);
  }
  end_op(p.device, p.stream);
}

namespace {

// The backward into grad_x (contiguous, x's dtype): stored, or added onto its contents.
// -> grad_a, grad_b (x's dtype), grad_row_scale in row_scale's dtype (empty [0] without it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(at::Tensor& grad_x, bool accumulate_dx,
                                                             const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                             const at::Tensor& offsets, double scaling,
                                                             const std::optional<at::Tensor>& row_scale) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  begin_op(x.get_device());
  const int64_t n = x.size(0);
  const auto acc = acc_type_for(x.scalar_type());
  const at::ScalarType rs_t = row_scale.has_value() ? row_scale->scalar_type() : x.scalar_type();
  at::Tensor grad_a = at::empty(lora_a.sizes(), lora_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::empty(lora_b.sizes(), lora_b.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_rs = at::empty({row_scale.has_value() ? n : 0}, x.options().dtype(acc));
  const Prepared p = prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (n == 0) {
    grad_a.zero_();
    grad_b.zero_();
    end_op(p.device, p.stream);
    return {grad_a, grad_b, grad_rs.to(rs_t)};
  }
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_lora_backward_cuda", [&] {
    using S = typename Native<scalar_t>::type;
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_typed<S, Acc>(p, gy, scaling, grad_x, accumulate_dx, grad_a, grad_b, grad_rs);
  });
  end_op(p.device, p.stream);
  return {grad_a, grad_b, grad_rs.to(rs_t)};
}

}  // namespace

// -> grad_x [N, in], grad_a [K, r, in], grad_b [K, out, r] (x's dtype), grad_row_scale [N] in
// row_scale's dtype (empty [0] in x's dtype without row_scale)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  check_cuda_inputs(x);
  const int64_t n = x.size(0), out_f = lora_b.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == n && grad_y.size(1) == out_f, "grad_y must be [", n, ", ",
              out_f, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), "grad_y must be on the device of x (", x.device(), "), got ",
              grad_y.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto [grad_a, grad_b, grad_rs] =
      backward_into(grad_x, /*accumulate_dx=*/false, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale);
  return {grad_x, grad_a, grad_b, grad_rs};
}

// grad_x [N, in] (x's dtype) += the grad_x of grouped_lora_backward, in place, rounded once
// -> grad_a, grad_b, grad_row_scale as grouped_lora_backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out_cuda(
    at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora_backward_add_out(grad_x, grad_y, x, lora_a, lora_b, offsets, row_scale);
  mark_written(grad_x);
  check_cuda_inputs(x);
  if (grad_x.is_contiguous()) {
    return backward_into(grad_x, /*accumulate_dx=*/true, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale);
  }
  at::Tensor tmp = grad_x.contiguous();
  auto grads = backward_into(tmp, /*accumulate_dx=*/true, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale);
  grad_x.copy_(tmp);
  return grads;
}

// x [N, in] (any float dtype, cast to weight's), weight [out, in] cuBLAS -> [N, out] with the grouped
// LoRA expand accumulated into the GEMM's output
at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                            double scaling, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& lora_x) {
  check_cuda_inputs(x);
  return lora_linear_with(&grouped_lora_add_out_cuda, x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale,
                          lora_x);
}

}  // namespace cuda

namespace tuning {
namespace {
std::atomic<bool>& vectorized_flag() {
  static std::atomic<bool> on{!env_flag("MOLE_EXT_GROUPED_LORA_SCALAR")};
  return on;
}

std::atomic<bool>& pipelined_flag() {
  static std::atomic<bool> on{!env_flag("MOLE_EXT_GROUPED_LORA_NO_PIPELINE")};
  return on;
}
}  // namespace

void set_grouped_lora_vectorized(bool on) { vectorized_flag().store(on); }
bool grouped_lora_vectorized() { return vectorized_flag().load(); }
void set_grouped_lora_pipelined(bool on) { pipelined_flag().store(on); }
bool grouped_lora_pipelined() { return pipelined_flag().load(); }
}  // namespace tuning

TORCH_LIBRARY_IMPL(mole_ext, CUDA, m) {
  m.impl("grouped_lora", &cuda::grouped_lora_cuda);
  m.impl("grouped_lora_add_out", &cuda::grouped_lora_add_out_cuda);
  m.impl("grouped_lora_backward", &cuda::grouped_lora_backward_cuda);
  m.impl("grouped_lora_backward_add_out", &cuda::grouped_lora_backward_add_out_cuda);
  m.impl("lora_linear", &cuda::lora_linear_cuda);
}

}  // namespace mole_ext
