// Stand-in for MLX's CUDA device header (mlx/backend/cuda/device/utils.cuh), which MLX's CUDA
// backend includes in front of every custom kernel and which is not installed with the CPU
// build: only what a kernel's generated signature and our body use (the fp16/bf16 types and
// the Shape/Strides arrays, sized as MLX's MAX_NDIM).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>

namespace mlx::core::cu {

constexpr int MAX_NDIM = 10;
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;

}  // namespace mlx::core::cu
