// The pybind11 side of mole_ext._C: what is not an op. Importing the module also loads the
// operator library registered in torch_bindings.cpp and the backend files.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/index_math.h"
#include "core/lora_tiles.h"
#include "core/routing_math.h"
#ifdef MOLE_EXT_WITH_CUDA
#include "cuda/error_flags.h"
#include "cuda/tuning.h"
#endif

namespace py = pybind11;
namespace im = mole_ext::index_math;
namespace rm = mole_ext::routing_math;
namespace lt = mole_ext::lora_tiles;

namespace {

bool compiled_with_cuda() {
#ifdef MOLE_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Runs the CUDA permute's index algorithm (csrc/cuda/permute.cu: tile histogram, one-block
// scan, warp-tile stable ranking) on the host with the same routing_math functions, lane by
// lane, emulating __match_any_sync. Returns (sorted_token, offsets) so tests can compare the
// algorithm with the CPU kernel on any input, without a GPU.
std::pair<std::vector<int64_t>, std::vector<int64_t>> simulate_permute(const std::vector<int64_t>& expert,
                                                                       int64_t k, int64_t scan_threads) {
  const int64_t n = static_cast<int64_t>(expert.size());
  const rm::PermuteTiling tiling = rm::permute_tiling(n, k);
  const int64_t bins = k + 1, tiles = tiling.num_tiles, len = bins * tiles;
  std::vector<int64_t> hist(len, 0), sorted(n, -1), offsets(bins, 0);
  if (n == 0) return {sorted, offsets};
  // One warp's walk over its tile; RANK writes positions, else counts.
  auto walk = [&](int64_t tile, bool rank) {
    std::vector<int64_t> running(bins);
    for (int64_t b = 0; b < bins; ++b) running[b] = rank ? hist[rm::hist_slot(b, tile, tiles)] : 0;
    int64_t t0 = 0, t1 = 0;
    rm::tile_tokens_range(n, tiling.tile_tokens, tile, &t0, &t1);
    for (int64_t c = t0; c < t1; c += rm::kWarpSize) {
      int32_t bin[rm::kWarpSize];
      for (int lane = 0; lane < rm::kWarpSize; ++lane) {
        const int64_t t = c + lane;
        bin[lane] = t < t1 ? rm::expert_bin(expert[t], k) : -1;
      }
      uint32_t group[rm::kWarpSize];
      for (int lane = 0; lane < rm::kWarpSize; ++lane) {  // __match_any_sync
        group[lane] = 0;
        for (int o = 0; o < rm::kWarpSize; ++o) group[lane] |= (bin[o] == bin[lane] ? 1u : 0u) << o;
      }
      for (int lane = 0; lane < rm::kWarpSize; ++lane) {
        if (rank && c + lane < t1) sorted[running[bin[lane]] + rm::rank_in_group(group[lane], lane)] = c + lane;
      }
      for (int lane = 0; lane < rm::kWarpSize; ++lane) {
        if (c + lane < t1 && lane == rm::group_leader(group[lane])) running[bin[lane]] += rm::popc32(group[lane]);
      }
    }
    if (!rank) {
      for (int64_t b = 0; b < bins; ++b) hist[rm::hist_slot(b, tile, tiles)] = running[b];
    }
  };
  for (int64_t tile = 0; tile < tiles; ++tile) walk(tile, false);
  // The one-block scan: per-thread runs, a scan over the threads' totals, per-thread rewrite.
  std::vector<int64_t> totals(scan_threads, 0), prefix(scan_threads, 0);
  for (int64_t th = 0; th < scan_threads; ++th) {
    int64_t b = 0, e = 0;
    rm::block_partition(len, scan_threads, th, &b, &e);
    for (int64_t i = b; i < e; ++i) totals[th] += hist[i];
  }
  im::exclusive_scan(totals.data(), scan_threads - 1, prefix.data());
  for (int64_t th = 0; th < scan_threads; ++th) {
    int64_t b = 0, e = 0;
    rm::block_partition(len, scan_threads, th, &b, &e);
    int64_t run = prefix[th];
    for (int64_t i = b; i < e; ++i) {
      const int64_t v = hist[i];
      hist[i] = run;
      run += v;
    }
  }
  for (int64_t b = 0; b < bins; ++b) offsets[b] = hist[rm::hist_slot(b, 0, tiles)];
  for (int64_t tile = 0; tile < tiles; ++tile) walk(tile, true);
  return {sorted, offsets};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mole_ext compiled core: importing it registers the torch.ops.mole_ext operators.";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were compiled in.");

  // The host/device index arithmetic, exposed so pytest checks the exact functions the kernels use.
  py::module_ im_mod = m.def_submodule("index_math", "index arithmetic shared by CPU and CUDA kernels");
  im_mod.def("exclusive_scan", [](const std::vector<int64_t>& counts) {
    std::vector<int64_t> off(counts.size() + 1);
    im::exclusive_scan(counts.data(), static_cast<int64_t>(counts.size()), off.data());
    return off;
  });
  im_mod.def("valid_offsets", [](const std::vector<int64_t>& offsets, int64_t n) {
    return im::valid_offsets(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, n);
  });

  // routing_math.h: the CUDA routing kernels' arithmetic.
  im_mod.def("lanemask_lt", [](int lane) { return rm::lanemask_lt(lane); });
  im_mod.def("rank_in_group", [](uint32_t match, int lane) { return rm::rank_in_group(match, lane); });
  im_mod.def("group_leader", [](uint32_t match) { return rm::group_leader(match); });
  im_mod.def("popc32", [](uint32_t x) { return rm::popc32(x); });
  im_mod.def("expert_bin", [](int64_t e, int64_t k) { return rm::expert_bin(e, k); });
  im_mod.def("permute_tiling", [](int64_t n, int64_t k) {
    const rm::PermuteTiling t = rm::permute_tiling(n, k);
    return py::make_tuple(t.tile_tokens, t.num_tiles);
  });
  im_mod.def("permute_uses_tiles", [](int64_t n, int64_t k) { return rm::permute_uses_tiles(n, k); });
  im_mod.def("hist_slot", &rm::hist_slot);
  im_mod.def("tile_tokens_range", [](int64_t n, int64_t tile_tokens, int64_t tile) {
    int64_t b = 0, e = 0;
    rm::tile_tokens_range(n, tile_tokens, tile, &b, &e);
    return py::make_tuple(b, e);
  });
  im_mod.def("block_partition", [](int64_t len, int64_t parts, int64_t part) {
    int64_t b = 0, e = 0;
    rm::block_partition(len, parts, part, &b, &e);
    return py::make_tuple(b, e);
  });
  im_mod.def("copy_vec_bytes", [](int64_t row_bytes, uint64_t src, uint64_t dst) {
    return rm::copy_vec_bytes(row_bytes, src, dst);
  });
  im_mod.def("row_copy_geometry", [](int64_t vecs_per_row, int block_threads) {
    const rm::RowCopyGeometry g = rm::row_copy_geometry(vecs_per_row, block_threads);
    return py::make_tuple(g.threads_per_row, g.rows_per_block);
  });
  im_mod.def("lb_rows_per_block", &rm::lb_rows_per_block);
  im_mod.def("lb_layout", [](int64_t k, int64_t threads) {
    const rm::LbLayout l = rm::lb_layout(k, threads);
    return py::make_tuple(l.col_threads, l.row_lanes, l.active);
  });
  // lora_tiles.h: the grouped LoRA kernels' tile map and split plans.
  im_mod.def("seg_tile_grid", &lt::seg_tile_grid, py::arg("n"), py::arg("k"), py::arg("bm"));
  im_mod.def("seg_tile_base", [](const std::vector<int64_t>& offsets, int64_t s, int64_t n, int64_t bm) {
    return lt::seg_tile_base(offsets.data(), s, n, bm);
  });
  im_mod.def("seg_tile", [](const std::vector<int64_t>& offsets, int64_t n, int64_t bm, int64_t t) {
    const lt::SegTile st = lt::seg_tile(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, n, bm, t);
    return py::make_tuple(st.segment, st.row_begin, st.row_end);
  }, "Tile t of height bm -> (segment, row_begin, row_end); idle when row_begin >= row_end.");
  im_mod.def("split_plan", [](int64_t len, int64_t want, int64_t align) {
    const lt::SplitPlan p = lt::split_plan(len, want, align);
    return py::make_tuple(p.chunk, p.splits);
  });
  im_mod.def("want_splits", &lt::want_splits);
  im_mod.def("wgrad_chunk_rows", &lt::wgrad_chunk_rows);

  im_mod.def("simulate_permute", &simulate_permute, py::arg("expert"), py::arg("num_experts"),
             py::arg("scan_threads") = 1024,
             "The CUDA permute's index algorithm run on the host: (sorted_token, offsets).");
  im_mod.attr("PERMUTE_MAX_TILE_EXPERTS") = rm::kPermuteMaxTileExperts;
  im_mod.attr("PERMUTE_MAX_TILE_TOKENS") = rm::kPermuteMaxTileTokens;
  im_mod.attr("PERMUTE_MAX_HIST_ENTRIES") = rm::kPermuteMaxHistEntries;

  // Errors reported by CUDA kernels (csrc/cuda/common.cuh). No-ops without CUDA kernels.
  m.def("cuda_check_errors", [](bool synchronize) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::cuda_errors::check_pending(-1, synchronize);
#else
    (void)synchronize;
#endif
  }, py::arg("synchronize") = true,
        "Raise an error a mole_ext CUDA kernel reported (bad expert id, bad sorted_token); "
        "synchronize waits for running kernels first.");
  m.def("set_cuda_validate", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::cuda_errors::set_validate(on);
#else
    (void)on;
#endif
  }, "Validate mode: CUDA routing ops synchronise and raise bad ids in the failing call.");
  m.def("cuda_validate", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::cuda_errors::validate();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_vectorized", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_vectorized(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora*: 16-byte global accesses where rows allow (default) or element accesses; "
     "the results are identical.");
  m.def("grouped_lora_vectorized", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_vectorized();
#else
    return false;
#endif
  });
  m.def("set_grouped_lora_pipelined", [](bool on) {
#ifdef MOLE_EXT_WITH_CUDA
    mole_ext::tuning::set_grouped_lora_pipelined(on);
#else
    (void)on;
#endif
  }, "CUDA grouped_lora*, bf16 / fp16: the cp.async pipelined main loop where rows allow (default) or "
     "the plain one; the results are identical.");
  m.def("grouped_lora_pipelined", []() {
#ifdef MOLE_EXT_WITH_CUDA
    return mole_ext::tuning::grouped_lora_pipelined();
#else
    return false;
#endif
  });
}
