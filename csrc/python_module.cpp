// The pybind11 side of mole_ext._C: what is not an op. Importing the module also loads the
// operator library registered in torch_bindings.cpp and the backend files.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/index_math.h"

namespace py = pybind11;
namespace im = mole_ext::index_math;

namespace {

bool compiled_with_cuda() {
#ifdef MOLE_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
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
  im_mod.def("segment_of", [](const std::vector<int64_t>& offsets, int64_t row) {
    return im::segment_of(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, row);
  });
  im_mod.def("num_segment_tiles", [](const std::vector<int64_t>& offsets, int64_t tile) {
    return im::num_segment_tiles(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, tile);
  });
  im_mod.def("segment_tile", [](const std::vector<int64_t>& offsets, int64_t tile, int64_t t) -> py::object {
    int64_t seg = 0, b = 0, e = 0;
    if (!im::segment_tile(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, tile, t, &seg, &b, &e)) {
      return py::none();
    }
    return py::make_tuple(seg, b, e);
  });
  im_mod.def("valid_offsets", [](const std::vector<int64_t>& offsets, int64_t n) {
    return im::valid_offsets(offsets.data(), static_cast<int64_t>(offsets.size()) - 1, n);
  });
}
