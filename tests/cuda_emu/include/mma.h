// Emulated nvcuda::wmma (m16n16k16, 16-bit inputs, fp32 accumulator) for tests/test_cuda_emulated.py.
//
// A fragment holds the whole 16x16 tile (as float: bf16 / fp16 values are exact in fp32) instead
// of CUDA's per-lane slices, so kernels that touch fragment elements directly (x[], num_elements)
// do not compile here: the register layout of real tensor-core fragments is NOT emulated.
// Checked on every call, as CUDA requires: the pointer is 256-bit (32-byte) aligned, ldm is a
// multiple of 16 bytes, and all lanes of a warp issue the same wmma calls with the same arguments
// (a per-lane log compared at every barrier and at the end of the block). Lane 0 of the warp does
// the data movement and arithmetic for the warp (the other lanes' fragments are placeholders);
// mma_sync sums the 16 products of each output in k order in fp32, starting from C.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda_emu.h"

namespace emu {
// Records one wmma call of this lane (kind, pointer, ldm, layout) in its log; checks the rules.
void wmma_log(int kind, const void* p, unsigned ldm, size_t elem_bytes, int layout);
void count_mma();
inline bool wmma_leader() { return lane_id() == 0; }
}  // namespace emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the m16n16k16 wmma shape is emulated");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>),
                "emulated wmma: 16-bit (half / bfloat16) inputs, float accumulator");
  static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                "matrix_a / matrix_b fragments need a layout, accumulators none");

 public:
  float v[16][16];  // the whole tile; valid in lane 0 of the warp
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float value) {
  emu::wmma_log(0, nullptr, 0, 0, 0);
  for (auto& row : f.v)
    for (auto& e : row) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load needs a layout_t argument");
  constexpr bool kRow = std::is_same_v<L, row_major>;
  emu::wmma_log(std::is_same_v<Use, matrix_a> ? 1 : 2, p, ldm, sizeof(T), kRow ? 0 : 1);
  if (!emu::wmma_leader()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = static_cast<float>(kRow ? p[i * ldm + j] : p[j * ldm + i]);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  emu::wmma_log(3, p, ldm, sizeof(float), layout == mem_row_major ? 0 : 1);
  if (!emu::wmma_leader()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  emu::wmma_log(4, p, ldm, sizeof(float), layout == mem_row_major ? 0 : 1);
  if (!emu::wmma_leader()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i][j];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  emu::wmma_log(5, nullptr, 0, 0, 0);
  if (!emu::wmma_leader()) return;
  emu::count_mma();
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
