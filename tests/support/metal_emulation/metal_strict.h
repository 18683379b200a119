// Enough of Metal's type system for clang to parse a generated Metal translation unit with the
// rules g++ and metal_shim.h cannot see (used by tests/paths/kernels/test_kernel_metal_strict.py, clang in
// C++14 mode with -fsyntax-only; nothing here is ever compiled to code):
//  - device / constant / threadgroup are real, distinct address spaces, so a pointer into one
//    cannot be initialised from a pointer into another: `const device S* x = v;` is an error
//    where MLX passes `v` in `constant` (inputs under 8 elements), as it is on Metal. Metal
//    also requires every pointer and reference to name its address space; clang has no such
//    rule, so the test walks clang's AST for it.
//  - half and bfloat16_t are scalar floating types, as Metal's `half` and `bfloat` are: MLX
//    defines `typedef bfloat bfloat16_t;` unconditionally since it requires macOS 14 (Metal
//    3.1), i.e. from MLX 0.29.4 on (mlx/backend/metal/kernels/bf16.h, commit 26ceb507e
//    "only build for macos 14 and up").
//  - only the Metal functions the body may call are declared, so a call to anything else
//    (a libc function, a double overload) fails to resolve.
// `#pragma METAL ...` (fp contract / math mode) is a pragma clang does not know: ignored,
// with -Wunknown-pragmas off, so the body may carry it.
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
// Metal's per-thread address space: the default for locals, may be spelled out.
#define thread

typedef __SIZE_TYPE__ size_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __INT32_TYPE__ int32_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __INT16_TYPE__ int16_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT8_TYPE__ uint8_t;
typedef unsigned int uint;
typedef unsigned int uint3 __attribute__((ext_vector_type(3)));

typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat;
typedef bfloat bfloat16_t;

namespace metal {
template <typename T, typename U>
struct is_same {
  static constexpr bool value = false;
};
template <typename T>
struct is_same<T, T> {
  static constexpr bool value = true;
};
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags flags);
float sqrt(float x);
float rsqrt(float x);
float abs(float x);
float max(float a, float b);
float min(float a, float b);
float fma(float a, float b, float c);
bool isnan(float x);
bool isinf(float x);
bool isfinite(float x);
namespace precise {
float sqrt(float x);
float rsqrt(float x);
float divide(float x, float y);
}  // namespace precise
namespace fast {
float sqrt(float x);
float rsqrt(float x);
float divide(float x, float y);
}  // namespace fast
}  // namespace metal

// Bit reinterpretation (Metal's as_type, for same-sized types).
template <typename To, typename From>
To as_type(From value);

// MLX's utility headers start with this.
using namespace metal;
