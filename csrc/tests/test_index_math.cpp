// Host-side tests of csrc/core/index_math.h: the same functions the CUDA kernels call.
// Run through ctest (CMakeLists.txt); exits non-zero on failure.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/index_math.h"
#include "expect.h"

namespace im = mole_ext::index_math;

static void test_exclusive_scan() {
  const std::vector<int> counts = {3, 0, 2, 0};
  std::vector<int> off(5, -1);
  im::exclusive_scan(counts.data(), 4, off.data());
  EXPECT(off == (std::vector<int>{0, 3, 3, 5, 5}));
  std::vector<int> one(1, -1);
  im::exclusive_scan(counts.data(), 0, one.data());
  EXPECT(one[0] == 0);
}

static void test_valid_offsets() {
  const std::vector<int> ok = {0, 2, 2, 7};
  EXPECT(im::valid_offsets(ok.data(), 3, 7));
  EXPECT(!im::valid_offsets(ok.data(), 3, 8));
  const std::vector<int> dec = {0, 3, 2, 7};
  EXPECT(!im::valid_offsets(dec.data(), 3, 7));
  const std::vector<int> start = {1, 3, 7};
  EXPECT(!im::valid_offsets(start.data(), 2, 7));
}

int main() {
  test_exclusive_scan();
  test_valid_offsets();
  return finish("index_math");
}
