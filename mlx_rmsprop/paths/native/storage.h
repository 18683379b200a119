// How results are stored, as mlx_rmsprop/storage.py defines it: 8-bit state (uint8 codes with
// one float32 scale per block) and stochastic rounding of float16/bfloat16 stores.
//
// Data layout: `codes` and every float32 span are row-contiguous runs of `n` elements of one
// chunk, which starts at a block boundary (update_range aligns its chunks and its threads' parts
// to whole blocks); `scales` points at the chunk's first block, one scale per `block_size`
// elements, the last block possibly shorter. Arithmetic is float32 IEEE, no contraction (the
// build sets -ffp-contract=off), so every value equals the reference's bit for bit.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "half_convert.h"
#include "spec.h"

namespace mlx_rmsprop {

#if defined(__GNUC__) || defined(__clang__)
#define MLX_RMSPROP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MLX_RMSPROP_ALWAYS_INLINE inline
#endif

// --- code search ---
// The code of a normalised value y is the number of the table's 255 midpoints strictly below
// y (NaN: 0), which storage.py finds by an 8-step binary search. Eight dependent loads per
// element made that search 9x slower than the table below (17 against 1.8 ns per element on
// the CI machine's x86 core) and the requantize the bulk of a step.
//
// Here y's top 13 bits (sign, exponent and 4 mantissa bits) name a bucket of 2^19 consecutive
// floats, and one 32-bit entry per bucket holds the number of midpoints below the bucket
// (`base`, bits 0-7) and the position of the midpoint inside it (bits 8-26; 2^19 - 1 when it
// holds none). A bucket spans at most log2(1 + 1/16) = 0.087 octaves while the midpoints of
// both codes lie 32/255 = 0.125 (unsigned) and 24/127 = 0.19 octaves (signed) apart, so a
// bucket holds at most one midpoint (the static_asserts check every bucket), and
// code = base + (position of y > position of the midpoint): exactly the search's count. A
// position is a float's low 19 bits in increasing-value order (complemented for negative
// floats, whose magnitude grows with their bits). One load per element, the rest integer
// operations that vectorise.
constexpr int kBucketShift = 19;
constexpr uint32_t kPositionMask = (uint32_t(1) << kBucketShift) - 1;
constexpr int kBuckets = 1 << (32 - kBucketShift);
constexpr int kCodes = 256;

struct CodeBuckets {
  uint32_t entry[kBuckets];
};

// The position of a float with these bits inside its bucket, in increasing-value order.
constexpr uint32_t bucket_position(uint32_t bits) {
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  return (bits & kPositionMask) ^ (negative & kPositionMask);
}

namespace detail {

// storage.py's binary search: the number of midpoints strictly below x (NaN: 0).
constexpr int midpoints_below(const float (&midpoints)[kCodes - 1], float x) {
  int code = 0;
  for (int half = kCodes / 2; half >= 1; half /= 2) {
    if (x > midpoints[code + half - 1]) {
      code += half;
    }
  }
  return code;
}

// The number of midpoints at or below x.
constexpr int midpoints_at_or_below(const float (&midpoints)[kCodes - 1], float x) {
  int code = 0;
  for (int half = kCodes / 2; half >= 1; half /= 2) {
    if (x >= midpoints[code + half - 1]) {
      code += half;
    }
  }
  return code;
}

// The smallest and largest value of bucket b, or false for a bucket of NaNs only.
constexpr bool bucket_range(int b, float& lowest, float& highest) {
  const uint32_t first = uint32_t(b) << kBucketShift;
  const uint32_t last = first | kPositionMask;
  const bool negative = (first >> 31) != 0;
  if (((first >> 23) & 0xFF) == 0xFF) {
    // Exponent 255: the bucket that starts at an infinity holds it, the rest are NaNs (which
    // `quantize` maps to code 0 before it looks at a bucket).
    if ((first & 0x7FFFFF) != 0) {
      return false;
    }
    const float infinity = std::numeric_limits<float>::infinity();
    lowest = highest = negative ? -infinity : infinity;
    return true;
  }
  const float a = std::bit_cast<float>(first), z = std::bit_cast<float>(last);
  lowest = negative ? z : a;
  highest = negative ? a : z;
  return true;
}

constexpr CodeBuckets make_code_buckets(const float (&midpoints)[kCodes - 1]) {
  CodeBuckets buckets{};
  for (int b = 0; b < kBuckets; ++b) {
    float lowest = 0, highest = 0;
    uint32_t base = 0, position = kPositionMask;
    if (bucket_range(b, lowest, highest)) {
      base = static_cast<uint32_t>(midpoints_below(midpoints, lowest));
      if (base < kCodes - 1 && midpoints[base] <= highest) {
        // The midpoint lies in this bucket. +0.0 is the signed code's middle midpoint: it
        // belongs to the bucket of +0 (bits 0), and -0.0 (which equals it) is below none.
        const uint32_t bits = std::bit_cast<uint32_t>(midpoints[base]);
        if ((bits >> kBucketShift) == uint32_t(b)) {
          position = bucket_position(bits);
        }
      }
    }
    buckets.entry[b] = base | (position << 8);
  }
  return buckets;
}

// Every bucket holds at most one midpoint, and that midpoint's bits lie in the bucket.
constexpr bool one_midpoint_per_bucket(const float (&midpoints)[kCodes - 1]) {
  for (int b = 0; b < kBuckets; ++b) {
    float lowest = 0, highest = 0;
    if (!bucket_range(b, lowest, highest)) {
      continue;
    }
    const int inside =
        midpoints_at_or_below(midpoints, highest) - midpoints_below(midpoints, lowest);
    if (inside > 1) {
      return false;
    }
  }
  return true;
}

constexpr uint32_t bucket_code(const CodeBuckets& buckets, uint32_t bits) {
  const uint32_t entry = buckets.entry[bits >> kBucketShift];
  return (entry & 0xFFu) + (bucket_position(bits) > (entry >> 8) ? 1u : 0u);
}

// The buckets give the binary search's code on each midpoint, its two neighbours either side
// and their negations, and on the first and last float of every bucket (NaNs excepted).
constexpr bool buckets_agree_with_search(const float (&midpoints)[kCodes - 1]) {
  const CodeBuckets buckets = make_code_buckets(midpoints);
  auto agrees = [&](uint32_t bits) {
    const float x = std::bit_cast<float>(bits);
    return x != x || bucket_code(buckets, bits) == uint32_t(midpoints_below(midpoints, x));
  };
  for (int c = 0; c < kCodes - 1; ++c) {
    const uint32_t bits = std::bit_cast<uint32_t>(midpoints[c]);
    for (uint32_t d = 0; d < 5; ++d) {
      const uint32_t near = bits + d - 2;
      if (!agrees(near) || !agrees(near ^ 0x80000000u)) {
        return false;
      }
    }
  }
  for (uint32_t b = 0; b < uint32_t(kBuckets); ++b) {
    if (!agrees(b << kBucketShift) || !agrees((b << kBucketShift) | kPositionMask)) {
      return false;
    }
  }
  return true;
}

} // namespace detail

static_assert(detail::one_midpoint_per_bucket(kUnsignedMidpoints), "unsigned code buckets");
static_assert(detail::one_midpoint_per_bucket(kSignedMidpoints), "signed code buckets");
static_assert(detail::buckets_agree_with_search(kUnsignedMidpoints), "unsigned code buckets");
static_assert(detail::buckets_agree_with_search(kSignedMidpoints), "signed code buckets");
inline constexpr CodeBuckets kUnsignedBuckets = detail::make_code_buckets(kUnsignedMidpoints);
inline constexpr CodeBuckets kSignedBuckets = detail::make_code_buckets(kSignedMidpoints);

// One quantized buffer's code table (`code_table(key)`) and its buckets.
struct Code {
  const float* table;
  const CodeBuckets* buckets;
};
inline constexpr Code kUnsigned{kUnsignedCode, &kUnsignedBuckets};
inline constexpr Code kSigned{kSignedCode, &kSignedBuckets};

// --- dequantize ---
// value = table[code] * scale[block]: one float32 multiply.
inline void dequantize(
    int64_t n,
    int64_t block_size,
    const Code& code,
    const uint8_t* __restrict codes,
    const float* __restrict scales,
    float* __restrict values) {
  const float* table = code.table;
  for (int64_t start = 0, block = 0; start < n; start += block_size, ++block) {
    const int64_t end = start + block_size < n ? start + block_size : n;
    const float scale = scales[block];
    for (int64_t i = start; i < end; ++i) {
      values[i] = table[codes[i]] * scale;
    }
  }
}

// --- quantize ---
// Per block: scale = NaN if any value is NaN, else max |x|; y = 0 if scale == 0 else x / scale;
// code = the number of midpoints below y. Overwrites `values` with y (a staging span that the
// caller no longer needs), so that the division runs as its own vectorised loop.
// Always inlined: rmsprop_update.cpp compiles it into a baseline and an AVX2 loop.
MLX_RMSPROP_ALWAYS_INLINE void quantize(
    int64_t n,
    int64_t block_size,
    const Code& code,
    float* __restrict values,
    uint8_t* __restrict codes,
    float* __restrict scales) {
  for (int64_t start = 0, block = 0; start < n; start += block_size, ++block) {
    const int64_t end = start + block_size < n ? start + block_size : n;
    // --- absmax ---
    // On the bits of |x|: non-negative floats order as their bit patterns, and every NaN's
    // pattern lies above infinity's, so one integer maximum finds both the absmax and a NaN.
    int32_t largest = 0;
    for (int64_t i = start; i < end; ++i) {
      const int32_t magnitude =
          static_cast<int32_t>(std::bit_cast<uint32_t>(values[i]) & 0x7FFFFFFFu);
      largest = magnitude > largest ? magnitude : largest;
    }
    const float scale = largest > 0x7F800000 ? std::numeric_limits<float>::quiet_NaN()
                                             : std::bit_cast<float>(largest);
    scales[block] = scale;
    const bool zero = scale == 0.0f;
    for (int64_t i = start; i < end; ++i) {
      values[i] = zero ? 0.0f : values[i] / scale;
    }
  }
  const uint32_t* entries = code.buckets->entry;
  for (int64_t i = 0; i < n; ++i) {
    const float y = values[i];
    const uint32_t bits = std::bit_cast<uint32_t>(y);
    const uint32_t entry = entries[bits >> kBucketShift];
    const uint32_t c = (entry & 0xFFu) + (bucket_position(bits) > (entry >> 8) ? 1u : 0u);
    codes[i] = static_cast<uint8_t>(y != y ? 0u : c);
  }
}

// --- stochastic rounding ---
// mlx_rmsprop.spec.mix32: Wellons' "lowbias32" integer hash, uint32 wrap-around.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix32Multiplier1;
  x ^= x >> 15;
  x *= kMix32Multiplier2;
  x ^= x >> 15;
  return x;
}

// The part of the hash shared by every element of output `output` (0: the parameter, k: the
// k-th entry of state_keys, from 1) of the parameter at position `index` in the step, under
// the step's key (the ROUNDING_KEY scalar): tensor_key + ROUNDING_OUTPUT_STRIDE * o.
inline uint32_t rounding_salt(uint32_t key, uint32_t index, uint32_t output) {
  const uint32_t tensor_key = mix32(key + kRoundingTensorStride * (index + 1u));
  return tensor_key + kRoundingOutputStride * output;
}

// A 16-bit float format: round-to-nearest-even conversion (MLX's bits) and widening.
struct HalfFormat {
  static uint16_t nearest(float x) {
    return half_bits_from_float(x);
  }
  static float widen(uint16_t bits) {
    return float_from_half_bits(bits);
  }
};
struct Bfloat16Format {
  static uint16_t nearest(float x) {
    return bfloat16_bits_from_float(x);
  }
  static float widen(uint16_t bits) {
    return float_from_bfloat16_bits(bits);
  }
};

// x rounded to `Format` with element j's random bits r = mix32(mix32(j) ^ salt): y = RNE(x)
// when x is NaN, y == x or y is infinite; otherwise lo and hi are x's neighbours in the format
// (y and the next value away from zero, or the next towards zero and y) and the result is hi
// when (r >> 8) * 2^-24 < (|x| - |lo|) / (|hi| - |lo|), else lo. Branch-free, so the store loop
// vectorises (the hash is uint32 multiplies and shifts).
template <typename Format>
MLX_RMSPROP_ALWAYS_INLINE uint16_t round_stochastically(float x, uint32_t salt, uint32_t j) {
  const uint32_t r = mix32(mix32(j) ^ salt);
  const uint16_t y = Format::nearest(x);
  const float y_value = Format::widen(y);
  const float magnitude = std::fabs(x);
  const bool towards_zero = std::fabs(y_value) < magnitude;
  const uint16_t lo = towards_zero ? y : uint16_t(y - 1u);
  const uint16_t hi = towards_zero ? uint16_t(y + 1u) : y;
  const float lo_magnitude = std::fabs(Format::widen(lo));
  const float frac = (magnitude - lo_magnitude) / (std::fabs(Format::widen(hi)) - lo_magnitude);
  const float u = static_cast<float>(r >> 8) * 0x1p-24f;
  const uint16_t drawn = u < frac ? hi : lo;
  const bool exact =
      x != x || y_value == x || std::fabs(y_value) == std::numeric_limits<float>::infinity();
  return exact ? y : drawn;
}

} // namespace mlx_rmsprop
