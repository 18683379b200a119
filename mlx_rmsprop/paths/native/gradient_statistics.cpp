// The GradientStatistics primitive: argument checks, the block list split across the worker
// threads, and the per-block loops in the summation order gradient_statistics.h fixes.
#include "gradient_statistics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "half_convert.h"
#include "input_hold.h"
#include "rmsprop_update.h"
#include "worker_pool.h"

namespace mlx_rmsprop {

namespace {

constexpr int64_t kLanes = kStatisticsLanes;
constexpr int64_t kBlock = kStatisticsBlock;
static_assert(kBlock % kLanes == 0, "a block is whole rows of lanes");

void require(bool ok, const std::string& message) {
  if (!ok) {
    throw std::invalid_argument("[gradient_statistics] " + message);
  }
}

bool is_reduced_dtype(mx::Dtype dtype) {
  return dtype == mx::float16 || dtype == mx::bfloat16 || dtype == mx::float32;
}

// One row-major float16/bfloat16/float32 array read as float32.
struct Source {
  const void* data = nullptr;
  mx::Dtype dtype = mx::float32;
};

void load(const Source& src, int64_t start, int64_t n, float* dst) {
  switch (src.dtype.val()) {
    case mx::Dtype::Val::float16: {
      const auto* s = static_cast<const uint16_t*>(src.data) + start;
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = float_from_half_bits(s[i]);
      }
      break;
    }
    case mx::Dtype::Val::bfloat16: {
      const auto* s = static_cast<const uint16_t*>(src.data) + start;
      for (int64_t i = 0; i < n; ++i) {
        dst[i] = float_from_bfloat16_bits(s[i]);
      }
      break;
    }
    default:
      std::copy_n(static_cast<const float*>(src.data) + start, n, dst);
      break;
  }
}

// Copies a strided array (a transpose, a broadcast, a slice) into row-major order.
template <typename Word>
void gather_words(const mx::array& src, void* dst) {
  const Word* from = src.data<Word>();
  Word* to = static_cast<Word*>(dst);
  const auto& shape = src.shape();
  const auto& strides = src.strides();
  const int ndim = static_cast<int>(shape.size());
  const int64_t size = static_cast<int64_t>(src.size());
  std::vector<int64_t> index(ndim, 0);
  int64_t offset = 0;
  for (int64_t done = 0; done < size; ++done) {
    *to++ = from[offset];
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

struct Tensor {
  Source gradient;
  Source accumulator; // data == nullptr without accumulation
  int64_t size = 0;
};

// One block of one tensor, and what its pass found.
struct Block {
  int tensor = 0;
  int64_t start = 0;
  int64_t size = 0;
  float sum = 0.0f; // its lanes combined
  float largest = 0.0f;
  bool nonfinite = false;
};

struct Settings {
  float loss_scale = 0.0f; // 0: none
  float accumulation_steps = 0.0f; // 0: none
};

// Elements staged at a time: z and an accumulator chunk stay within the L1 data cache, and a
// worker thread's stack (512 KiB on macOS) holds them easily.
constexpr int64_t kChunk = 1024;
static_assert(kChunk % kLanes == 0 && kBlock % kChunk == 0, "chunks are whole rows of lanes");

// z for elements [start, start + n) of `tensor`, in pipeline.py's order:
// ((g / loss_scale) + accumulator) / accumulation_steps, each step only when configured. Returns
// the gradient itself where it is float32 and nothing applies to it, else `stage` (n
// elements); float32 inputs are read where they lie, the others converted into staging.
const float* reduced_values(
    const Tensor& tensor,
    const Settings& settings,
    int64_t start,
    int64_t n,
    float* stage) {
  auto direct = [start](const Source& src) -> const float* {
    return src.dtype == mx::float32 ? static_cast<const float*>(src.data) + start : nullptr;
  };
  const float* g = direct(tensor.gradient);
  if (settings.loss_scale == 0.0f && settings.accumulation_steps == 0.0f && g != nullptr) {
    return g;
  }
  if (g == nullptr) {
    load(tensor.gradient, start, n, stage);
    g = stage;
  }
  if (settings.loss_scale != 0.0f) {
    const float divisor = settings.loss_scale;
    for (int64_t i = 0; i < n; ++i) {
      stage[i] = g[i] / divisor;
    }
    g = stage;
  }
  if (settings.accumulation_steps != 0.0f) {
    alignas(64) float accumulator_stage[kChunk];
    const float* accumulator = direct(tensor.accumulator);
    if (accumulator == nullptr) {
      load(tensor.accumulator, start, n, accumulator_stage);
      accumulator = accumulator_stage;
    }
    const float steps = settings.accumulation_steps;
    for (int64_t i = 0; i < n; ++i) {
      stage[i] = (g[i] + accumulator[i]) / steps;
    }
    g = stage;
  }
  return g;
}

// The lanes of one block: running sums of z^2 ((z / divisor)^2 when scaled), and for the
// first pass the largest magnitude and a NaN-poisoned sum of z * 0 (NaN exactly where some z
// is NaN or infinite). Element i of the block adds into lane i mod kLanes.
struct Lanes {
  alignas(64) float sum[kLanes] = {};
  alignas(64) float largest[kLanes] = {};
  alignas(64) float poison[kLanes] = {};

  // Adds z[0, n) starting at lane 0 (n is a multiple of kLanes but for a block's last chunk).
  template <bool kScaled>
  void add(const float* z, int64_t n, float divisor) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const float x = kScaled ? z[i + k] / divisor : z[i + k];
        sum[k] = sum[k] + x * x;
        if constexpr (!kScaled) {
          const float magnitude = std::fabs(x);
          largest[k] = magnitude > largest[k] ? magnitude : largest[k];
          poison[k] = poison[k] + x * 0.0f;
        }
      }
    }
    for (int64_t k = 0; i + k < n; ++k) {
      const float x = kScaled ? z[i + k] / divisor : z[i + k];
      sum[k] = sum[k] + x * x;
      if constexpr (!kScaled) {
        const float magnitude = std::fabs(x);
        largest[k] = magnitude > largest[k] ? magnitude : largest[k];
        poison[k] = poison[k] + x * 0.0f;
      }
    }
  }

  // The lanes' sums combined by halves (lanes past the end of the block hold 0, as the zero
  // padding of the MLX-ops version leaves them).
  float combined_sum() {
    for (int64_t half = kLanes / 2; half >= 1; half /= 2) {
      for (int64_t k = 0; k < half; ++k) {
        sum[k] = sum[k] + sum[k + half];
      }
    }
    return sum[0];
  }
};

// One pass over one block: its sum of squares, and on the first pass (divisor 0) its largest
// magnitude and non-finite flag; with a divisor, the sum of (z / divisor)^2.
void block_pass(const Tensor& tensor, const Settings& settings, Block& block, float divisor) {
  Lanes lanes;
  alignas(64) float stage[kChunk];
  for (int64_t done = 0; done < block.size; done += kChunk) {
    const int64_t n = std::min(kChunk, block.size - done);
    const float* z = reduced_values(tensor, settings, block.start + done, n, stage);
    if (divisor == 0.0f) {
      lanes.add<false>(z, n, 1.0f);
    } else {
      lanes.add<true>(z, n, divisor);
    }
  }
  block.sum = lanes.combined_sum();
  if (divisor != 0.0f) {
    return;
  }
  float largest = 0.0f;
  bool nonfinite = false;
  for (int64_t k = 0; k < kLanes; ++k) {
    largest = lanes.largest[k] > largest ? lanes.largest[k] : largest;
    nonfinite = nonfinite || lanes.poison[k] != lanes.poison[k];
  }
  block.largest = largest;
  block.nonfinite = nonfinite;
}

// The pass compiled a second time for AVX2 (8 lanes a register instead of 4; no FMA, the same
// IEEE operations: the same bits), used where the update's storage loops use AVX2
// (storage_loops_name(), which MLX_RMSPROP_NATIVE_AVX2=0 keeps at the baseline).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"), flatten)) void
block_pass_avx2(const Tensor& tensor, const Settings& settings, Block& block, float divisor) {
  block_pass(tensor, settings, block, divisor);
}
#define MLX_RMSPROP_STATISTICS_AVX2 1
#endif

using BlockPass = void (*)(const Tensor&, const Settings&, Block&, float);

BlockPass chosen_block_pass() {
#if MLX_RMSPROP_STATISTICS_AVX2
  static const BlockPass pass =
      std::string(storage_loops_name()) == "avx2" ? &block_pass_avx2 : &block_pass;
  return pass;
#else
  return &block_pass;
#endif
}

// Runs part(b) for every block, split across the worker threads when the step is large. Parts
// are runs of consecutive blocks of at least kBlock elements, so that many small tensors do not
// cost a claim each.
template <typename F>
void for_each_block(std::vector<Block>& blocks, int64_t elements, F&& part) {
  if (elements < kParallelThreshold) {
    for (auto& block : blocks) {
      part(block);
    }
    return;
  }
  std::vector<size_t> starts;
  int64_t run = kBlock;
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (run >= kBlock) {
      starts.push_back(b);
      run = 0;
    }
    run += blocks[b].size;
  }
  starts.push_back(blocks.size());
  WorkerPool::instance().run(static_cast<int>(starts.size() - 1), [&](int p) {
    for (size_t b = starts[p]; b < starts[p + 1]; ++b) {
      part(blocks[b]);
    }
  });
}

// Fills `out` (tensors x kNumStatistics, row-major).
void compute(
    const std::vector<Tensor>& tensors,
    const Settings& settings,
    ScaledNorm scaled_norm,
    float* out) {
  std::vector<Block> blocks;
  int64_t elements = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    for (int64_t start = 0; start < tensors[t].size; start += kBlock) {
      blocks.push_back(
          Block{static_cast<int>(t), start, std::min(kBlock, tensors[t].size - start)});
    }
    elements += tensors[t].size;
  }
  const BlockPass pass = chosen_block_pass();
  for_each_block(blocks, elements, [&](Block& block) {
    pass(tensors[block.tensor], settings, block, 0.0f);
  });

  // Combine each tensor's blocks in block order, from 0.
  const size_t count = tensors.size();
  for (size_t t = 0; t < count; ++t) {
    float* row = out + t * kNumStatistics;
    row[kSumOfSquares] = 0.0f;
    row[kLargest] = 0.0f;
    row[kNonFinite] = 0.0f;
    row[kScaledSumOfSquares] = 0.0f;
  }
  for (const auto& block : blocks) {
    float* row = out + block.tensor * kNumStatistics;
    row[kSumOfSquares] = row[kSumOfSquares] + block.sum;
    row[kLargest] = block.largest > row[kLargest] ? block.largest : row[kLargest];
    if (block.nonfinite) {
      row[kNonFinite] = 1.0f;
    }
  }

  // The scaled sums, only where the plain one overflows (a second pass, rare).
  std::vector<float> divisor(count, 0.0f); // 0: this row's scaled sum stays 0
  const float inf = std::numeric_limits<float>::infinity();
  if (scaled_norm == ScaledNorm::kPerTensor) {
    for (size_t t = 0; t < count; ++t) {
      const float* row = out + t * kNumStatistics;
      if (row[kSumOfSquares] == inf && std::isfinite(row[kLargest])) {
        divisor[t] = row[kLargest];
      }
    }
  } else if (scaled_norm == ScaledNorm::kGlobal) {
    float total = 0.0f;
    float largest = 0.0f;
    for (size_t t = 0; t < count; ++t) {
      const float* row = out + t * kNumStatistics;
      total = total + row[kSumOfSquares];
      largest = row[kLargest] > largest ? row[kLargest] : largest;
    }
    if (total == inf && std::isfinite(largest)) {
      std::fill(divisor.begin(), divisor.end(), largest);
    }
  }
  std::vector<Block> scaled;
  int64_t scaled_elements = 0;
  for (const auto& block : blocks) {
    if (divisor[block.tensor] > 0.0f) {
      scaled.push_back(block);
      scaled_elements += block.size;
    }
  }
  if (scaled.empty()) {
    return;
  }
  for_each_block(scaled, scaled_elements, [&](Block& block) {
    pass(tensors[block.tensor], settings, block, divisor[block.tensor]);
  });
  for (const auto& block : scaled) {
    float* row = out + block.tensor * kNumStatistics;
    row[kScaledSumOfSquares] = row[kScaledSumOfSquares] + block.sum;
  }
}

} // namespace

mx::array gradient_statistics(
    const std::vector<mx::array>& gradients,
    const std::vector<mx::array>& accumulators,
    double loss_scale,
    int accumulation_steps,
    int scaled_norm) {
  require(
      scaled_norm >= 0 && scaled_norm <= 2,
      "scaled_norm must be 0 (none), 1 (per tensor) or 2 (global), got " +
          std::to_string(scaled_norm));
  require(
      std::isfinite(loss_scale) && loss_scale >= 0.0,
      "loss_scale must be finite and >= 0 (0: none), got " + std::to_string(loss_scale));
  require(
      accumulation_steps == 0 || accumulation_steps >= 2,
      "accumulation_steps must be 0 (none) or >= 2, got " + std::to_string(accumulation_steps));
  require(
      accumulation_steps == 0 ? accumulators.empty() : accumulators.size() == gradients.size(),
      "accumulators must hold one array per gradient with accumulation_steps, and none "
      "without, got " +
          std::to_string(accumulators.size()) + " for " + std::to_string(gradients.size()) +
          " gradients");
  for (size_t t = 0; t < gradients.size(); ++t) {
    require(
        is_reduced_dtype(gradients[t].dtype()),
        "gradients[" + std::to_string(t) + "] must be float16, bfloat16 or float32");
    if (!accumulators.empty()) {
      require(
          is_reduced_dtype(accumulators[t].dtype()) &&
              accumulators[t].shape() == gradients[t].shape(),
          "accumulators[" + std::to_string(t) +
              "] must be float16, bfloat16 or float32 and shaped like its gradient");
    }
  }
  std::vector<mx::array> inputs(gradients);
  inputs.insert(inputs.end(), accumulators.begin(), accumulators.end());
  const mx::Stream stream = mx::to_stream(mx::Device::cpu);
  const int tensors = static_cast<int>(gradients.size());
  return mx::array(
      {tensors, kNumStatistics},
      mx::float32,
      std::make_shared<GradientStatistics>(
          stream,
          tensors,
          static_cast<float>(loss_scale),
          accumulation_steps,
          static_cast<ScaledNorm>(scaled_norm)),
      std::move(inputs));
}

void GradientStatistics::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  out.set_data(mx::allocator::malloc(out.nbytes()));
  // Strided inputs are gathered into row-major temporaries at the start of the task.
  std::vector<std::pair<mx::array, mx::array>> gathers;
  auto row_major = [&](const mx::array& in) -> Source {
    encoder.set_input_array(in);
    if (in.flags().row_contiguous) {
      return Source{in.data<void>(), in.dtype()};
    }
    mx::array copy(in.shape(), in.dtype(), nullptr, {});
    copy.set_data(mx::allocator::malloc(copy.nbytes()));
    gathers.emplace_back(in, copy);
    encoder.add_temporary(copy);
    return Source{copy.data<void>(), copy.dtype()};
  };
  std::vector<Tensor> tensors(tensors_);
  for (int t = 0; t < tensors_; ++t) {
    tensors[t].gradient = row_major(inputs[t]);
    tensors[t].size = static_cast<int64_t>(inputs[t].size());
    if (accumulation_steps_ != 0) {
      tensors[t].accumulator = row_major(inputs[tensors_ + t]);
    }
  }
  encoder.set_output_array(out);
  // The accumulators are held through InputHolds (input_hold.h), which the accumulating update
  // that rewrites each of them releases, so that it can update it in place; everything else
  // is held by the task. Tracers keep their graph (and MLX keeps their inputs).
  std::vector<mx::array> held;
  std::vector<std::shared_ptr<InputHold>> holds;
  if (!out.is_tracer()) {
    for (int t = 0; t < tensors_; ++t) {
      held.push_back(inputs[t]);
    }
    if (accumulation_steps_ != 0) {
      for (int t = 0; t < tensors_; ++t) {
        holds.push_back(std::make_shared<InputHold>(inputs[tensors_ + t], stream().index));
      }
    }
    out.inputs().clear(); // `inputs` is this list: not read below
  }
  Settings settings{loss_scale_, static_cast<float>(accumulation_steps_)};
  encoder.dispatch([tensors = std::move(tensors),
                    held = std::move(held),
                    holds = std::move(holds),
                    gathers = std::move(gathers),
                    settings,
                    scaled_norm = scaled_norm_,
                    result = out.data<float>()]() {
    for (const auto& [src, dst] : gathers) {
      if (src.itemsize() == 2) {
        gather_words<uint16_t>(src, const_cast<mx::array&>(dst).data<void>());
      } else {
        gather_words<uint32_t>(src, const_cast<mx::array&>(dst).data<void>());
      }
    }
    compute(tensors, settings, scaled_norm, result);
  });
}

namespace {
StatisticsOps& statistics_ops() {
  static StatisticsOps ops;
  return ops;
}
} // namespace

void set_statistics_ops(StatisticsOps ops) {
  statistics_ops() = std::move(ops);
}

std::function<std::vector<mx::array>(const std::vector<mx::array>&)> GradientStatistics::ops()
    const {
  if (!statistics_ops()) {
    throw std::runtime_error("[gradient_statistics] no MLX-ops version registered to transform");
  }
  return [ops = statistics_ops(),
          loss_scale = loss_scale_,
          steps = accumulation_steps_,
          scaled = static_cast<int>(scaled_norm_)](const std::vector<mx::array>& inputs) {
    return std::vector<mx::array>{ops(inputs, loss_scale, steps, scaled)};
  };
}

std::vector<mx::array> GradientStatistics::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto grads = mx::vjp(ops(), primals, cotangents).second;
  std::vector<mx::array> selected;
  for (int index : argnums) {
    selected.push_back(grads[index]);
  }
  return selected;
}

std::vector<mx::array> GradientStatistics::jvp(
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
  return mx::jvp(ops(), primals, all).second;
}

std::pair<std::vector<mx::array>, std::vector<int>> GradientStatistics::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  return {mx::vmap(ops(), axes, {0})(inputs), {0}};
}

void GradientStatistics::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[gradient_statistics] the native reduction runs on the CPU only");
}

std::vector<mx::Shape> GradientStatistics::output_shapes(const std::vector<mx::array>&) {
  return {mx::Shape{tensors_, kNumStatistics}};
}

bool GradientStatistics::is_equivalent(const mx::Primitive& other) const {
  const auto* same = dynamic_cast<const GradientStatistics*>(&other);
  return same != nullptr && same->tensors_ == tensors_ && same->loss_scale_ == loss_scale_ &&
      same->accumulation_steps_ == accumulation_steps_ && same->scaled_norm_ == scaled_norm_;
}

} // namespace mlx_rmsprop
