// Host entry points of the mole_ext ops. Schemas live in torch_bindings.cpp; CPU kernels in
// cpu/<family>.cpp, CUDA kernels in cuda/<family>.cu. Shapes: N tokens, K experts, d/in/out
// feature sizes, r LoRA rank.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

namespace mole_ext {

// Kernels compose ATen ops (mm, to, copy_) on their inputs. Autograd of each mole_ext op is
// registered around the whole op (python/mole_ext/ops.py), so the calls inside a kernel must
// not record history, and autocast must not recast them (a kernel picks its own accumulation
// dtype; under autocast an inner mm would come back in bf16): every entry point holds one.
struct BelowAutograd {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// ---- shape/dtype checks shared by every backend (checks.cpp) ----
// Value checks (expert ids in range, offsets well formed) are backend-specific.
void check_router_top1(const at::Tensor& logits);
void check_router_top1_backward(const at::Tensor& grad_probs, const at::Tensor& probs);
void check_permute(const at::Tensor& x, const at::Tensor& expert, int64_t num_experts);
void check_permute_rows(const at::Tensor& x, const at::Tensor& sorted_token, const char* name);
void check_grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& offsets, const std::optional<at::Tensor>& row_scale);
// out [N, out_features] of x's dtype, on x's device; then check_grouped_lora.
void check_grouped_lora_add_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& row_scale);
// h [N, r] in x's accumulation dtype on x's device: the forward's unscaled shrink X A_k^T
// (grouped_lora_h / lora_linear_h), which the backward ops take instead of recomputing it.
void check_saved_h(const at::Tensor& h, const at::Tensor& x, const at::Tensor& lora_a);
// Bumps the version counter of a tensor an op writes in place (the Tensor(a!) argument of the
// *_add_out ops), as ATen's in-place ops do: autograd then refuses a backward through a saved
// tensor that changed. PyTorch's autograd fallback for custom ops skips the ADInplaceOrView key
// that would do it, so each backend's entry point calls this after its checks.
void mark_written(const at::Tensor& t);
// grad_x [N, in] of x's dtype on x's device, grad_y [N, out_features]; then check_grouped_lora.
void check_grouped_lora_backward_add_out(const at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                                         const std::optional<at::Tensor>& row_scale);
// x [N, in] float (any float dtype), weight [out, in], bias [out] or None, lora_a [K, r, in] and
// lora_b [K, out, r] in weight's dtype (the compute dtype), lora_x [N, in] float or None; offsets
// and row_scale as grouped_lora.
void check_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, const std::optional<at::Tensor>& lora_x);
void check_load_balance(const at::Tensor& probs, const at::Tensor& expert,
                        const std::optional<at::Tensor>& mask);
// Accumulation type: float32 for float32/bfloat16/float16, float64 for float64.
at::ScalarType acc_type_for(at::ScalarType t);

// ---- CPU kernels ----
// logits [N, K] float -> probs [N, K] float32 (float64 for float64 logits), expert [N] int32
std::tuple<at::Tensor, at::Tensor> router_top1_cpu(const at::Tensor& logits);
// grad_probs [N, K], probs [N, K] -> grad_logits [N, K] in probs' dtype
at::Tensor router_top1_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs);

// x [N, d], expert [N] int32/int64 -> x_sorted [N, d], sorted_token [N] int32, offsets [K+1] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x, const at::Tensor& expert,
                                                           int64_t num_experts);
// x [N, d], sorted_token [N] -> x[sorted_token] [N, d]
at::Tensor permute_rows_cpu(const at::Tensor& x, const at::Tensor& sorted_token);
// y_sorted [N, d], sorted_token [N] -> y [N, d], y[sorted_token[i]] = y_sorted[i]
at::Tensor unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& sorted_token);

// x [N, in], lora_a [K, r, in], lora_b [K, out, r] (same dtype as x), offsets [K+1] int32,
// row_scale [N] float or None -> y [N, out]
at::Tensor grouped_lora_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& offsets, double scaling,
                            const std::optional<at::Tensor>& row_scale);
// -> (y, h): y as grouped_lora, h [N, r] = X A_k^T unscaled, in the accumulation dtype (float32;
// float64 for float64 x): what the backward ops take as `h` instead of recomputing it.
std::tuple<at::Tensor, at::Tensor> grouped_lora_h_cpu(const at::Tensor& x, const at::Tensor& lora_a,
                                                      const at::Tensor& lora_b, const at::Tensor& offsets,
                                                      double scaling, const std::optional<at::Tensor>& row_scale);
// -> grad_x [N, in], grad_a [K, r, in], grad_b [K, out, r], grad_row_scale [N] (empty [0] when
// row_scale is None). h: the forward's saved shrink (grouped_lora_h) or None (recomputed from x);
// the results are the same bit for bit either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h);

// out [N, out] (x's dtype) += grouped_lora(x, ...), rounded once from the accumulation type
void grouped_lora_add_out_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& offsets, double scaling,
                              const std::optional<at::Tensor>& row_scale);

// grad_x [N, in] (x's dtype) += the grad_x of grouped_lora_backward, rounded once from the
// accumulation type -> grad_a, grad_b, grad_row_scale as grouped_lora_backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_lora_backward_add_out_cpu(
    at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& h);

// The backend's grouped_lora_add_out, for the device-generic lora_linear below; with a non-null
// last argument it also returns the unscaled shrink X A_k^T there ([N, r], accumulation dtype).
using GroupedLoraAddOut = void (*)(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double, const std::optional<at::Tensor>&, at::Tensor*);
// x [N, in] (cast to weight's dtype), weight [out, in], bias [out] or None, lora_x [N, in] (the LoRA's
// input when it differs from x, e.g. after dropout) or None -> [N, out] in weight's dtype:
// at::linear (the backend's BLAS) and then `add_out` of the grouped LoRA delta into its output, so
// the delta never exists as a second [N, out] tensor (lora_linear.cpp). With `h_out` it also
// returns the LoRA's unscaled shrink there (lora_linear_h, for the backward's `h`).
at::Tensor lora_linear_with(GroupedLoraAddOut add_out, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& lora_x, at::Tensor* h_out = nullptr);

// probs [N, K] float, expert [N] int, mask [N] bool or None -> scalar (float32; float64 for float64 probs)
at::Tensor load_balance_loss_cpu(const at::Tensor& probs, const at::Tensor& expert,
                                 const std::optional<at::Tensor>& mask);
// grad_loss scalar -> grad_probs [N, K] in probs' dtype
at::Tensor load_balance_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& probs,
                                          const at::Tensor& expert, const std::optional<at::Tensor>& mask);

}  // namespace mole_ext
