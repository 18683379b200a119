// The AccumulateGradient primitive: checks, the element loop (split across the worker threads
// for large tensors) and its transforms, which run accumulate_ops.
#include "accumulate_gradient.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "mlx/types/half_types.h"

#include "dtype_spans.h"
#include "rmsprop_update.h"
#include "worker_pool.h"

namespace mlx_rmsprop {

namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kPart = int64_t(1) << 15;

void require(bool ok, const std::string& message) {
  if (!ok) {
    throw std::invalid_argument("[accumulate_gradient] " + message);
  }
}

bool is_floating(mx::Dtype dtype) {
  return dtype == mx::float16 || dtype == mx::bfloat16 || dtype == mx::float32 ||
      dtype == mx::float64;
}

struct Plan {
  const void* gradient = nullptr;
  mx::Dtype gradient_dtype = mx::float32;
  const void* accumulator = nullptr;
  mx::Dtype accumulator_dtype = mx::float32;
  void* gradient_out = nullptr;
  void* accumulator_out = nullptr;
  int64_t size = 0;
  double loss_scale = 0.0;
  int steps = 2;
  bool applies = false;
  bool skip = false;
};

template <typename C>
void run_range(const Plan& plan, int64_t begin, int64_t end) {
  const C loss_scale = static_cast<C>(plan.loss_scale);
  const C steps = static_cast<C>(plan.steps);
  const mx::Dtype compute = std::is_same_v<C, float> ? mx::float32 : mx::float64;
  alignas(64) C g[kChunk];
  alignas(64) C old[kChunk];
  alignas(64) C kept[kChunk];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t n = std::min(kChunk, end - start);
    load_as(plan.gradient, plan.gradient_dtype, start, n, g);
    load_as(plan.accumulator, plan.accumulator_dtype, start, n, old);
    if (plan.loss_scale != 0.0) {
      for (int64_t i = 0; i < n; ++i) {
        g[i] = g[i] / loss_scale;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const C summed = g[i] + old[i];
      g[i] = summed / steps;
      kept[i] = plan.skip ? old[i] : (plan.applies ? C(0) : summed);
    }
    store_nearest(g, plan.gradient_out, compute, start, n);
    store_nearest(kept, plan.accumulator_out, plan.accumulator_dtype, start, n);
  }
}

template <typename C>
void run(const Plan& plan) {
  if (plan.size < kParallelThreshold) {
    run_range<C>(plan, 0, plan.size);
    return;
  }
  const int64_t parts = (plan.size + kPart - 1) / kPart;
  WorkerPool::instance().run(static_cast<int>(parts), [&](int part) {
    const int64_t begin = part * kPart;
    run_range<C>(plan, begin, std::min(plan.size, begin + kPart));
  });
}

} // namespace

std::vector<mx::array> accumulate_gradient(
    const mx::array& gradient,
    const mx::array& accumulator,
    const mx::array& gates,
    double loss_scale,
    int steps,
    mx::Dtype compute) {
  require(
      compute == mx::float32 || compute == mx::float64,
      "compute must be float32 or float64");
  require(is_floating(gradient.dtype()), "gradient must be a floating array");
  require(
      is_floating(accumulator.dtype()) && accumulator.shape() == gradient.shape(),
      "accumulator must be a floating array shaped like the gradient");
  require(
      gates.ndim() == 1 && gates.size() == kNumAccumulationGates && gates.dtype() == mx::float32,
      "gates must be a float32 vector of 2 entries (applies, skip)");
  require(steps >= 2, "steps must be >= 2, got " + std::to_string(steps));
  require(loss_scale >= 0.0, "loss_scale must be >= 0 (0: none)");
  const mx::Stream stream = mx::to_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      {gradient.shape(), accumulator.shape()},
      {compute, accumulator.dtype()},
      std::make_shared<AccumulateGradient>(stream, loss_scale, steps, compute),
      {gradient, accumulator, gates});
}

std::vector<mx::array> accumulate_ops(
    const std::vector<mx::array>& inputs,
    double loss_scale,
    int steps,
    mx::Dtype compute) {
  // step.py's accumulate and carry_accumulators, op for op.
  const mx::array& gates = inputs[2];
  mx::array scaled = mx::astype(inputs[0], compute);
  if (loss_scale != 0.0) {
    scaled = mx::divide(scaled, mx::array(loss_scale, compute));
  }
  const mx::array old = mx::astype(inputs[1], compute);
  const mx::array summed = mx::add(scaled, old);
  const mx::array mean = mx::divide(summed, mx::array(static_cast<double>(steps), compute));
  auto gate = [&](int k) {
    return mx::not_equal(
        mx::reshape(mx::slice(gates, {k}, {k + 1}), {}), mx::array(0.0f, mx::float32));
  };
  mx::array kept = mx::where(gate(kGateApplies), mx::zeros_like(summed), summed);
  kept = mx::where(gate(kGateSkip), old, kept);
  return {mean, mx::astype(kept, inputs[1].dtype())};
}

void AccumulateGradient::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  // Gather strided inputs and read the gates on the stream thread, inside the task.
  std::vector<mx::array> held;
  auto row_major = [&](const mx::array& in) -> mx::array {
    if (in.flags().row_contiguous) {
      return in;
    }
    mx::array copy(in.shape(), in.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    held.push_back(in);
    held.push_back(copy);
    encoder.add_temporary(copy);
    return copy;
  };
  // As in RMSpropUpdate::eval_cpu: every output holds its own copy of the input list, so no
  // input of a multi-output node is donatable until the other outputs' copies are dropped
  // (MLX drops them right after this call anyway). Tracers keep their graph.
  const bool tracing = std::any_of(
      outputs.begin(), outputs.end(), [](const mx::array& out) { return out.is_tracer(); });
  if (!tracing) {
    for (auto& out : outputs) {
      if (&out.inputs() != &inputs) {
        out.inputs().clear();
      }
    }
  }
  // Donation first (taking any further reference to an input makes it non-donatable): the
  // mean into the gradient's buffer, the new accumulator into the old one's. Each element is
  // read before it is written, so updating in place is safe. Freed buffers above MLX's CPU
  // cache limit are not kept, so large outputs would otherwise page-fault every step.
  for (int k = 0; k < 2; ++k) {
    const mx::array& in = inputs[k];
    mx::array& out = outputs[k];
    if (in.flags().row_contiguous && in.is_donatable() && in.itemsize() == out.itemsize()) {
      out.copy_shared_buffer(in);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }
  const mx::array gradient = row_major(inputs[0]);
  const mx::array accumulator = row_major(inputs[1]);
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  Plan plan;
  plan.gradient = gradient.data<void>();
  plan.gradient_dtype = gradient.dtype();
  plan.accumulator = accumulator.data<void>();
  plan.accumulator_dtype = accumulator.dtype();
  plan.gradient_out = outputs[0].data<void>();
  plan.accumulator_out = outputs[1].data<void>();
  plan.size = static_cast<int64_t>(outputs[0].size());
  plan.loss_scale = loss_scale_;
  plan.steps = steps_;
  const mx::array gates = inputs[2];
  const bool wide = compute_ == mx::float64;
  encoder.dispatch([plan, gates, held = std::move(held), wide]() mutable {
    for (size_t k = 0; k + 1 < held.size(); k += 2) {
      // Copies a strided array into row-major order through MLX-free index arithmetic.
      const mx::array& src = held[k];
      mx::array& dst = held[k + 1];
      const auto& shape = src.shape();
      const auto& strides = src.strides();
      const int ndim = static_cast<int>(shape.size());
      std::vector<int64_t> index(ndim, 0);
      int64_t offset = 0;
      const size_t item = src.itemsize();
      const char* from = static_cast<const char*>(src.data<void>());
      char* to = static_cast<char*>(dst.data<void>());
      for (size_t done = 0; done < src.size(); ++done) {
        std::copy_n(from + offset * item, item, to + done * item);
        for (int d = ndim - 1; d >= 0; --d) {
          offset += strides[d];
          if (++index[d] < shape[d]) {
            break;
          }
          offset -= strides[d] * shape[d];
          index[d] = 0;
        }
      }
    }
    const float* g = gates.data<float>();
    const int64_t stride = gates.strides()[0];
    plan.applies = g[kGateApplies * stride] != 0.0f;
    plan.skip = g[kGateSkip * stride] != 0.0f;
    if (wide) {
      run<double>(plan);
    } else {
      run<float>(plan);
    }
  });
}

void AccumulateGradient::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[accumulate_gradient] the native accumulation runs on the CPU only");
}

std::vector<mx::array> AccumulateGradient::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto ops = [this](const std::vector<mx::array>& in) {
    return accumulate_ops(in, loss_scale_, steps_, compute_);
  };
  auto grads = mx::vjp(ops, primals, cotangents).second;
  std::vector<mx::array> selected;
  for (int index : argnums) {
    selected.push_back(grads[index]);
  }
  return selected;
}

std::vector<mx::array> AccumulateGradient::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  std::vector<mx::array> all;
  for (const auto& primal : primals) {
    all.push_back(mx::zeros_like(primal));
  }
  for (size_t j = 0; j < argnums.size(); ++j) {
    all[argnums[j]] = tangents[j];
  }
  auto ops = [this](const std::vector<mx::array>& in) {
    return accumulate_ops(in, loss_scale_, steps_, compute_);
  };
  return mx::jvp(ops, primals, all).second;
}

std::pair<std::vector<mx::array>, std::vector<int>> AccumulateGradient::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto ops = [this](const std::vector<mx::array>& in) {
    return accumulate_ops(in, loss_scale_, steps_, compute_);
  };
  return {mx::vmap(ops, axes, {0, 0})(inputs), {0, 0}};
}

std::vector<mx::Shape> AccumulateGradient::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[1].shape()};
}

bool AccumulateGradient::is_equivalent(const mx::Primitive& other) const {
  const auto* same = dynamic_cast<const AccumulateGradient*>(&other);
  return same != nullptr && same->loss_scale_ == loss_scale_ && same->steps_ == steps_ &&
      same->compute_ == compute_;
}

} // namespace mlx_rmsprop
