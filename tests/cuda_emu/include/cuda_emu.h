// CPU emulation of the CUDA execution model, for tests/test_cuda_emulated.py (see ../README.md).
//
// A kernel launch runs its blocks one after another (in a configurable order) on the calling
// thread; the threads of a block are ucontext fibers (one per CUDA thread) scheduled
// cooperatively (emu_support.cpp):
//   * __syncthreads() parks the thread; the barrier opens only when EVERY thread of the block waits
//     at the SAME __syncthreads (file:line). A thread that exits while others wait, or threads
//     waiting at different barriers, fail the launch.
//   * warp collectives (__shfl_*_sync, __syncwarp) park the lane until all 32 lanes of its warp
//     wait at the same call (file:line, same mask); the mask must be the full warp.
//   * __shared__ variables live in a per-block arena filled with 0xFF bytes (NaN in every float
//     type) before every block, so a read before a write shows up.
//   * nvcuda::wmma (mma.h) is emulated per fragment with CUDA's alignment / ldm rules checked; the
//     lanes of a warp must issue the same wmma calls with the same arguments.
//   * 16-byte vector accesses (uint4 copies) must be 16-byte aligned.
// A violated rule raises a C++ exception out of the launch (a Python RuntimeError) naming the
// kernel, block and thread.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `__shared__ [__align__(A)] T name[dims];` in the emulated source is rewritten by the test's
// transform into `auto& name = ::emu::shared_var<T[dims], A>(__FILE__, __LINE__);` (below): the
// block's shared memory, filled with 0xFF bytes before every block. Anywhere else (a header),
// __shared__ is an error rather than a silently unpoisoned static.
#define __shared__ \
  _Pragma("GCC error \"__shared__ is emulated only in the transformed .cu (tests/test_cuda_emulated.py)\"")

// ---- built-in vector types ----
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace emu {
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void count_vec16();
}  // namespace emu

// A 16-byte vector: every copy through it is one 16-byte access and must be 16-byte aligned (as
// on the GPU, where a misaligned vector access is a launch failure).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) { copy_from(o); }
  uint4& operator=(const uint4& o) {
    check(this, "store to");
    copy_from(o);
    return *this;
  }

 private:
  static void check(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("16-byte vector %s a misaligned address %p", what, p);
  }
  void copy_from(const uint4& o) {
    check(&o, "load from");
    emu::count_vec16();
    std::memcpy(static_cast<void*>(this), &o, 16);
  }
};
struct int4 {
  int x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};

// ---- thread / block coordinates (set by the scheduler for the running fiber; read-only) ----
namespace emu {
namespace detail {
inline uint3 thread_idx{0, 0, 0};
inline uint3 block_idx{0, 0, 0};
inline dim3 block_dim{1, 1, 1};
inline dim3 grid_dim{1, 1, 1};
}  // namespace detail
}  // namespace emu
#define threadIdx (static_cast<const uint3&>(::emu::detail::thread_idx))
#define blockIdx (static_cast<const uint3&>(::emu::detail::block_idx))
#define blockDim (static_cast<const dim3&>(::emu::detail::block_dim))
#define gridDim (static_cast<const dim3&>(::emu::detail::grid_dim))
constexpr int warpSize = 32;

// ---- streams, errors ----
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
struct cudaDeviceProp {
  int multiProcessorCount;
  int warpSize;
  int maxThreadsPerBlock;
  size_t sharedMemPerBlock;
  int major, minor;
};

// ---- device intrinsics ----
// Round-to-nearest arithmetic: plain IEEE operations (the test compiles with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// The fibers of a block run one at a time and blocks run one after another: every memory access
// is already visible to the next thread, so fences have nothing to do.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// ---- barriers and warp collectives (emu_support.cpp) ----
namespace emu {
void syncthreads(const char* file, int line);
// Posts `bytes` bytes of this lane's value and parks the lane until all lanes of its warp posted
// at the same call; returns the 32 posted values (8 bytes apart).
const unsigned char* warp_exchange(const char* what, const char* file, int line, unsigned mask, const void* v,
                                   size_t bytes);
int lane_id();

template <typename T>
T shfl_common(const char* what, const char* file, int line, unsigned mask, T v, int src, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "emulated shuffles move up to 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("%s: width %d is not a power of two <= 32", what, width);
  const unsigned char* all = warp_exchange(what, file, line, mask, &v, sizeof(T));
  const int lane = lane_id();
  const int seg = lane & ~(width - 1);
  T r;
  std::memcpy(&r, all + 8 * (src < 0 ? lane : seg + (src & (width - 1))), sizeof(T));
  return r;
}
template <typename T>
T shfl_idx(const char* f, int l, unsigned mask, T v, int src_lane, int width = 32) {
  return shfl_common("__shfl_sync", f, l, mask, v, src_lane, width);
}
template <typename T>
T shfl_xor(const char* f, int l, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = lane_id() & (width - 1);
  return shfl_common("__shfl_xor_sync", f, l, mask, v, lane ^ lane_mask, width);
}
template <typename T>
T shfl_up(const char* f, int l, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = lane_id() & (width - 1);
  return shfl_common("__shfl_up_sync", f, l, mask, v, lane - static_cast<int>(delta) >= 0 ? lane - static_cast<int>(delta) : -1, width);
}
template <typename T>
T shfl_down(const char* f, int l, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = lane_id() & (width - 1);
  return shfl_common("__shfl_down_sync", f, l, mask, v, lane + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1, width);
}
inline void syncwarp(const char* f, int l, unsigned mask = 0xffffffffu) {
  const char none = 0;
  warp_exchange("__syncwarp", f, l, mask, &none, 1);
}
}  // namespace emu

namespace emu {
// Shared memory: one arena per block (48 KB, the static limit), poisoned before every block; a
// variable gets the same offset in every block of a launch, aligned exactly as declared (and not
// more: offset = an odd multiple of its alignment, so code that relies on luckier alignment fails).
void* shared_alloc(const char* file, int line, size_t bytes, size_t align);
template <typename T, size_t Align>
T& shared_var(const char* file, int line) {
  static_assert(std::is_trivially_default_constructible_v<T>, "__shared__ variables cannot have constructors");
  constexpr size_t a = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(shared_alloc(file, line, sizeof(T), a));
}
}  // namespace emu

// Macros, so that each barrier / collective is identified by its source line.
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)

// ---- kernel launch: what `kernel<<<grid, block, smem, stream>>>(args)` becomes ----
namespace emu {
struct LaunchSite {
  const char* kernel;  // the kernel expression as written at the launch
  const char* file;
  int line;
};

// Runs grid blocks of block threads, each thread calling run(ctx). Throws on an emulation failure.
void launch_blocks(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                   void (*run)(void*), void* ctx);

template <typename... P, typename... A>
void launch(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
            void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launch with the wrong number of arguments");
  // CUDA copies the arguments (converted to the parameter types) at the launch; every thread
  // then gets its own copy of the parameters.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  launch_blocks(site, grid, block, dynamic_smem, stream, [](void* c) { (*static_cast<decltype(body)*>(c))(); },
                &body);
}
}  // namespace emu
