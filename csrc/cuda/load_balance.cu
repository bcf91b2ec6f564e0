// CUDA kernels for the Switch-style load-balance loss L = K * sum_k f_k P_k over masked tokens
// and its gradient with respect to probs (semantics: cpu/load_balance.cpp).
//
// Deterministic two-level reduction, no atomics: the partial kernel gives each block a fixed
// range of rows (lb_rows_per_block depends on N and K only, never on the GPU) and writes that
// range's per-expert probability sums (float64, like the CPU) and counts; one block then adds the
// partials in block order and forms the loss. The gradient g * K * mask_t * counts_j / M^2 is
// computed per expert in float64 with the CPU's operation order and broadcast, so it is
// bit-identical to the CPU kernel; the loss differs from it only by float64 summation order.
//
// Invalid expert ids (outside [0, K)): the row is left out of every sum and its gradient row is
// zero (as if masked), and the error is reported (common.cuh): raised in this call in validate
// mode, else lazily.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../ops.h"
#include "common.cuh"
#include "op_scope.cuh"

namespace mole_ext {
namespace cuda {
namespace {

namespace rm = routing_math;

constexpr int kLbThreads = 256;

// The fixed-order combine of the row lanes: every thread publishes its (s, cn) in shared memory,
// then thread c < k adds the row_lanes values of column c in lane order (lane q of column c is
// thread q * k + c) into (*ss, *cc). Every thread of the block must call this (it has a barrier);
// the result is meaningful for threadIdx.x < k only.
__device__ __forceinline__ void combine_row_lanes(double s, int64_t cn, int64_t k, int64_t row_lanes, double* s_sum,
                                                  int64_t* s_cnt, double* ss, int64_t* cc) {
  const int64_t tid = threadIdx.x;
  s_sum[tid] = s;
  s_cnt[tid] = cn;
  __syncthreads();
  *ss = 0;
  *cc = 0;
  if (tid < k) {
    for (int64_t q = 0; q < row_lanes; ++q) {
      *ss = add_rn(*ss, s_sum[q * k + tid]);
      *cc += s_cnt[q * k + tid];
    }
  }
}

// probs [n, k] (unused when !WITH_PSUM), expert [n], mask [n] or null ->
// psum [blocks, k] float64 (when WITH_PSUM), cnt [blocks, k] int64.
template <typename scalar_t, typename index_t, bool WITH_PSUM>
__global__ void __launch_bounds__(kLbThreads) lb_partials_kernel(
    const scalar_t* __restrict__ probs, const index_t* __restrict__ expert, const bool* __restrict__ mask,
    int64_t n, int64_t k, int64_t rows_per_block, double* __restrict__ psum, int64_t* __restrict__ cnt,
    ErrorSlots* slots) {
  __shared__ double s_sum[kLbThreads];
  __shared__ int64_t s_cnt[kLbThreads];
  const rm::LbLayout layout = rm::lb_layout(k, kLbThreads);
  const int64_t blk = blockIdx.x;
  const int64_t r0 = blk * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < n ? r0 + rows_per_block : n;
  const int64_t tid = threadIdx.x;

  // Sum of column c over rows r0 + lane, + step, ... < r1. Loads are unconditional (in bounds)
  // and the row's contribution is selected, so unrolled iterations keep several loads in flight.
  auto column = [&](int64_t c, int64_t lane, int64_t step, double* s_out, int64_t* c_out) {
    double s = 0;
    int64_t cn = 0;
#pragma unroll 4
    for (int64_t r = r0 + lane; r < r1; r += step) {
      const index_t e = expert[r];
      const int32_t bin = rm::expert_bin(e, k);
      const bool bad = bin == k;
      if (bad && c == 0) report_error(slots, cuda_errors::kLoadBalanceExpert, static_cast<int64_t>(e), r, k);
      const bool use = !bad && (mask == nullptr || mask[r]);
      if constexpr (WITH_PSUM) {
        const double p = static_cast<double>(probs[r * k + c]);
        s = use ? add_rn(s, p) : s;
      }
      cn += (use && bin == c) ? 1 : 0;
    }
    *s_out = s;
    *c_out = cn;
  };

  if (layout.row_lanes == 1) {
    // k > threads / 2: each thread owns whole columns.
    for (int64_t c = tid; c < k; c += kLbThreads) {
      double s;
      int64_t cn;
      column(c, 0, 1, &s, &cn);
      if constexpr (WITH_PSUM) psum[blk * k + c] = s;
      cnt[blk * k + c] = cn;
    }
    return;
  }
  // k <= threads / 2: row_lanes threads per column, then a fixed-order combine in shared memory.
  double s = 0;
  int64_t cn = 0;
  if (tid < layout.active) column(tid % layout.col_threads, tid / layout.col_threads, layout.row_lanes, &s, &cn);
  double ss;
  int64_t cc;
  combine_row_lanes(s, cn, k, layout.row_lanes, s_sum, s_cnt, &ss, &cc);
  if (tid < k) {
    if constexpr (WITH_PSUM) psum[blk * k + tid] = ss;
    cnt[blk * k + tid] = cc;
  }
}

// For every column c < k, the totals over the blocks' partials (psum may be null), in a fixed
// order; calls f(c, sum, count) once per column, from some thread of the block. Every thread of
// the block must call this (it has barriers). Uses the partial kernel's layout: for k <= 128,
// row_lanes threads per column each add a contiguous run of blocks, then one thread per column
// adds the runs in order; otherwise each thread adds whole columns.
template <typename F>
__device__ __forceinline__ void for_each_column_total(const double* psum, const int64_t* cnt, int64_t blocks,
                                                      int64_t k, double* s_sum, int64_t* s_cnt, F&& f) {
  const rm::LbLayout layout = rm::lb_layout(k, kLbThreads);
  const int64_t tid = threadIdx.x;
  if (layout.row_lanes == 1) {
    for (int64_t c = tid; c < k; c += kLbThreads) {
      double s = 0;
      int64_t cn = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        if (psum != nullptr) s = add_rn(s, psum[b * k + c]);
        cn += cnt[b * k + c];
      }
      f(c, s, cn);
    }
    return;
  }
  double s = 0;
  int64_t cn = 0;
  if (tid < layout.active) {
    const int64_t c = tid % layout.col_threads, q = tid / layout.col_threads;
    int64_t b0 = 0, b1 = 0;
    rm::block_partition(blocks, layout.row_lanes, q, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      if (psum != nullptr) s = add_rn(s, psum[b * k + c]);
      cn += cnt[b * k + c];
    }
  }
  double ss;
  int64_t cc;
  combine_row_lanes(s, cn, k, layout.row_lanes, s_sum, s_cnt, &ss, &cc);
  if (tid < k) f(tid, ss, cc);
  __syncthreads();  // s_sum / s_cnt may be reused right after
}

// One block: loss = K * sum_c count_c * psum_c / M^2 (0 when M == 0), M = sum_c count_c.
template <typename out_t>
__global__ void __launch_bounds__(kLbThreads) lb_loss_kernel(const double* __restrict__ psum,
                                                             const int64_t* __restrict__ cnt, int64_t blocks,
                                                             int64_t k, out_t* __restrict__ loss) {
  __shared__ double s_sum[kLbThreads];
  __shared__ int64_t s_cnt[kLbThreads];
  __shared__ double sd[kWarp];
  __shared__ int64_t sc[kWarp];
  double dot = 0;
  int64_t m = 0;
  for_each_column_total(psum, cnt, blocks, k, s_sum, s_cnt, [&](int64_t, double s, int64_t cn) {
    dot = add_rn(dot, mul_rn(static_cast<double>(cn), s));
    m += cn;
  });
  dot = block_sum(dot, sd);
  m = block_sum(m, sc);
  if (threadIdx.x == 0) {
    double l = 0;
    if (m > 0) {
      const double mm = static_cast<double>(m);
      l = div_rn(mul_rn(static_cast<double>(k), dot), mul_rn(mm, mm));
    }
    *loss = static_cast<out_t>(l);
  }
}

// One block: col[c] = g * K * count_c / M^2 in float64 (0 when M == 0); g = grad_loss[0].
__global__ void __launch_bounds__(kLbThreads) lb_grad_col_kernel(const int64_t* __restrict__ cnt, int64_t blocks,
                                                                 int64_t k, const double* __restrict__ grad_loss,
                                                                 double* __restrict__ col) {
  __shared__ double s_sum[kLbThreads];
  __shared__ int64_t s_cnt[kLbThreads];
  __shared__ int64_t sc[kWarp];
  __shared__ int64_t m_all;
  int64_t m = 0;
  // first pass: M; the counts go to col (as doubles, exact below 2^53) for the second pass
  for_each_column_total(nullptr, cnt, blocks, k, s_sum, s_cnt, [&](int64_t c, double, int64_t cn) {
    m += cn;
    col[c] = static_cast<double>(cn);
  });
  m = block_sum(m, sc);
  if (threadIdx.x == 0) m_all = m;
  __syncthreads();  // also orders the col[] writes above before the reads below
  m = m_all;
  const double g = grad_loss[0];
  const double mm = static_cast<double>(m);
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) {
    // CPU: g * double(k) * double(counts[j]) / (double(m) * m)
    col[c] = m > 0 ? div_rn(mul_rn(mul_rn(g, static_cast<double>(k)), col[c]), mul_rn(mm, mm)) : 0.0;
  }
}

// grad [n, k] = col broadcast over rows, times mask[t] (in probs' dtype, as the CPU does). A row
// with an invalid expert id is left out of the loss (as if masked), so its gradient is zero too.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kLbThreads) lb_grad_kernel(const double* __restrict__ col,
                                                             const bool* __restrict__ mask,
                                                             const index_t* __restrict__ expert, int64_t n,
                                                             int64_t k, scalar_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = n * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k, c = i - r * k;
    const scalar_t v = static_cast<scalar_t>(col[c]);
    const bool bad = rm::expert_bin(expert[r], k) == k;
    if (mask == nullptr && !bad) {
      out[i] = v;
    } else {
      const opmath_t mv = (!bad && (mask == nullptr || mask[r])) ? opmath_t(1) : opmath_t(0);
      out[i] = static_cast<scalar_t>(mv * static_cast<opmath_t>(v));
    }
  }
}

// Launches the partial kernel; returns the number of blocks.
template <typename scalar_t, bool WITH_PSUM>
int64_t launch_partials(const at::Tensor& probs, const at::Tensor& expert, const bool* mask, int64_t n, int64_t k,
                        double* psum, int64_t* cnt, ErrorSlots* slots, cudaStream_t stream) {
  const int64_t rows = rm::lb_rows_per_block(n, k);
  const int64_t blocks = index_math::ceil_div(n, rows);
  const scalar_t* pp = nullptr;
  if constexpr (WITH_PSUM) pp = probs.const_data_ptr<scalar_t>();
  AT_DISPATCH_INDEX_TYPES(expert.scalar_type(), "mole_ext_lb_partials", [&] {
    lb_partials_kernel<scalar_t, index_t, WITH_PSUM><<<static_cast<unsigned>(blocks), kLbThreads, 0, stream>>>(
        pp, expert.const_data_ptr<index_t>(), mask, n, k, rows, psum, cnt, slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return blocks;
}

}  // namespace

// probs [N, K] float, expert [N] int32/int64, mask [N] bool or None -> scalar float32 (float64
// for float64 probs)
at::Tensor load_balance_loss_cuda(const at::Tensor& probs_in, const at::Tensor& expert_in,
                                  const std::optional<at::Tensor>& mask_in) {
  const CudaOpScope scope(probs_in, "probs", [&] { check_load_balance(probs_in, expert_in, mask_in); });
  const int64_t n = probs_in.size(0), k = probs_in.size(1);
  const auto acc = acc_type_for(probs_in.scalar_type());
  if (n == 0) return at::zeros({}, probs_in.options().dtype(acc));
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const int64_t blocks = index_math::ceil_div(n, rm::lb_rows_per_block(n, k));
  at::Tensor psum = at::empty({blocks, k}, probs.options().dtype(at::kDouble));
  at::Tensor cnt = at::empty({blocks, k}, probs.options().dtype(at::kLong));
  at::Tensor loss = at::empty({}, probs.options().dtype(acc));
  ErrorSlots* slots = scope.slots();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "load_balance_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_partials<scalar_t, true>(probs, expert, mp, n, k, psum.mutable_data_ptr<double>(),
                                    cnt.mutable_data_ptr<int64_t>(), slots, stream);
    lb_loss_kernel<acc_t><<<1, kLbThreads, 0, stream>>>(psum.const_data_ptr<double>(), cnt.const_data_ptr<int64_t>(),
                                                        blocks, k, loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

// grad_loss scalar, probs [N, K] float, expert [N], mask [N] bool or None -> grad_probs [N, K]
// in probs' dtype
at::Tensor load_balance_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& probs_in,
                                           const at::Tensor& expert_in, const std::optional<at::Tensor>& mask_in) {
  const CudaOpScope scope(probs_in, "probs", [&] {
    check_load_balance(probs_in, expert_in, mask_in);
    TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  });
  const int64_t n = probs_in.size(0), k = probs_in.size(1);
  at::Tensor grad = at::empty({n, k}, probs_in.options());
  if (n == 0) return grad;
  const at::Tensor expert = expert_in.contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  // Exact widening (as the CPU's item<double>()), on this device, without a host sync.
  const at::Tensor g = grad_loss.reshape({1}).to(probs_in.device(), at::kDouble).contiguous();
  const int64_t blocks = index_math::ceil_div(n, rm::lb_rows_per_block(n, k));
  at::Tensor cnt = at::empty({blocks, k}, probs_in.options().dtype(at::kLong));
  at::Tensor col = at::empty({k}, probs_in.options().dtype(at::kDouble));
  ErrorSlots* slots = scope.slots();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // probs' values do not enter the gradient: the partial pass reads expert and mask only.
  launch_partials<float, false>(probs_in, expert, mp, n, k, nullptr, cnt.mutable_data_ptr<int64_t>(), slots, stream);
  lb_grad_col_kernel<<<1, kLbThreads, 0, stream>>>(cnt.const_data_ptr<int64_t>(), blocks, k, g.const_data_ptr<double>(),
                                                  col.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = n * k;
  const int64_t grid = std::min<int64_t>(index_math::ceil_div(total, kLbThreads), 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs_in.scalar_type(), "load_balance_loss_backward_cuda", [&] {
    using prob_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(expert.scalar_type(), "load_balance_loss_backward_cuda", [&] {
      lb_grad_kernel<prob_t, index_t><<<static_cast<unsigned>(grid), kLbThreads, 0, stream>>>(
          col.const_data_ptr<double>(), mp, expert.const_data_ptr<index_t>(), n, k, grad.mutable_data_ptr<prob_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(mole_ext, CUDA, m) {
  m.impl("load_balance_loss", &cuda::load_balance_loss_cuda);
  m.impl("load_balance_loss_backward", &cuda::load_balance_loss_backward_cuda);
}

}  // namespace mole_ext
