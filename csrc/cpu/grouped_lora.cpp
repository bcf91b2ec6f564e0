// CPU kernels for grouped_lora: per expert segment, a shrink (x_k @ A_k^T, [n_k, r]) and an
// expand (h_k @ B_k^T, [n_k, out]) through ATen's BLAS-backed mm in the accumulation type, and
// the backward from the same products. The per-row scale is applied to the rank-r
// intermediate (n_k * r multiplications instead of n_k * out) in plain loops: at LoRA ranks
// these are tiny, and separate ATen ops would cost more in dispatch and thread wake-ups than
// in arithmetic.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../core/index_math.h"
#include "../ops.h"

namespace mole_ext {
namespace {

std::vector<int64_t> checked_offsets(const at::Tensor& offsets, int64_t n) {
  const at::Tensor o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  const int64_t k = o.size(0) - 1;
  std::vector<int64_t> v(p, p + k + 1);
  TORCH_CHECK(index_math::valid_offsets(v.data(), k, n),
              "offsets must be non-decreasing with offsets[0] = 0 and offsets[-1] = N = ", n,
              " (the rows of x), got ", offsets);
  return v;
}

// Multiplier of row i: scaling * row_scale[i] (or scaling alone).
template <typename acc_t>
inline acc_t row_mult(const acc_t* rs, int64_t i, double scaling) {
  return rs ? static_cast<acc_t>(scaling) * rs[i] : static_cast<acc_t>(scaling);
}

// Zeroes the expert slices of a [K, ...] gradient whose segment is empty; the others are
// fully written by mm_out.
void zero_empty_experts(at::Tensor& grad, const std::vector<int64_t>& off) {
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    if (off[e + 1] == off[e]) grad[static_cast<int64_t>(e)].zero_();
  }
}

// The forward in the accumulation type: y [N, out] float32 (float64 for float64 x). With `into`
// (an [N, out] tensor of the accumulation type) the expand GEMMs add onto it instead (BLAS beta = 1:
// no delta tensor, no separate add pass), and `into` is returned. With `h_out`, the unscaled
// shrink X A_k^T [N, r] (accumulation type) is returned there: the same mm the backward would
// recompute, so a backward given it produces the same bits.
at::Tensor grouped_lora_acc(const at::Tensor& x_in, const at::Tensor& lora_a_in, const at::Tensor& lora_b_in,
                            const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
                            at::Tensor* into = nullptr, at::Tensor* h_out = nullptr) {
  const int64_t n = x_in.size(0), k = lora_a_in.size(0), out_f = lora_b_in.size(1);
  const std::vector<int64_t> off = checked_offsets(offsets, n);
  const auto acc = acc_type_for(x_in.scalar_type());
  // In the accumulation type; a no-op (no copy) for float32/float64 contiguous input.
  const at::Tensor x = x_in.to(acc).contiguous();
  const at::Tensor lora_a = lora_a_in.to(acc).contiguous();
  const at::Tensor lora_b = lora_b_in.to(acc).contiguous();
  const at::Tensor rs = row_scale.has_value() ? row_scale->to(acc).contiguous() : at::Tensor();
  // Valid offsets cover every row exactly once, so every row of y is written below.
  at::Tensor y = into != nullptr ? *into : at::empty({n, out_f}, x.options());
  if (h_out != nullptr) *h_out = at::empty({n, lora_a.size(1)}, x.options());  // every row lies in one segment
  AT_DISPATCH_FLOATING_TYPES(acc, "grouped_lora_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* rsp = rs.defined() ? rs.const_data_ptr<acc_t>() : nullptr;
    for (int64_t e = 0; e < k; ++e) {
      const int64_t b = off[e], len = off[e + 1] - off[e];
      if (len == 0) continue;
      at::Tensor h = at::mm(x.narrow(0, b, len), lora_a[e].t());  // [len, r]
      if (h_out != nullptr) h_out->narrow(0, b, len).copy_(h);
      acc_t* hp = h.mutable_data_ptr<acc_t>();
      const int64_t r = h.size(1);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t m = row_mult(rsp, b + i, scaling);
        for (int64_t j = 0; j < r; ++j) hp[i * r + j] *= m;
      }
      at::Tensor y_seg = y.narrow(0, b, len);
      if (into != nullptr) {
        at::addmm_out(y_seg, y_seg, h, lora_b[e].t());  // [len, out] +=
      } else {
        at::mm_out(y_seg, h, lora_b[e].t());  // [len, out]
      }
    }
  });
  return y;
}

}  // namespace

at::Tensor grouped_lora_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  return grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> grouped_lora_h_cpu(const at::Tensor& x, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& offsets,
                                                      double scaling, const std::optional<at::Tensor>& row_scale) {
  const BelowAutograd below_autograd;
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  at::Tensor h;
  at::Tensor y = grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale, nullptr, &h).to(x.scalar_type());
  return {y, h};
}

namespace {
// grouped_lora_add_out, and with h_out the unscaled shrink (lora_linear_h).
void add_out_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                 const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
                 at::Tensor* h_out) {
  const BelowAutograd below_autograd;
  check_grouped_lora_add_out(out, x, lora_a, lora_b, offsets, row_scale);
  mark_written(out);
  if (out.scalar_type() == acc_type_for(x.scalar_type())) {  // float32 / float64: accumulate in place
    grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale, &out, h_out);
  } else {  // add in the accumulation type, round once (what the CUDA epilogue does)
    at::Tensor sum = out.to(acc_type_for(x.scalar_type()));
    grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale, &sum, h_out);
    out.copy_(sum);
  }
}
}  // namespace

void grouped_lora_add_out_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& offsets, double scaling,
                              const std::optional<at::Tensor>& row_scale) {
  add_out_cpu(out, x, lora_a, lora_b, offsets, scaling, row_scale, nullptr);
}

namespace {

// The backward in the accumulation type: (grad_x, grad_a, grad_b, grad_row_scale), all float32
// (float64 for float64 x); grad_row_scale is empty [0] without row_scale. With `grad_x_into` (an
// [N, in] tensor of the accumulation type) dX is added onto it (BLAS beta = 1) and it is returned.
// h_in: the forward's unscaled shrink (grouped_lora_acc's h_out, checked by check_saved_h) or None:
// then the same mm recomputes it from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_acc(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& lora_a_in, const at::Tensor& lora_b_in,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h_in, at::Tensor* grad_x_into = nullptr) {
  const int64_t n = x_in.size(0), k = lora_a_in.size(0);
  const std::vector<int64_t> off = checked_offsets(offsets, n);
  const auto acc = acc_type_for(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc).contiguous();
  const at::Tensor lora_a = lora_a_in.to(acc).contiguous();
  const at::Tensor lora_b = lora_b_in.to(acc).contiguous();
  const at::Tensor grad_y = grad_y_in.to(acc).contiguous();
  const at::Tensor rs = row_scale.has_value() ? row_scale->to(acc).contiguous() : at::Tensor();

  at::Tensor grad_x = grad_x_into != nullptr ? *grad_x_into : at::empty_like(x);  // every row lies in one segment
  at::Tensor grad_a = at::empty_like(lora_a);
  at::Tensor grad_b = at::empty_like(lora_b);
  zero_empty_experts(grad_a, off);  // empty experts get exactly zero gradients
  zero_empty_experts(grad_b, off);
  at::Tensor grad_rs = at::empty({row_scale.has_value() ? n : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "grouped_lora_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* rsp = rs.defined() ? rs.const_data_ptr<acc_t>() : nullptr;
    acc_t* grsp = rs.defined() ? grad_rs.mutable_data_ptr<acc_t>() : nullptr;
    for (int64_t e = 0; e < k; ++e) {
      const int64_t b = off[e], len = off[e + 1] - off[e];
      if (len == 0) continue;
      const at::Tensor xe = x.narrow(0, b, len);
      const at::Tensor gy = grad_y.narrow(0, b, len);
      // [len, r], the unscaled shrink (a copy of the saved one: it is scaled in place below)
      at::Tensor h = h_in.has_value() ? h_in->narrow(0, b, len).clone(at::MemoryFormat::Contiguous)
                                      : at::mm(xe, lora_a[e].t());
      at::Tensor gb = at::mm(gy, lora_b[e]);      // [len, r] = grad_y @ B
      acc_t* hp = h.mutable_data_ptr<acc_t>();
      acc_t* gp = gb.mutable_data_ptr<acc_t>();
      const int64_t r = h.size(1);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t m = row_mult(rsp, b + i, scaling);
        if (grsp) {  // d row_scale[i] = scaling * <grad_y[i], B h[i]> = scaling * <gb[i], h[i]>
          acc_t dot = 0;
          for (int64_t j = 0; j < r; ++j) dot += gp[i * r + j] * hp[i * r + j];
          grsp[b + i] = static_cast<acc_t>(scaling) * dot;
        }
        for (int64_t j = 0; j < r; ++j) {
          gp[i * r + j] *= m;  // -> dh = grad wrt the shrink output
          hp[i * r + j] *= m;  // -> the scaled shrink the expand consumed
        }
      }
      at::Tensor ga = grad_a[e], gbw = grad_b[e], gx = grad_x.narrow(0, b, len);
      at::mm_out(gbw, gy.t(), h);         // [out, r]
      at::mm_out(ga, gb.t(), xe);         // [r, in]
      if (grad_x_into != nullptr) {
        at::addmm_out(gx, gx, gb, lora_a[e]);  // [len, in] +=
      } else {
        at::mm_out(gx, gb, lora_a[e]);      // [len, in]
      }
    }
  });
  return {grad_x, grad_a, grad_b, grad_rs};
}

at::ScalarType row_scale_grad_type(const at::Tensor& x, const std::optional<at::Tensor>& row_scale) {
  return row_scale.has_value() ? row_scale->scalar_type() : x.scalar_type();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h) {
  const BelowAutograd below_autograd;
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  if (h.has_value()) check_saved_h(*h, x, lora_a);
  const int64_t n = x.size(0), out_f = lora_b.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == n && grad_y.size(1) == out_f,
              "grad_y must be [", n, ", ", out_f, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), "grad_y must be on the device of x (", x.device(),
              "), got ", grad_y.device());
  auto [gx, ga, gb, grs] = grouped_lora_backward_acc(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h);
  return {gx.to(x.scalar_type()), ga.to(lora_a.scalar_type()), gb.to(lora_b.scalar_type()),
          grs.to(row_scale_grad_type(x, row_scale))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out_cpu(
    at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h) {
  const BelowAutograd below_autograd;
  check_grouped_lora_backward_add_out(grad_x, grad_y, x, lora_a, lora_b, offsets, row_scale);
  if (h.has_value()) check_saved_h(*h, x, lora_a);
  mark_written(grad_x);
  const auto acc = acc_type_for(x.scalar_type());
  at::Tensor sum = grad_x.scalar_type() == acc ? grad_x : grad_x.to(acc);  // float32 / float64: in place
  auto [gx, ga, gb, grs] = grouped_lora_backward_acc(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h, &sum);
  if (!sum.is_same(grad_x)) grad_x.copy_(sum);  // bf16 / fp16: the sum rounded once
  return {ga.to(lora_a.scalar_type()), gb.to(lora_b.scalar_type()), grs.to(row_scale_grad_type(x, row_scale))};
}

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                           double scaling, const std::optional<at::Tensor>& row_scale,
                           const std::optional<at::Tensor>& lora_x) {
  return lora_linear_with(&add_out_cpu, x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_h_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                     const at::Tensor& lora_b, const at::Tensor& offsets,
                                                     double scaling, const std::optional<at::Tensor>& row_scale,
                                                     const std::optional<at::Tensor>& lora_x) {
  at::Tensor h;
  at::Tensor y = lora_linear_with(&add_out_cpu, x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x,
                                  &h);
  return {y, h};
}

TORCH_LIBRARY_IMPL(mole_ext, CPU, m) {
  m.impl("grouped_lora", &grouped_lora_cpu);
  m.impl("grouped_lora_h", &grouped_lora_h_cpu);
  m.impl("grouped_lora_add_out", &grouped_lora_add_out_cpu);
  m.impl("grouped_lora_backward", &grouped_lora_backward_cpu);
  m.impl("grouped_lora_backward_add_out", &grouped_lora_backward_add_out_cpu);
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_h", &lora_linear_h_cpu);
}

}  // namespace mole_ext
