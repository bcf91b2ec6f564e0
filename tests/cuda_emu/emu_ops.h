// Shared by the op files of the emulated libraries (emu_support.cpp, emu_ops_*.cpp).
#pragma once

#include <c10/core/Allocator.h>

namespace emu {

// Scope of one emulated op: while it lives, every CPU allocation (scratch and outputs made inside
// the op) is NaN-filled and fenced by guard zones; check() raises an out-of-bounds write found in
// them (or a misaligned host access the alignment sanitizer reported).
class OpScope {
 public:
  OpScope();
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  static void check(const char* op);

 private:
  c10::Allocator* saved_;
};

}  // namespace emu

// TORCH_LIBRARY_FRAGMENT with the library name from the build (-DMOLE_EMU_LIBRARY=...).
#define MOLE_EMU_LIBRARY_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define MOLE_EMU_LIBRARY_FRAGMENT(m) MOLE_EMU_LIBRARY_FRAGMENT_(MOLE_EMU_LIBRARY, m)
