// Just enough of Metal, and of the utility headers MLX puts in front of every custom kernel,
// for g++ to compile the exact kernel text MLX generates and run it on the CPU, one call per
// thread. What this cannot catch is listed in the README ("How the kernel is verified").
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "threadgroups.h"

// Address spaces: plain memory on the CPU, except that a `threadgroup` variable is shared by
// the threads of a group: one per OS thread, which runs a whole group as fibers
// (threadgroups.h). Attributes ([[kernel]], [[buffer(i)]], [[thread_position_in_grid]],
// [[host_name(...)]]) are unknown to g++ and ignored (-Wno-attributes).
#define device
#define constant
#define threadgroup static thread_local

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

// half: IEEE binary16 with round-to-nearest-even conversions (GCC's _Float16), as Metal's.
typedef _Float16 half;
typedef half float16_t;

// bfloat16_t: MLX's Metal preamble defines it as Metal's native `bfloat` (unconditionally since
// MLX 0.29.4, which requires macOS 14 / Metal 3.1: mlx/backend/metal/kernels/bf16.h). It
// converts from float with round-to-nearest-even, which is spelled out here. Conversions are
// explicit so that a store that forgets its cast does not compile.
struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;
  explicit bfloat16_t(float value) {
    uint32_t word;
    std::memcpy(&word, &value, sizeof word);
    if ((word & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((word >> 16) | 0x0040u);  // NaN stays NaN (quiet), sign kept
    } else {
      // Add half an ulp of the result, minus one unless the kept part is odd: ties go to even.
      bits = uint16_t((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    uint32_t word = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &word, sizeof value);
    return value;
  }
};

// Metal's bit reinterpretation between same-sized types.
template <typename To, typename From>
inline To as_type(From value) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of one size");
  To result;
  std::memcpy(&result, &value, sizeof result);
  return result;
}

// Metal's threadgroup barrier: the group's fibers meet there (threadgroups.h).
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { mlx_rmsprop_emulation::barrier(); }

// metal:: math for float, with Metal's semantics where they differ from C++'s: max/min return
// the other operand when one is NaN (fmax/fmin), as Metal documents.
namespace metal {
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
using std::is_same;
inline float abs(float x) { return __builtin_fabsf(x); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
// The IEEE-rounded variants the kernel's arithmetic primitives name (source.py, PRIMITIVES).
// Each result passes through an empty asm that the optimizer cannot see through, so that
// even the fusing emulation (harness.py, FUSING_CXXFLAGS) rounds it on its own, as Metal must
// under `fp contract(off)`: the compiler cannot fuse what it cannot see.
namespace precise {
inline float sqrt(float x) {
  float r = __builtin_sqrtf(x);
  __asm__("" : "+m"(r));
  return r;
}
inline float divide(float a, float b) {
  float r = a / b;
  __asm__("" : "+m"(r));
  return r;
}
}  // namespace precise
}  // namespace metal

using namespace metal;
