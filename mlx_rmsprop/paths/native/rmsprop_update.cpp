// The RMSpropUpdate primitive and the group of them: argument checks, output memory (in place
// when donated), and the task that walks the elements in cache-sized chunks across the worker
// threads.
#include "rmsprop_update.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"
#include "mlx/utils.h"

#include "dtype_spans.h"
#include "half_convert.h"
#include "input_hold.h"
#include "storage.h"
#include "update_kernel.h"
#include "worker_pool.h"

namespace mlx_rmsprop {

namespace {

constexpr int kMaxBuffers = 5; // parameter, v, grad_avg, momentum_buffer, ema

// Elements per chunk: every staged span of a chunk (a gradient and up to five inputs and five
// outputs, in double) stays within a 48 KiB L1 data cache. With 8-bit state a chunk is whole
// quantization blocks: kChunk elements, or one block when blocks are larger (float32 only, so
// the spans of a 1024-element chunk take as much cache as 512 doubles).
constexpr int64_t kChunk = 512;
constexpr int64_t kMaxBlockSize = 1024;
constexpr int64_t kMaxChunk = kChunk > kMaxBlockSize ? kChunk : kMaxBlockSize;

// Elements per part of a threaded update: large enough that claiming a part (one atomic
// increment) is noise, small enough to balance two cores when one is shared; a multiple of 64
// elements, so no two threads write into the same cache line.
constexpr int64_t kPartElements = int64_t(1) << 15;
static_assert(kParallelThreshold >= 2 * kPartElements, "a threaded update has several parts");
static_assert(kPartElements % kMaxBlockSize == 0, "a part is whole quantization blocks");
static_assert(kChunk % 32 == 0, "a chunk is whole blocks of every smaller block size");

bool is_floating(mx::Dtype dtype) {
  return dtype == mx::float16 || dtype == mx::bfloat16 || dtype == mx::float32 ||
      dtype == mx::float64;
}

std::string describe(const mx::array& a) {
  std::ostringstream out;
  out << "shape (";
  for (size_t i = 0; i < a.shape().size(); ++i) {
    out << (i ? ", " : "") << a.shape()[i];
  }
  out << (a.shape().size() == 1 ? ",)" : ")") << " and dtype " << a.dtype();
  return out.str();
}

void require(bool ok, const std::string& message) {
  if (!ok) {
    throw std::invalid_argument("[rmsprop_update] " + message);
  }
}

// One parameter-shaped array that the update reads and rewrites: the parameter or a state
// buffer. A quantized buffer holds uint8 codes, with its float32 scales beside them.
struct Buffer {
  const void* in = nullptr;
  void* out = nullptr;
  mx::Dtype dtype = mx::float32;
  // Its output's number in the stochastic-rounding hash (its position in the outputs).
  uint32_t output = 0;
  const Code* code = nullptr; // the code table of a quantized buffer, else null
  const float* scales_in = nullptr;
  float* scales_out = nullptr;
};

// Everything the task needs, captured by value when the task is scheduled.
struct Plan {
  uint32_t flags = 0;
  int64_t size = 0;
  int64_t block_size = 0; // 8-bit state: elements per scale; 0 without
  int64_t chunk = kChunk; // elements per chunk, whole blocks
  uint32_t index = 0; // the parameter's position in the step (stochastic rounding)
  mx::Dtype compute = mx::float32;
  const void* scalars = nullptr;
  int64_t scalar_stride = 1;
  // The clip factors' row (CLIP_MULTIPLIER, CLIP_DIVISOR), or nullptr.
  const void* factors = nullptr;
  bool factors_double = false;
  int64_t factor_offset[2] = {0, 0};
  const void* gradient = nullptr;
  mx::Dtype gradient_dtype = mx::float32;
  int buffers = 0;
  Buffer buffer[kMaxBuffers];
  int grad_avg = -1; // index in `buffer`, or -1 when the option is off
  int momentum = -1;
  int ema = -1;
  // Gradient accumulation (accumulation.h), when accumulation.on(); the gates are read when
  // the task runs.
  Accumulation accumulation;
  bool accumulation_applies = false;
  bool accumulation_skip = false;
  const void* accumulator = nullptr;
  void* accumulator_out = nullptr;
  mx::Dtype accumulator_dtype = mx::float32;
};

template <typename Format>
void store_rounded(const float* src, uint16_t* dst, uint32_t salt, int64_t start, int64_t n) {
  MLX_RMSPROP_ELEMENTWISE
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = round_stochastically<Format>(src[i], salt, static_cast<uint32_t>(start + i));
  }
}

void quantize_baseline(
    int64_t n,
    int64_t block_size,
    const Code& code,
    float* values,
    uint8_t* codes,
    float* scales) {
  quantize(n, block_size, code, values, codes, scales);
}

// --- instruction set ---
// x86-64 builds target the baseline instruction set (SSE2; no -march=native: the module may run
// on another machine). The storage loops need what SSE2 lacks: gathers for the code buckets,
// 32-bit multiplies for the rounding hash, and they divide 8 lanes at a time with AVX, so they
// are compiled a second time for AVX2 and picked once per process. Same IEEE operations and no
// FMA (the AVX2 target does not include it): the same bits. Measured on the CI machine's x86
// core (AMD EPYC), per element of a 512-element chunk: quantize 2.2 ns baseline, 0.75 ns AVX2.
// MLX_RMSPROP_NATIVE_AVX2=0 keeps the baseline loops (the tests run both).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MLX_RMSPROP_AVX2_LOOPS 1

__attribute__((target("avx2"))) void quantize_avx2(
    int64_t n,
    int64_t block_size,
    const Code& code,
    float* values,
    uint8_t* codes,
    float* scales) {
  quantize(n, block_size, code, values, codes, scales);
}

// The update itself, for 8-bit state: with the requantize at AVX2 speed the update's own loop
// (division, square root) became a third of a chunk's time. `flatten` inlines update_core into
// the AVX2 wrapper. Per element of a 512-element chunk, float32 v, the whole 8-bit chunk:
// 1.88 ns with the baseline update loop, 1.54 ns with this one (CI machine, in cache).
template <
    typename C,
    bool kCenteredT,
    Momentum kMomentumT,
    bool kNesterovT,
    bool kEpsInSqrtT,
    bool kBiasCorrectionT,
    bool kDecoupledT>
__attribute__((target("avx2"), flatten)) void update_core_avx2(
    int64_t n,
    const StepScalars<C>& s,
    const C* g,
    const C* p,
    C* p_out,
    const C* v,
    C* v_out,
    const C* grad_avg,
    C* grad_avg_out,
    const C* buf,
    C* buf_out) {
  update_core<C, kCenteredT, kMomentumT, kNesterovT, kEpsInSqrtT, kBiasCorrectionT, kDecoupledT>(
      n, s, g, p, p_out, v, v_out, grad_avg, grad_avg_out, buf, buf_out);
}

struct UpdateCoreAvx2 {
  template <
      typename C,
      bool kCenteredT,
      Momentum kMomentumT,
      bool kNesterovT,
      bool kEpsInSqrtT,
      bool kBiasCorrectionT,
      bool kDecoupledT>
  static constexpr CoreFn<C> instance = &update_core_avx2<
      C,
      kCenteredT,
      kMomentumT,
      kNesterovT,
      kEpsInSqrtT,
      kBiasCorrectionT,
      kDecoupledT>;
};

template <typename Format>
__attribute__((target("avx2"))) void
store_rounded_avx2(const float* src, uint16_t* dst, uint32_t salt, int64_t start, int64_t n) {
  MLX_RMSPROP_ELEMENTWISE
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = round_stochastically<Format>(src[i], salt, static_cast<uint32_t>(start + i));
  }
}
#endif

using QuantizeLoop = void (*)(int64_t, int64_t, const Code&, float*, uint8_t*, float*);
using RoundLoop = void (*)(const float*, uint16_t*, uint32_t, int64_t, int64_t);
using CoreSelector = CoreFn<float> (*)(uint32_t);

struct StorageLoops {
  const char* name = "baseline";
  QuantizeLoop quantize = &quantize_baseline;
  RoundLoop round_half = &store_rounded<HalfFormat>;
  RoundLoop round_bfloat16 = &store_rounded<Bfloat16Format>;
  // The update loop of an 8-bit-state step.
  CoreSelector quantized_core = &select_core<float>;
};

const StorageLoops& storage_loops() {
  static const StorageLoops loops = [] {
    StorageLoops chosen;
#if MLX_RMSPROP_AVX2_LOOPS
    const char* setting = std::getenv("MLX_RMSPROP_NATIVE_AVX2");
    const bool allowed = setting == nullptr || std::string(setting) != "0";
    if (allowed && __builtin_cpu_supports("avx2")) {
      chosen.name = "avx2";
      chosen.quantize = &quantize_avx2;
      chosen.round_half = &store_rounded_avx2<HalfFormat>;
      chosen.round_bfloat16 = &store_rounded_avx2<Bfloat16Format>;
      chosen.quantized_core = &select_core<float, UpdateCoreAvx2>;
    }
#endif
    return chosen;
  }();
  return loops;
}

// To nearest (store_nearest), or for float16/bfloat16 from float stochastically with the
// output's hash salt when `salt` is given.
template <typename C>
void store_as(
    const C* src,
    void* dst,
    mx::Dtype dtype,
    int64_t start,
    int64_t n,
    const uint32_t* salt) {
  if constexpr (std::is_same_v<C, float>) {
    if (salt != nullptr && dtype == mx::float16) {
      storage_loops().round_half(src, static_cast<uint16_t*>(dst) + start, *salt, start, n);
      return;
    }
    if (salt != nullptr && dtype == mx::bfloat16) {
      storage_loops().round_bfloat16(src, static_cast<uint16_t*>(dst) + start, *salt, start, n);
      return;
    }
  }
  store_nearest(src, dst, dtype, start, n);
}

constexpr uint32_t kGradientPipeline =
    Flag::kMaximize | Flag::kScaleGradient | Flag::kClipValue | Flag::kCoupledDecay;

// The hash salt of each buffer's float16/bfloat16 stores with stochastic rounding; `on` is
// false for round-to-nearest.
struct Rounding {
  bool on = false;
  uint32_t salt[kMaxBuffers] = {};
};

// Updates elements [begin, end). Buffers already in the compute type are read and written
// where they lie; the others go through per-chunk staging spans in the compute type (8-bit
// buffers: dequantized into them, requantized from them, a chunk being whole blocks).
template <typename C>
void update_range(
    const Plan& plan,
    const StepScalars<C>& s,
    const Rounding& rounding,
    bool apply,
    CoreFn<C> core,
    int64_t begin,
    int64_t end) {
  alignas(64) C gradient_stage[kMaxChunk];
  // Accumulation's staged gradient and accumulator, when not in the compute type.
  alignas(64) C accumulation_stage[2][kMaxChunk];
  alignas(64) C in_stage[kMaxBuffers][kMaxChunk];
  alignas(64) C out_stage[kMaxBuffers][kMaxChunk];
  const mx::Dtype compute = plan.compute;
  const bool accumulating = plan.accumulation.on();
  const bool gradient_direct =
      plan.gradient_dtype == compute && !(plan.flags & kGradientPipeline) && !accumulating;
  const int64_t block_size = plan.block_size;

  for (int64_t start = begin; start < end; start += plan.chunk) {
    const int64_t n = std::min(plan.chunk, end - start);
    const C* in[kMaxBuffers] = {};
    C* out[kMaxBuffers] = {};
    // Every buffer is read here (the reference's `read`): 8-bit ones dequantized, block by
    // block, into the staging spans; a closed gate never looks at their values.
    for (int k = 0; k < plan.buffers; ++k) {
      const Buffer& b = plan.buffer[k];
      if constexpr (std::is_same_v<C, float>) {
        if (b.code != nullptr) {
          if (apply) {
            dequantize(
                n,
                block_size,
                *b.code,
                static_cast<const uint8_t*>(b.in) + start,
                b.scales_in + start / block_size,
                in_stage[k]);
          }
          in[k] = in_stage[k];
          out[k] = out_stage[k];
          continue;
        }
      }
      if (b.dtype == compute) {
        in[k] = static_cast<const C*>(b.in) + start;
        out[k] = static_cast<C*>(b.out) + start;
      } else {
        load_as(b.in, b.dtype, start, n, in_stage[k]);
        in[k] = in_stage[k];
        out[k] = out_stage[k];
      }
    }
    if (accumulating) {
      // Every call accumulates, whether or not the update applies. Float buffers in the
      // compute type are read and written where they lie (the accumulator in place when MLX
      // donated it); the mean is computed only when the update reads it.
      const C* raw = plan.gradient_dtype == compute
          ? static_cast<const C*>(plan.gradient) + start
          : (load_as(plan.gradient, plan.gradient_dtype, start, n, accumulation_stage[0]),
             accumulation_stage[0]);
      const bool accumulator_direct = plan.accumulator_dtype == compute;
      const C* accumulator = accumulator_direct
          ? static_cast<const C*>(plan.accumulator) + start
          : (load_as(plan.accumulator, plan.accumulator_dtype, start, n, accumulation_stage[1]),
             accumulation_stage[1]);
      C* accumulator_out = accumulator_direct
          ? static_cast<C*>(plan.accumulator_out) + start
          : accumulation_stage[1];
      accumulate_chunk(
          n,
          plan.accumulation,
          plan.accumulation_applies,
          plan.accumulation_skip,
          raw,
          accumulator,
          apply ? gradient_stage : nullptr,
          accumulator_out);
      if (!accumulator_direct) {
        store_nearest(accumulator_out, plan.accumulator_out, plan.accumulator_dtype, start, n);
      }
    }
    const int a = plan.grad_avg, m = plan.momentum;
    if (apply) {
      const C* g;
      if (gradient_direct) {
        g = static_cast<const C*>(plan.gradient) + start;
      } else {
        if (!accumulating) {
          load_as(plan.gradient, plan.gradient_dtype, start, n, gradient_stage);
        }
        prepare_gradient(n, plan.flags, s, gradient_stage, in[0]);
        g = gradient_stage;
      }
      core(
          n,
          s,
          g,
          in[0],
          out[0],
          in[1],
          out[1],
          a < 0 ? nullptr : in[a],
          a < 0 ? nullptr : out[a],
          m < 0 ? nullptr : in[m],
          m < 0 ? nullptr : out[m]);
    } else {
      // --- gate ---
      // The update gate is 0: the parameter and every buffer but the EMA keep their values;
      // 8-bit buffers keep their codes and scales as they are.
      for (int k = 0; k < plan.buffers; ++k) {
        const Buffer& b = plan.buffer[k];
        if (b.code != nullptr) {
          const auto* codes = static_cast<const uint8_t*>(b.in) + start;
          if (b.out != b.in) {
            std::copy(codes, codes + n, static_cast<uint8_t*>(b.out) + start);
          }
          if (b.scales_out != b.scales_in) {
            const float* scales = b.scales_in + start / block_size;
            std::copy(
                scales,
                scales + (n + block_size - 1) / block_size,
                b.scales_out + start / block_size);
          }
        } else if (k != plan.ema && out[k] != in[k]) {
          std::copy(in[k], in[k] + n, out[k]);
        }
      }
    }
    if (plan.ema >= 0) {
      update_ema(n, s, out[0], in[plan.ema], out[plan.ema]);
    }
    // --- store ---
    // 8-bit buffers requantized (with the gate closed they were copied above); float16/bfloat16
    // results rounded stochastically when `rounding.on`, else to nearest even.
    for (int k = 0; k < plan.buffers; ++k) {
      const Buffer& b = plan.buffer[k];
      if constexpr (std::is_same_v<C, float>) {
        if (b.code != nullptr) {
          if (apply) {
            storage_loops().quantize(
                n,
                block_size,
                *b.code,
                out[k],
                static_cast<uint8_t*>(b.out) + start,
                b.scales_out + start / block_size);
          }
          continue;
        }
      }
      if (b.dtype != compute) {
        store_as(out[k], b.out, b.dtype, start, n, rounding.on ? &rounding.salt[k] : nullptr);
      }
    }
  }
}

// One plan ready to run: its update of elements [begin, end), and its size.
struct PlanRun {
  int64_t size = 0;
  std::function<void(int64_t, int64_t)> range;
};

template <typename C>
PlanRun prepare_run(const Plan& plan) {
  StepScalars<C> s;
  const C* scalars = static_cast<const C*>(plan.scalars);
  for (int i = 0; i < kNumScalars; ++i) {
    s.value[i] = scalars[i * plan.scalar_stride];
  }
  if (plan.factors != nullptr) {
    // Factors computed in float32 are exact in float64: the cast to C is exact.
    for (int j = 0; j < 2; ++j) {
      const int64_t at = plan.factor_offset[j];
      s.value[j == 0 ? kClipMultiplier : kClipDivisor] = plan.factors_double
          ? static_cast<C>(static_cast<const double*>(plan.factors)[at])
          : static_cast<C>(static_cast<const float*>(plan.factors)[at]);
    }
  }
  const bool apply = !(plan.flags & Flag::kGated) || !(s[kUpdateGate] == C(0));
  CoreFn<C> core = select_core<C>(plan.flags);
  if constexpr (std::is_same_v<C, float>) {
    if (plan.flags & Flag::kQuantizedState) {
      core = storage_loops().quantized_core(plan.flags);
    }
  }
  // Stochastic rounding with float32 arithmetic; float64 arithmetic rounds to nearest.
  Rounding rounding;
  if (std::is_same_v<C, float> && (plan.flags & Flag::kStochasticRounding)) {
    rounding.on = true;
    // An integer below 2^24 (exact); anything else is not a key the optimizer makes, and is
    // read as 0 rather than converted with undefined behaviour.
    const C key_value = s[kRoundingKey];
    const uint32_t key = key_value >= C(0) && key_value < C(16777216)
        ? static_cast<uint32_t>(key_value)
        : 0u;
    for (int k = 0; k < plan.buffers; ++k) {
      rounding.salt[k] = rounding_salt(key, plan.index, plan.buffer[k].output);
    }
  }
  return PlanRun{plan.size, [&plan, s, rounding, apply, core](int64_t begin, int64_t end) {
                   update_range(plan, s, rounding, apply, core, begin, end);
                 }};
}

// Runs every plan of a node. Below kParallelThreshold elements in all, one thread runs them
// in turn. Otherwise each plan is cut into fixed-size parts, and the parts of all plans are
// claimed one at a time across the workers: a thread whose core is busy with other work takes
// fewer parts instead of holding up the step with a half of it, and a node of many small
// parameters waits for the workers once, not once per parameter.
void run_plans(const std::vector<Plan>& plans) {
  std::vector<PlanRun> runs;
  runs.reserve(plans.size());
  int64_t total = 0;
  for (const Plan& plan : plans) {
    runs.push_back(plan.compute == mx::float64 ? prepare_run<double>(plan)
                                               : prepare_run<float>(plan));
    total += plan.size;
  }
  if (total < kParallelThreshold) {
    for (const PlanRun& run : runs) {
      run.range(0, run.size);
    }
    return;
  }
  // first_part[m]: the number of the first part of plan m; the last entry counts them all.
  std::vector<int64_t> first_part(runs.size() + 1, 0);
  for (size_t m = 0; m < runs.size(); ++m) {
    first_part[m + 1] = first_part[m] + (runs[m].size + kPartElements - 1) / kPartElements;
  }
  WorkerPool::instance().run(static_cast<int>(first_part.back()), [&](int part) {
    const size_t m = static_cast<size_t>(
        std::upper_bound(first_part.begin(), first_part.end(), int64_t(part)) -
        first_part.begin() - 1);
    const int64_t begin = (part - first_part[m]) * kPartElements;
    runs[m].range(begin, std::min(runs[m].size, begin + kPartElements));
  });
}

// Copies a strided array into row-major order (element size only matters, not the dtype).
template <typename Word>
void gather_words(const mx::array& src, mx::array& dst) {
  const Word* from = src.data<Word>();
  Word* to = dst.data<Word>();
  const auto& shape = src.shape();
  const auto& strides = src.strides();
  const int ndim = static_cast<int>(shape.size());
  if (src.size() == 0) {
    return;
  }
  if (ndim == 0) {
    to[0] = from[0];
    return;
  }
  const int64_t inner = shape[ndim - 1];
  const int64_t inner_stride = strides[ndim - 1];
  std::vector<int64_t> index(ndim, 0);
  int64_t offset = 0;
  for (int64_t done = 0; done < static_cast<int64_t>(src.size()); done += inner) {
    for (int64_t j = 0; j < inner; ++j) {
      *to++ = from[offset + j * inner_stride];
    }
    for (int d = ndim - 2; d >= 0; --d) {
      offset += strides[d];
      if (++index[d] < shape[d]) {
        break;
      }
      offset -= strides[d] * shape[d];
      index[d] = 0;
    }
  }
}

void gather(const mx::array& src, mx::array& dst) {
  switch (src.itemsize()) {
    case 1:
      gather_words<uint8_t>(src, dst);
      break;
    case 2:
      gather_words<uint16_t>(src, dst);
      break;
    case 4:
      gather_words<uint32_t>(src, dst);
      break;
    default:
      gather_words<uint64_t>(src, dst);
      break;
  }
}

// One entry of UpdateOptions.state_keys: a buffer, or the scales of the 8-bit buffer before it.
enum class Role { kV, kGradAvg, kMomentum, kEma };
struct StateEntry {
  std::string key;
  Role role;
  bool scales;
};

// The state arrays `flags` asks for, in UpdateOptions.state_keys order: v, grad_avg
// (centered), momentum_buffer (momentum), each followed by its scales with quantized_state,
// then ema (EMA; never quantized).
std::vector<StateEntry> state_layout(uint32_t flags) {
  const bool quantized = flags & Flag::kQuantizedState;
  std::vector<StateEntry> layout;
  auto add = [&](const char* key, Role role) {
    layout.push_back({key, role, false});
    if (quantized && role != Role::kEma) {
      layout.push_back({std::string(key) + "_scale", role, true});
    }
  };
  add("v", Role::kV);
  if (flags & Flag::kCentered) {
    add("grad_avg", Role::kGradAvg);
  }
  if (flags & Flag::kMomentum) {
    add("momentum_buffer", Role::kMomentum);
  }
  if (flags & Flag::kEma) {
    add("ema", Role::kEma);
  }
  return layout;
}

// The number of quantization blocks of an n-element buffer (the last possibly shorter).
int64_t block_count(int64_t n, int64_t block_size) {
  return (n + block_size - 1) / block_size;
}

} // namespace

int state_buffer_count(uint32_t flags) {
  return static_cast<int>(state_layout(flags).size());
}

bool stochastic_stores(uint32_t flags, const std::vector<mx::array>& inputs) {
  if (!(flags & Flag::kStochasticRounding) || inputs[0].dtype() != mx::float32) {
    return false;
  }
  return std::any_of(inputs.begin() + 2, inputs.end(), [](const mx::array& a) {
    return a.dtype() == mx::float16 || a.dtype() == mx::bfloat16;
  });
}

int worker_threads() {
  return WorkerPool::instance().threads();
}

const char* storage_loops_name() {
  return storage_loops().name;
}

UpdateNode update_node(
    const mx::array& scalars,
    const mx::array& gradient,
    const mx::array& parameter,
    const std::vector<mx::array>& state,
    uint32_t flags,
    int block_size,
    int64_t index,
    const std::optional<mx::array>& factors,
    const Accumulation& accumulation,
    const std::optional<mx::array>& accumulator,
    const std::optional<mx::array>& accumulation_gates) {
  require(
      (flags & ~uint32_t(Flag::kAll)) == 0,
      "flags has unknown bits: " + std::to_string(flags & ~uint32_t(Flag::kAll)));
  // The spec's invariants (mlx_rmsprop/spec.py), with its messages.
#define RMSPROP_X(flag, needed, message) \
  require(!(flags & Flag::flag) || (flags & Flag::needed), std::string("flags: ") + message);
  RMSPROP_REQUIREMENTS(RMSPROP_X)
#undef RMSPROP_X
#define RMSPROP_X(first, second, message) \
  require(!((flags & Flag::first) && (flags & Flag::second)), std::string("flags: ") + message);
  RMSPROP_EXCLUSIONS(RMSPROP_X)
#undef RMSPROP_X
  require(
      scalars.ndim() == 1 && scalars.size() == kNumScalars &&
          (scalars.dtype() == mx::float32 || scalars.dtype() == mx::float64),
      "scalars must be a float32 or float64 vector of " + std::to_string(kNumScalars) +
          " entries, got " + describe(scalars));
  const bool quantized = flags & Flag::kQuantizedState;
  if (quantized) {
    // UpdateOptions.block_size (spec.BLOCK_SIZES): up to kMaxBlockSize, the staging chunk.
    require(
        block_size >= 32 && block_size <= kMaxBlockSize && (block_size & (block_size - 1)) == 0,
        "block_size must be a power of two from 32 to " + std::to_string(kMaxBlockSize) +
            " with quantized_state, got " + std::to_string(block_size));
    require(
        scalars.dtype() == mx::float32,
        "quantized_state needs float32 arithmetic (float32 scalars), got " + describe(scalars));
  } else {
    require(
        block_size == 0,
        "block_size must be 0 without quantized_state, got " + std::to_string(block_size));
  }
  require(
      index >= 0 && index <= int64_t(UINT32_MAX),
      "index must be from 0 to " + std::to_string(UINT32_MAX) + ", got " +
          std::to_string(index));
  require(
      is_floating(parameter.dtype()),
      "parameter must be float16, bfloat16, float32 or float64, got " + describe(parameter));
  require(
      gradient.shape() == parameter.shape() && is_floating(gradient.dtype()),
      "gradient must be a floating array shaped like the parameter (" + describe(parameter) +
          "), got " + describe(gradient));
  const std::vector<StateEntry> layout = state_layout(flags);
  require(
      state.size() == layout.size(),
      "state must hold " + std::to_string(layout.size()) + " buffers for these flags, got " +
          std::to_string(state.size()));
  for (size_t k = 0; k < state.size(); ++k) {
    const StateEntry& entry = layout[k];
    const std::string what = "state[" + std::to_string(k) + "] (" + entry.key + ") must be ";
    if (entry.scales) {
      const int64_t blocks = block_count(static_cast<int64_t>(parameter.size()), block_size);
      require(
          state[k].shape() == mx::Shape{static_cast<int>(blocks)} &&
              state[k].dtype() == mx::float32,
          what + "a float32 vector of " + std::to_string(blocks) +
              " scales (one per block of " + std::to_string(block_size) +
              " elements of the parameter), got " + describe(state[k]));
    } else if (quantized && entry.role != Role::kEma) {
      require(
          state[k].shape() == parameter.shape() && state[k].dtype() == mx::uint8,
          what + "uint8 codes shaped like the parameter (" + describe(parameter) + "), got " +
              describe(state[k]));
    } else {
      require(
          state[k].shape() == parameter.shape() && is_floating(state[k].dtype()),
          what + "a floating array shaped like the parameter (" + describe(parameter) +
              "), got " + describe(state[k]));
    }
  }

  if (factors) {
    require(
        factors->ndim() == 2 && factors->shape(1) == 2 &&
            (factors->dtype() == mx::float32 || factors->dtype() == mx::float64),
        "factors must be a float32 or float64 matrix of shape (parameters, 2), got " +
            describe(*factors));
    require(
        index >= 0 && index < factors->shape(0),
        "index must be a row of factors (0 to " + std::to_string(factors->shape(0) - 1) +
            "), got " + std::to_string(index));
  }

  require(
      accumulation.steps == 0 || accumulation.steps >= 2,
      "accumulation_steps must be 0 (off) or at least 2, got " +
          std::to_string(accumulation.steps));
  require(
      std::isfinite(accumulation.loss_scale) && accumulation.loss_scale >= 0.0,
      "loss_scale must be finite and >= 0 (0: none), got " +
          std::to_string(accumulation.loss_scale));
  require(
      accumulation.on() == accumulator.has_value() &&
          accumulation.on() == accumulation_gates.has_value(),
      "accumulator and accumulation_gates must be given exactly when accumulation_steps > 0");
  if (accumulation.on()) {
    require(
        accumulator->shape() == parameter.shape() && is_floating(accumulator->dtype()),
        "accumulator must be a floating array shaped like the parameter (" +
            describe(parameter) + "), got " + describe(*accumulator));
    require(
        accumulation_gates->ndim() == 1 &&
            accumulation_gates->size() == kNumAccumulationGates &&
            accumulation_gates->dtype() == mx::float32,
        "accumulation_gates must be a float32 vector of 2 entries (applies, skip), got " +
            describe(*accumulation_gates));
  }

  std::vector<mx::array> inputs = {scalars, gradient, parameter};
  std::vector<mx::Shape> shapes = {parameter.shape()};
  std::vector<mx::Dtype> dtypes = {parameter.dtype()};
  for (const auto& buffer : state) {
    inputs.push_back(buffer);
    shapes.push_back(buffer.shape());
    dtypes.push_back(buffer.dtype());
  }
  if (factors) {
    inputs.push_back(*factors);
  }
  if (accumulation.on()) {
    inputs.push_back(*accumulator);
    inputs.push_back(*accumulation_gates);
    shapes.push_back(accumulator->shape());
    dtypes.push_back(accumulator->dtype());
  }
  return UpdateNode{
      std::move(inputs),
      std::move(shapes),
      std::move(dtypes),
      std::make_shared<RMSpropUpdate>(
          mx::to_stream(mx::Device::cpu),
          flags,
          block_size,
          static_cast<uint32_t>(index),
          factors.has_value(),
          accumulation)};
}

std::vector<mx::array> rmsprop_update(UpdateNode node) {
  return mx::array::make_arrays(
      std::move(node.shapes), node.dtypes, std::move(node.update), node.inputs);
}

std::vector<mx::array> rmsprop_update_group(std::vector<UpdateNode> members) {
  require(!members.empty(), "a group needs at least one update");
  if (members.size() == 1) {
    return rmsprop_update(std::move(members.front()));
  }
  // The node lays its members out last first. MLX's vjp adds the cotangents of an input that
  // several members share (the scalars vector) in the order of the node's inputs; laid out
  // last first, they add up in the order that a node per parameter gives (the graph walked
  // backwards), which is the order of the reference's ops: gradients through a step, of the
  // learning rate say, stay bit-identical to fused=False.
  std::vector<mx::array> inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  std::vector<RMSpropUpdateGroup::Member> parts;
  parts.reserve(members.size());
  for (auto node = members.rbegin(); node != members.rend(); ++node) {
    parts.push_back({node->update, node->inputs.size(), node->shapes.size()});
    inputs.insert(inputs.end(), node->inputs.begin(), node->inputs.end());
    shapes.insert(shapes.end(), node->shapes.begin(), node->shapes.end());
    dtypes.insert(dtypes.end(), node->dtypes.begin(), node->dtypes.end());
  }
  std::vector<mx::array> laid_out = mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<RMSpropUpdateGroup>(mx::to_stream(mx::Device::cpu), std::move(parts)),
      inputs);
  // Back in the members' order.
  std::vector<mx::array> outputs;
  outputs.reserve(laid_out.size());
  size_t end = laid_out.size();
  for (const UpdateNode& node : members) {
    const size_t begin = end - node.shapes.size();
    outputs.insert(outputs.end(), laid_out.begin() + begin, laid_out.begin() + end);
    end = begin;
  }
  return outputs;
}

namespace {

// What one node's task runs: the strided inputs' gathers, then the plan of each parameter.
struct UpdateTask {
  std::vector<std::pair<mx::array, mx::array>> gathers;
  std::vector<Plan> plans;
  // The accumulation gates of each plan, read when the task runs (none without accumulation).
  std::vector<std::optional<mx::array>> gates;
};

// Returns whether the node is being traced. Otherwise it drops every output's copy of the
// input list but the one `inputs` is: array::make_arrays gives every output its own copy, so
// each input is referenced once per output and array::is_donatable() never holds for a
// multi-output node. MLX drops those copies right after eval_cpu (array::detach); dropping the
// other outputs' copies first lets an input nobody else holds be donated, as for a
// single-output op. Tracers keep their graph (MLX also keeps their inputs from being donated).
bool release_input_copies(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const bool tracing = std::any_of(
      outputs.begin(), outputs.end(), [](const mx::array& out) { return out.is_tracer(); });
  if (!tracing) {
    for (auto& out : outputs) {
      if (&out.inputs() != &inputs) {
        out.inputs().clear();
      }
    }
  }
  return tracing;
}

// Gives one parameter's outputs their memory and adds its plan to `task`. `inputs` and
// `outputs` are the update's own (rmsprop_update's layout), views into its node's lists: a
// copy of an input would be one more reference, and it could not be donated.
void add_plan(
    RMSpropUpdate& update,
    std::span<const mx::array> inputs,
    std::span<mx::array> outputs,
    bool tracing,
    mx::cpu::CommandEncoder& encoder,
    UpdateTask& task) {
  const uint32_t flags = update.flags();
  const Accumulation& accumulation = update.accumulation();
  const int arrays = static_cast<int>(outputs.size());

  // The inputs each output replaces: the parameter and state buffers, then the accumulator.
  const int updated = arrays - (accumulation.on() ? 1 : 0);
  const int accumulator_input = static_cast<int>(inputs.size()) - 2;
  auto replaced = [&](int k) -> const mx::array& {
    return inputs[k < updated ? 2 + k : accumulator_input];
  };

  // The statistics pass that read the accumulator before this node lets go of it here: this
  // node holds it, and its task runs after theirs (input_hold.h).
  if (accumulation.on() && !tracing) {
    InputHold::release(inputs[accumulator_input], update.stream().index);
  }

  // Donation first: taking any further reference to an input makes it non-donatable.
  for (int k = 0; k < arrays; ++k) {
    const mx::array& in = replaced(k);
    mx::array& out = outputs[k];
    if (in.flags().row_contiguous && in.is_donatable() && in.itemsize() == out.itemsize()) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }

  // Strided inputs (transposes, broadcasts, slices) are gathered into row-major temporaries
  // at the start of the task; their outputs are fresh row-major arrays.
  auto row_major = [&](const mx::array& in) -> const void* {
    if (in.flags().row_contiguous) {
      return in.data<void>();
    }
    mx::array copy(in.shape(), in.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    task.gathers.emplace_back(in, copy);
    encoder.add_temporary(copy);
    return copy.data<void>();
  };

  const bool quantized = flags & Flag::kQuantizedState;
  Plan plan;
  plan.flags = flags;
  plan.size = static_cast<int64_t>(outputs[0].size());
  plan.block_size = update.block_size();
  plan.chunk = quantized ? std::max<int64_t>(kChunk, plan.block_size) : kChunk;
  plan.index = update.index();
  plan.compute = inputs[0].dtype();
  plan.scalars = inputs[0].data<void>();
  plan.scalar_stride = inputs[0].strides()[0];
  if (update.has_factors()) {
    const mx::array& factors = inputs[2 + updated];
    plan.factors = factors.data<void>();
    plan.factors_double = factors.dtype() == mx::float64;
    plan.factor_offset[0] = plan.index * factors.strides()[0];
    plan.factor_offset[1] = plan.index * factors.strides()[0] + factors.strides()[1];
  }
  plan.gradient = row_major(inputs[1]);
  plan.gradient_dtype = inputs[1].dtype();
  plan.buffer[0] = Buffer{row_major(inputs[2]), outputs[0].data<void>(), inputs[2].dtype()};
  // Logical buffers: the parameter, then each state buffer; scales join their buffer's entry.
  int buffers = 1;
  const std::vector<StateEntry> layout = state_layout(flags);
  for (size_t e = 0; e < layout.size(); ++e) {
    const int output = static_cast<int>(e) + 1;
    const mx::array& in = inputs[2 + output];
    const StateEntry& entry = layout[e];
    if (entry.scales) {
      Buffer& quantized_buffer = plan.buffer[buffers - 1];
      quantized_buffer.scales_in = static_cast<const float*>(row_major(in));
      quantized_buffer.scales_out = outputs[output].data<float>();
      continue;
    }
    Buffer buffer{row_major(in), outputs[output].data<void>(), in.dtype()};
    buffer.output = static_cast<uint32_t>(output);
    if (quantized && entry.role != Role::kEma) {
      buffer.code = entry.role == Role::kV ? &kUnsigned : &kSigned;
    }
    if (entry.role == Role::kGradAvg) {
      plan.grad_avg = buffers;
    } else if (entry.role == Role::kMomentum) {
      plan.momentum = buffers;
    } else if (entry.role == Role::kEma) {
      plan.ema = buffers;
    }
    plan.buffer[buffers++] = buffer;
  }
  plan.buffers = buffers;
  std::optional<mx::array> gates;
  if (accumulation.on()) {
    plan.accumulation = accumulation;
    plan.accumulator = row_major(inputs[accumulator_input]);
    plan.accumulator_dtype = inputs[accumulator_input].dtype();
    plan.accumulator_out = outputs[updated].data<void>();
    gates = inputs.back();
  }
  task.plans.push_back(plan);
  task.gates.push_back(std::move(gates));
}

// Schedules the node's task on its stream: the gathers, then every plan.
void dispatch_task(
    mx::cpu::CommandEncoder& encoder,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    UpdateTask&& task) {
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  encoder.dispatch([task = std::move(task)]() mutable {
    for (auto& [src, dst] : task.gathers) {
      gather(src, dst);
    }
    for (size_t m = 0; m < task.plans.size(); ++m) {
      if (const auto& gates = task.gates[m]) {
        const float* gate = gates->data<float>();
        const int64_t stride = gates->strides()[0];
        task.plans[m].accumulation_applies = gate[kGateApplies * stride] != 0.0f;
        task.plans[m].accumulation_skip = gate[kGateSkip * stride] != 0.0f;
      }
    }
    run_plans(task.plans);
  });
}

} // namespace

void RMSpropUpdate::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const bool tracing = release_input_copies(inputs, outputs);
  UpdateTask task;
  add_plan(*this, inputs, outputs, tracing, encoder, task);
  dispatch_task(encoder, inputs, outputs, std::move(task));
}

void RMSpropUpdateGroup::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const bool tracing = release_input_copies(inputs, outputs);
  UpdateTask task;
  task.plans.reserve(members_.size());
  size_t input = 0;
  size_t output = 0;
  for (const Member& member : members_) {
    add_plan(
        *member.update,
        std::span<const mx::array>(inputs).subspan(input, member.inputs),
        std::span<mx::array>(outputs).subspan(output, member.outputs),
        tracing,
        encoder,
        task);
    input += member.inputs;
    output += member.outputs;
  }
  dispatch_task(encoder, inputs, outputs, std::move(task));
}

void RMSpropUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[rmsprop_update] the native update runs on the CPU stream only");
}

std::vector<mx::array> RMSpropUpdate::replaced(const std::vector<mx::array>& inputs) const {
  // The parameter and state buffers (scales included), then the accumulator; the factors and
  // the gates are no output.
  const size_t updated = inputs.size() - trailing_inputs();
  std::vector<mx::array> replaced(inputs.begin() + 2, inputs.begin() + updated);
  if (accumulation_.on()) {
    replaced.push_back(inputs[inputs.size() - 2]);
  }
  return replaced;
}

std::vector<mx::Shape> RMSpropUpdate::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& in : replaced(inputs)) {
    shapes.push_back(in.shape());
  }
  return shapes;
}

bool RMSpropUpdate::is_equivalent(const mx::Primitive& other) const {
  const auto* update = dynamic_cast<const RMSpropUpdate*>(&other);
  return update != nullptr && update->flags_ == flags_ && update->block_size_ == block_size_ &&
      update->index_ == index_ && update->has_factors_ == has_factors_ &&
      update->accumulation_ == accumulation_;
}

void RMSpropUpdateGroup::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[rmsprop_update] the native update runs on the CPU stream only");
}

std::vector<mx::Shape> RMSpropUpdateGroup::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for_each_member(inputs, [&](const Member& member, std::vector<mx::array> own, size_t) {
    for (auto& shape : member.update->output_shapes(own)) {
      shapes.push_back(std::move(shape));
    }
  });
  return shapes;
}

bool RMSpropUpdateGroup::is_equivalent(const mx::Primitive& other) const {
  const auto* group = dynamic_cast<const RMSpropUpdateGroup*>(&other);
  if (group == nullptr || group->members_.size() != members_.size()) {
    return false;
  }
  for (size_t m = 0; m < members_.size(); ++m) {
    const Member& mine = members_[m];
    const Member& theirs = group->members_[m];
    if (mine.inputs != theirs.inputs || mine.outputs != theirs.outputs ||
        !mine.update->is_equivalent(*theirs.update)) {
      return false;
    }
  }
  return true;
}

} // namespace mlx_rmsprop
