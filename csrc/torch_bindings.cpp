// The one registration block of the mole_ext operator library. Kernels register per backend in
// cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd are registered from Python
// (python/mole_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(mole_ext, m) {
  // Softmax over experts in float32 (float64 for float64) and top-1 expert, ties to the lowest index.
  m.def("router_top1(Tensor logits) -> (Tensor probs, Tensor expert)");
  // Softmax Jacobian-vector product: grad_logits = probs * (grad_probs - sum(grad_probs * probs)).
  m.def("router_top1_backward(Tensor grad_probs, Tensor probs) -> Tensor");
  // Stable grouping of rows by expert: (x_sorted, sorted_token, offsets[K+1]).
  m.def("permute(Tensor x, Tensor expert, int num_experts) -> (Tensor x_sorted, Tensor sorted_token, Tensor offsets)");
  // Applies a permutation computed by permute: out[i] = x[sorted_token[i]].
  m.def("permute_rows(Tensor x, Tensor sorted_token) -> Tensor");
  // Inverse of permute_rows: y[sorted_token[i]] = y_sorted[i].
  m.def("unpermute(Tensor y_sorted, Tensor sorted_token) -> Tensor");
  // Segmented LoRA: y[i] = scaling * row_scale[i] * lora_b[k] @ (lora_a[k] @ x[i]) for i in segment k.
  m.def("grouped_lora(Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale) -> Tensor");
  // In place out += grouped_lora(x, ...) (the LoRA delta lands on the base GEMM's output), rounded once.
  m.def("grouped_lora_add_out(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale) -> ()");
  // The forward's unscaled shrink h = X A_k^T as well ([N, r], float32; float64 for float64 x), for
  // the backward's `h`: then the backward reads x once (for grad_a) instead of twice.
  m.def("grouped_lora_h(Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale) -> (Tensor y, Tensor h)");
  // Gradients of grouped_lora: (grad_x, grad_a, grad_b, grad_row_scale; the last is empty without
  // row_scale). h: grouped_lora_h's second output or None (recomputed from x); the same bits either way.
  m.def("grouped_lora_backward(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale, Tensor? h=None) -> (Tensor grad_x, Tensor grad_a, Tensor grad_b, Tensor grad_row_scale)");
  // Gradients of grouped_lora with grad_x accumulated in place onto an existing gradient (the base
  // path's dX), rounded once: (grad_a, grad_b, grad_row_scale; the last is empty without row_scale).
  m.def("grouped_lora_backward_add_out(Tensor(a!) grad_x, Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale, Tensor? h=None) -> (Tensor grad_a, Tensor grad_b, Tensor grad_row_scale)");
  // A MoLE projection in one op: x W^T + b with the grouped LoRA delta (of lora_x when given, the
  // dropped-out input, else of x) accumulated into the base GEMM's output; inputs are cast to
  // weight's dtype inside (so callers under autocast keep one copy of x).
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale, Tensor? lora_x=None) -> Tensor");
  // lora_linear and the LoRA's unscaled shrink h (as grouped_lora_h), for the backward's `h`.
  m.def("lora_linear_h(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor offsets, float scaling, Tensor? row_scale, Tensor? lora_x=None) -> (Tensor y, Tensor h)");
  // Switch-style balance loss K * sum_k f_k P_k over masked tokens.
  m.def("load_balance_loss(Tensor probs, Tensor expert, Tensor? mask) -> Tensor");
  // Gradient of load_balance_loss with respect to probs.
  m.def("load_balance_loss_backward(Tensor grad_loss, Tensor probs, Tensor expert, Tensor? mask) -> Tensor");
}
