// Host side of the kernels' error reporting (semantics in common.cuh): one ErrorSlots block per
// device in pinned, device-mapped host memory, read without synchronisation.
#include <c10/cuda/CUDAFunctions.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#include "common.cuh"
#include "tuning.h"

namespace mole_ext {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

struct SlotTable {
  std::mutex mu;
  std::array<ErrorSlots*, kMaxDevices> host{};    // host view (mapped) or a host staging copy
  std::array<ErrorSlots*, kMaxDevices> device{};  // what kernels write
  std::array<bool, kMaxDevices> mapped{};         // false: device memory, read only after a sync
};

SlotTable& table() {
  static SlotTable* t = new SlotTable();  // never destroyed: kernels may still hold the pointers
  return *t;
}

std::atomic<int>& validate_flag() {
  static std::atomic<int> v(tuning::env_flag("MOLE_EXT_CUDA_VALIDATE") ? 1 : 0);
  return v;
}

// Reads and clears the slots of one device; raises if a flag was set. `synchronized`: the caller
// has waited for the device (needed to read slots that live in device memory).
void check_device(int device, bool synchronized) {
  if (device < 0 || device >= kMaxDevices) return;  // never had slots (error_slots refuses it)
  ErrorSlots* s = nullptr;
  ErrorSlots* d = nullptr;
  bool mapped = true;
  {
    std::lock_guard<std::mutex> lock(table().mu);
    s = table().host[device];
    d = table().device[device];
    mapped = table().mapped[device];
  }
  if (s == nullptr) return;  // no kernel with error reporting ran on this device yet
  if (!mapped) {
    if (!synchronized) return;  // fallback mode: errors surface only after a sync
    c10::cuda::CUDAGuard g(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaMemcpy(s, d, sizeof(ErrorSlots), cudaMemcpyDeviceToHost));
    bool any = false;
    for (int k = 0; k < cuda_errors::kNumKinds; ++k) any = any || s->flag[k] != 0;
    if (any) C10_CUDA_CHECK(cudaMemset(d, 0, sizeof(ErrorSlots)));
  }
  volatile ErrorSlots* v = s;
  std::ostringstream msg;
  bool any = false;
  for (int k = 0; k < cuda_errors::kNumKinds; ++k) {
    if (v->flag[k] == 0) continue;
    const int64_t value = v->value[k], where = v->where[k], bound = v->bound[k];
    v->flag[k] = 0;
    if (any) msg << "; ";
    msg << cuda_errors::describe_report(k, value, where, bound);
    any = true;
  }
  TORCH_CHECK(!any, "mole_ext CUDA kernel on cuda:", device, " reported: ", msg.str(),
              ". CUDA ops report such errors asynchronously, so this may come from an earlier call; "
              "set MOLE_EXT_CUDA_VALIDATE=1 (or mole_ext._C.set_cuda_validate(True)) to raise in the "
              "failing call itself.");
}

}  // namespace

ErrorSlots* error_slots(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "mole_ext supports CUDA devices 0..", kMaxDevices - 1,
              ", got ", device);
  SlotTable& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.device[device] == nullptr) {
    // The first routing op may run inside a CUDA graph capture; allocation is not a stream
    // operation, so let it through the capture (relaxed mode) and restore the mode after.
    cudaStreamCaptureMode capture_mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&capture_mode));
    // Portable + mapped: any device can write it, the host reads it without a copy.
    void* p = nullptr;
    void* d = nullptr;
    bool mapped = cudaHostAlloc(&p, sizeof(ErrorSlots), cudaHostAllocMapped | cudaHostAllocPortable) == cudaSuccess;
    if (mapped) {
      std::memset(p, 0, sizeof(ErrorSlots));
      mapped = cudaHostGetDevicePointer(&d, p, 0) == cudaSuccess;
      if (!mapped) cudaFreeHost(p);
    }
    if (!mapped) {
      // A platform without mapped pinned memory: slots in device memory, read after a sync
      // (validate mode, cuda_check_errors); the lazy check of begin_op then sees nothing.
      (void)cudaGetLastError();  // clear the failed call's error
      C10_CUDA_CHECK(cudaMalloc(&d, sizeof(ErrorSlots)));
      C10_CUDA_CHECK(cudaMemset(d, 0, sizeof(ErrorSlots)));
      p = new ErrorSlots();
    }
    t.host[device] = static_cast<ErrorSlots*>(p);
    t.device[device] = static_cast<ErrorSlots*>(d);
    t.mapped[device] = mapped;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&capture_mode));
  }
  return t.device[device];
}

void begin_op(int device) { check_device(device, /*synchronized=*/false); }

void end_op(int device, cudaStream_t stream) {
  if (!cuda_errors::validate()) return;
  // Under CUDA graph capture nothing has run yet: validate mode cannot check there (the error
  // still surfaces lazily after a replay).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  check_device(device, /*synchronized=*/true);
}

}  // namespace cuda

namespace cuda_errors {

void check_pending(int device, bool synchronize) {
  if (device >= 0) {
    if (synchronize) {
      c10::cuda::CUDAGuard g(static_cast<c10::DeviceIndex>(device));
      c10::cuda::device_synchronize();
    }
    cuda::check_device(device, synchronize);
    return;
  }
  const int n = static_cast<int>(c10::cuda::device_count());
  for (int d = 0; d < n && d < 64; ++d) {
    bool used = false;
    {
      std::lock_guard<std::mutex> lock(cuda::table().mu);
      used = cuda::table().host[d] != nullptr;
    }
    if (!used) continue;
    if (synchronize) {
      c10::cuda::CUDAGuard g(static_cast<c10::DeviceIndex>(d));
      c10::cuda::device_synchronize();
    }
    cuda::check_device(d, synchronize);
  }
}

void set_validate(bool on) { cuda::validate_flag().store(on ? 1 : 0); }
bool validate() { return cuda::validate_flag().load() != 0; }

}  // namespace cuda_errors
}  // namespace mole_ext
