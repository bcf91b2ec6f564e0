// Stand-in for <ATen/cuda/CUDAContext.h> in the CPU emulation: the current stream is a null handle
// (launches run synchronously) and the device properties are the emulated device's
// (mole_cuda_emu::configure sets the SM count; default 132, an H100 / H200).
#pragma once
#include <ATen/ATen.h>

#include "../../cuda_emu.h"

namespace emu {
cudaDeviceProp* device_properties();
}

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10

namespace at {
namespace cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
inline cudaDeviceProp* getCurrentDeviceProperties() { return emu::device_properties(); }
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return emu::device_properties(); }
}  // namespace cuda
}  // namespace at
