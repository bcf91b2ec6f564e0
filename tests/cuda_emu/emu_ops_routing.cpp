// The emulated CUDA entry points of csrc/cuda/router.cu, permute.cu and load_balance.cu as ops of
// the emulated library (torch.ops.mole_cuda_emu_routing.*, tests/test_cuda_emulated_routing.py):
// CPU tensors in and out, every call in an OpScope (poisoned, guarded allocations).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "core/routing_math.h"
#include "emu_ops.h"

namespace mole_ext {
namespace cuda {
std::tuple<at::Tensor, at::Tensor> router_top1_cuda(const at::Tensor& logits);
at::Tensor router_top1_backward_cuda(const at::Tensor& grad, const at::Tensor& probs);
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x, const at::Tensor& expert,
                                                            int64_t num_experts);
at::Tensor permute_rows_cuda(const at::Tensor& x, const at::Tensor& sorted_token);
at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& sorted_token);
at::Tensor load_balance_loss_cuda(const at::Tensor& probs, const at::Tensor& expert,
                                  const std::optional<at::Tensor>& mask);
at::Tensor load_balance_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& probs,
                                           const at::Tensor& expert, const std::optional<at::Tensor>& mask);
}  // namespace cuda
}  // namespace mole_ext

namespace {

namespace mc = mole_ext::cuda;
using emu::OpScope;

// Runs one entry point inside an OpScope, then checks the guard zones.
template <typename F>
auto scoped(const char* op, F&& f) {
  OpScope scope;
  auto r = f();
  OpScope::check(op);
  return r;
}

std::tuple<at::Tensor, at::Tensor> router_top1(const at::Tensor& logits) {
  return scoped("router_top1", [&] { return mc::router_top1_cuda(logits); });
}
at::Tensor router_top1_backward(const at::Tensor& grad, const at::Tensor& probs) {
  return scoped("router_top1_backward", [&] { return mc::router_top1_backward_cuda(grad, probs); });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& expert, int64_t k) {
  return scoped("permute", [&] { return mc::permute_cuda(x, expert, k); });
}
at::Tensor permute_rows(const at::Tensor& x, const at::Tensor& st) {
  return scoped("permute_rows", [&] { return mc::permute_rows_cuda(x, st); });
}
at::Tensor unpermute(const at::Tensor& y, const at::Tensor& st) {
  return scoped("unpermute", [&] { return mc::unpermute_cuda(y, st); });
}
at::Tensor load_balance_loss(const at::Tensor& probs, const at::Tensor& expert, const std::optional<at::Tensor>& mask) {
  return scoped("load_balance_loss", [&] { return mc::load_balance_loss_cuda(probs, expert, mask); });
}
at::Tensor load_balance_loss_backward(const at::Tensor& g, const at::Tensor& probs, const at::Tensor& expert,
                                      const std::optional<at::Tensor>& mask) {
  return scoped("load_balance_loss_backward", [&] { return mc::load_balance_loss_backward_cuda(g, probs, expert, mask); });
}

// The permute's plan for n tokens and k experts (csrc/core/routing_math.h, as permute.cu calls
// it): (tokens per tile, tiles, whether the tile histogram is used rather than the sort), so tests
// can require the path each case is meant to reach.
std::tuple<int64_t, int64_t, bool> permute_plan(int64_t n, int64_t k) {
  const auto t = mole_ext::routing_math::permute_tiling(n, k);
  return {t.tile_tokens, t.num_tiles, mole_ext::routing_math::permute_uses_tiles(n, k)};
}

}  // namespace

MOLE_EMU_LIBRARY_FRAGMENT(m) {
  m.def("permute_plan(int n, int k) -> (int, int, bool)", &permute_plan);
  m.def("router_top1(Tensor logits) -> (Tensor, Tensor)", &router_top1);
  m.def("router_top1_backward(Tensor grad_probs, Tensor probs) -> Tensor", &router_top1_backward);
  m.def("permute(Tensor x, Tensor expert, int num_experts) -> (Tensor, Tensor, Tensor)", &permute);
  m.def("permute_rows(Tensor x, Tensor sorted_token) -> Tensor", &permute_rows);
  m.def("unpermute(Tensor y_sorted, Tensor sorted_token) -> Tensor", &unpermute);
  m.def("load_balance_loss(Tensor probs, Tensor expert, Tensor? mask) -> Tensor", &load_balance_loss);
  m.def("load_balance_loss_backward(Tensor grad_loss, Tensor probs, Tensor expert, Tensor? mask) -> Tensor",
        &load_balance_loss_backward);
}
