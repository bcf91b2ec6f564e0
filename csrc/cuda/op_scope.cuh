// The prologue and epilogue every CUDA entry point shares, as one scope object (CudaOpScope).
//
// Kept out of common.cuh on purpose: the CPU emulator of the CUDA sources (tests/cuda_emu)
// includes common.cuh first and then redefines MOLE_CHECK_CUDA_TENSOR to accept its CPU tensors;
// this header, included by the .cu files after that, uses whichever definition is in force.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <exception>
#include <utility>

#include "../ops.h"
#include "common.cuh"

namespace mole_ext {
namespace cuda {

// On entry, in this order: autograd and autocast are off below (BelowAutograd, so the ATen calls
// inside record no history); `checks()` runs (the op's shape / dtype / device checks); `anchor`,
// the tensor that picks the device (named `name` in the error), must be a CUDA tensor; its device
// becomes the current one (guard); an error a kernel of an earlier op reported on that device is
// raised (begin_op, common.cuh). On a normal exit (every return path): end_op, which in validate
// mode synchronises the stream and raises what this op's kernels reported. Leaving by an
// exception skips end_op (the first error is the one reported), so the destructor never throws
// while another exception is in flight.
class CudaOpScope {
 public:
  template <typename Checks>
  CudaOpScope(const at::Tensor& anchor, const char* name, Checks&& checks) {
    std::forward<Checks>(checks)();
    MOLE_CHECK_CUDA_TENSOR(anchor, name);
    guard_.set_device(anchor.device());
    device_ = anchor.get_device();
    begin_op(device_);
    stream_ = at::cuda::getCurrentCUDAStream();
    uncaught_ = std::uncaught_exceptions();
  }
  ~CudaOpScope() noexcept(false) {
    if (std::uncaught_exceptions() == uncaught_) end_op(device_, stream_);
  }
  CudaOpScope(const CudaOpScope&) = delete;
  CudaOpScope& operator=(const CudaOpScope&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  // This device's error slots, for the kernels' report_error.
  ErrorSlots* slots() const { return error_slots(device_); }

 private:
  const BelowAutograd below_autograd_;
  c10::cuda::OptionalCUDAGuard guard_;
  int device_ = -1;
  cudaStream_t stream_ = nullptr;
  int uncaught_ = 0;
};

}  // namespace cuda
}  // namespace mole_ext
