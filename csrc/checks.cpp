// Shape, dtype and device checks shared by the CPU and CUDA entry points, so every backend
// rejects bad input with the same message.
#include "ops.h"

#include <c10/util/Exception.h>

namespace mole_ext {
namespace {

bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

bool is_index_kind(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_kind(t.scalar_type()), name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_index_kind(t.scalar_type()), name, " must be int32 or int64, got ", t.scalar_type());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), bn, " must be on the same device as ", an, " (", a.device(),
              "), got ", b.device());
}

}  // namespace

at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_router_top1(const at::Tensor& logits) {
  check_dim(logits, 2, "logits", "[tokens, experts]");
  check_float(logits, "logits");
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one expert column, got shape ",
              logits.sizes());
}

void check_router_top1_backward(const at::Tensor& grad_probs, const at::Tensor& probs) {
  check_dim(probs, 2, "probs", "[tokens, experts]");
  check_float(probs, "probs");
  check_float(grad_probs, "grad_probs");
  TORCH_CHECK(grad_probs.sizes() == probs.sizes(), "grad_probs must have the shape of probs ",
              probs.sizes(), ", got ", grad_probs.sizes());
  check_same_device(probs, "probs", grad_probs, "grad_probs");
}

void check_permute(const at::Tensor& x, const at::Tensor& expert, int64_t num_experts) {
  check_dim(x, 2, "x", "[tokens, features]");
  check_dim(expert, 1, "expert", "[tokens]");
  check_index(expert, "expert");
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(num_experts <= (1 << 20), "num_experts must be <= 2^20, got ", num_experts);
  TORCH_CHECK(expert.size(0) == x.size(0), "expert must have one entry per row of x (", x.size(0),
              "), got ", expert.size(0));
  TORCH_CHECK(x.size(0) <= INT32_MAX, "x has ", x.size(0), " rows; at most 2^31-1 are supported");
  check_same_device(x, "x", expert, "expert");
}

void check_permute_rows(const at::Tensor& x, const at::Tensor& sorted_token, const char* name) {
  check_dim(x, 2, name, "[tokens, features]");
  check_dim(sorted_token, 1, "sorted_token", "[tokens]");
  check_index(sorted_token, "sorted_token");
  TORCH_CHECK(sorted_token.size(0) == x.size(0), "sorted_token must have one entry per row of ", name,
              " (", x.size(0), "), got ", sorted_token.size(0));
  check_same_device(x, name, sorted_token, "sorted_token");
}

void check_grouped_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                        const at::Tensor& offsets, const std::optional<at::Tensor>& row_scale) {
  check_dim(x, 2, "x", "[tokens, in_features]");
  check_dim(lora_a, 3, "lora_a", "[experts, rank, in_features]");
  check_dim(lora_b, 3, "lora_b", "[experts, out_features, rank]");
  check_dim(offsets, 1, "offsets", "[experts + 1]");
  check_float(x, "x");
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type(), "lora_a must have the dtype of x (",
              x.scalar_type(), "), got ", lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == x.scalar_type(), "lora_b must have the dtype of x (",
              x.scalar_type(), "), got ", lora_b.scalar_type());
  check_index(offsets, "offsets");
  const int64_t k = lora_a.size(0);
  TORCH_CHECK(k >= 1, "lora_a must hold at least one expert, got shape ", lora_a.sizes());
  TORCH_CHECK(lora_a.size(1) >= 1, "LoRA rank must be >= 1, got lora_a of shape ", lora_a.sizes());
  TORCH_CHECK(lora_a.size(2) == x.size(1), "lora_a must be [experts, rank, ", x.size(1),
              "] to match x's in_features, got ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == k && lora_b.size(2) == lora_a.size(1), "lora_b must be [", k,
              ", out_features, ", lora_a.size(1), "] to match lora_a ", lora_a.sizes(), ", got ",
              lora_b.sizes());
  TORCH_CHECK(offsets.size(0) == k + 1, "offsets must have experts + 1 = ", k + 1, " entries, got ",
              offsets.size(0));
  check_same_device(x, "x", lora_a, "lora_a");
  check_same_device(x, "x", lora_b, "lora_b");
  check_same_device(x, "x", offsets, "offsets");
  if (row_scale.has_value()) {
    const at::Tensor& rs = *row_scale;
    check_dim(rs, 1, "row_scale", "[tokens]");
    check_float(rs, "row_scale");
    TORCH_CHECK(rs.size(0) == x.size(0), "row_scale must have one entry per row of x (", x.size(0),
                "), got ", rs.size(0));
    check_same_device(x, "x", rs, "row_scale");
  }
}

void mark_written(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

void check_saved_h(const at::Tensor& h, const at::Tensor& x, const at::Tensor& lora_a) {
  const int64_t n = x.size(0), r = lora_a.size(1);
  const at::ScalarType acc = acc_type_for(x.scalar_type());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == n && h.size(1) == r, "h (the forward's saved X A_k^T) must be [", n,
              ", ", r, "] (rows of x, LoRA rank), got ", h.sizes());
  TORCH_CHECK(h.scalar_type() == acc, "h (the forward's saved X A_k^T) must be ", acc,
              " (the accumulation dtype of x), got ", h.scalar_type());
  check_same_device(x, "x", h, "h");
}

void check_grouped_lora_add_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& row_scale) {
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  check_dim(out, 2, "out", "[tokens, out_features]");
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == lora_b.size(1), "out must be [", x.size(0), ", ",
              lora_b.size(1), "] (rows of x, out_features of lora_b), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have the dtype of x (", x.scalar_type(), "), got ",
              out.scalar_type());
  check_same_device(x, "x", out, "out");
}

void check_grouped_lora_backward_add_out(const at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& offsets,
                                         const std::optional<at::Tensor>& row_scale) {
  check_grouped_lora(x, lora_a, lora_b, offsets, row_scale);
  const int64_t n = x.size(0), out_f = lora_b.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == n && grad_y.size(1) == out_f, "grad_y must be [", n, ", ",
              out_f, "], got ", grad_y.sizes());
  check_float(grad_y, "grad_y");
  check_same_device(x, "x", grad_y, "grad_y");
  check_dim(grad_x, 2, "grad_x", "[tokens, in_features]");
  TORCH_CHECK(grad_x.size(0) == n && grad_x.size(1) == x.size(1), "grad_x must be [", n, ", ", x.size(1),
              "] (the shape of x), got ", grad_x.sizes());
  TORCH_CHECK(grad_x.scalar_type() == x.scalar_type(), "grad_x must have the dtype of x (", x.scalar_type(),
              "), got ", grad_x.scalar_type());
  check_same_device(x, "x", grad_x, "grad_x");
}

void check_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, const std::optional<at::Tensor>& lora_x) {
  check_dim(x, 2, "x", "[tokens, in_features]");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  check_float(x, "x");
  check_float(weight, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must be [out_features, ", x.size(1),
              "] to match x's in_features, got ", weight.sizes());
  check_same_device(x, "x", weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [", weight.size(0),
                "] (out_features of weight), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias must have the dtype of weight (",
                weight.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(x, "x", *bias, "bias");
  }
  // The LoRA stacks run in the compute dtype, which is weight's (x is cast to it).
  TORCH_CHECK(lora_a.scalar_type() == weight.scalar_type(), "lora_a must have the dtype of weight (",
              weight.scalar_type(), "), got ", lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == weight.scalar_type(), "lora_b must have the dtype of weight (",
              weight.scalar_type(), "), got ", lora_b.scalar_type());
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(1) == weight.size(0), "lora_b must be [experts, ", weight.size(0),
              ", rank] to match weight's out_features, got ", lora_b.sizes());
  if (lora_x.has_value()) {
    check_float(*lora_x, "lora_x");
    TORCH_CHECK(lora_x->sizes() == x.sizes(), "lora_x must have the shape of x ", x.sizes(), ", got ",
                lora_x->sizes());
    check_same_device(x, "x", *lora_x, "lora_x");
  }
}

void check_load_balance(const at::Tensor& probs, const at::Tensor& expert,
                        const std::optional<at::Tensor>& mask) {
  check_dim(probs, 2, "probs", "[tokens, experts]");
  check_float(probs, "probs");
  TORCH_CHECK(probs.size(1) >= 1, "probs must have at least one expert column, got shape ",
              probs.sizes());
  check_dim(expert, 1, "expert", "[tokens]");
  check_index(expert, "expert");
  TORCH_CHECK(expert.size(0) == probs.size(0), "expert must have one entry per row of probs (",
              probs.size(0), "), got ", expert.size(0));
  check_same_device(probs, "probs", expert, "expert");
  if (mask.has_value()) {
    check_dim(*mask, 1, "mask", "[tokens]");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->size(0) == probs.size(0), "mask must have one entry per row of probs (",
                probs.size(0), "), got ", mask->size(0));
    check_same_device(probs, "probs", *mask, "mask");
  }
}

}  // namespace mole_ext
