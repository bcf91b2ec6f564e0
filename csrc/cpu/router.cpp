// CPU kernels for router_top1: fused softmax + arg-max over experts, and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"

namespace mole_ext {
namespace {

// One row: probs = softmax(logits) in acc_t, expert = first index of the largest prob. A NaN
// prob counts as the largest (as torch.argmax does), so a NaN row is never silently routed.
template <typename scalar_t, typename acc_t>
void router_row(const scalar_t* logits, int64_t k, acc_t* probs, int32_t* expert) {
  acc_t mx = static_cast<acc_t>(logits[0]);
  for (int64_t j = 1; j < k; ++j) mx = std::max(mx, static_cast<acc_t>(logits[j]));
  acc_t sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t e = std::exp(static_cast<acc_t>(logits[j]) - mx);
    probs[j] = e;
    sum += e;
  }
  const acc_t inv = acc_t(1) / sum;
  int32_t best = 0;
  for (int64_t j = 0; j < k; ++j) {
    probs[j] = probs[j] * inv;
    if (j > 0) {
      const acc_t p = probs[j], b = probs[best];
      if (p > b || (std::isnan(p) && !std::isnan(b))) best = static_cast<int32_t>(j);
    }
  }
  *expert = best;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> router_top1_cpu(const at::Tensor& logits_in) {
  const BelowAutograd below_autograd;
  check_router_top1(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto acc = acc_type_for(logits.scalar_type());
  at::Tensor probs = at::empty({n, k}, logits.options().dtype(acc));
  at::Tensor expert = at::empty({n}, logits.options().dtype(at::kInt));
  if (n == 0) return {probs, expert};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "router_top1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    acc_t* pp = probs.mutable_data_ptr<acc_t>();
    int32_t* ep = expert.mutable_data_ptr<int32_t>();
    at::parallel_for(0, n, 2048 / std::max<int64_t>(k, 1) + 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) router_row<scalar_t, acc_t>(lp + t * k, k, pp + t * k, ep + t);
    });
  });
  return {probs, expert};
}

at::Tensor router_top1_backward_cpu(const at::Tensor& grad_in, const at::Tensor& probs_in) {
  const BelowAutograd below_autograd;
  check_router_top1_backward(grad_in, probs_in);
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor grad = grad_in.to(probs.scalar_type()).contiguous();
  const int64_t n = probs.size(0), k = probs.size(1);
  at::Tensor out = at::empty_like(probs);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "router_top1_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = probs.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 2048 / std::max<int64_t>(k, 1) + 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* p = pp + t * k;
        const scalar_t* g = gp + t * k;
        acc_t dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += static_cast<acc_t>(g[j]) * static_cast<acc_t>(p[j]);
        for (int64_t j = 0; j < k; ++j) {
          op[t * k + j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) * (static_cast<acc_t>(g[j]) - dot));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(mole_ext, CPU, m) {
  m.impl("router_top1", &router_top1_cpu);
  m.impl("router_top1_backward", &router_top1_backward_cpu);
}

}  // namespace mole_ext
