// CUDA kernels for permute / permute_rows / unpermute: a stable counting sort of tokens by expert
// on the device, and row moves in both directions.
//
// permute (rm::permute_uses_tiles: num_experts <= 1024 and tiles of at most 2048 tokens), four
// launches, no host synchronisation, no atomics:
//   1. tile_kernel<HIST>: one warp per tile of tile_tokens consecutive tokens counts the tile's
//      tokens per bin (bin = expert id, or K for an invalid id) into hist[bin * tiles + tile].
//   2. scan_kernel: one block turns hist into its exclusive scan (bin-major, so the running
//      position walks expert 0's tiles in token order, then expert 1's, ...) and writes
//      offsets[b] = hist[b * tiles] for b = 0..K.
//   3. tile_kernel<RANK>: each warp walks its tile again, 32 tokens at a time; __match_any_sync
//      groups lanes with the same bin, a lane's position is its bin's running base plus its rank
//      among the lower lanes of its group, and the group's lowest lane advances the base. So
//      rows keep their token order inside each expert: the same order as the CPU kernel's
//      sequential scatter, hence sorted_token and offsets are bit-identical to it.
//   4. move_rows_kernel: x_sorted[i] = x[sorted_token[i]], 16-byte accesses when the row size
//      and both base addresses allow (any dtype: rows are moved as bytes, like the CPU memcpy).
// Otherwise (num_experts > 1024, or so many tokens that the capped (K + 1) x tiles histogram would
// leave few warps walking long tiles): a stable device sort of the bins (at::sort), offsets by
// searchsorted. The 2048-token switch is reasoned, not measured (no GPU yet).
//
// Invalid expert ids (outside [0, num_experts)): never an out-of-bounds access. Their rows go to
// bin K, after every valid row, in token order: sorted_token is still a permutation, x_sorted is
// fully written, and offsets[K] is the number of valid rows (< N). The kernel reports the error
// (common.cuh); it raises in this call in validate mode, else lazily.
//
// permute_rows / unpermute: an entry of sorted_token outside [0, N) is reported and its row is
// skipped (permute_rows writes zeros to it). Repeated entries are only detected in validate mode;
// otherwise rows of unpermute's output that no entry hits are left unwritten.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "common.cuh"
#include "op_scope.cuh"

namespace mole_ext {
namespace cuda {
namespace {

namespace rm = routing_math;

constexpr int kTileWarps = 4;  // warps (tiles) per block of the tile kernels
constexpr int kScanThreads = 1024;
constexpr int kCopyThreads = 256;
constexpr int kCopyUnroll = 4;
constexpr int kCheckThreads = 256;

enum class TileMode { kHist, kRank };

// hist: [bins * num_tiles] int32, bin-major (kHist: written; kRank: read, holding the scan).
// sorted_token: [n] int32 (kRank only).
template <typename index_t, TileMode MODE>
__global__ void __launch_bounds__(kTileWarps * kWarp) tile_kernel(
    const index_t* __restrict__ expert, int64_t n, int64_t k, int64_t tile_tokens, int64_t num_tiles,
    int32_t* __restrict__ hist, int32_t* __restrict__ sorted_token, ErrorSlots* slots) {
  extern __shared__ int32_t running_all[];  // [kTileWarps][bins]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kTileWarps + warp;
  if (tile >= num_tiles) return;  // the whole warp leaves; this kernel has no block barrier
  const int64_t bins = k + 1;
  int32_t* running = running_all + warp * bins;
  for (int64_t b = lane; b < bins; b += kWarp) {
    running[b] = MODE == TileMode::kRank ? hist[rm::hist_slot(b, tile, num_tiles)] : 0;
  }
  __syncwarp();
  int64_t t0 = 0, t1 = 0;
  rm::tile_tokens_range(n, tile_tokens, tile, &t0, &t1);
  for (int64_t c = t0; c < t1; c += kWarp) {  // c is warp-uniform: every lane runs each round
    const int64_t t = c + lane;
    const bool active = t < t1;
    int32_t bin = -1;  // inactive lanes share a key no active lane has
    if (active) {
      const index_t e = expert[t];
      bin = rm::expert_bin(e, k);
      if (bin == k) report_error(slots, cuda_errors::kPermuteExpert, static_cast<int64_t>(e), t, k);
    }
    const uint32_t group = __match_any_sync(kFullMask, bin);
    if (MODE == TileMode::kRank && active) {
      sorted_token[running[bin] + rm::rank_in_group(group, lane)] = static_cast<int32_t>(t);
    }
    __syncwarp();  // every lane has read running[bin] before the leader advances it
    if (active && lane == rm::group_leader(group)) running[bin] += rm::popc32(group);
    __syncwarp();
  }
  if (MODE == TileMode::kHist) {
    for (int64_t b = lane; b < bins; b += kWarp) hist[rm::hist_slot(b, tile, num_tiles)] = running[b];
  }
}

// In-place exclusive scan of hist [len] by one block; offsets[b] = hist[b * num_tiles], b <= k.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(int32_t* __restrict__ hist, int64_t len,
                                                            int64_t num_tiles, int64_t bins,
                                                            int32_t* __restrict__ offsets) {
  __shared__ int32_t scratch[kWarp + 1];
  int64_t b = 0, e = 0;
  rm::block_partition(len, blockDim.x, threadIdx.x, &b, &e);
  int32_t local = 0;
  for (int64_t i = b; i < e; ++i) local += hist[i];
  int32_t total = 0;
  int32_t run = block_exclusive_scan(local, scratch, &total);
  for (int64_t i = b; i < e; ++i) {
    const int32_t v = hist[i];
    hist[i] = run;
    run += v;
  }
  __syncthreads();  // the block's global writes are visible to the block after the barrier
  for (int64_t bin = threadIdx.x; bin < bins; bin += blockDim.x) {
    offsets[bin] = hist[rm::hist_slot(bin, 0, num_tiles)];
  }
}

template <int BYTES>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};
template <>
struct VecOf<1> {
  using type = uint8_t;
};

// Row moves: GATHER dst[r] = src[idx[r]]; SCATTER dst[idx[r]] = src[r]. Rows are vecs_per_row
// vectors of V. A block moves rows_per_block rows, threads_per_row threads each.
template <typename V, typename index_t, bool SCATTER>
__global__ void __launch_bounds__(kCopyThreads) move_rows_kernel(
    const V* __restrict__ src, V* __restrict__ dst, const index_t* __restrict__ idx, int64_t n,
    int64_t vecs_per_row, int threads_per_row, int rows_per_block, ErrorSlots* slots, int error_kind) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / threads_per_row;
  const int lane = threadIdx.x % threads_per_row;
  if (r >= n) return;
  const int64_t j = static_cast<int64_t>(idx[r]);
  if (j < 0 || j >= n) {
    if (lane == 0) report_error(slots, error_kind, j, r, n);
    if (!SCATTER) {  // a gather still defines its output row
      const V zero{};
      for (int64_t c = lane; c < vecs_per_row; c += threads_per_row) dst[r * vecs_per_row + c] = zero;
    }
    return;
  }
  const V* s = src + (SCATTER ? r : j) * vecs_per_row;
  V* d = dst + (SCATTER ? j : r) * vecs_per_row;
  const int64_t step = static_cast<int64_t>(threads_per_row) * kCopyUnroll;
  for (int64_t c = lane; c < vecs_per_row; c += step) {
    V v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t cc = c + static_cast<int64_t>(u) * threads_per_row;
      if (cc < vecs_per_row) v[u] = s[cc];
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t cc = c + static_cast<int64_t>(u) * threads_per_row;
      if (cc < vecs_per_row) d[cc] = v[u];
    }
  }
}

// Validate mode: how often each row is hit (integer atomics: the counts are exact).
template <typename index_t>
__global__ void __launch_bounds__(kCheckThreads) count_hits_kernel(const index_t* __restrict__ idx, int64_t n,
                                                                   int32_t* __restrict__ hits) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const int64_t j = static_cast<int64_t>(idx[r]);
  if (j >= 0 && j < n) atomicAdd(hits + j, 1);
}

__global__ void __launch_bounds__(kCheckThreads) check_hits_kernel(const int32_t* __restrict__ hits, int64_t n,
                                                                   ErrorSlots* slots, int error_kind) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  if (hits[r] != 1) report_error(slots, error_kind, hits[r], r, n);
}

// Flags invalid ids for the sort path (the tile path flags them in tile_kernel).
template <typename index_t>
__global__ void __launch_bounds__(kCheckThreads) flag_bad_experts_kernel(const index_t* __restrict__ expert,
                                                                         int64_t n, int64_t k, ErrorSlots* slots) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const index_t e = expert[t];
  if (rm::expert_bin(e, k) == k) report_error(slots, cuda_errors::kPermuteExpert, static_cast<int64_t>(e), t, k);
}

// Reports row indices outside [0, n) for rows of no bytes (d == 0), where no copy kernel runs to
// notice them; the same report as move_rows_kernel's.
template <typename index_t>
__global__ void __launch_bounds__(kCheckThreads) flag_bad_rows_kernel(const index_t* __restrict__ idx, int64_t n,
                                                                      ErrorSlots* slots, int error_kind) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const int64_t j = static_cast<int64_t>(idx[r]);
  if (j < 0 || j >= n) report_error(slots, error_kind, j, r, n);
}

template <typename index_t, bool SCATTER>
void launch_move_rows_typed(const at::Tensor& src, at::Tensor& dst, const index_t* idx, int64_t n,
                            ErrorSlots* slots, int error_kind, cudaStream_t stream) {
  const int64_t row_bytes = src.size(1) * static_cast<int64_t>(src.element_size());
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  const int vec = rm::copy_vec_bytes(row_bytes, reinterpret_cast<uint64_t>(s), reinterpret_cast<uint64_t>(d));
  const int64_t vecs = row_bytes / vec;
  const rm::RowCopyGeometry geo = rm::row_copy_geometry(vecs, kCopyThreads);
  const dim3 grid(static_cast<unsigned>(grid_for(n, geo.rows_per_block)));
  auto go = [&](auto bytes) {
    using V = typename VecOf<decltype(bytes)::value>::type;
    move_rows_kernel<V, index_t, SCATTER><<<grid, kCopyThreads, 0, stream>>>(
        reinterpret_cast<const V*>(s), reinterpret_cast<V*>(d), idx, n, vecs, geo.threads_per_row,
        geo.rows_per_block, slots, error_kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (vec) {
    case 16: go(std::integral_constant<int, 16>()); break;
    case 8: go(std::integral_constant<int, 8>()); break;
    case 4: go(std::integral_constant<int, 4>()); break;
    case 2: go(std::integral_constant<int, 2>()); break;
    default: go(std::integral_constant<int, 1>()); break;
  }
}

// Moves rows of src [n, d] into dst [n, d] (both contiguous) by idx [n] int32/int64.
template <bool SCATTER>
void move_rows(const at::Tensor& src, at::Tensor& dst, const at::Tensor& idx, ErrorSlots* slots, int error_kind,
               cudaStream_t stream) {
  const int64_t n = src.size(0);
  if (n == 0) return;
  if (src.size(1) == 0) {  // nothing to move, but a bad index is still reported
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "mole_ext_flag_bad_rows", [&] {
      flag_bad_rows_kernel<index_t><<<static_cast<unsigned>(grid_for(n, kCheckThreads)), kCheckThreads, 0, stream>>>(
          idx.const_data_ptr<index_t>(), n, slots, error_kind);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  if (idx.scalar_type() == at::kInt) {
    launch_move_rows_typed<int32_t, SCATTER>(src, dst, idx.const_data_ptr<int32_t>(), n, slots, error_kind, stream);
  } else {
    launch_move_rows_typed<int64_t, SCATTER>(src, dst, idx.const_data_ptr<int64_t>(), n, slots, error_kind, stream);
  }
}

// Validate mode: reports when idx [n] is not a permutation of [0, n).
void check_permutation(const at::Tensor& idx, ErrorSlots* slots, int error_kind, cudaStream_t stream) {
  const int64_t n = idx.size(0);
  if (n == 0) return;
  at::Tensor hits = at::zeros({n}, idx.options().dtype(at::kInt));
  const dim3 grid(static_cast<unsigned>(grid_for(n, kCheckThreads)));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "mole_ext_check_permutation", [&] {
    count_hits_kernel<index_t><<<grid, kCheckThreads, 0, stream>>>(idx.const_data_ptr<index_t>(), n,
                                                                   hits.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_hits_kernel<<<grid, kCheckThreads, 0, stream>>>(hits.const_data_ptr<int32_t>(), n, slots, error_kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// sorted_token [n] int32 and offsets [k+1] int32 by the tile histogram (rm::permute_uses_tiles).
template <typename index_t>
void sort_by_tiles(const index_t* expert, int64_t n, int64_t k, at::Tensor& sorted_token, at::Tensor& offsets,
                   ErrorSlots* slots, cudaStream_t stream) {
  const rm::PermuteTiling tiling = rm::permute_tiling(n, k);
  const int64_t bins = k + 1;
  const int64_t len = bins * tiling.num_tiles;
  TORCH_INTERNAL_ASSERT(len <= rm::kPermuteMaxHistEntries, "permute histogram of ", len, " entries");
  at::Tensor hist = at::empty({len}, sorted_token.options());
  int32_t* hp = hist.mutable_data_ptr<int32_t>();
  const dim3 grid(static_cast<unsigned>(grid_for(tiling.num_tiles, kTileWarps)));
  const size_t smem = static_cast<size_t>(kTileWarps) * bins * sizeof(int32_t);
  tile_kernel<index_t, TileMode::kHist><<<grid, kTileWarps * kWarp, smem, stream>>>(
      expert, n, k, tiling.tile_tokens, tiling.num_tiles, hp, nullptr, slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_kernel<<<1, kScanThreads, 0, stream>>>(hp, len, tiling.num_tiles, bins, offsets.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The rank pass sees the same ids and reports the same errors again: harmless.
  tile_kernel<index_t, TileMode::kRank><<<grid, kTileWarps * kWarp, smem, stream>>>(
      expert, n, k, tiling.tile_tokens, tiling.num_tiles, hp, sorted_token.mutable_data_ptr<int32_t>(), slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same by a stable device sort of the bins (k > 1024, or too many tokens per tile).
template <typename index_t>
void sort_by_device_sort(const at::Tensor& expert, int64_t n, int64_t k, at::Tensor& sorted_token,
                         at::Tensor& offsets, ErrorSlots* slots, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_for(n, kCheckThreads)));
  flag_bad_experts_kernel<index_t><<<grid, kCheckThreads, 0, stream>>>(expert.const_data_ptr<index_t>(), n, k, slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor e = expert.to(at::kLong);
  const at::Tensor bins = at::where(e.ge(0).logical_and(e.lt(k)), e, at::full_like(e, k));
  const auto sorted = at::sort(bins, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  sorted_token.copy_(std::get<1>(sorted));
  offsets.copy_(at::searchsorted(std::get<0>(sorted), at::arange(k + 1, e.options()), /*out_int32=*/true));
}

}  // namespace

// x [N, d] any dtype, expert [N] int32/int64 -> x_sorted [N, d], sorted_token [N] int32,
// offsets [K+1] int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x_in, const at::Tensor& expert_in,
                                                            int64_t num_experts) {
  const CudaOpScope scope(x_in, "x", [&] { check_permute(x_in, expert_in, num_experts); });
  const at::Tensor x = x_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  const int64_t n = x.size(0);
  at::Tensor sorted_token = at::empty({n}, x.options().dtype(at::kInt));
  at::Tensor x_sorted = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (n == 0) return {x_sorted, sorted_token, at::zeros({num_experts + 1}, x.options().dtype(at::kInt))};
  at::Tensor offsets = at::empty({num_experts + 1}, x.options().dtype(at::kInt));
  ErrorSlots* slots = scope.slots();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(expert.scalar_type(), "permute_cuda", [&] {
    if (rm::permute_uses_tiles(n, num_experts)) {
      sort_by_tiles<index_t>(expert.const_data_ptr<index_t>(), n, num_experts, sorted_token, offsets, slots, stream);
    } else {
      sort_by_device_sort<index_t>(expert, n, num_experts, sorted_token, offsets, slots, stream);
    }
  });
  move_rows</*SCATTER=*/false>(x, x_sorted, sorted_token, slots, cuda_errors::kPermuteRowsIndex, stream);
  return {x_sorted, sorted_token, offsets};
}

// x [N, d] any dtype, sorted_token [N] int32/int64 -> out [N, d], out[i] = x[sorted_token[i]]
at::Tensor permute_rows_cuda(const at::Tensor& x_in, const at::Tensor& sorted_token_in) {
  const CudaOpScope scope(x_in, "x", [&] { check_permute_rows(x_in, sorted_token_in, "x"); });
  const at::Tensor x = x_in.contiguous();
  const at::Tensor idx = sorted_token_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.size(0) == 0) return out;
  ErrorSlots* slots = scope.slots();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (cuda_errors::validate()) check_permutation(idx, slots, cuda_errors::kPermuteRowsDuplicate, stream);
  move_rows</*SCATTER=*/false>(x, out, idx, slots, cuda_errors::kPermuteRowsIndex, stream);
  return out;
}

// y_sorted [N, d] any dtype, sorted_token [N] int32/int64 -> y [N, d], y[sorted_token[i]] = y_sorted[i]
at::Tensor unpermute_cuda(const at::Tensor& y_in, const at::Tensor& sorted_token_in) {
  const CudaOpScope scope(y_in, "y_sorted", [&] { check_permute_rows(y_in, sorted_token_in, "y_sorted"); });
  const at::Tensor y = y_in.contiguous();
  const at::Tensor idx = sorted_token_in.contiguous();
  at::Tensor out = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.size(0) == 0) return out;
  ErrorSlots* slots = scope.slots();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (cuda_errors::validate()) check_permutation(idx, slots, cuda_errors::kUnpermuteDuplicate, stream);
  move_rows</*SCATTER=*/true>(y, out, idx, slots, cuda_errors::kUnpermuteIndex, stream);
  return out;
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(mole_ext, CUDA, m) {
  m.impl("permute", &cuda::permute_cuda);
  m.impl("permute_rows", &cuda::permute_rows_cuda);
  m.impl("unpermute", &cuda::unpermute_cuda);
}

}  // namespace mole_ext
