// Host test of csrc/cuda/tuning.h's switch rule (flag_value / env_flag): 1, true, yes, on in any
// letter case are on, everything else (unset, empty, 0, false, no, off, 2, " 1", "y") is off.
// setup.py's _truthy and CMakeLists.txt's mole_env_flag follow the same rule (tests/test_build.py).
#include <cstdlib>
#include <initializer_list>

#include "cuda/tuning.h"
#include "expect.h"

namespace tn = mole_ext::tuning;

int main() {
  for (const char* on : {"1", "true", "TRUE", "True", "yes", "YES", "Yes", "on", "ON", "On", "tRuE"}) {
    EXPECT(tn::flag_value(on));
  }
  for (const char* off : {"", "0", "false", "no", "off", "2", " 1", "1 ", "y", "t", "truee", "tru", "onn", "o",
                          "enable"}) {
    EXPECT(!tn::flag_value(off));
  }
  EXPECT(!tn::flag_value(nullptr));
  ::setenv("MOLE_EXT_TEST_ENV_FLAG", "Yes", 1);
  EXPECT(tn::env_flag("MOLE_EXT_TEST_ENV_FLAG"));
  ::setenv("MOLE_EXT_TEST_ENV_FLAG", "off", 1);
  EXPECT(!tn::env_flag("MOLE_EXT_TEST_ENV_FLAG"));
  ::unsetenv("MOLE_EXT_TEST_ENV_FLAG");
  EXPECT(!tn::env_flag("MOLE_EXT_TEST_ENV_FLAG"));
  return finish("env_flag");
}
