// Stand-in for <c10/cuda/CUDAGuard.h> in the CPU emulation: one emulated device, nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include <optional>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::DeviceIndex) {}
  explicit CUDAGuard(c10::Device) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
  explicit OptionalCUDAGuard(c10::Device) {}
  explicit OptionalCUDAGuard(std::optional<c10::DeviceIndex>) {}
  void set_device(c10::Device) {}
  void set_index(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10
