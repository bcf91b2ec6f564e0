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
//              fixed order (chunk count: whole waves of the occupancy, lt::wgrad_target_chunks). No float atomics anywhere: every result is bit-reproducible.
// bf16 / fp16 multiply on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulate); fp32 and fp64
// use a SIMT inner product with the same tiling. MOLE_EXT_GROUPED_LORA_SIMT=1 forces the SIMT
// path for bf16 / fp16 as well (a cross-check of the tensor-core path). Global memory is read and
// written in 16-byte vectors where every row of a matrix starts 16-byte aligned (tile loads of
// row-contiguous operands, the epilogues; wgrad's left operand, dH or dY read along its rows of
// tokens, is staged k-major for that, block_mma's AT); MOLE_EXT_GROUPED_LORA_SCALAR=1 or
// mole_ext._C.set_grouped_lora_vectorized(False) turns that off (element accesses, the same
// results bit for bit: a cross-check and an A/B switch for the benchmarks). With vector accesses,
// the bf16 / fp16 row GEMMs and weight gradients run a cp.async pipelined main loop
// (block_mma_pipelined, sm_80+; the same products in the same order, so again identical results;
// set_grouped_lora_pipelined(False) or MOLE_EXT_GROUPED_LORA_NO_PIPELINE=1 turns it off).
// Occupancy: the row GEMMs' splits and the weight gradients' row chunks are chosen from the
// occupancy API (resident blocks of the kernel variant that runs, times the SMs) so that the grids
// end in whole waves; the chunk boundaries (the order of the fp32 sums) thus follow the device, and
// on one device every run gives the same bits.
//
// Forward (y = scaling * row_scale * B_k (A_k x)):
//   1. row_gemm<PARTIAL>: Hp[split] = X A_k^T over a piece of `in`          [splits, N, r] fp32
//   2. finish_h: Hs = dtype(m_i * sum_split Hp), m_i = scaling * row_scale[i]   [N, r] x's dtype
//   3. row_gemm<STORE | ADD>: y (+)= Hs B_k^T                                 [N, out]
//   grouped_lora_h / lora_linear_h (what autograd runs) also keep the unscaled H = sum_split Hp
//   ([N, r] fp32, written by finish_h: tiny next to x) for the backward.
// Backward: H is the forward's (the `h` argument) or, without it, recomputed as in 1.
//   bf16 / fp16 with r < 128 (sm_80+, switch grouped_lora_fused_dy on, the default; every r with
//   grouped_lora_fused_dy_any_rank):
//   2. finish_h: Hs = dtype(m_i H)
//   3. dy_pass: one pass over dY tiles: G partials (dY B_k per 256 columns of dY) and dB_k partials
//      (dY_k^T Hs_k per row chunk, its accumulators in registers over the chunk's rows); its tiles
//      double-buffered with cp.async where every row is 16-byte aligned (the pipeline switch).
//      r > 32 runs in rank chunks of 32 columns of B_k / Hs / the partials, one block each, the
//      chunks of a dY tile adjacent blocks (lt::dy_pass_block), so dY still comes from DRAM once;
//      its blocks are two halves of 256 threads over 512 columns of dY (G partials per 512 columns).
//   otherwise: G = dY B_k (row_gemm<PARTIAL> split over out), and dB later from its own pass.
// finish_bwd gives dH = m_i G, Hs = m_i H and d row_scale[i] = scaling <G_i, H_i>; then dA_k =
// dH_k^T X_k (wgrad + wgrad_reduce), dB_k (wgrad_reduce of the dy_pass partials, or wgrad + reduce
// over dY again), and last dX = dH A_k (row_gemm: last, so that an accumulating grad_x may share
// memory with x or grad_y, as the CPU kernel allows). The saved H is the value finish_bwd would sum
// from the same partials in the same order (finish_bwd adds it to 0 once: the same bits), so every
// gradient is identical bit for bit with and without it. The fused pass sums G and dB in another
// order than the two passes: they agree within rounding (tests compare both with the CPU kernel);
// each is reproducible run to run (fixed partition and order, no float atomics).
// DRAM traffic (bench/traffic.py models it kernel by kernel), in bytes per element of the large
// activations for bf16 (implemented / minimum; rank-r, weight and partial traffic aside):
//   forward:  x 2 / 2 (read once), y 2 / 2 (written once; add_out 4 / 4);
//   backward with the saved H: x 4 / 4 (read once by dA, dX written once; add_out 6 / 6);
//             dY 2 / 2 with the fused pass (r < 128), 4 / 2 with two passes (r >= 128, fp32);
//   backward without it (the plain ops): x 6 / 4 (the shrink reads x again).
// The fused pass trades dY's second read for fp32 partials: a block covering R rows x W columns of
// dY keeps dB [W, r] in registers over its rows and writes G [rows, r] per W columns, about 8 r / W
// + 8 r / R bytes per element of dY (W = 256 up to r = 32, 512 above; R = a row chunk, N / 8 or
// less): 0.5 + small at r = 16, 1 at r = 32 and at r = 64 (against 2 for the second read), 2 at
// r = 128 (the break-even, lt::dy_pass_pays: two passes, slightly less, run by default). Rank chunks
// keep dB's accumulators at 64 x 32 per warp (all of r = 64 would need twice the registers, past 2
// blocks of 256 threads per SM); the 512 columns come from a second half of 8 warps (512 threads, 1
// block per SM: the same threads per SM). Still fewer G partials need dB accumulators beyond registers.
// Rounding: Hs and dH are rounded once to the input dtype before the second GEMM (PyTorch's
// bf16 LoRA rounds the same intermediates), everything else accumulates in fp32 (fp64 for fp64).
//
// Offsets: a first kernel copies them to int64 and checks them (non-decreasing, 0 .. N); a bad
// list is reported like permute's bad ids (common.cuh: lazily or, in validate mode, in this call).
// The tile map clamps every offset to [0, N], so a bad list never causes an out-of-bounds access;
// the results are then unspecified.
//
// Files: grouped_lora_tile.cuh (device tile primitives: layouts, loads, the two main loops),
// grouped_lora_kernels.cuh (the kernels), grouped_lora_launch.cuh (host planning and launches),
// this file (the entry points and the switches).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>

#include "../ops.h"
#include "common.cuh"
#include "grouped_lora_launch.cuh"
#include "op_scope.cuh"
#include "tuning.h"

namespace mole_ext {
namespace cuda {

// x [N, in], lora_a [K, r, in], lora_b [K, out, r] (x's dtype), offsets [K+1] int32/int64,
// row_scale [N] float or None -> y [N, out] in x's dtype
at::Tensor grouped_lora_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale) {
  const CudaOpScope scope(x, "x", [&] { check_grouped_lora(x, lora_a, lora_b, offsets, row_scale); });
  at::Tensor y = at::empty({x.size(0), lora_b.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor no_h;
  const glora::Prepared p = glora::prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (x.size(0) > 0) glora::run_forward(p, scaling, y, /*accumulate=*/false, no_h);
  return y;
}

namespace {
// An [N, r] tensor for the forward's unscaled shrink (accumulation dtype, contiguous).
at::Tensor empty_h(const at::Tensor& x, const at::Tensor& lora_a) {
  return at::empty({x.size(0), lora_a.size(1)}, x.options().dtype(acc_type_for(x.scalar_type())));
}
}  // namespace

// -> (y, h): y as grouped_lora_cuda, h [N, r] = X A_k^T unscaled in the accumulation dtype
std::tuple<at::Tensor, at::Tensor> grouped_lora_h_cuda(const at::Tensor& x, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, const at::Tensor& offsets,
                                                       double scaling, const std::optional<at::Tensor>& row_scale) {
  const CudaOpScope scope(x, "x", [&] { check_grouped_lora(x, lora_a, lora_b, offsets, row_scale); });
  at::Tensor y = at::empty({x.size(0), lora_b.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor h = empty_h(x, lora_a);
  const glora::Prepared p = glora::prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (x.size(0) > 0) glora::run_forward(p, scaling, y, /*accumulate=*/false, h);
  return {y, h};
}

namespace {
// out += grouped_lora(x, ...); with h_out the unscaled shrink is returned there (lora_linear_h).
void add_out_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                  const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
                  at::Tensor* h_out) {
  const CudaOpScope scope(x, "x", [&] {
    check_grouped_lora_add_out(out, x, lora_a, lora_b, offsets, row_scale);
    mark_written(out);
  });
  at::Tensor h;
  if (h_out != nullptr) h = *h_out = empty_h(x, lora_a);
  const glora::Prepared p = glora::prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (x.size(0) == 0) return;
  if (out.is_contiguous()) {
    glora::run_forward(p, scaling, out, /*accumulate=*/true, h);
  } else {
    at::Tensor tmp = out.contiguous();
    glora::run_forward(p, scaling, tmp, /*accumulate=*/true, h);
    out.copy_(tmp);
  }
}
}  // namespace

// out [N, out_features] (x's dtype) += grouped_lora(x, ...), in place, rounded once.
void grouped_lora_add_out_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& offsets, double scaling,
                               const std::optional<at::Tensor>& row_scale) {
  add_out_cuda(out, x, lora_a, lora_b, offsets, scaling, row_scale, nullptr);
}

namespace {

// The backward into grad_x (contiguous, x's dtype): stored, or added onto its contents. Runs inside
// the caller's CudaOpScope. h: the forward's unscaled shrink (checked) or None (recomputed).
// -> grad_a, grad_b (x's dtype), grad_row_scale in row_scale's dtype (empty [0] without it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_into(at::Tensor& grad_x, bool accumulate_dx,
                                                             const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                             const at::Tensor& offsets, double scaling,
                                                             const std::optional<at::Tensor>& row_scale,
                                                             const std::optional<at::Tensor>& h) {
  const int64_t n = x.size(0);
  const auto acc = acc_type_for(x.scalar_type());
  const at::ScalarType rs_t = row_scale.has_value() ? row_scale->scalar_type() : x.scalar_type();
  at::Tensor grad_a = at::empty(lora_a.sizes(), lora_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_b = at::empty(lora_b.sizes(), lora_b.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_rs = at::empty({row_scale.has_value() ? n : 0}, x.options().dtype(acc));
  const glora::Prepared p = glora::prepare(x, lora_a, lora_b, offsets, row_scale);  // checks the offsets, also for N = 0
  if (n == 0) {
    grad_a.zero_();
    grad_b.zero_();
    return {grad_a, grad_b, grad_rs.to(rs_t)};
  }
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  const at::Tensor hc = h.has_value() ? h->contiguous() : at::Tensor();
  glora::run_backward(p, gy, scaling, grad_x, accumulate_dx, grad_a, grad_b, grad_rs, hc);
  return {grad_a, grad_b, grad_rs.to(rs_t)};
}

}  // namespace

// -> grad_x [N, in], grad_a [K, r, in], grad_b [K, out, r] (x's dtype), grad_row_scale [N] in
// row_scale's dtype (empty [0] in x's dtype without row_scale)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h) {
  const int64_t n = x.size(0), out_f = lora_b.size(1);
  const CudaOpScope scope(x, "x", [&] {
    check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
    if (h.has_value()) check_saved_h(*h, x, lora_a);
    TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == n && grad_y.size(1) == out_f, "grad_y must be [", n, ", ",
                out_f, "], got ", grad_y.sizes());
    TORCH_CHECK(grad_y.device() == x.device(), "grad_y must be on the device of x (", x.device(), "), got ",
                grad_y.device());
  });
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto [grad_a, grad_b, grad_rs] =
      backward_into(grad_x, /*accumulate_dx=*/false, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h);
  return {grad_x, grad_a, grad_b, grad_rs};
}

// grad_x [N, in] (x's dtype) += the grad_x of grouped_lora_backward, in place, rounded once
// -> grad_a, grad_b, grad_row_scale as grouped_lora_backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out_cuda(
    at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h) {
  const CudaOpScope scope(x, "x", [&] {
    check_grouped_lora_backward_add_out(grad_x, grad_y, x, lora_a, lora_b, offsets, row_scale);
    if (h.has_value()) check_saved_h(*h, x, lora_a);
    mark_written(grad_x);
  });
  if (grad_x.is_contiguous()) {
    return backward_into(grad_x, /*accumulate_dx=*/true, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h);
  }
  at::Tensor tmp = grad_x.contiguous();
  auto grads = backward_into(tmp, /*accumulate_dx=*/true, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h);
  grad_x.copy_(tmp);
  return grads;
}

// x [N, in] (any float dtype, cast to weight's), weight [out, in] cuBLAS -> [N, out] with the grouped
// LoRA expand accumulated into the GEMM's output (grouped_lora_add_out_cuda, its own scope)
at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                            double scaling, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& lora_x) {
  MOLE_CHECK_CUDA_TENSOR(x, "x");
  return lora_linear_with(&add_out_cuda, x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x);
}

// -> (lora_linear_cuda's result, the LoRA's unscaled shrink h as grouped_lora_h_cuda)
std::tuple<at::Tensor, at::Tensor> lora_linear_h_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& offsets,
                                                      double scaling, const std::optional<at::Tensor>& row_scale,
                                                      const std::optional<at::Tensor>& lora_x) {
  MOLE_CHECK_CUDA_TENSOR(x, "x");
  at::Tensor h;
  at::Tensor y = lora_linear_with(&add_out_cuda, x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x,
                                  &h);
  return {y, h};
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

std::atomic<bool>& fused_dy_flag() {
  static std::atomic<bool> on{!env_flag("MOLE_EXT_GROUPED_LORA_NO_FUSED_DY")};
  return on;
}

std::atomic<bool>& fused_dy_any_rank_flag() {
  static std::atomic<bool> on{env_flag("MOLE_EXT_GROUPED_LORA_FUSED_DY_ANY_RANK")};
  return on;
}
}  // namespace

void set_grouped_lora_vectorized(bool on) { vectorized_flag().store(on); }
bool grouped_lora_vectorized() { return vectorized_flag().load(); }
void set_grouped_lora_pipelined(bool on) { pipelined_flag().store(on); }
bool grouped_lora_pipelined() { return pipelined_flag().load(); }
void set_grouped_lora_fused_dy(bool on) { fused_dy_flag().store(on); }
bool grouped_lora_fused_dy() { return fused_dy_flag().load(); }
void set_grouped_lora_fused_dy_any_rank(bool on) { fused_dy_any_rank_flag().store(on); }
bool grouped_lora_fused_dy_any_rank() { return fused_dy_any_rank_flag().load(); }
}  // namespace tuning

TORCH_LIBRARY_IMPL(mole_ext, CUDA, m) {
  m.impl("grouped_lora", &cuda::grouped_lora_cuda);
  m.impl("grouped_lora_h", &cuda::grouped_lora_h_cuda);
  m.impl("grouped_lora_add_out", &cuda::grouped_lora_add_out_cuda);
  m.impl("grouped_lora_backward", &cuda::grouped_lora_backward_cuda);
  m.impl("grouped_lora_backward_add_out", &cuda::grouped_lora_backward_add_out_cuda);
  m.impl("lora_linear", &cuda::lora_linear_cuda);
  m.impl("lora_linear_h", &cuda::lora_linear_h_cuda);
}

}  // namespace mole_ext
