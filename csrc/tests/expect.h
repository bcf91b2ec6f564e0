// The tiny harness of the host tests in csrc/tests (run through ctest): EXPECT counts failures
// and goes on (it stops after 20, so an exhaustive loop does not flood the log); finish() prints
// the verdict and is main's return value.
#pragma once

#include <cstdio>
#include <cstdlib>

static int failures = 0;

#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
      if (failures > 20) std::exit(EXIT_FAILURE);                            \
    }                                                                        \
  } while (0)

static int finish(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
    return EXIT_FAILURE;
  }
  std::printf("%s: all checks passed\n", name);
  return EXIT_SUCCESS;
}
