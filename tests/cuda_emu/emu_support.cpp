// Runtime of the CPU emulation of the CUDA kernels (tests/test_cuda_emulated*.py, README.md here):
// the fiber scheduler behind emu::launch, barriers and warp collectives, the wmma and memory
// checks, the host side of the kernels' error reporting, self-test kernels, and the common ops of
// the emulated op library (MOLE_EMU_LIBRARY: torch.ops.mole_cuda_emu for grouped_lora.cu,
// torch.ops.mole_cuda_emu_routing for the routing kernels). The entry points of the emulated
// sources are registered by emu_ops_grouped_lora.cpp / emu_ops_routing.cpp (CPU tensors in and out).
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "emu_ops.h"
#include "emu_prelude.h"  // cuda_emu.h + the real common.cuh (ErrorSlots, begin_op / end_op)
#include "error_flags.h"
#include "mma.h"

#ifndef MOLE_EMU_LIBRARY
#error "build with -DMOLE_EMU_LIBRARY=<op namespace> (tests/test_cuda_emulated.py)"
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;

enum State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;  // kStackBytes above a PROT_NONE guard page
  State state = kReady;
  const char* what = nullptr;  // what it waits at (kBarrier / kWarp)
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;
  uint64_t wmma_hash = 0;  // the wmma calls since the last barrier (kind, pointer, ldm, layout)
  uint64_t wmma_calls = 0;
};

struct Stats {
  std::map<std::string, uint64_t> launches;  // "kernel expression @ file:line"
  std::map<std::string, uint64_t> ever;      // the same since the library was loaded (never reset)
  std::map<std::string, uint64_t> instances;  // launches per kernel specialisation, since loaded
  uint64_t blocks = 0, barriers = 0, warp_collectives = 0, mma = 0, vec16 = 0, vec8 = 0, atomics = 0;
  uint64_t dynamic_smem_launches = 0;  // launches with a nonzero smem argument
  uint64_t split_launches = 0;  // launches with gridDim.z > 1 (the split reductions of row_gemm)
};

struct Config {
  int sm_count = 132;     // the emulated device's SMs (an H100 / H200)
  int block_order = 0;    // 0 grid order, 1 reverse, 2 random
  int thread_order = 0;   // order in which the ready threads of a block run: 0, 1, 2 as above
  uint64_t seed = 1;
};

struct Scheduler {
  ucontext_t host;
  Fiber fibers[kMaxThreads];
  int cur = -1;  // linear thread id of the running fiber, -1 on the host
  unsigned parked = 0;  // fibers [0, parked) wait at the top of their loop (reusable without makecontext)
  void (*run)(void*) = nullptr;
  void* run_ctx = nullptr;
  const LaunchSite* site = nullptr;
  unsigned nthreads = 0;
  bool failed = false;
  std::string failure;
  alignas(16) unsigned char slots[kMaxWarps][32][8];
  alignas(16) unsigned char snap[kMaxWarps][32][8];
  std::mt19937_64 rng{1};
  uint64_t launch_serial = 0;
};

Scheduler& S() {
  static Scheduler* s = new Scheduler();
  return *s;
}
Stats& stats() {
  static Stats s;
  return s;
}
Config& config() {
  static Config c;
  return c;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where_now() {
  const Scheduler& s = S();
  const char* k = s.site ? s.site->kernel : "?";
  std::string w = format("kernel %s (launched at %s:%d), block (%u, %u, %u)", k, s.site ? s.site->file : "?",
                         s.site ? s.site->line : 0, detail::block_idx.x, detail::block_idx.y, detail::block_idx.z);
  if (s.cur >= 0) w += format(", thread %d (warp %d, lane %d)", s.cur, s.cur / 32, s.cur % 32);
  return w;
}

// Switches from the running fiber back to the scheduler.
void yield_to_host() {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.cur];
  swapcontext(&f.ctx, &s.host);
}

void fiber_main() {
  Scheduler& s = S();
  for (;;) {
    try {
      s.run(s.run_ctx);
    } catch (const std::exception& e) {
      s.failed = true;
      s.failure = std::string("exception in the kernel: ") + e.what() + " [" + where_now() + "]";
    } catch (...) {
      s.failed = true;
      s.failure = "unknown exception in the kernel [" + where_now() + "]";
    }
    s.fibers[s.cur].state = kDone;
    yield_to_host();  // resumed at the next block of the next launch
  }
}

void make_fibers(unsigned from, unsigned to) {
  Scheduler& s = S();
  for (unsigned t = from; t < to; ++t) {
    Fiber& f = s.fibers[t];
    if (f.stack == nullptr) {
      const size_t page = 4096;
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
      mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
      f.stack = static_cast<unsigned char*>(m) + page;
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
}

void run_fiber(unsigned t) {
  Scheduler& s = S();
  const dim3 b = detail::block_dim;
  s.cur = static_cast<int>(t);
  detail::thread_idx = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
  swapcontext(&s.host, &s.fibers[t].ctx);
  s.cur = -1;
}

void scheduler_fail(std::string msg) {
  Scheduler& s = S();
  s.failed = true;
  s.failure = msg + " [" + where_now() + "]";
}

unsigned lanes_of_warp(unsigned w) {
  const unsigned n = S().nthreads;
  return std::min(32u, n - 32 * w);
}
unsigned full_mask(unsigned lanes) { return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1); }

bool wmma_logs_agree() {
  Scheduler& s = S();
  for (unsigned t = 0; t < s.nthreads; ++t) {
    const Fiber& lead = s.fibers[t - t % 32];
    const Fiber& f = s.fibers[t];
    if (f.wmma_calls != lead.wmma_calls || f.wmma_hash != lead.wmma_hash) {
      scheduler_fail(format("the lanes of warp %u issued different wmma calls since the last barrier (lane 0: %llu "
                            "calls, lane %u: %llu calls%s): wmma operations must be executed by the whole warp with "
                            "the same arguments",
                            t / 32, static_cast<unsigned long long>(lead.wmma_calls), t % 32,
                            static_cast<unsigned long long>(f.wmma_calls),
                            f.wmma_calls == lead.wmma_calls ? ", different pointers / ldm / layouts" : ""));
      return false;
    }
  }
  for (unsigned t = 0; t < s.nthreads; ++t) s.fibers[t].wmma_calls = s.fibers[t].wmma_hash = 0;
  return true;
}

const char* state_name(const Fiber& f) {
  switch (f.state) {
    case kDone: return "has exited";
    case kBarrier: return "waits at __syncthreads";
    case kWarp: return "waits at a warp collective";
    default: return "is ready";
  }
}

// Runs the current block to completion; false (with s.failure) on an emulation failure.
bool run_block() {
  Scheduler& s = S();
  const unsigned n = s.nthreads;
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    f.state = kReady;
    f.wmma_calls = f.wmma_hash = 0;
  }
  for (;;) {
    std::iota(order.begin(), order.end(), 0u);
    if (config().thread_order == 1) std::reverse(order.begin(), order.end());
    if (config().thread_order == 2) std::shuffle(order.begin(), order.end(), s.rng);
    for (unsigned t : order) {
      if (s.fibers[t].state != kReady) continue;
      run_fiber(t);
      if (s.failed) return false;
    }
    // Every thread now waits (barrier / warp collective) or has exited.
    bool released = false;
    for (unsigned w = 0; 32 * w < n; ++w) {
      const unsigned lanes = lanes_of_warp(w);
      unsigned waiting = 0;
      for (unsigned l = 0; l < lanes; ++l) waiting += s.fibers[32 * w + l].state == kWarp;
      if (waiting == 0) continue;
      const Fiber& first = s.fibers[32 * w];
      if (waiting < lanes) {
        unsigned a = 32 * w, b = 32 * w;  // a lane that waits, one that does not
        for (unsigned l = lanes; l-- > 0;) (s.fibers[32 * w + l].state == kWarp ? a : b) = 32 * w + l;
        scheduler_fail(format("warp collective %s at %s:%d reached by %u of the %u lanes of warp %u (lane %u %s): "
                              "a _sync collective must be reached by every lane of its mask",
                              s.fibers[a].what, s.fibers[a].file, s.fibers[a].line, waiting, lanes, w, b % 32,
                              state_name(s.fibers[b])));
        return false;
      }
      for (unsigned l = 1; l < lanes; ++l) {
        const Fiber& f = s.fibers[32 * w + l];
        if (f.line != first.line || std::strcmp(f.file, first.file) != 0 || std::strcmp(f.what, first.what) != 0) {
          scheduler_fail(format("the lanes of warp %u wait at different warp collectives: lane 0 at %s (%s:%d), "
                                "lane %u at %s (%s:%d)",
                                w, first.what, first.file, first.line, l, f.what, f.file, f.line));
          return false;
        }
      }
      std::memcpy(s.snap[w], s.slots[w], sizeof s.snap[w]);
      for (unsigned l = 0; l < lanes; ++l) s.fibers[32 * w + l].state = kReady;
      ++stats().warp_collectives;
      released = true;
    }
    if (released) continue;
    unsigned at_barrier = 0, done = 0, first_bar = n, first_done = n;
    for (unsigned t = 0; t < n; ++t) {
      if (s.fibers[t].state == kBarrier) {
        ++at_barrier;
        if (first_bar == n) first_bar = t;
      } else {
        ++done;
        if (first_done == n) first_done = t;
      }
    }
    if (at_barrier == 0) return wmma_logs_agree();  // the block has finished
    const Fiber& fb = s.fibers[first_bar];
    if (done > 0) {
      scheduler_fail(format("__syncthreads at %s:%d reached by %u of the %u threads of the block (thread %u has "
                            "exited): every thread of the block must reach every __syncthreads",
                            fb.file, fb.line, at_barrier, n, first_done));
      return false;
    }
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = s.fibers[t];
      if (f.line != fb.line || std::strcmp(f.file, fb.file) != 0) {
        scheduler_fail(format("the threads of the block wait at different __syncthreads: thread %u at %s:%d, "
                              "thread %u at %s:%d (divergent barrier)",
                              first_bar, fb.file, fb.line, t, f.file, f.line));
        return false;
      }
    }
    if (!wmma_logs_agree()) return false;
    for (unsigned t = 0; t < n; ++t) s.fibers[t].state = kReady;
    ++stats().barriers;
  }
}

// ---- shared memory ----
constexpr size_t kSharedBytes = 48 * 1024;  // static + dynamic shared memory of a block (no opt-in)
constexpr size_t kDynGuard = 256;           // poisoned bytes after the dynamic shared memory
alignas(4096) unsigned char g_shared[kSharedBytes + kDynGuard + 4096];
struct SharedVar {
  const char* file;
  int line;
  size_t offset, bytes;
};
std::vector<SharedVar> g_shared_vars;  // this launch's variables
size_t g_shared_used = 0;   // arena bytes taken (variables, padding, the dynamic guard)
size_t g_dyn_bytes = 0;     // this launch's dynamic shared memory (its smem argument)
size_t g_dyn_offset = SIZE_MAX;  // where it starts in the arena, once a kernel declared it
const char* g_dyn_file = nullptr;
int g_dyn_line = 0;

void poison_shared() { std::memset(g_shared, 0xFF, sizeof g_shared); }

// ---- scratch poisoning and out-of-bounds write detection for allocations made inside an op ----

constexpr size_t kGuard = 256;  // poisoned bytes on each side
constexpr size_t kAlign = 256;  // data alignment (cudaMalloc gives at least 256)

struct Block {
  c10::DataPtr raw;
  unsigned char* base;
  size_t total;
  unsigned char* data;
  size_t n;
  bool reported = false;  // a corruption already raised (not again when freed)
};

std::mutex g_blocks_mu;
std::map<void*, Block*> g_blocks;  // by data pointer (the DataPtr's context is the data pointer, as
                                   // raw_allocate requires)
std::vector<std::string> g_violations;

std::string check_block(const Block* b) {
  for (const unsigned char* p = b->base; p < b->data; ++p)
    if (*p != 0xFF)
      return format("out-of-bounds write %td bytes before a %zu-byte buffer allocated in the op", b->data - p, b->n);
  for (const unsigned char* p = b->data + b->n; p < b->base + b->total; ++p)
    if (*p != 0xFF)
      return format("out-of-bounds write %td bytes past the end of a %zu-byte buffer allocated in the op",
                    p - (b->data + b->n), b->n);
  return "";
}

void free_block(void* data) {
  Block* b = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_blocks_mu);
    auto it = g_blocks.find(data);
    if (it == g_blocks.end()) return;  // cannot happen
    b = it->second;
    g_blocks.erase(it);
    std::string bad = check_block(b);
    if (!bad.empty() && !b->reported) g_violations.push_back(bad + " (found when it was freed)");
  }
  delete b;
}

// Wraps the CPU allocator while an emulated op runs: every allocation (at::empty scratch and
// outputs) is filled with 0xFF bytes (NaN in every float type, -1 in integers), placed 256-byte
// aligned between two poisoned guard zones that are checked after every kernel.
class PoisonAllocator final : public c10::Allocator {
 public:
  c10::Allocator* base = nullptr;
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return base->allocate(n);
    const size_t total = n + 2 * kGuard + kAlign;
    c10::DataPtr raw = base->allocate(total);
    auto* p = static_cast<unsigned char*>(raw.get());
    std::memset(p, 0xFF, total);
    unsigned char* data = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(p) + kGuard + kAlign - 1) / kAlign * kAlign);
    auto* b = new Block{std::move(raw), p, total, data, n};
    {
      std::lock_guard<std::mutex> lock(g_blocks_mu);
      g_blocks[data] = b;
    }
    return c10::DataPtr(data, data, &free_block, c10::Device(c10::kCPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

PoisonAllocator& poison_allocator() {
  static PoisonAllocator a;
  return a;
}

void check_guards(const std::string& when) {
  std::vector<std::string> bad;
  {
    std::lock_guard<std::mutex> lock(g_blocks_mu);
    for (auto& [data, b] : g_blocks) {
      if (b->reported) continue;
      std::string m = check_block(b);
      if (!m.empty()) bad.push_back(m);
      b->reported = b->reported || !m.empty();
    }
    bad.insert(bad.end(), g_violations.begin(), g_violations.end());
    g_violations.clear();
  }
  if (!bad.empty()) throw std::runtime_error("EMULATED CUDA FAILURE: " + bad.front() + " (" + when + ")");
}

}  // namespace

// ---- the API of cuda_emu.h / mma.h ----

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  Scheduler& s = S();
  if (s.cur < 0) throw std::runtime_error("EMULATED CUDA FAILURE: " + msg);
  s.failed = true;
  s.failure = msg + " [" + where_now() + "]";
  yield_to_host();  // never resumed: the launch is abandoned
  std::abort();
}

void* shared_alloc(const char* file, int line, size_t bytes, size_t align) {
  if (S().cur < 0) fail("a __shared__ variable used outside a kernel");
  for (const SharedVar& v : g_shared_vars) {
    if (v.line == line && std::strcmp(v.file, file) == 0) {
      if (v.bytes != bytes) fail("__shared__ variable at %s:%d changed size within a launch", file, line);
      return g_shared + v.offset;
    }
  }
  if (align == 0 || (align & (align - 1)) != 0 || align > 4096) fail("__shared__ variable at %s:%d: bad alignment %zu", file, line, align);
  size_t off = (g_shared_used + align - 1) / align * align;
  if (align < 4096 && (off / align) % 2 == 0) off += align;  // exactly as aligned as declared
  // static + dynamic bytes in use (the dynamic ones counted even before a kernel declares them)
  const size_t guard = g_dyn_offset == SIZE_MAX ? 0 : kDynGuard;
  const size_t dyn_pending = g_dyn_offset == SIZE_MAX ? g_dyn_bytes : 0;
  if (off + bytes - guard + dyn_pending > kSharedBytes)
    fail("the __shared__ variables of the kernel (up to %s:%d) and its %zu bytes of dynamic shared memory need "
         "more than %zu bytes (the limit without cudaFuncSetAttribute opt-in)",
         file, line, g_dyn_bytes, kSharedBytes);
  g_shared_vars.push_back(SharedVar{file, line, off, bytes});
  g_shared_used = off + bytes;
  return g_shared + off;
}

void* dynamic_shared_alloc(const char* file, int line, size_t align) {
  if (S().cur < 0) fail("an extern __shared__ array used outside a kernel");
  if (align == 0 || (align & (align - 1)) != 0 || align > 4096)
    fail("extern __shared__ array at %s:%d: bad alignment %zu", file, line, align);
  if (g_dyn_offset == SIZE_MAX) {
    // CUDA aligns dynamic shared memory to 16 bytes (more only if a declaration asks): exactly
    // that here, so code that relies on luckier alignment fails.
    const size_t a = std::max<size_t>(align, 16);
    size_t off = (g_shared_used + a - 1) / a * a;
    if ((off / a) % 2 == 0) off += a;
    if (off + g_dyn_bytes > kSharedBytes)
      fail("the kernel's __shared__ variables and %zu bytes of dynamic shared memory need more than %zu bytes",
           g_dyn_bytes, kSharedBytes);
    g_dyn_offset = off;
    g_dyn_file = file;
    g_dyn_line = line;
    g_shared_used = off + g_dyn_bytes + kDynGuard;
  }
  if ((g_dyn_offset % align) != 0)
    fail("extern __shared__ array at %s:%d asks for %zu-byte alignment, but the dynamic shared memory was first "
         "declared at %s:%d with less",
         file, line, align, g_dyn_file, g_dyn_line);
  return g_shared + g_dyn_offset;
}

// After every block: nothing was written past the end of the dynamic shared memory.
bool dynamic_guard_intact() {
  if (g_dyn_offset == SIZE_MAX) return true;
  const unsigned char* g = g_shared + g_dyn_offset + g_dyn_bytes;
  for (size_t i = 0; i < kDynGuard; ++i) {
    if (g[i] != 0xFF) {
      scheduler_fail(format("write %zu bytes past the end of the %zu bytes of dynamic shared memory (the launch's "
                            "smem argument; extern __shared__ at %s:%d)",
                            i, g_dyn_bytes, g_dyn_file, g_dyn_line));
      return false;
    }
  }
  return true;
}

void count_vec16() { ++stats().vec16; }
void count_vec8() { ++stats().vec8; }
void count_mma() { ++stats().mma; }

void atomic_op(const char* what) {
  if (S().cur < 0) fail("%s called outside a kernel", what);
  ++stats().atomics;
}

int lane_id() {
  if (S().cur < 0) fail("a warp-level intrinsic called outside a kernel");
  return S().cur % 32;
}

void syncthreads(const char* file, int line) {
  Scheduler& s = S();
  if (s.cur < 0) fail("__syncthreads called outside a kernel");
  Fiber& f = s.fibers[s.cur];
  f.state = kBarrier;
  f.what = "__syncthreads";
  f.file = file;
  f.line = line;
  yield_to_host();
}

const unsigned char* warp_exchange(const char* what, const char* file, int line, unsigned mask, const void* v,
                                   size_t bytes) {
  Scheduler& s = S();
  if (s.cur < 0) fail("%s called outside a kernel", what);
  const unsigned w = s.cur / 32, lane = s.cur % 32, full = full_mask(lanes_of_warp(w));
  if (mask != full) fail("%s at %s:%d with mask 0x%08x: only full-warp masks (0x%08x here) are emulated", what, file, line, mask, full);
  std::memset(s.slots[w][lane], 0, 8);
  std::memcpy(s.slots[w][lane], v, bytes);
  Fiber& f = s.fibers[s.cur];
  f.state = kWarp;
  f.what = what;
  f.file = file;
  f.line = line;
  f.mask = mask;
  yield_to_host();
  return &s.snap[w][0][0];
}

void wmma_log(int kind, const void* p, unsigned ldm, size_t elem_bytes, int layout) {
  static const char* kNames[] = {"fill_fragment", "load_matrix_sync (matrix_a)", "load_matrix_sync (matrix_b)",
                                 "load_matrix_sync (accumulator)", "store_matrix_sync", "mma_sync"};
  Scheduler& s = S();
  if (s.cur < 0) fail("wmma::%s called outside a kernel", kNames[kind]);
  if (kind >= 1 && kind <= 4) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
      fail("wmma::%s: pointer %p is not 256-bit (32-byte) aligned", kNames[kind], p);
    if ((static_cast<size_t>(ldm) * elem_bytes) % 16 != 0)
      fail("wmma::%s: ldm = %u elements of %zu bytes is not a multiple of 16 bytes", kNames[kind], ldm, elem_bytes);
  }
  Fiber& f = s.fibers[s.cur];
  uint64_t h = f.wmma_hash ^ (0x9e3779b97f4a7c15ull * (static_cast<uint64_t>(kind) + 1));
  for (uint64_t x : {static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)), static_cast<uint64_t>(ldm),
                     static_cast<uint64_t>(layout)}) {
    h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  }
  f.wmma_hash = h;
  ++f.wmma_calls;
}

cudaDeviceProp* device_properties() {
  static cudaDeviceProp p;
  p.multiProcessorCount = config().sm_count;
  p.warpSize = 32;
  p.maxThreadsPerBlock = 1024;
  p.sharedMemPerBlock = 48 * 1024;
  p.major = 9;
  p.minor = 0;
  return &p;
}

void launch_blocks(const LaunchSite& site, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t,
                   void (*run)(void*), void* ctx) {
  Scheduler& s = S();
  auto bad = [&](const std::string& m) {
    throw std::runtime_error(format("EMULATED CUDA FAILURE: launch of %s at %s:%d: ", site.kernel, site.file,
                                    site.line) + m);
  };
  if (s.cur >= 0) bad("a launch from inside a kernel (dynamic parallelism) is not emulated");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    bad(format("invalid grid (%u, %u, %u)", grid.x, grid.y, grid.z));
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxThreads || block.z > 64)
    bad(format("invalid block (%u, %u, %u)", block.x, block.y, block.z));
  if (dynamic_smem > kSharedBytes)
    bad(format("%zu bytes of dynamic shared memory: more than %zu needs cudaFuncSetAttribute (not emulated)",
               dynamic_smem, kSharedBytes));
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (nblocks > (1ull << 24)) bad(format("%llu blocks: too many to emulate", static_cast<unsigned long long>(nblocks)));

  ++stats().launches[format("%s @ %s:%d", site.kernel, site.file, site.line)];
  ++stats().ever[format("%s @ %s:%d", site.kernel, site.file, site.line)];
  if (site.instance != nullptr) ++stats().instances[site.instance()];
  if (grid.z > 1) ++stats().split_launches;
  if (dynamic_smem > 0) ++stats().dynamic_smem_launches;
  s.site = &site;
  s.run = run;
  s.run_ctx = ctx;
  s.nthreads = static_cast<unsigned>(nthreads);
  s.failed = false;
  s.rng.seed(config().seed * 0x100000001b3ull + ++s.launch_serial);
  detail::grid_dim = grid;
  detail::block_dim = block;
  // Fibers [0, parked) wait at the top of their loop from an earlier launch; the others are made.
  const unsigned parked = s.parked;
  s.parked = 0;  // until this launch has finished: a failure leaves fibers in the middle of a kernel
  if (parked < s.nthreads) make_fibers(parked, s.nthreads);

  g_shared_vars.clear();
  g_shared_used = 0;
  g_dyn_bytes = dynamic_smem;
  g_dyn_offset = SIZE_MAX;
  std::vector<uint64_t> order(nblocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (config().block_order == 1) std::reverse(order.begin(), order.end());
  if (config().block_order == 2) std::shuffle(order.begin(), order.end(), s.rng);
  for (uint64_t b : order) {
    detail::block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                              static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    poison_shared();
    ++stats().blocks;
    if (!run_block() || !dynamic_guard_intact()) {
      s.cur = -1;
      s.site = nullptr;
      throw std::runtime_error("EMULATED CUDA FAILURE: " + s.failure);  // the fibers are remade next launch
    }
  }
  s.parked = std::max(parked, s.nthreads);
  s.site = nullptr;
  check_guards(format("after %s launched at %s:%d", site.kernel, site.file, site.line));
}

}  // namespace emu

// ---- misaligned accesses (builds with -fsanitize=alignment, MOLE_EMU_SANITIZE_ALIGNMENT) ----
// GCC instruments every load, store and reference binding of the TU with an alignment check and
// calls this handler on a misaligned address; no sanitizer runtime is linked, this is it. In a
// kernel the access fails the launch (a misaligned access is a launch failure on the GPU); on the
// host it is recorded and raised at the end of the launch or op.
extern "C" {
struct EmuUbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct EmuUbsanType {
  uint16_t kind, info;
  char name[1];
};
struct EmuUbsanTypeMismatch {
  EmuUbsanLocation loc;
  const EmuUbsanType* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
__attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(EmuUbsanTypeMismatch* d, uintptr_t p) {
  static const char* kKinds[] = {"load of",           "store to",       "reference binding to", "member access within",
                                 "member call on",    "constructor call on", "downcast of",     "downcast of",
                                 "upcast of",         "cast to virtual base of", "_Nonnull binding to", "dynamic operation on"};
  const uintptr_t align = uintptr_t{1} << d->log_alignment;
  if (p == 0 || p % align == 0) return;  // only alignment is checked in these builds
  const char* kind = d->check_kind < sizeof kKinds / sizeof kKinds[0] ? kKinds[d->check_kind] : "access to";
  char msg[512];
  std::snprintf(msg, sizeof msg, "misaligned %s address %p for type %s, which requires %zu-byte alignment (%s:%u)",
                kind, reinterpret_cast<void*>(p), d->type ? d->type->name : "?", static_cast<size_t>(align),
                d->loc.file ? d->loc.file : "?", d->loc.line);
  if (emu::S().cur >= 0) emu::fail("%s", msg);  // in a kernel: never returns
  std::lock_guard<std::mutex> lock(emu::g_blocks_mu);
  emu::g_violations.push_back(msg);
}
__attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(EmuUbsanTypeMismatch* d, uintptr_t p) {
  __ubsan_handle_type_mismatch_v1(d, p);
}
}

// ---- host side of the kernels' error reporting (csrc/cuda/errors.cu on a GPU) ----
// As errors.cu: begin_op raises what an earlier op's kernels reported (the lazy check), end_op
// raises what this op's kernels reported in validate mode (on by default here; set_validate turns
// it off), check_errors raises anything pending. The slots are plain host memory the emulated
// kernels write through report_error (common.cuh). Messages as errors.cu's.
namespace mole_ext {
namespace cuda {
namespace {
ErrorSlots g_slots{};
bool g_validate = true;

void raise_reported(const char* when) {
  std::ostringstream msg;
  bool any = false;
  for (int k = 0; k < cuda_errors::kNumKinds; ++k) {
    if (g_slots.flag[k] == 0) continue;
    const int32_t flag = g_slots.flag[k];
    if (flag != 1) {
      g_slots.flag[k] = 0;
      TORCH_CHECK(false, "emulated error slot ", k, " holds flag ", flag, " (kernels write 1)");
    }
    const int64_t value = g_slots.value[k], where = g_slots.where[k], bound = g_slots.bound[k];
    g_slots.flag[k] = 0;
    if (any) msg << "; ";
    msg << cuda_errors::describe_report(k, value, where, bound);
    any = true;
  }
  TORCH_CHECK(!any, "mole_ext CUDA kernel (emulated) reported ", when, ": ", msg.str());
}
}  // namespace

ErrorSlots* error_slots(int) { return &g_slots; }
void begin_op(int) { raise_reported("before this op (an earlier op's error)"); }
void end_op(int, cudaStream_t) {
  if (g_validate) raise_reported("in this op");
}
}  // namespace cuda

namespace cuda_errors {
void check_pending(int, bool) { cuda::raise_reported("(pending)"); }
void set_validate(bool on) { cuda::g_validate = on; }
bool validate() { return cuda::g_validate; }
}  // namespace cuda_errors
}  // namespace mole_ext

// ---- self-test kernels: each breaks one rule the emulator enforces (or checks a collective) ----
// (Written as the transform leaves kernels: shared variables through shared_var.)
namespace emu {
namespace selftest {

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void exit_before_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
// No barrier between the shared write and the read of a neighbour's slot.
__global__ void missing_barrier(float* out) {
  auto& s = shared_var<float[256], 0>(__FILE__, __LINE__);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 256];
}
__global__ void with_barrier(float* out) {
  auto& s = shared_var<float[256], 0>(__FILE__, __LINE__);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 256];
}
// Reads shared memory that no thread of this block wrote (the previous block did).
__global__ void stale_shared(float* out) {
  auto& s = shared_var<float[256], 0>(__FILE__, __LINE__);
  if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 256 + threadIdx.x] = s[threadIdx.x];
}
template <int Offset, unsigned Ldm>
__global__ void wmma_load(float* out) {
  auto& s = shared_var<__half[64 * 64], 128>(__FILE__, __LINE__);
  for (int i = threadIdx.x; i < 64 * 64; i += 256) s[i] = __half(1.0f);
  __syncthreads();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, s + Offset, Ldm);
  out[threadIdx.x] = 1.0f;
}
__global__ void wmma_half_warp(float* out) {
  auto& s = shared_var<__half[16 * 16], 128>(__FILE__, __LINE__);
  for (int i = threadIdx.x; i < 256; i += 256) s[i] = __half(1.0f);
  __syncthreads();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  if (threadIdx.x % 32 < 16) nvcuda::wmma::load_matrix_sync(a, s, 16);
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}
// A full 16x16x16 product through wmma: out = A B (A[i][k] = i + k, B[k][j] = k - j), by warp 0.
__global__ void wmma_product(float* out) {
  auto& a = shared_var<__half[256], 128>(__FILE__, __LINE__);
  auto& b = shared_var<__half[256], 128>(__FILE__, __LINE__);
  auto& c = shared_var<float[256], 128>(__FILE__, __LINE__);
  const int i = threadIdx.x / 16, j = threadIdx.x % 16;
  a[threadIdx.x] = __half(static_cast<float>(i + j));
  b[threadIdx.x] = __half(static_cast<float>(i - j));
  __syncthreads();
  if (threadIdx.x < 32) {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::fill_fragment(fc, 0.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
  }
  __syncthreads();
  out[threadIdx.x] = c[threadIdx.x];
}
__global__ void shfl_partial_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}
// Half of each warp leaves before the warp reduction.
__global__ void shfl_divergent(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = mole_ext::cuda::warp_sum(1.0f);
}
// common.cuh's warp and block reductions / scans on known data: out[t] = block scan of t,
// out[256 + t] = warp sum of t, out[512] = block sum.
__global__ void collectives(int64_t* out) {
  auto& scratch = shared_var<int64_t[33], 0>(__FILE__, __LINE__);
  int64_t total = 0;
  const int64_t v = threadIdx.x;
  out[threadIdx.x] = mole_ext::cuda::block_exclusive_scan(v, scratch, &total);
  out[256 + threadIdx.x] = mole_ext::cuda::warp_sum(v);
  const int64_t s = mole_ext::cuda::block_sum(v, scratch);
  if (threadIdx.x == 0) out[512] = s;
  if (threadIdx.x == 0) out[513] = total;
}
__global__ void misaligned_vec16(const unsigned char* p, unsigned* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p + 4);
  out[threadIdx.x] = v.x;
}
__global__ void oob_write(float* out, int64_t n) {
  if (threadIdx.x == 0) out[n] = 1.0f;  // one element past the end
}

// out[t] = __match_any_sync of key t % 5 (warp 0) / t % 32 < 7 ? 1 : t (warp 1, int64 keys);
// out[256 + t] = __ballot_sync(t % 3 == 0); out[512 + t] = __any_sync / __all_sync bits.
__global__ void match_and_ballot(int64_t* out) {
  const int t = threadIdx.x;
  out[t] = threadIdx.x < 32 ? __match_any_sync(0xffffffffu, t % 5)
                            : __match_any_sync(0xffffffffu, static_cast<int64_t>(t % 32 < 7 ? 1 : t));
  out[256 + t] = __ballot_sync(0xffffffffu, t % 3 == 0);
  out[512 + t] = __any_sync(0xffffffffu, t == 40) + 2 * __all_sync(0xffffffffu, t / 32 != 3);
}
__global__ void match_any_divergent(int64_t* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __match_any_sync(0xffffffffu, 1);
}
// Dynamic shared memory (written as the transform leaves `extern __shared__ int d[];`): thread t
// writes `writes` ints from 256 * t / 256 on, then reads its neighbour's first one; out[256] =
// the base address mod 32.
__global__ void dynamic_smem(float* out, int writes, int read) {
  auto& d = dynamic_shared<float[], 0>(__FILE__, __LINE__);
  auto& again = dynamic_shared<float[], 0>(__FILE__, __LINE__ + 1000);  // a second declaration, the same bytes
  for (int i = 0; i < writes; ++i) d[threadIdx.x * writes + i] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (read) out[threadIdx.x] = again[((threadIdx.x + 1) % 256) * writes];
  if (threadIdx.x == 0) out[256] = static_cast<float>(reinterpret_cast<uintptr_t>(d) % 32);
}
__global__ void dynamic_smem_with_static(float* out) {
  auto& s = shared_var<float[10000], 0>(__FILE__, __LINE__);
  auto& d = dynamic_shared<float[], 0>(__FILE__, __LINE__);
  s[threadIdx.x] = 1.0f;
  d[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x] + d[threadIdx.x];
}
// hist[t % 7] += 1 by every thread of 4 blocks.
__global__ void atomics(int* hist) { atomicAdd(hist + threadIdx.x % 7, 1); }
__global__ void misaligned_vec8(const unsigned char* p, unsigned* out) {
  const uint2 v = *reinterpret_cast<const uint2*>(p + 4);
  out[threadIdx.x] = v.x;
}
// A 4-byte scalar load from an address that is only 2-byte aligned: a launch failure on the GPU,
// caught here only by a build with the alignment sanitizer.
__global__ void misaligned_scalar(const unsigned char* p, unsigned* out) {
  out[threadIdx.x] = *reinterpret_cast<const unsigned*>(p + 2 + 0 * threadIdx.x);
}

template <typename... P, typename... A>
void go_smem(const char* name, dim3 grid, size_t smem, void (*k)(P...), A&&... a) {
  const LaunchSite site{name, __FILE__, __LINE__};
  launch(site, grid, dim3(256), smem, nullptr, k, std::forward<A>(a)...);
}
template <typename... P, typename... A>
void go(const char* name, dim3 grid, void (*k)(P...), A&&... a) {
  go_smem(name, grid, 0, k, std::forward<A>(a)...);
}

at::Tensor run(const std::string& name) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::zeros({4 * 256}, f32);
  float* o = out.data_ptr<float>();
  if (name == "divergent_barrier" || name == "exit_before_barrier") {
    at::Tensor i = at::zeros({256}, at::kInt);
    go(name.c_str(), dim3(1), name == "divergent_barrier" ? &divergent_barrier : &exit_before_barrier,
       i.data_ptr<int>());
    return i;
  }
  if (name == "missing_barrier") go("missing_barrier", dim3(1), &missing_barrier, o);
  else if (name == "with_barrier") go("with_barrier", dim3(1), &with_barrier, o);
  else if (name == "stale_shared") go("stale_shared", dim3(2), &stale_shared, o);
  else if (name == "wmma_aligned") go("wmma_aligned", dim3(1), &wmma_load<16, 64>, o);
  else if (name == "wmma_misaligned") go("wmma_misaligned", dim3(1), &wmma_load<8, 64>, o);
  else if (name == "wmma_bad_ldm") go("wmma_bad_ldm", dim3(1), &wmma_load<0, 60>, o);
  else if (name == "wmma_half_warp") go("wmma_half_warp", dim3(1), &wmma_half_warp, o);
  else if (name == "wmma_product") go("wmma_product", dim3(1), &wmma_product, o);
  else if (name == "shfl_partial_mask") go("shfl_partial_mask", dim3(1), &shfl_partial_mask, o);
  else if (name == "shfl_divergent") go("shfl_divergent", dim3(1), &shfl_divergent, o);
  else if (name == "collectives") {
    at::Tensor r = at::zeros({514}, at::kLong);
    go("collectives", dim3(1), &collectives, r.data_ptr<int64_t>());
    return r;
  } else if (name == "misaligned_vec16") {
    at::Tensor bytes = at::zeros({64}, at::kByte);
    at::Tensor u = at::zeros({256}, at::kInt);
    go("misaligned_vec16", dim3(1), &misaligned_vec16, static_cast<const unsigned char*>(bytes.data_ptr<uint8_t>()),
       reinterpret_cast<unsigned*>(u.data_ptr<int>()));
    return u;
  } else if (name == "match_and_ballot" || name == "match_any_divergent") {
    at::Tensor r = at::zeros({768}, at::kLong);
    go(name.c_str(), dim3(1), name == "match_and_ballot" ? &match_and_ballot : &match_any_divergent,
       r.data_ptr<int64_t>());
    return r;
  } else if (name == "dynamic_smem") {
    go_smem("dynamic_smem", dim3(2), 256 * 3 * sizeof(float), &dynamic_smem, o, 3, 1);
  } else if (name == "dynamic_smem_unwritten") {
    go_smem("dynamic_smem_unwritten", dim3(1), 256 * sizeof(float), &dynamic_smem, o, 0, 1);
  } else if (name == "dynamic_smem_overflow") {  // one float too few
    go_smem("dynamic_smem_overflow", dim3(1), 255 * sizeof(float), &dynamic_smem, o, 1, 0);
  } else if (name == "dynamic_smem_too_big") {  // 40000 static + 9500 dynamic bytes > 48 KB
    go_smem("dynamic_smem_too_big", dim3(1), 9500, &dynamic_smem_with_static, o);
  } else if (name == "dynamic_smem_fits") {
    go_smem("dynamic_smem_fits", dim3(1), 1024, &dynamic_smem_with_static, o);
  } else if (name == "atomics") {
    at::Tensor h = at::zeros({7}, at::kInt);
    go("atomics", dim3(4), &atomics, h.data_ptr<int>());
    return h;
  } else if (name == "misaligned_vec8" || name == "misaligned_scalar") {
    at::Tensor bytes = at::zeros({64}, at::kByte);
    at::Tensor u = at::zeros({256}, at::kInt);
    go(name.c_str(), dim3(1), name == "misaligned_vec8" ? &misaligned_vec8 : &misaligned_scalar,
       static_cast<const unsigned char*>(bytes.data_ptr<uint8_t>()), reinterpret_cast<unsigned*>(u.data_ptr<int>()));
    return u;
  } else if (name == "oob_write") {
    at::Tensor t = at::empty({100}, f32);  // inside the op: poisoned, with guard zones
    go("oob_write", dim3(1), &oob_write, t.data_ptr<float>(), int64_t{100});
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return out;
}

}  // namespace selftest
}  // namespace emu

// ---- the op library: the ops every emulated library has (MOLE_EMU_LIBRARY) ----
namespace emu {

OpScope::OpScope() : saved_(c10::GetCPUAllocator()) {
  poison_allocator().base = saved_;
  c10::SetCPUAllocator(&poison_allocator(), /*priority=*/255);
}
OpScope::~OpScope() { c10::SetCPUAllocator(saved_, /*priority=*/255); }
void OpScope::check(const char* op) { check_guards(std::string("at the end of ") + op); }

}  // namespace emu

namespace {

at::Tensor selftest(const std::string& name) {
  emu::OpScope scope;
  at::Tensor r = emu::selftest::run(name);
  emu::OpScope::check("selftest");
  return r;
}

void configure(int64_t sm_count, int64_t block_order, int64_t thread_order, int64_t seed) {
  TORCH_CHECK(sm_count >= 1 && block_order >= 0 && block_order <= 2 && thread_order >= 0 && thread_order <= 2,
              "configure(sm_count >= 1, block_order / thread_order in 0 (grid order), 1 (reverse), 2 (random), seed)");
  emu::config().sm_count = static_cast<int>(sm_count);
  emu::config().block_order = static_cast<int>(block_order);
  emu::config().thread_order = static_cast<int>(thread_order);
  emu::config().seed = static_cast<uint64_t>(seed);
}
std::string stats_text() {
  const emu::Stats& s = emu::stats();
  std::ostringstream o;
  for (const auto& [k, v] : s.launches) o << "launch\t" << k << "\t" << v << "\n";
  for (const auto& [k, v] : s.ever) o << "ever\t" << k << "\t" << v << "\n";
  for (const auto& [k, v] : s.instances) o << "instance\t" << k << "\t" << v << "\n";
  o << "blocks\t" << s.blocks << "\nbarriers\t" << s.barriers << "\nwarp_collectives\t" << s.warp_collectives
    << "\nmma\t" << s.mma << "\nvec16\t" << s.vec16 << "\nvec8\t" << s.vec8 << "\natomics\t" << s.atomics
    << "\nsplit_launches\t" << s.split_launches << "\ndynamic_smem_launches\t" << s.dynamic_smem_launches << "\n";
  return o.str();
}
void reset_stats() {
  auto ever = std::move(emu::stats().ever);
  auto instances = std::move(emu::stats().instances);
  emu::stats() = emu::Stats{};
  emu::stats().ever = std::move(ever);
  emu::stats().instances = std::move(instances);
}
void set_validate(bool on) { mole_ext::cuda_errors::set_validate(on); }
bool validate() { return mole_ext::cuda_errors::validate(); }
void check_errors() { mole_ext::cuda_errors::check_pending(-1, true); }
bool sanitize_alignment() {
#ifdef MOLE_EMU_SANITIZE_ALIGNMENT
  return true;
#else
  return false;
#endif
}

}  // namespace

#define MOLE_EMU_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
MOLE_EMU_TORCH_LIBRARY(MOLE_EMU_LIBRARY, m) {
  m.def("selftest(str name) -> Tensor", &selftest);
  m.def("configure(int sm_count, int block_order, int thread_order, int seed) -> ()", &configure);
  m.def("stats() -> str", &stats_text);
  m.def("reset_stats() -> ()", &reset_stats);
  // validate mode (on by default): end_op raises what the op's kernels reported; off, the error
  // stays pending until the next op's begin_op or check_errors (errors.cu's lazy mode)
  m.def("set_validate(bool on) -> ()", &set_validate);
  m.def("validate() -> bool", &validate);
  m.def("check_errors() -> ()", &check_errors);
  m.def("sanitize_alignment() -> bool", &sanitize_alignment);
}
