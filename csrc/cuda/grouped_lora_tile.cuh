// grouped_lora's device tile primitives (the "kernel traits" of csrc/cuda/grouped_lora*.cuh): the
// block shape, element types and their conversions, the shared-memory tile layouts, the tile
// loads (bounds-checked, zero-filled, 16-byte vectors where rows allow), the tensor-core operand
// loads, and the two block-level main loops: block_mma (load, barrier, multiply) and
// block_mma_pipelined (a kStages-deep cp.async pipeline, sm_80+). No kernel, no launch, no host
// code: grouped_lora_kernels.cuh builds the kernels from these, grouped_lora_launch.cuh plans and
// launches them, grouped_lora.cu holds the entry points. The design is described there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../core/index_math.h"
#include "../core/lora_tiles.h"
#include "common.cuh"

namespace mole_ext {
namespace cuda {
namespace glora {

namespace lt = lora_tiles;

constexpr int kThreads = 256;
// The intended occupancy of the tensor-core GEMM kernels (row_gemm, wgrad with TC): at least this
// many resident blocks of kThreads per SM, i.e. at most 65536 / (2 * 256) = 128 registers and
// 2 blocks' shared memory per SM. bench/sass_check.py reads this number and fails the build's
// machine code beyond it. It is checked, not imposed: as __launch_bounds__(kThreads, 3) ptxas
// capped the registers at 80 and the pipelined kernel with k-major B (kPipeBRow) spilled 16
// bytes; as __launch_bounds__(kThreads, 2) it spent up to 120 registers where it now chooses
// 48-88 (more resident warps). Which is faster is for a GPU to measure.
constexpr int kGemmMinBlocksPerSm = 2;
constexpr int BM = 64;  // output tile rows
constexpr int BN = 64;  // output tile columns
constexpr int BK = 32;  // reduction step
constexpr int kMinSplitChunk = 256;   // shortest piece of a split reduction
constexpr int kMaxSplits = 16;
constexpr int kWgradChunks = 8;       // fewest row chunks of the weight-gradient partials
constexpr int kMaxWgradChunks = 64;   // most (each costs an fp32 partial of the gradient)
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

// ---- tensor-core operand loads from shared memory, 16-byte global stores ----
//
// wmma::load_matrix_sync of a __half fragment compiles to `wmma.load.*.shared.f16`, which ptxas
// turns into LDSM (ldmatrix); of a __nv_bfloat16 fragment it compiles to the generic-address form
// `wmma.load.*.bf16` (no .shared), which ptxas turns into generic 32-bit loads (4 LD.E per
// fragment, 24 per k-step: bench/sass_check.py). load_frag_shared issues the same PTX instruction
// for bf16 with the shared state space spelled out: the same fragment (the PTX layout of
// wmma.load does not depend on the state space), loaded by LDSM. `p` must point into shared memory.
// Without __CUDA_ARCH__ (the CPU emulator of these sources) it is wmma::load_matrix_sync.
template <typename Frag>
__device__ __forceinline__ uint32_t* frag_regs(Frag& f) {
  return reinterpret_cast<uint32_t*>(&f.x[0]);
}

#define MOLE_EXT_WMMA_LD_BF16(AB, LAYOUT)                                                            \
  asm volatile("wmma.load." AB ".sync.aligned." LAYOUT ".m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n" \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                     \
               : "r"(addr), "r"(ldm))

template <typename Use, typename S, typename Layout>
__device__ __forceinline__ void load_frag_shared(nvcuda::wmma::fragment<Use, 16, 16, 16, S, Layout>& f,
                                                 const S* p, unsigned ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    static_assert(sizeof(f.x) == 4 * sizeof(uint32_t), "a bf16 m16n16k16 operand fragment is 4 registers");
    uint32_t* r = frag_regs(f);
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    constexpr bool kA = std::is_same_v<Use, nvcuda::wmma::matrix_a>;
    constexpr bool kRow = std::is_same_v<Layout, nvcuda::wmma::row_major>;
    if constexpr (kA && kRow) {
      MOLE_EXT_WMMA_LD_BF16("a", "row");
    } else if constexpr (kA) {
      MOLE_EXT_WMMA_LD_BF16("a", "col");
    } else if constexpr (kRow) {
      MOLE_EXT_WMMA_LD_BF16("b", "row");
    } else {
      MOLE_EXT_WMMA_LD_BF16("b", "col");
    }
  } else {
    nvcuda::wmma::load_matrix_sync(f, p, ldm);
  }
#else
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
#endif
}

#undef MOLE_EXT_WMMA_LD_BF16

// 16 bytes to global memory as ONE 128-bit store (STG.E.128). nvcc splits a plain
// `*reinterpret_cast<uint4*>(o) = v` of a vector assembled from a local array into four 32-bit
// stores (STG.E, seen in the SASS of the plain-store epilogues); st.global.v4 keeps it whole. `p`
// global, 16-byte aligned. Without __CUDA_ARCH__ (the CPU emulator) a plain uint4 store.
__device__ __forceinline__ void store16_global(void* p, const uint4& v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
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
// NT: the block's threads (dy_pass_kernel's two halves have 512).
template <typename S, int R, int C, int LD, int NT = kThreads>
__device__ __forceinline__ void load_tile(S* __restrict__ dst, const S* __restrict__ src, int64_t s_r, int64_t s_c,
                                          int rv, int cv, bool c_fast, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  static_assert(C % V == 0 && (LD * sizeof(S)) % 16 == 0, "tile rows must hold whole 16-byte vectors");
  if (vec && c_fast && s_c == 1) {
    for (int idx = threadIdx.x; idx < R * (C / V); idx += NT) {
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
  for (int idx = threadIdx.x; idx < R * C; idx += NT) {
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
          load_frag_shared(fa, sA + kk * L::LDAT + fm * 16, L::LDAT);
        } else {
          load_frag_shared(fa, sA + fm * 16 * L::LDA + kk, L::LDA);
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb;
          load_frag_shared(fb, sB + kk * L::LDB + (fn0 + q) * 16, L::LDB);
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
// dX; the weight gradients' right operand, x or Hs) through row_major ones. With AT the left operand
// is m-contiguous (the weight gradients' dH / dY, A.s_i == 1) and staged k-major, as block_mma's AT.
// The multiplications are block_mma's, in the same order, on the
// same zero-filled tiles: the results are identical bit for bit (a CUDA test checks it).

constexpr int kStages = 3;
enum Pipe : int { kPipeNone = 0, kPipeBRow = 1, kPipeBCol = 2 };

template <typename S>
struct PipeSmem {
  static constexpr int LDA = BK + 8;                 // A stage [BM][LDA], or with AT [BK][LDAT]
  static constexpr int LDAT = BM + 8;
  static constexpr int LDB_ROW = BN + 8;             // B row stage [BK][LDB_ROW]
  static constexpr int LDB_COL = BK + 8;             // B col stage [BN][LDB_COL]
  static constexpr size_t kA = sizeof(S) * BM * LDA;
  static constexpr size_t kB = sizeof(S) * (BK * LDB_ROW > BN * LDB_COL ? BK * LDB_ROW : BN * LDB_COL);
  static constexpr size_t kStage = kA + kB;
  static constexpr size_t kC = sizeof(float) * BM * (BN + 4);  // the epilogue's tile (TileSmem's LDC)
  static constexpr size_t kBytes = kStages * kStage > kC ? kStages * kStage : kC;
  static_assert(kA % 128 == 0 && kStage % 128 == 0, "stages keep 128-byte alignment");
  static_assert(BK * LDAT <= BM * LDA && (sizeof(S) * LDAT) % 16 == 0 && (sizeof(S) * 16 * LDAT) % 32 == 0,
                "the k-major A stage fits the A stage, in 16-byte chunks, fragment pointers 32-byte aligned");
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
// is the tile's first row, which exists). NT: the block's threads.
template <typename S, int R, int C, int LD, int NT = kThreads>
__device__ __forceinline__ void async_tile(S* __restrict__ dst, const S* __restrict__ src, int64_t s_r, int rv,
                                           int cv) {
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  static_assert(C % V == 0, "tile rows hold whole 16-byte chunks");
  for (int idx = threadIdx.x; idx < R * (C / V); idx += NT) {
    const int r = idx / (C / V), c0 = (idx % (C / V)) * V;
    const int valid = r < rv ? lt::vec_chunk_valid(c0, V, cv) : 0;
    const S* from = valid > 0 ? src + static_cast<int64_t>(r) * s_r + c0 : src;
    cp_async16(dst + r * LD + c0, from, valid * static_cast<int>(sizeof(S)));
  }
}

// block_mma<S, float, true, AT> with the kStages cp.async pipeline. A: element (m, k) at
// A.p[m * A.s_i + k], or with AT at A.p[m + k * A.s_j]; B as PIPE says (B row: B.p[k * B.s_i + n];
// B col: B.p[n * B.s_j + k]). Leaves C in shared memory (ld TileSmem<S, float>::LDC) like block_mma.
// Every thread of the block must call it.
template <typename S, int PIPE, bool AT = false>
__device__ __forceinline__ void block_mma_pipelined(unsigned char* smem, const Operand<S>& A, const Operand<S>& B,
                                                    int mv, int nv, int64_t klen) {
  using P = PipeSmem<S>;
  using L = TileSmem<S, float>;
  namespace wmma = nvcuda::wmma;
  constexpr bool kBCol = PIPE == kPipeBCol;
  using BLayout = std::conditional_t<kBCol, wmma::col_major, wmma::row_major>;
  using ALayout = std::conditional_t<AT, wmma::col_major, wmma::row_major>;
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
      if constexpr (AT) {
        async_tile<S, BK, BM, P::LDAT>(stage_a(t), A.p + k0 * A.s_j, A.s_j, kv, mv);
      } else {
        async_tile<S, BM, BK, P::LDA>(stage_a(t), A.p + k0, A.s_i, mv, kv);
      }
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
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, ALayout> fa;
      if constexpr (AT) {
        load_frag_shared(fa, sa + kk * P::LDAT + fm * 16, P::LDAT);
      } else {
        load_frag_shared(fa, sa + fm * 16 * P::LDA + kk, P::LDA);
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, BLayout> fb;
        if constexpr (kBCol) {
          load_frag_shared(fb, sb + (fn0 + q) * 16 * P::LDB_COL + kk, P::LDB_COL);
        } else {
          load_frag_shared(fb, sb + kk * P::LDB_ROW + (fn0 + q) * 16, P::LDB_ROW);
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

}  // namespace glora
}  // namespace cuda
}  // namespace mole_ext
