// CPU emulation of the CUDA execution model, for tests/test_cuda_emulated.py (see ../README.md).
//
// A kernel launch runs its blocks one after another (in a configurable order) on the calling
// thread; the threads of a block are ucontext fibers (one per CUDA thread) scheduled
// cooperatively (emu_support.cpp):
//   * __syncthreads() parks the thread; the barrier opens only when EVERY thread of the block waits
//     at the SAME __syncthreads (file:line). A thread that exits while others wait, or threads
//     waiting at different barriers, fail the launch.
//   * warp collectives (__shfl_*_sync, __syncwarp, __match_any_sync, __ballot_sync, __any_sync,
//     __all_sync) park the lane until all 32 lanes of its warp wait at the same call (file:line,
//     same mask); the mask must be the full warp.
//   * __shared__ variables live in a per-block arena filled with 0xFF bytes (NaN in every float
//     type) before every block, so a read before a write shows up. `extern __shared__ T x[];`
//     (dynamic shared memory) gets the launch's smem bytes from the same arena, 16-byte aligned
//     (not more), followed by a poisoned guard zone checked after every block.
//   * nvcuda::wmma (mma.h) is emulated per fragment with CUDA's alignment / ldm rules checked; the
//     lanes of a warp must issue the same wmma calls with the same arguments.
//   * 16-byte and 8-byte vector accesses (uint4 / uint2 copies) must be 16- / 8-byte aligned. A
//     build with -fsanitize=alignment (the routing test) also fails any misaligned scalar access
//     (emu_support.cpp handles the sanitizer's reports; no sanitizer runtime is linked).
//   * atomicAdd runs as one uninterrupted read-modify-write (fibers never interleave inside it).
// A violated rule raises a C++ exception out of the launch (a Python RuntimeError) naming the
// kernel, block and thread.
#pragma once

#include <math.h>  // CUDA's math API is global: expf, exp, isnan, ... (libstdc++'s math.h: using std::isnan)

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
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
void count_vec8();
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
// An 8-byte vector: every copy through it is one 8-byte access and must be 8-byte aligned.
struct alignas(8) uint2 {
  unsigned x, y;
  uint2() = default;
  uint2(const uint2& o) { copy_from(o); }
  uint2& operator=(const uint2& o) {
    check(this, "store to");
    copy_from(o);
    return *this;
  }

 private:
  static void check(const void* p, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % 8 != 0) emu::fail("8-byte vector %s a misaligned address %p", what, p);
  }
  void copy_from(const uint2& o) {
    check(&o, "load from");
    emu::count_vec8();
    std::memcpy(static_cast<void*>(this), &o, 8);
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
// The occupancy API: occupancy is not emulated; every kernel reports 2 resident blocks per SM
// (the grouped LoRA's intended floor, kGemmMinBlocksPerSm), so its split planning targets
// 2 x multiProcessorCount blocks here.
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
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
// __match_any_sync: the lanes of the mask whose value has the same bits as this lane's.
template <typename T>
unsigned match_any(const char* f, int l, unsigned mask, T v) {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "emulated __match_any_sync compares 32- or 64-bit integers");
  const unsigned char* all = warp_exchange("__match_any_sync", f, l, mask, &v, sizeof(T));
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) {
    if (((mask >> i) & 1u) != 0 && std::memcmp(all + 8 * i, &v, sizeof(T)) == 0) r |= 1u << i;
  }
  return r;
}
// __ballot_sync / __any_sync / __all_sync: the predicates of the lanes of the mask.
inline unsigned ballot_bits(const char* what, const char* f, int l, unsigned mask, int pred) {
  const unsigned char p = pred != 0 ? 1 : 0;
  const unsigned char* all = warp_exchange(what, f, l, mask, &p, 1);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) {
    if (((mask >> i) & 1u) != 0 && all[8 * i] != 0) r |= 1u << i;
  }
  return r;
}
inline unsigned ballot(const char* f, int l, unsigned mask, int pred) { return ballot_bits("__ballot_sync", f, l, mask, pred); }
inline int any_sync(const char* f, int l, unsigned mask, int pred) {
  return ballot_bits("__any_sync", f, l, mask, pred) != 0;
}
inline int all_sync(const char* f, int l, unsigned mask, int pred) {
  return ballot_bits("__all_sync", f, l, mask, pred) == mask;
}

// Atomics: fails outside a kernel; counts. Fibers run one at a time and never switch inside an
// atomic, so the read-modify-write below is atomic.
void atomic_op(const char* what);
template <typename T>
T atomic_add(T* p, T v) {
  atomic_op("atomicAdd");
  const T old = *p;
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;  // wraps like the GPU's integer atomics
    *p = static_cast<T>(static_cast<U>(old) + static_cast<U>(v));
  } else {
    *p = old + v;
  }
  return old;
}
}  // namespace emu

inline int atomicAdd(int* p, int v) { return emu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return emu::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return emu::atomic_add(p, v); }

// Bit intrinsics (pure functions).
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

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
// Dynamic shared memory: `extern __shared__ [__align__(A)] T name[];` is rewritten by the
// transform into `auto& name = ::emu::dynamic_shared<T[], A>(__FILE__, __LINE__);`. Every such
// declaration of a launch names the same bytes (the launch's smem argument), as on the GPU.
void* dynamic_shared_alloc(const char* file, int line, size_t align);
template <typename T, size_t Align>
T& dynamic_shared(const char* file, int line) {
  static_assert(std::is_array_v<T> && std::rank_v<T> == 1 && std::extent_v<T> == 0,
                "extern __shared__ declares an array without a bound");
  using E = std::remove_extent_t<T>;
  static_assert(std::is_trivially_default_constructible_v<E>, "__shared__ variables cannot have constructors");
  constexpr size_t a = Align > alignof(E) ? Align : alignof(E);
  return *reinterpret_cast<T*>(dynamic_shared_alloc(file, line, a));
}
}  // namespace emu

// Macros, so that each barrier / collective is identified by its source line.
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __match_any_sync(...) ::emu::match_any(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(...) ::emu::ballot(__FILE__, __LINE__, __VA_ARGS__)
#define __any_sync(...) ::emu::any_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __all_sync(...) ::emu::all_sync(__FILE__, __LINE__, __VA_ARGS__)

// ---- kernel launch: what `kernel<<<grid, block, smem, stream>>>(args)` becomes ----
namespace emu {
struct LaunchSite {
  const char* kernel;  // the kernel expression as written at the launch
  const char* file;
  int line;
  const char* (*instance)() = nullptr;  // the launched specialisation's full name (kernel_name)
};

// "NAME" out of a __PRETTY_FUNCTION__ "... [with auto F = NAME]".
inline std::string pretty_template_argument(const char* pretty) {
  std::string s(pretty);
  const size_t b = s.find("F = ");
  if (b == std::string::npos) return s;
  s = s.substr(b + 4);
  if (!s.empty() && s.back() == ']') s.pop_back();
  return s;
}
// The full name of kernel F with its template arguments, e.g.
// "mole_ext::cuda::{anonymous}::router_top1_regs_kernel<float, float, 4>".
template <auto F>
const char* kernel_name() {
  static const std::string name = pretty_template_argument(__PRETTY_FUNCTION__);
  return name.c_str();
}

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
