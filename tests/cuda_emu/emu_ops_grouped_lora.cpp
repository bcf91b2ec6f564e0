// The emulated CUDA entry points of csrc/cuda/grouped_lora.cu as ops of the emulated library
// (torch.ops.mole_cuda_emu.*, tests/test_cuda_emulated.py): CPU tensors in and out, every call in
// an OpScope (poisoned, guarded allocations).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "emu_ops.h"
#include "tuning.h"

namespace mole_ext {
namespace cuda {
at::Tensor grouped_lora_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                             const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale);
void grouped_lora_add_out_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& offsets, double scaling,
                               const std::optional<at::Tensor>& row_scale);
std::tuple<at::Tensor, at::Tensor> grouped_lora_h_cuda(const at::Tensor& x, const at::Tensor& lora_a,
                                                       const at::Tensor& lora_b, const at::Tensor& offsets,
                                                       double scaling, const std::optional<at::Tensor>& row_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out_cuda(
    at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h);
at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                            double scaling, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& lora_x);
std::tuple<at::Tensor, at::Tensor> lora_linear_h_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& offsets,
                                                      double scaling, const std::optional<at::Tensor>& row_scale,
                                                      const std::optional<at::Tensor>& lora_x);
}  // namespace cuda
}  // namespace mole_ext

namespace {

using emu::OpScope;

at::Tensor grouped_lora(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& off,
                        double scaling, const std::optional<at::Tensor>& rs) {
  OpScope scope;
  at::Tensor y = mole_ext::cuda::grouped_lora_cuda(x, a, b, off, scaling, rs);
  OpScope::check("grouped_lora");
  return y;
}
std::tuple<at::Tensor, at::Tensor> grouped_lora_h(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                                  const at::Tensor& off, double scaling,
                                                  const std::optional<at::Tensor>& rs) {
  OpScope scope;
  auto r = mole_ext::cuda::grouped_lora_h_cuda(x, a, b, off, scaling, rs);
  OpScope::check("grouped_lora_h");
  return r;
}
void grouped_lora_add_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& off, double scaling, const std::optional<at::Tensor>& rs) {
  OpScope scope;
  mole_ext::cuda::grouped_lora_add_out_cuda(out, x, a, b, off, scaling, rs);
  OpScope::check("grouped_lora_add_out");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& off,
    double scaling, const std::optional<at::Tensor>& rs, const std::optional<at::Tensor>& h) {
  OpScope scope;
  auto r = mole_ext::cuda::grouped_lora_backward_cuda(gy, x, a, b, off, scaling, rs, h);
  OpScope::check("grouped_lora_backward");
  return r;
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out(
    at::Tensor& gx, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& off, double scaling, const std::optional<at::Tensor>& rs, const std::optional<at::Tensor>& h) {
  OpScope scope;
  auto r = mole_ext::cuda::grouped_lora_backward_add_out_cuda(gx, gy, x, a, b, off, scaling, rs, h);
  OpScope::check("grouped_lora_backward_add_out");
  return r;
}
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       const at::Tensor& a, const at::Tensor& b, const at::Tensor& off, double scaling,
                       const std::optional<at::Tensor>& rs, const std::optional<at::Tensor>& lora_x) {
  OpScope scope;
  at::Tensor y = mole_ext::cuda::lora_linear_cuda(x, w, bias, a, b, off, scaling, rs, lora_x);
  OpScope::check("lora_linear");
  return y;
}
std::tuple<at::Tensor, at::Tensor> lora_linear_h(const at::Tensor& x, const at::Tensor& w,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                                 const at::Tensor& b, const at::Tensor& off, double scaling,
                                                 const std::optional<at::Tensor>& rs,
                                                 const std::optional<at::Tensor>& lora_x) {
  OpScope scope;
  auto r = mole_ext::cuda::lora_linear_h_cuda(x, w, bias, a, b, off, scaling, rs, lora_x);
  OpScope::check("lora_linear_h");
  return r;
}
void set_vectorized(bool on) { mole_ext::tuning::set_grouped_lora_vectorized(on); }
bool vectorized() { return mole_ext::tuning::grouped_lora_vectorized(); }
void set_pipelined(bool on) { mole_ext::tuning::set_grouped_lora_pipelined(on); }
void set_fused_dy(bool on) { mole_ext::tuning::set_grouped_lora_fused_dy(on); }
void set_fused_dy_any_rank(bool on) { mole_ext::tuning::set_grouped_lora_fused_dy_any_rank(on); }

}  // namespace

MOLE_EMU_LIBRARY_FRAGMENT(m) {
  m.def("grouped_lora(Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale) -> Tensor",
        &grouped_lora);
  m.def("grouped_lora_h(Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale) "
        "-> (Tensor, Tensor)",
        &grouped_lora_h);
  m.def("grouped_lora_add_out(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, "
        "Tensor? row_scale) -> ()",
        &grouped_lora_add_out);
  m.def("grouped_lora_backward(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, "
        "Tensor? row_scale, Tensor? h=None) -> (Tensor, Tensor, Tensor, Tensor)",
        &grouped_lora_backward);
  m.def("grouped_lora_backward_add_out(Tensor(a!) grad_x, Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, "
        "Tensor offsets, float scaling, Tensor? row_scale, Tensor? h=None) -> (Tensor, Tensor, Tensor)",
        &grouped_lora_backward_add_out);
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor offsets, "
        "float scaling, Tensor? row_scale, Tensor? lora_x=None) -> Tensor",
        &lora_linear);
  m.def("lora_linear_h(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor offsets, "
        "float scaling, Tensor? row_scale, Tensor? lora_x=None) -> (Tensor, Tensor)",
        &lora_linear_h);
  m.def("set_vectorized(bool on) -> ()", &set_vectorized);
  m.def("vectorized() -> bool", &vectorized);
  m.def("set_pipelined(bool on) -> ()", &set_pipelined);
  m.def("set_fused_dy(bool on) -> ()", &set_fused_dy);
  m.def("set_fused_dy_any_rank(bool on) -> ()", &set_fused_dy_any_rank);
}
