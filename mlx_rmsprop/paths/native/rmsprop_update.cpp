// The RMSpropUpdate primitive: argument checks, output memory (in place when donated), and the
// task that walks the elements in cache-sized chunks across the worker threads.
#include "rmsprop_update.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"
#include "mlx/utils.h"

#include "half_convert.h"
#include "update_kernel.h"
#include "worker_pool.h"

namespace mlx_rmsprop {

namespace {

constexpr int kMaxBuffers = 5; // parameter, v, grad_avg, momentum_buffer, ema

// Elements per chunk: every staged span of a chunk (a gradient and up to five inputs and five
// outputs, in double) stays within a 48 KiB L1 data cache.
constexpr int64_t kChunk = 512;

// Elements per part of a threaded update: large enough that claiming a part (one atomic
// increment) is noise, small enough to balance two cores when one is shared; a multiple of 64
// elements, so no two threads write into the same cache line.
constexpr int64_t kPartElements = int64_t(1) << 15;
static_assert(kParallelThreshold >= 2 * kPartElements, "a threaded update has several parts");

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

// One parameter-shaped array that the update reads and rewrites.
struct Buffer {
  const void* in = nullptr;
  void* out = nullptr;
  mx::Dtype dtype = mx::float32;
};

// Everything the task needs, captured by value when the task is scheduled.
struct Plan {
  uint32_t flags = 0;
  int64_t size = 0;
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
};

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
void store_as(const C* src, void* dst, mx::Dtype dtype, int64_t start, int64_t n) {
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

constexpr uint32_t kGradientPipeline =
    Flag::kMaximize | Flag::kScaleGradient | Flag::kClipValue | Flag::kCoupledDecay;

// Updates elements [begin, end). Buffers already in the compute type are read and written
// where they lie; the others go through per-chunk staging spans in the compute type.
template <typename C>
void update_range(
    const Plan& plan,
    const StepScalars<C>& s,
    bool apply,
    CoreFn<C> core,
    int64_t begin,
    int64_t end) {
  alignas(64) C gradient_stage[kChunk];
  alignas(64) C in_stage[kMaxBuffers][kChunk];
  alignas(64) C out_stage[kMaxBuffers][kChunk];
  const mx::Dtype compute = plan.compute;
  const bool gradient_direct =
      plan.gradient_dtype == compute && !(plan.flags & kGradientPipeline);

  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(kChunk, end - start);
    const C* in[kMaxBuffers] = {};
    C* out[kMaxBuffers] = {};
    for (int k = 0; k < plan.buffers; ++k) {
      const Buffer& b = plan.buffer[k];
      if (b.dtype == compute) {
        in[k] = static_cast<const C*>(b.in) + start;
        out[k] = static_cast<C*>(b.out) + start;
      } else {
        load_as(b.in, b.dtype, start, n, in_stage[k]);
        in[k] = in_stage[k];
        out[k] = out_stage[k];
      }
    }
    const int a = plan.grad_avg, m = plan.momentum;
    if (apply) {
      const C* g;
      if (gradient_direct) {
        g = static_cast<const C*>(plan.gradient) + start;
      } else {
        load_as(plan.gradient, plan.gradient_dtype, start, n, gradient_stage);
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
      // The update gate is 0: the parameter and every buffer but the EMA keep their values.
      for (int k = 0; k < plan.buffers; ++k) {
        if (k != plan.ema && out[k] != in[k]) {
          std::copy(in[k], in[k] + n, out[k]);
        }
      }
    }
    if (plan.ema >= 0) {
      update_ema(n, s, out[0], in[plan.ema], out[plan.ema]);
    }
    for (int k = 0; k < plan.buffers; ++k) {
      const Buffer& b = plan.buffer[k];
      if (b.dtype != compute) {
        store_as(out[k], b.out, b.dtype, start, n);
      }
    }
  }
}

template <typename C>
void run_plan(const Plan& plan) {
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
  const CoreFn<C> core = select_core<C>(plan.flags);

  const int64_t size = plan.size;
  if (size < kParallelThreshold) {
    update_range(plan, s, apply, core, 0, size);
    return;
  }
  // Fixed-size parts claimed one at a time: a thread whose core is busy with other work
  // takes fewer parts instead of holding up the step with a half of it.
  const int64_t parts = (size + kPartElements - 1) / kPartElements;
  WorkerPool::instance().run(static_cast<int>(parts), [&](int part) {
    const int64_t begin = part * kPartElements;
    update_range(plan, s, apply, core, begin, std::min(size, begin + kPartElements));
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

} // namespace

int state_buffer_count(uint32_t flags) {
  return 1 + !!(flags & Flag::kCentered) + !!(flags & Flag::kMomentum) + !!(flags & Flag::kEma);
}

int worker_threads() {
  return WorkerPool::instance().threads();
}

std::vector<mx::array> rmsprop_update(
    const mx::array& scalars,
    const mx::array& gradient,
    const mx::array& parameter,
    const std::vector<mx::array>& state,
    uint32_t flags,
    const std::optional<mx::array>& factors,
    int index) {
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
  require(
      is_floating(parameter.dtype()),
      "parameter must be float16, bfloat16, float32 or float64, got " + describe(parameter));
  require(
      gradient.shape() == parameter.shape() && is_floating(gradient.dtype()),
      "gradient must be a floating array shaped like the parameter (" + describe(parameter) +
          "), got " + describe(gradient));
  const int expected = state_buffer_count(flags);
  require(
      static_cast<int>(state.size()) == expected,
      "state must hold " + std::to_string(expected) + " buffers for these flags, got " +
          std::to_string(state.size()));
  for (size_t k = 0; k < state.size(); ++k) {
    require(
        state[k].shape() == parameter.shape() && is_floating(state[k].dtype()),
        "state[" + std::to_string(k) + "] must be a floating array shaped like the parameter (" +
            describe(parameter) + "), got " + describe(state[k]));
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
  const mx::Stream stream = mx::to_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<RMSpropUpdate>(stream, flags, factors.has_value(), factors ? index : 0),
      inputs);
}

void RMSpropUpdate::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const int buffers = static_cast<int>(outputs.size());

  // array::make_arrays gives every output its own copy of the input list, so each input is
  // referenced once per output and array::is_donatable() never holds for a multi-output node.
  // MLX drops those copies right after this call (array::detach); dropping the other outputs'
  // copies first lets an input nobody else holds be donated, as for a single-output op.
  // Tracers keep their graph (MLX also keeps their inputs from being donated).
  const bool tracing = std::any_of(
      outputs.begin(), outputs.end(), [](const mx::array& out) { return out.is_tracer(); });
  if (!tracing) {
    for (auto& out : outputs) {
      if (&out.inputs() != &inputs) {
        out.inputs().clear();
      }
    }
  }

  // Donation first: taking any further reference to an input makes it non-donatable.
  for (int k = 0; k < buffers; ++k) {
    const mx::array& in = inputs[2 + k];
    mx::array& out = outputs[k];
    if (in.flags().row_contiguous && in.is_donatable() && in.itemsize() == out.itemsize()) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }

  // Strided inputs (transposes, broadcasts, slices) are gathered into row-major temporaries
  // at the start of the task; their outputs are fresh row-major arrays.
  std::vector<std::pair<mx::array, mx::array>> gathers;
  auto row_major = [&](const mx::array& in) -> const void* {
    if (in.flags().row_contiguous) {
      return in.data<void>();
    }
    mx::array copy(in.shape(), in.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    gathers.emplace_back(in, copy);
    encoder.add_temporary(copy);
    return copy.data<void>();
  };

  Plan plan;
  plan.flags = flags_;
  plan.size = static_cast<int64_t>(outputs[0].size());
  plan.compute = inputs[0].dtype();
  plan.scalars = inputs[0].data<void>();
  plan.scalar_stride = inputs[0].strides()[0];
  if (has_factors_) {
    const mx::array& factors = inputs.back();
    plan.factors = factors.data<void>();
    plan.factors_double = factors.dtype() == mx::float64;
    plan.factor_offset[0] = index_ * factors.strides()[0];
    plan.factor_offset[1] = index_ * factors.strides()[0] + factors.strides()[1];
  }
  plan.gradient = row_major(inputs[1]);
  plan.gradient_dtype = inputs[1].dtype();
  plan.buffers = buffers;
  for (int k = 0; k < buffers; ++k) {
    const mx::array& in = inputs[2 + k];
    const void* source = row_major(in);
    plan.buffer[k] = Buffer{source, outputs[k].data<void>(), in.dtype()};
  }
  int next = 2; // state order: v, grad_avg, momentum_buffer, ema
  if (flags_ & Flag::kCentered) {
    plan.grad_avg = next++;
  }
  if (flags_ & Flag::kMomentum) {
    plan.momentum = next++;
  }
  if (flags_ & Flag::kEma) {
    plan.ema = next++;
  }

  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  encoder.dispatch([plan, gathers = std::move(gathers)]() mutable {
    for (auto& [src, dst] : gathers) {
      gather(src, dst);
    }
    if (plan.compute == mx::float64) {
      run_plan<double>(plan);
    } else {
      run_plan<float>(plan);
    }
  });
}

void RMSpropUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[rmsprop_update] the native update runs on the CPU stream only");
}

std::vector<mx::Shape> RMSpropUpdate::output_shapes(const std::vector<mx::array>& inputs) {
  return std::vector<mx::Shape>(inputs.size() - 2 - (has_factors_ ? 1 : 0), inputs[2].shape());
}

bool RMSpropUpdate::is_equivalent(const mx::Primitive& other) const {
  const auto* update = dynamic_cast<const RMSpropUpdate*>(&other);
  return update != nullptr && update->flags_ == flags_ &&
      update->has_factors_ == has_factors_ && update->index_ == index_;
}

} // namespace mlx_rmsprop
