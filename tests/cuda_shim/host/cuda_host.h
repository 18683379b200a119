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
#include <vector_types.h>

// (CUDA's host_defines.h, included above, spells them for nvcc.)
#undef __global__
#define __global__
#undef __grid_constant__
#define __grid_constant__

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

using std::isnan;
using std::sqrt;
