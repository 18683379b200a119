// Forced in front of a CUDA translation unit (g++ -include) so that g++ can compile it for the
// CPU and the emulation can run the kernel one thread at a time: __global__ and
// __grid_constant__ disappear, the thread and block coordinates become variables the driver
// sets, and the device math the body uses (sqrt, isnan for float) comes from the C++ library,
// correctly rounded like CUDA's defaults. __half and __nv_bfloat16 are CUDA's own types: their
// host-side conversions round to nearest even, as the device ones do.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector_types.h>

#include "../../metal_emulation/threadgroups.h"

// (CUDA's host_defines.h, included above, spells them for nvcc.)
#undef __global__
#define __global__
#undef __grid_constant__
#define __grid_constant__

// A block's threads are fibers on one OS thread (threadgroups.h): each restores its own
// coordinates after a barrier. __shared__ variables are shared by the fibers of a block.
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
#undef __shared__
#define __shared__ static thread_local
inline void __syncthreads() {
  const uint3 thread = threadIdx, block = blockIdx;
  mlx_rmsprop_emulation::barrier();
  threadIdx = thread;
  blockIdx = block;
}

using std::isinf;
using std::isnan;
using std::sqrt;

inline unsigned int __float_as_uint(float x) {
  unsigned int bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline float __uint_as_float(unsigned int bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// CUDA's IEEE round-to-nearest intrinsics (device-only in CUDA's headers), which the kernel's
// arithmetic primitives are (source.py, PRIMITIVES). Each result passes through an empty asm
// the optimizer cannot see through: like the intrinsics on the GPU, they are never merged into
// a multiply-add, even by the fusing emulation (-ffp-contract=fast -mfma).
#define MLX_RMSPROP_ROUNDED(expression) \
  float r = (expression);               \
  __asm__("" : "+m"(r));                \
  return r
inline float __fmul_rn(float a, float b) { MLX_RMSPROP_ROUNDED(a * b); }
inline float __fadd_rn(float a, float b) { MLX_RMSPROP_ROUNDED(a + b); }
inline float __fsub_rn(float a, float b) { MLX_RMSPROP_ROUNDED(a - b); }
inline float __fdiv_rn(float a, float b) { MLX_RMSPROP_ROUNDED(a / b); }
inline float __fsqrt_rn(float x) { MLX_RMSPROP_ROUNDED(std::sqrt(x)); }
#undef MLX_RMSPROP_ROUNDED
