// lora_linear: the device-generic part of the fused MoLE projection. Each backend registers it
// with its own grouped_lora_add_out (cpu/grouped_lora.cpp, cuda/grouped_lora.cu), so the base GEMM
// is the backend's BLAS (MKL / cuBLAS) and the LoRA delta lands in its output in place.
#include "ops.h"

namespace mole_ext {

at::Tensor lora_linear_with(GroupedLoraAddOut add_out, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& offsets, double scaling, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& lora_x, at::Tensor* h_out) {
  const BelowAutograd below_autograd;
  check_lora_linear(x, weight, bias, lora_a, lora_b, lora_x);
  // Under autocast the caller passes x in its own dtype and the weights in the compute dtype; the
  // cast copy lives only inside this op (autograd keeps x, not the copy).
  const at::Tensor xc = x.to(weight.scalar_type());
  at::Tensor y = at::linear(xc, weight, bias);  // [N, out], contiguous
  add_out(y, lora_x.has_value() ? lora_x->to(weight.scalar_type()) : xc, lora_a, lora_b, offsets, scaling, row_scale,
          h_out);
  return y;
}

}  // namespace mole_ext
