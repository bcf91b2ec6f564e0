// Shared pieces of the CUDA kernels: input checks, error reporting from kernels, warp/block
// reductions and scans, and round-to-nearest arithmetic helpers.
//
// Error reporting (bad expert ids, bad sorted_token entries)
// ---------------------------------------------------------------------------------------------
// A kernel never reads or writes out of bounds because of a bad id: it routes the row somewhere
// defined (see each op) and raises a flag in a small block of pinned, device-mapped host memory
// (ErrorSlots, one per device). Raising a flag is a few plain stores, so the normal path costs
// nothing: no extra launch, no copy, no host synchronisation, and it works under CUDA graphs.
// The flag surfaces as a RuntimeError:
//   * lazily, at the start of the next mole_ext CUDA op on that device (a host-memory read, no
//     sync), or from mole_ext._C.cuda_check_errors() (which synchronises first);
//   * eagerly, in validate mode (MOLE_EXT_CUDA_VALIDATE=1 or mole_ext._C.set_cuda_validate(True)):
//     the op synchronises its stream and raises before returning, like the CPU kernels do.
// On a platform where mapped pinned memory cannot be allocated, the slots live in device memory
// and are read only after a synchronisation (validate mode, cuda_check_errors()); the lazy
// check at the start of the next op then sees nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/index_math.h"
#include "../core/routing_math.h"
#include "error_flags.h"

namespace mole_ext {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// `name`: a string (literal or const char*) naming the argument in the error.
#define MOLE_CHECK_CUDA_TENSOR(t, name) \
  TORCH_CHECK((t).is_cuda(), name, " must be a CUDA tensor, got one on ", (t).device())

// ---- error slots: written by kernels, read by the host ----

struct ErrorSlots {
  int32_t flag[cuda_errors::kNumKinds];  // 1 once a kernel saw that kind of error
  int32_t pad_;
  int64_t value[cuda_errors::kNumKinds];  // one offending value (any one, if several)
  int64_t where[cuda_errors::kNumKinds];  // its position (token / row)
  int64_t bound[cuda_errors::kNumKinds];  // the valid range was [0, bound)
};

// Device-visible pointer to `device`'s slots (allocated on first use, never freed).
ErrorSlots* error_slots(int device);

// Called first by every entry point: raises an error a previous kernel on this device reported.
void begin_op(int device);
// Called last: in validate mode, synchronises `stream` and raises what its kernels reported.
void end_op(int device, cudaStream_t stream);

// The error path: plain stores (every writer of a flag writes the same 1), value before flag.
// Several threads reporting the same kind at once may leave one's value next to another's
// position in the message (the kind and the call are right); an atomic claim was not used because
// atomics on mapped host memory are not portable across PCIe hosts.
__device__ __forceinline__ void report_error(ErrorSlots* slots, int kind, int64_t value, int64_t where,
                                             int64_t bound) {
  volatile ErrorSlots* s = slots;
  s->value[kind] = value;
  s->where[kind] = where;
  s->bound[kind] = bound;
  __threadfence_system();
  s->flag[kind] = 1;
}

// ---- round-to-nearest arithmetic: no FMA contraction, so results match the CPU kernels ----

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
// Full-accuracy exp (never the __expf intrinsic).
__device__ __forceinline__ float exp_acc(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }

// ---- warp / block reductions and scans (deterministic: fixed shapes, fixed order) ----

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Inclusive scan over the warp.
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const T u = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// Exclusive scan over the block (blockDim.x a multiple of 32, <= 1024); every thread calls it.
// `scratch` is shared memory of 33 entries. Returns the thread's exclusive prefix and sets
// *total to the block total. Ends with a barrier, so scratch can be reused right after.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const T inc = warp_inclusive_scan(v, lane);
  if (lane == kWarp - 1) scratch[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < nwarps ? scratch[lane] : T(0);
    const T wi = warp_inclusive_scan(w, lane);
    if (lane < nwarps) scratch[lane] = wi - w;  // each lane rewrites only the entry it read
    if (lane == kWarp - 1) scratch[kWarp] = wi;
  }
  __syncthreads();
  const T excl = scratch[warp] + (inc - v);
  *total = scratch[kWarp];
  __syncthreads();
  return excl;
}

// Sum over the block in a fixed tree order; the result is valid in thread 0 only.
// `scratch` is shared memory of 32 entries; ends with a barrier.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) {
    r = warp_sum(lane < nwarps ? scratch[lane] : T(0));
  }
  __syncthreads();
  return r;
}

inline int64_t grid_for(int64_t work, int64_t per_block) { return index_math::ceil_div(work, per_block); }

}  // namespace cuda
}  // namespace mole_ext
