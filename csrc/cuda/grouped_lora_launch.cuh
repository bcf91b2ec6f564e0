// grouped_lora's host side below the entry points: checking and copying the offsets, planning
// (tile grids, splits of long reductions, weight-gradient chunks, vector and pipeline eligibility
// of each operand, all from csrc/core/lora_tiles.h, unit-tested on the CPU) and launching the
// kernels of grouped_lora_kernels.cuh for the forward (run_forward) and the backward
// (run_backward). The entry points in grouped_lora.cu call these two.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "../core/index_math.h"
#include "../core/lora_tiles.h"
#include "../core/routing_math.h"
#include "../ops.h"
#include "common.cuh"
#include "grouped_lora_kernels.cuh"
#include "grouped_lora_tile.cuh"
#include "tuning.h"

namespace mole_ext {
namespace cuda {
namespace glora {

// ---- host side ----

// Every row of a [rows, ld] matrix of T at p starts 16-byte aligned (permute's row-copy rule,
// routing_math::copy_vec_bytes), and vector accesses are on.
template <typename T>
bool vec_rows(const void* p, int64_t ld) {
  const auto addr = reinterpret_cast<uint64_t>(p);
  return tuning::grouped_lora_vectorized() &&
         routing_math::copy_vec_bytes(ld * static_cast<int64_t>(sizeof(T)), addr, addr) == 16;
}

inline bool force_simt() {
  static const bool on = tuning::env_flag("MOLE_EXT_GROUPED_LORA_SIMT");
  return on;
}

// Resident blocks per SM of `Kernel` at Threads threads (its static shared memory included), from
// the occupancy API, asked once per kernel; kGemmMinBlocksPerSm if the API fails.
template <auto Kernel, int Threads = kThreads>
int resident_blocks() {
  static const int n = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, Threads, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // leave no error behind for the next launch check
      b = 0;
    }
    return b > 0 ? b : kGemmMinBlocksPerSm;
  }();
  return n;
}

// Blocks in one full wave of `resident` blocks per SM: the target a split reduction fills.
inline int64_t wave_blocks(int resident) {
  return static_cast<int64_t>(resident) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Grid dimension `what` ("x": up to 2^31 - 1 blocks, "y" / "z": up to 65535).
inline unsigned grid_dim(int64_t v, const char* what) {
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

inline Prepared prepare(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& offsets, const std::optional<at::Tensor>& row_scale) {
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
  a.n_tiles = index_math::ceil_div(sh.ncols, static_cast<int64_t>(BN));
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
  // blockIdx.x = row tile * column tiles + column tile (the kernel's comment says why)
  const dim3 grid(grid_dim(lt::seg_tile_grid(args.n, args.k_seg, BM) * args.n_tiles, "x"), 1,
                  grid_dim(splits, "z"));
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

// Resident blocks per SM of the row_gemm variant launch_row_gemm picks for `args` (same choice).
template <typename S, typename Acc, Epi EPI>
int row_gemm_resident_blocks(const RowGemmArgs<S>& args, bool tc) {
  if constexpr (kIs16Bit<S>) {
    if (tc && args.pipe == kPipeBRow) return resident_blocks<&row_gemm_kernel<S, Acc, true, EPI, kPipeBRow>>();
    if (tc && args.pipe == kPipeBCol) return resident_blocks<&row_gemm_kernel<S, Acc, true, EPI, kPipeBCol>>();
    if (tc) return resident_blocks<&row_gemm_kernel<S, Acc, true, EPI>>();
  }
  return resident_blocks<&row_gemm_kernel<S, Acc, false, EPI>>();
}

// Hp [splits, N, r] (Acc) = X A_k^T over pieces of `in`. The split count fills one wave of the
// kernel's occupancy (the occupancy API), so the grid ends in whole waves where it can.
template <typename S, typename Acc>
at::Tensor shrink_partials(const Prepared& p, bool tc, int64_t* splits_out) {
  RowGemmArgs<S> a = row_args<S>(lt::shrink_shape(p.in, p.r), p.x, p.lora_a, p.offsets, p.k, p.n);
  const int64_t blocks = lt::seg_tile_grid(p.n, p.k, BM) * index_math::ceil_div(p.r, BN);
  const int64_t target = wave_blocks(row_gemm_resident_blocks<S, Acc, Epi::kPartial>(a, tc));
  const lt::SplitPlan plan =
      lt::split_plan(p.in, lt::want_splits(blocks, target, p.in, kMinSplitChunk, kMaxSplits), BK);
  at::Tensor hp = at::empty({plan.splits, p.n, p.r}, p.x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
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

// h_out: an [N, r] tensor in Acc (contiguous) for the unscaled shrink, or undefined.
template <typename S, typename Acc>
void forward_typed(const Prepared& p, double scaling, at::Tensor& y, bool accumulate, at::Tensor& h_out) {
  const bool tc = kIs16Bit<S> && !force_simt();
  int64_t splits = 1;
  const at::Tensor hp = shrink_partials<S, Acc>(p, tc, &splits);
  at::Tensor hs = at::empty({p.n, p.r}, p.x.options());
  const int64_t elems = p.n * p.r;
  finish_h_kernel<S, Acc><<<grid_dim(index_math::ceil_div(elems, kEltThreads), "x"), kEltThreads, 0, p.stream>>>(
      hp.const_data_ptr<Acc>(), splits, p.n, p.r, p.row_scale.defined() ? p.row_scale.const_data_ptr<Acc>() : nullptr,
      static_cast<Acc>(scaling), reinterpret_cast<S*>(hs.mutable_data_ptr()),
      h_out.defined() ? h_out.mutable_data_ptr<Acc>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (accumulate) {
    expand<S, Acc, Epi::kAdd>(p, hs, y, tc);
  } else {
    expand<S, Acc, Epi::kStore>(p, hs, y, tc);
  }
}

// y (+)= the grouped LoRA; h_out (undefined, or [N, r] contiguous in x's accumulation type) gets
// the unscaled shrink X A_k^T. N > 0.
inline void run_forward(const Prepared& p, double scaling, at::Tensor& y, bool accumulate, at::Tensor& h_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "grouped_lora_cuda", [&] {
    using S = typename Native<scalar_t>::type;
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_typed<S, Acc>(p, scaling, y, accumulate, h_out);
  });
}

// The wgrad_kernel variant for `a`: tensor cores (tc), and the cp.async main loop where both
// operands come in 16-byte row chunks and the switch is on (16-bit types only).
enum class WgradVariant { kSimt, kTc, kTcPipelined };

template <typename S>
WgradVariant wgrad_variant(const WgradArgs<S>& a, bool tc) {
  if (!kIs16Bit<S> || !tc) return WgradVariant::kSimt;
  return a.a_vec && a.b_vec && tuning::grouped_lora_pipelined() ? WgradVariant::kTcPipelined : WgradVariant::kTc;
}

template <typename S, typename Acc>
int wgrad_resident_blocks(WgradVariant v) {
  if constexpr (kIs16Bit<S>) {
    if (v == WgradVariant::kTcPipelined) return resident_blocks<&wgrad_kernel<S, Acc, true, kPipeBRow>>();
    if (v == WgradVariant::kTc) return resident_blocks<&wgrad_kernel<S, Acc, true>>();
  }
  return resident_blocks<&wgrad_kernel<S, Acc, false>>();
}

// Partials of a weight gradient over row chunks, then the per-segment reduction into grad [K, M, ncols].
// The chunk count fills whole waves of the kernel's occupancy (lt::wgrad_target_chunks, at least
// kWgradChunks): the chunk boundaries, and so the order of the fp32 sums, follow the device's SM
// count and the kernel's occupancy; on one device every run gives the same bits.
template <typename S, typename Acc>
void weight_grad(const Prepared& p, const lt::WgradShape& sh, const at::Tensor& left, const at::Tensor& right,
                 at::Tensor& grad, bool tc) {
  const int64_t lda = sh.lda, m_rows = sh.m_rows, ldb = sh.ldb, ncols = sh.ncols;
  const int64_t elems = m_rows * ncols;
  if (elems == 0) return;
  WgradArgs<S> a{};
  a.a = reinterpret_cast<const S*>(left.const_data_ptr());
  a.lda = lda;
  a.b = reinterpret_cast<const S*>(right.const_data_ptr());
  a.ldb = ldb;
  a.offsets = p.offsets.const_data_ptr<int64_t>();
  a.k_seg = p.k;
  a.n = p.n;
  a.m_rows = m_rows;
  a.ncols = ncols;
  a.m_tiles = index_math::ceil_div(m_rows, BM);
  a.n_tiles = index_math::ceil_div(ncols, BN);
  a.m_fast = m_rows <= ncols;  // the narrower side fastest (wgrad_kernel says why)
  a.a_vec = vec_rows<S>(a.a, a.lda);
  a.b_vec = vec_rows<S>(a.b, a.ldb);
  const WgradVariant variant = wgrad_variant(a, tc);
  const int64_t target =
      lt::wgrad_target_chunks(a.m_tiles * a.n_tiles, wave_blocks(wgrad_resident_blocks<S, Acc>(variant)), p.k,
                              kWgradChunks, kMaxWgradChunks);
  const int64_t chunk_rows = lt::wgrad_chunk_rows(p.n, target, BK, BM);
  const int64_t chunks = lt::seg_tile_grid(p.n, p.k, chunk_rows);
  a.chunk_rows = chunk_rows;
  at::Tensor part = at::empty({chunks, m_rows, ncols}, p.x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  if constexpr (std::is_same_v<Acc, double>) {
    a.out_d = part.mutable_data_ptr<double>();
  } else {
    a.out_f = part.mutable_data_ptr<float>();
  }
  a.out_vec = vec_rows<Acc>(part.const_data_ptr(), ncols);
  const dim3 grid(grid_dim(chunks * a.m_tiles * a.n_tiles, "x"));
  if constexpr (kIs16Bit<S>) {
    if (variant == WgradVariant::kTcPipelined) {
      wgrad_kernel<S, Acc, true, kPipeBRow><<<grid, kThreads, 0, p.stream>>>(a);
    } else if (variant == WgradVariant::kTc) {
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

// Whether the backward runs G and dB in one pass over dY (dy_pass_kernel): bf16 / fp16 on tensor
// cores, a non-empty `out`, sm_80+, the switch on (tuning.h), and a rank at which the pass moves
// fewer DRAM bytes than two (lt::dy_pass_pays: r < 128; any rank with grouped_lora_fused_dy_any_rank,
// the A/B switch of the benchmarks). r > 32 runs in rank chunks of kDyPassRank, two halves a block.
template <typename S>
bool use_dy_pass(const Prepared& p, bool tc) {
  const int64_t cols = static_cast<int64_t>(kDyPassCols) * lt::dy_pass_halves(p.r, kDyPassRank);
  const bool rank_ok = lt::dy_pass_pays(p.r, cols, static_cast<int64_t>(sizeof(S))) ||
                       tuning::grouped_lora_fused_dy_any_rank();
  return kIs16Bit<S> && tc && rank_ok && p.out > 0 && tuning::grouped_lora_fused_dy() &&
         at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// The one pass over dY: *gp = G partials [column chunks, N, r] (fp32), *dbp = dB partials
// [row chunks, out, r] (fp32) over row chunks of *db_chunk_rows rows, each block one rank chunk of
// kDyPassRank columns; r > 32: blocks of two halves (512 threads, 512 columns of dY). The row
// chunks fill whole waves of the kernel's occupancy over the column and rank chunks' blocks, as the
// weight gradients' (lt::wgrad_target_chunks).
template <typename S>
void dy_pass(const Prepared& p, const at::Tensor& gy, const at::Tensor& hs, at::Tensor* gp, int64_t* g_splits,
             at::Tensor* dbp, int64_t* db_chunk_rows) {
  DyPassArgs<S> a{};
  a.dy = reinterpret_cast<const S*>(gy.const_data_ptr());
  a.hs = reinterpret_cast<const S*>(hs.const_data_ptr());
  a.b = reinterpret_cast<const S*>(p.lora_b.const_data_ptr());
  a.offsets = p.offsets.const_data_ptr<int64_t>();
  a.k_seg = p.k;
  a.n = p.n;
  a.out = p.out;
  a.r = p.r;
  const int halves = lt::dy_pass_halves(p.r, kDyPassRank);
  a.col_chunks = index_math::ceil_div(p.out, static_cast<int64_t>(kDyPassCols) * halves);
  a.rank_chunks = lt::dy_pass_rank_chunks(p.r, kDyPassRank);
  a.dy_vec = vec_rows<S>(a.dy, p.out);
  a.hs_vec = vec_rows<S>(a.hs, p.r);
  a.b_vec = vec_rows<S>(a.b, p.r) && (p.out * p.r * static_cast<int64_t>(sizeof(S))) % 16 == 0;
  a.out_vec = tuning::grouped_lora_vectorized() && p.r % 4 == 0;  // fp32 rows of r: 16-byte aligned
  // the cp.async main loop where every operand comes in 16-byte rows (as the GEMMs')
  const bool pipelined = tuning::grouped_lora_pipelined() && a.dy_vec && a.hs_vec && a.b_vec;
  constexpr int kWide = kThreads * 2;  // two halves
  const int resident = halves == 2 ? (pipelined ? resident_blocks<&dy_pass_kernel<S, true, 2>, kWide>()
                                                : resident_blocks<&dy_pass_kernel<S, false, 2>, kWide>())
                                   : (pipelined ? resident_blocks<&dy_pass_kernel<S, true>>()
                                                : resident_blocks<&dy_pass_kernel<S, false>>());
  const int64_t target =
      lt::wgrad_target_chunks(a.col_chunks * a.rank_chunks, wave_blocks(resident), p.k, kWgradChunks, kMaxWgradChunks);
  a.chunk_rows = lt::wgrad_chunk_rows(p.n, target, BK, BM);
  const int64_t chunks = lt::seg_tile_grid(p.n, p.k, a.chunk_rows);
  *gp = at::empty({a.col_chunks, p.n, p.r}, p.x.options().dtype(at::kFloat));
  *dbp = at::empty({chunks, p.out, p.r}, p.x.options().dtype(at::kFloat));
  a.gp = gp->mutable_data_ptr<float>();
  a.dbp = dbp->mutable_data_ptr<float>();
  *g_splits = a.col_chunks;
  *db_chunk_rows = a.chunk_rows;
  const dim3 grid(grid_dim(chunks * a.col_chunks * a.rank_chunks, "x"));
  if (halves == 2 && pipelined) {
    dy_pass_kernel<S, true, 2><<<grid, kWide, 0, p.stream>>>(a);
  } else if (halves == 2) {
    dy_pass_kernel<S, false, 2><<<grid, kWide, 0, p.stream>>>(a);
  } else if (pipelined) {
    dy_pass_kernel<S, true><<<grid, kThreads, 0, p.stream>>>(a);
  } else {
    dy_pass_kernel<S, false><<<grid, kThreads, 0, p.stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename Acc>
void backward_typed(const Prepared& p, const at::Tensor& gy, double scaling, at::Tensor& grad_x, bool accumulate_dx,
                    at::Tensor& grad_a, at::Tensor& grad_b, at::Tensor& grad_rs, const at::Tensor& h) {
  const bool tc = kIs16Bit<S> && !force_simt();
  // The unscaled shrink: the forward's (one [N, r] piece, no read of x) or recomputed in pieces
  int64_t h_splits = 1;
  const at::Tensor hp = h.defined() ? h : shrink_partials<S, Acc>(p, tc, &h_splits);
  at::Tensor dh = at::empty({p.n, p.r}, p.x.options());
  at::Tensor hs = at::empty({p.n, p.r}, p.x.options());
  const Acc* rs = p.row_scale.defined() ? p.row_scale.const_data_ptr<Acc>() : nullptr;
  at::Tensor gp;     // G partials [g_splits, N, r]
  int64_t g_splits = 1;
  at::Tensor dbp;    // with the fused pass: dB partials [row chunks, out, r], over db_chunk_rows
  int64_t db_chunk_rows = 0;
  if (use_dy_pass<S>(p, tc)) {
    // Hs first: the one pass over dY needs it for dB
    finish_h_kernel<S, Acc><<<grid_dim(index_math::ceil_div(p.n * p.r, kEltThreads), "x"), kEltThreads, 0,
                              p.stream>>>(hp.const_data_ptr<Acc>(), h_splits, p.n, p.r, rs, static_cast<Acc>(scaling),
                                          reinterpret_cast<S*>(hs.mutable_data_ptr()), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (kIs16Bit<S>) dy_pass<S>(p, gy, hs, &gp, &g_splits, &dbp, &db_chunk_rows);
  } else {
    // G = dY B_k, split over `out` (as the shrink: one wave of the kernel's occupancy)
    RowGemmArgs<S> a = row_args<S>(lt::dy_b_shape(p.out, p.r), gy, p.lora_b, p.offsets, p.k, p.n);
    const int64_t blocks = lt::seg_tile_grid(p.n, p.k, BM) * index_math::ceil_div(p.r, BN);
    const int64_t target = wave_blocks(row_gemm_resident_blocks<S, Acc, Epi::kPartial>(a, tc));
    const lt::SplitPlan plan =
        lt::split_plan(p.out, lt::want_splits(blocks, target, p.out, kMinSplitChunk, kMaxSplits), BK);
    g_splits = plan.splits;
    gp = at::empty({plan.splits, p.n, p.r}, hp.options());
    a.kchunk = plan.chunk;
    a.out = gp.mutable_data_ptr();
    a.out_vec = vec_rows<Acc>(a.out, a.ncols);
    if (p.out == 0) {
      gp.zero_();  // an empty reduction: no block would write the partials
    } else {
      launch_row_gemm<S, Acc, Epi::kPartial>(a, plan.splits, tc, p.stream);
    }
  }
  const int rows_per_block = kEltThreads / kWarp;
  finish_bwd_kernel<S, Acc><<<grid_dim(index_math::ceil_div(p.n, rows_per_block), "x"), kEltThreads, 0, p.stream>>>(
      hp.const_data_ptr<Acc>(), h_splits, gp.const_data_ptr<Acc>(), g_splits, p.n, p.r, rs,
      static_cast<Acc>(scaling), reinterpret_cast<S*>(dh.mutable_data_ptr()),
      reinterpret_cast<S*>(hs.mutable_data_ptr()), grad_rs.numel() ? grad_rs.mutable_data_ptr<Acc>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // dA_k = dH_k^T X_k  [r, in];  dB_k = dY_k^T Hs_k  [out, r] (summed from the fused pass's partials,
  // or its own pass over dY). Before dX: grad_x may share memory with x or grad_y (the CPU kernel
  // allows it), and these read both.
  weight_grad<S, Acc>(p, lt::grad_a_shape(p.r, p.in), dh, p.x, grad_a, tc);
  if (dbp.defined()) {
    const int64_t elems = p.out * p.r;
    wgrad_reduce_kernel<S, Acc><<<grid_dim(index_math::ceil_div(elems, kEltThreads) * p.k, "x"), kEltThreads, 0,
                                  p.stream>>>(dbp.const_data_ptr<Acc>(), p.offsets.const_data_ptr<int64_t>(), p.k,
                                              p.n, db_chunk_rows, elems,
                                              reinterpret_cast<S*>(grad_b.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    weight_grad<S, Acc>(p, lt::grad_b_shape(p.out, p.r), gy, hs, grad_b, tc);
  }
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

// grad_x (contiguous, x's dtype) gets dX (stored, or added with accumulate_dx); grad_a, grad_b
// (contiguous, x's dtype) get dA, dB; grad_rs ([N] in Acc, or empty) d row_scale; h: the forward's
// unscaled shrink ([N, r] contiguous in Acc) or undefined (recomputed). N > 0.
inline void run_backward(const Prepared& p, const at::Tensor& gy, double scaling, at::Tensor& grad_x,
                         bool accumulate_dx, at::Tensor& grad_a, at::Tensor& grad_b, at::Tensor& grad_rs,
                         const at::Tensor& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "grouped_lora_backward_cuda", [&] {
    using S = typename Native<scalar_t>::type;
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_typed<S, Acc>(p, gy, scaling, grad_x, accumulate_dx, grad_a, grad_b, grad_rs, h);
  });
}

}  // namespace glora
}  // namespace cuda
}  // namespace mole_ext
