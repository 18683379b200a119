// MLX's astype between the floating dtypes, over spans of elements: loads widen into the compute
// type C (float or double), stores narrow from it to the nearest value. Shared by every native
// primitive, so that each converts exactly as the reference's astype does.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mlx/array.h"
#include "mlx/types/half_types.h"

#include "half_convert.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

template <typename T, typename C>
void load_span(const T* src, C* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<C>(src[i]);
  }
}

// The conversions of MLX's astype. Half types widen exactly, so the fast bit-pattern
// conversions serve both compute types.
template <typename C>
void load_as(const void* src, mx::Dtype dtype, int64_t start, int64_t n, C* dst) {
  switch (dtype.val()) {
    case mx::Dtype::Val::float16: {
      const auto* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = static_cast<C>(float_from_half_bits(s[i]));
      }
      break;
    }
    case mx::Dtype::Val::bfloat16: {
      const auto* s = static_cast<const uint16_t*>(src) + start;
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = static_cast<C>(float_from_bfloat16_bits(s[i]));
      }
      break;
    }
    case mx::Dtype::Val::float32:
      load_span(static_cast<const float*>(src) + start, dst, n);
      break;
    default:
      load_span(static_cast<const double*>(src) + start, dst, n);
      break;
  }
}

template <typename C, typename T>
void store_span(const C* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<T>(src[i]);
  }
}

// Narrowing from float uses the fast conversions (MLX's bits). From double, MLX's own types
// decide (on x86 they round to float first, then to the half type).
template <typename C>
void store_nearest(const C* src, void* dst, mx::Dtype dtype, int64_t start, int64_t n) {
  switch (dtype.val()) {
    case mx::Dtype::Val::float16:
      if constexpr (std::is_same_v<C, float>) {
        auto* d = static_cast<uint16_t*>(dst) + start;
        for (int64_t i = 0; i < n; ++i) {
          d[i] = half_bits_from_float(src[i]);
        }
      } else {
        store_span(src, static_cast<mx::float16_t*>(dst) + start, n);
      }
      break;
    case mx::Dtype::Val::bfloat16:
      if constexpr (std::is_same_v<C, float>) {
        auto* d = static_cast<uint16_t*>(dst) + start;
        for (int64_t i = 0; i < n; ++i) {
          d[i] = bfloat16_bits_from_float(src[i]);
        }
      } else {
        store_span(src, static_cast<mx::bfloat16_t*>(dst) + start, n);
      }
      break;
    case mx::Dtype::Val::float32:
      store_span(src, static_cast<float*>(dst) + start, n);
      break;
    default:
      store_span(src, static_cast<double*>(dst) + start, n);
      break;
  }
}

} // namespace mlx_rmsprop
