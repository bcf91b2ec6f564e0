// CPU kernels for the Switch-style load-balance loss L = K * sum_k f_k P_k over masked tokens
// (f_k: fraction of tokens routed to k, P_k: mean router probability of k), and its gradient
// with respect to probs (f_k is piecewise constant, so only P_k carries gradient).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"

namespace mole_ext {
namespace {

// Counts per expert over masked tokens (f_k * M) and M itself; checks expert ids.
std::vector<int64_t> masked_counts(const at::Tensor& expert_in, const std::optional<at::Tensor>& mask_in,
                                   int64_t k, int64_t* m_out) {
  const at::Tensor expert = expert_in.to(at::kLong).contiguous();
  const int64_t n = expert.size(0);
  const int64_t* e = expert.const_data_ptr<int64_t>();
  at::Tensor mask;
  const bool* mp = nullptr;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    mp = mask.const_data_ptr<bool>();
  }
  std::vector<int64_t> counts(k, 0);
  int64_t m = 0;
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(e[t] >= 0 && e[t] < k, "expert ids must be in [0, K = ", k, ") (K = probs.size(1)), but expert[",
                t, "] = ", e[t]);
    if (mp && !mp[t]) continue;
    ++counts[e[t]];
    ++m;
  }
  *m_out = m;
  return counts;
}

}  // namespace

at::Tensor load_balance_loss_cpu(const at::Tensor& probs_in, const at::Tensor& expert,
                                 const std::optional<at::Tensor>& mask_in) {
  const BelowAutograd below_autograd;
  check_load_balance(probs_in, expert, mask_in);
  const int64_t n = probs_in.size(0), k = probs_in.size(1);
  int64_t m = 0;
  const std::vector<int64_t> counts = masked_counts(expert, mask_in, k, &m);
  const auto acc = acc_type_for(probs_in.scalar_type());
  if (m == 0) return at::zeros({}, probs_in.options().dtype(acc));  // no real tokens: no signal
  const at::Tensor probs = probs_in.contiguous();
  at::Tensor mask;
  const bool* mp = nullptr;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    mp = mask.const_data_ptr<bool>();
  }
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "load_balance_loss_cpu", [&] {
    // double sums: the loss is O(K) work on top of an O(N K) read, and N can be millions.
    using acc_t = double;
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    std::vector<acc_t> psum(k, 0);
    for (int64_t t = 0; t < n; ++t) {
      if (mp && !mp[t]) continue;
      for (int64_t j = 0; j < k; ++j) psum[j] += static_cast<acc_t>(p[t * k + j]);
    }
    acc_t dot = 0;
    for (int64_t j = 0; j < k; ++j) dot += static_cast<acc_t>(counts[j]) * psum[j];
    const acc_t mm = static_cast<acc_t>(m);
    loss = static_cast<acc_t>(k) * dot / (mm * mm);
  });
  return at::scalar_tensor(loss, probs_in.options().dtype(acc));
}

at::Tensor load_balance_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& probs_in,
                                          const at::Tensor& expert, const std::optional<at::Tensor>& mask_in) {
  const BelowAutograd below_autograd;
  check_load_balance(probs_in, expert, mask_in);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar, got shape ", grad_loss.sizes());
  const int64_t n = probs_in.size(0), k = probs_in.size(1);
  int64_t m = 0;
  const std::vector<int64_t> counts = masked_counts(expert, mask_in, k, &m);
  at::Tensor grad = at::zeros({n, k}, probs_in.options());
  if (m == 0) return grad;
  const double g = grad_loss.item<double>();
  // dL/dprobs[t, j] = g * K * m_t * counts_j / M^2
  std::vector<double> col(k);
  for (int64_t j = 0; j < k; ++j) {
    col[j] = g * static_cast<double>(k) * static_cast<double>(counts[j]) / (static_cast<double>(m) * m);
  }
  at::Tensor row = at::tensor(col, probs_in.options().dtype(at::kDouble)).to(probs_in.scalar_type());
  if (mask_in.has_value()) {
    grad.copy_(mask_in->unsqueeze(1).to(probs_in.scalar_type()) * row.unsqueeze(0));
  } else {
    grad.copy_(row.unsqueeze(0).expand({n, k}));
  }
  return grad;
}

TORCH_LIBRARY_IMPL(mole_ext, CPU, m) {
  m.impl("load_balance_loss", &load_balance_loss_cpu);
  m.impl("load_balance_loss_backward", &load_balance_loss_backward_cpu);
}

}  // namespace mole_ext
