// CUDA kernels for router_top1 (fused softmax + arg-max over experts) and its backward (the
// softmax Jacobian-vector product).
//
// One thread per token row, the row's arithmetic in exactly the CPU kernel's order
// (cpu/router.cpp): max by `(a < b) ? b : a`, e_j = exp(l_j - max), a sequential sum, 1 / sum,
// p_j = e_j * inv, arg-max over p_j with ties to the lowest index and a NaN counting as the
// largest. Every operation is a single IEEE operation in round-to-nearest (no FMA contraction),
// so the only difference from the CPU is exp itself (CUDA's expf is within 2 ulp, glibc's within
// 1): probs agree to a few ulp, and `expert` is identical unless two probabilities of a row are
// within those few ulp of each other (a tie that floating point cannot decide the same way on
// both; see tests/test_cuda_router.py). The backward has no transcendental and is bit-identical.
//
// K <= 64 keeps the row in registers (template on a maximum K, 4 / 8 / 16 / 32 / 64; the backward
// up to 16, float64 up to 32); a larger K
// takes the generic kernel, which re-reads the row from memory instead of holding it, with the
// same arithmetic and so the same bits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "common.cuh"
#include "op_scope.cuh"

namespace mole_ext {
namespace cuda {
namespace {

constexpr int kRouterThreads = 128;

// One better-than step of the CPU's arg-max: a NaN beats any number, otherwise strictly larger.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t p, acc_t best) {
  return p > best || (isnan(p) && !isnan(best));
}

// logits [n, k] scalar_t -> probs [n, k] acc_t, expert [n] int32, k <= KMAX.
template <typename scalar_t, typename acc_t, int KMAX>
__global__ void __launch_bounds__(kRouterThreads) router_top1_regs_kernel(
    const scalar_t* __restrict__ logits, int64_t n, int k, acc_t* __restrict__ probs,
    int32_t* __restrict__ expert) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const scalar_t* row = logits + t * k;
  acc_t v[KMAX];
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) v[j] = static_cast<acc_t>(row[j]);
  }
  acc_t mx = v[0];
#pragma unroll
  for (int j = 1; j < KMAX; ++j) {
    if (j < k) mx = (mx < v[j]) ? v[j] : mx;  // std::max(mx, v[j])
  }
  acc_t sum = 0;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      v[j] = exp_acc(sub_rn(v[j], mx));
      sum = add_rn(sum, v[j]);
    }
  }
  const acc_t inv = div_rn(acc_t(1), sum);
  int32_t best = 0;
  acc_t best_p = 0;
  acc_t* out = probs + t * k;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      const acc_t p = mul_rn(v[j], inv);
      out[j] = p;
      if (j == 0) {
        best_p = p;
      } else if (beats(p, best_p)) {
        best = j;
        best_p = p;
      }
    }
  }
  expert[t] = best;
}

// Any k: the same arithmetic, re-reading the row (from L1/L2) instead of holding it.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRouterThreads) router_top1_generic_kernel(
    const scalar_t* __restrict__ logits, int64_t n, int64_t k, acc_t* __restrict__ probs,
    int32_t* __restrict__ expert) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const scalar_t* row = logits + t * k;
  acc_t mx = static_cast<acc_t>(row[0]);
  for (int64_t j = 1; j < k; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    mx = (mx < v) ? v : mx;
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < k; ++j) sum = add_rn(sum, exp_acc(sub_rn(static_cast<acc_t>(row[j]), mx)));
  const acc_t inv = div_rn(acc_t(1), sum);
  int32_t best = 0;
  acc_t best_p = 0;
  acc_t* out = probs + t * k;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t p = mul_rn(exp_acc(sub_rn(static_cast<acc_t>(row[j]), mx)), inv);
    out[j] = p;
    if (j == 0) {
      best_p = p;
    } else if (beats(p, best_p)) {
      best = static_cast<int32_t>(j);
      best_p = p;
    }
  }
  expert[t] = best;
}

// grad_logits[t, j] = p_j * (g_j - sum_i g_i p_i), in probs' dtype; k <= KMAX.
template <typename scalar_t, typename acc_t, int KMAX>
__global__ void __launch_bounds__(kRouterThreads) router_top1_backward_regs_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ probs, int64_t n, int k,
    scalar_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const scalar_t* g = grad + t * k;
  const scalar_t* p = probs + t * k;
  acc_t gv[KMAX], pv[KMAX];
  acc_t dot = 0;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      gv[j] = static_cast<acc_t>(g[j]);
      pv[j] = static_cast<acc_t>(p[j]);
      dot = add_rn(dot, mul_rn(gv[j], pv[j]));
    }
  }
  scalar_t* o = out + t * k;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) o[j] = static_cast<scalar_t>(mul_rn(pv[j], sub_rn(gv[j], dot)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRouterThreads) router_top1_backward_generic_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ probs, int64_t n, int64_t k,
    scalar_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const scalar_t* g = grad + t * k;
  const scalar_t* p = probs + t * k;
  acc_t dot = 0;
  for (int64_t j = 0; j < k; ++j) {
    dot = add_rn(dot, mul_rn(static_cast<acc_t>(g[j]), static_cast<acc_t>(p[j])));
  }
  scalar_t* o = out + t * k;
  for (int64_t j = 0; j < k; ++j) {
    o[j] = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(p[j]), sub_rn(static_cast<acc_t>(g[j]), dot)));
  }
}

// Calls f(std::integral_constant<int, KMAX>) for the smallest specialised KMAX >= k (up to
// `limit`), or f(std::integral_constant<int, 0>) for the generic kernel. The limits keep the
// register kernels free of spills (-Xptxas -v): the forward holds one row (64 floats, 32
// doubles), the backward two rows (16 values each).
template <typename F>
void dispatch_small_k(int64_t k, int64_t limit, F&& f) {
  if (k <= 4 && limit >= 4) {
    f(std::integral_constant<int, 4>());
  } else if (k <= 8 && limit >= 8) {
    f(std::integral_constant<int, 8>());
  } else if (k <= 16 && limit >= 16) {
    f(std::integral_constant<int, 16>());
  } else if (k <= 32 && limit >= 32) {
    f(std::integral_constant<int, 32>());
  } else if (k <= 64 && limit >= 64) {
    f(std::integral_constant<int, 64>());
  } else {
    f(std::integral_constant<int, 0>());
  }
}

}  // namespace

// logits [N, K] float32/bf16/fp16/fp64 -> probs [N, K] float32 (float64 for float64),
// expert [N] int32
std::tuple<at::Tensor, at::Tensor> router_top1_cuda(const at::Tensor& logits_in) {
  const CudaOpScope scope(logits_in, "logits", [&] { check_router_top1(logits_in); });
  const at::Tensor logits = logits_in.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1);
  at::Tensor probs = at::empty({n, k}, logits.options().dtype(acc_type_for(logits.scalar_type())));
  at::Tensor expert = at::empty({n}, logits.options().dtype(at::kInt));
  if (n == 0) return {probs, expert};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(grid_for(n, kRouterThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_top1_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    acc_t* pp = probs.mutable_data_ptr<acc_t>();
    int32_t* ep = expert.mutable_data_ptr<int32_t>();
    constexpr int64_t kLimit = std::is_same_v<acc_t, double> ? 32 : 64;
    dispatch_small_k(k, kLimit, [&](auto kmax) {
      constexpr int KMAX = decltype(kmax)::value;
      if constexpr (KMAX == 0 || KMAX > kLimit) {
        router_top1_generic_kernel<scalar_t, acc_t><<<grid, kRouterThreads, 0, stream>>>(lp, n, k, pp, ep);
      } else {
        router_top1_regs_kernel<scalar_t, acc_t, KMAX>
            <<<grid, kRouterThreads, 0, stream>>>(lp, n, static_cast<int>(k), pp, ep);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {probs, expert};
}

// grad_probs [N, K] float, probs [N, K] float -> grad_logits [N, K] in probs' dtype
at::Tensor router_top1_backward_cuda(const at::Tensor& grad_in, const at::Tensor& probs_in) {
  const CudaOpScope scope(probs_in, "probs", [&] { check_router_top1_backward(grad_in, probs_in); });
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor grad = grad_in.to(probs.scalar_type()).contiguous();
  const int64_t n = probs.size(0), k = probs.size(1);
  at::Tensor out = at::empty_like(probs, at::MemoryFormat::Contiguous);
  if (n == 0 || k == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(grid_for(n, kRouterThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "router_top1_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* pp = probs.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_small_k(k, 16, [&](auto kmax) {
      constexpr int KMAX = decltype(kmax)::value;
      if constexpr (KMAX == 0 || KMAX > 16) {
        router_top1_backward_generic_kernel<scalar_t, acc_t><<<grid, kRouterThreads, 0, stream>>>(gp, pp, n, k, op);
      } else {
        router_top1_backward_regs_kernel<scalar_t, acc_t, KMAX>
            <<<grid, kRouterThreads, 0, stream>>>(gp, pp, n, static_cast<int>(k), op);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(mole_ext, CUDA, m) {
  m.impl("router_top1", &cuda::router_top1_cuda);
  m.impl("router_top1_backward", &cuda::router_top1_backward_cuda);
}

}  // namespace mole_ext
