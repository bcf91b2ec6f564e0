// Host-side tests of csrc/core/index_math.h: the same functions the CUDA kernels call.
// Run through ctest (CMakeLists.txt); exits non-zero on the first failure.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/index_math.h"

namespace im = mole_ext::index_math;

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

static void test_exclusive_scan() {
  const std::vector<int> counts = {3, 0, 2, 0};
  std::vector<int> off(5, -1);
  im::exclusive_scan(counts.data(), 4, off.data());
  EXPECT(off == (std::vector<int>{0, 3, 3, 5, 5}));
  std::vector<int> one(1, -1);
  im::exclusive_scan(counts.data(), 0, one.data());
  EXPECT(one[0] == 0);
}

static void test_segment_of() {
  const std::vector<int> off = {0, 3, 3, 5, 5, 9};  // segments 1 and 3 empty
  const int expect[] = {0, 0, 0, 2, 2, 4, 4, 4, 4};
  for (int row = 0; row < 9; ++row) EXPECT(im::segment_of(off.data(), 5, row) == expect[row]);
  EXPECT(im::segment_of(off.data(), 5, -1) == -1);
  EXPECT(im::segment_of(off.data(), 5, 9) == -1);
  const std::vector<int> empty = {0, 0, 0};
  EXPECT(im::segment_of(empty.data(), 2, 0) == -1);
}

static void test_segment_tiles() {
  const std::vector<long> off = {0, 5, 5, 12};  // lengths 5, 0, 7
  EXPECT(im::num_segment_tiles(off.data(), 3, 4) == 2 + 0 + 2);
  int64_t s, b, e;
  EXPECT(im::segment_tile(off.data(), 3, 4, 0, &s, &b, &e) && s == 0 && b == 0 && e == 4);
  EXPECT(im::segment_tile(off.data(), 3, 4, 1, &s, &b, &e) && s == 0 && b == 4 && e == 5);
  EXPECT(im::segment_tile(off.data(), 3, 4, 2, &s, &b, &e) && s == 2 && b == 5 && e == 9);
  EXPECT(im::segment_tile(off.data(), 3, 4, 3, &s, &b, &e) && s == 2 && b == 9 && e == 12);
  EXPECT(!im::segment_tile(off.data(), 3, 4, 4, &s, &b, &e));
  EXPECT(!im::segment_tile(off.data(), 3, 4, -1, &s, &b, &e));
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
  test_segment_of();
  test_segment_tiles();
  test_valid_offsets();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("index_math: all checks passed\n");
  return EXIT_SUCCESS;
}
