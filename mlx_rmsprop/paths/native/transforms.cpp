// Function transforms (vjp, jvp, vmap) of the RMSpropUpdate primitive, and of a group of them.
//
// The fused loop has no derivative of its own: the transforms run on `update_ops`, the update of
// mlx_rmsprop/reference.py written with MLX ops, section by section and in the same order, so
// MLX differentiates the same operations that `fused=False` differentiates (the tests compare
// the results bit for bit). The forward pass never builds these ops: a step that no transform
// traces costs what it cost before.
#include "rmsprop_update.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "update_kernel.h"

namespace mlx_rmsprop {

std::vector<mx::array> update_ops(const std::vector<mx::array>& inputs, uint32_t flags) {
  // inputs: {scalars, gradient, parameter, state...} as the primitive takes them. `scalars` is
  // (16,) or, under vmap with batched scalars, (B, 16) with every other input shaped (B, ...).
  const mx::array& scalars = inputs[0];
  const mx::array& gradient = inputs[1];
  const mx::array& parameter = inputs[2];
  const mx::Dtype compute = scalars.dtype();
  const bool batched_scalars = scalars.ndim() == 2;
  mx::Shape scalar_shape;
  if (batched_scalars) {
    scalar_shape = mx::Shape(parameter.ndim(), 1);
    scalar_shape[0] = scalars.shape(0);
  }
  auto s = [&](ScalarIndex index) {
    const int k = static_cast<int>(index);
    mx::Shape start(scalars.ndim(), 0), stop = scalars.shape();
    start.back() = k;
    stop.back() = k + 1;
    return mx::reshape(mx::slice(scalars, start, stop), scalar_shape);
  };
  const mx::array zero(0.0, compute);

  int next = 3; // state order: v, grad_avg, momentum_buffer, ema
  const int v_index = next++;
  const int grad_avg_index = (flags & Flag::kCentered) ? next++ : -1;
  const int momentum_index = (flags & Flag::kMomentum) ? next++ : -1;
  const int ema_index = (flags & Flag::kEma) ? next++ : -1;

  mx::array p = mx::astype(parameter, compute);
  mx::array g = mx::astype(gradient, compute);

  // --- prepare gradient ---
  if (flags & Flag::kMaximize) {
    g = mx::negative(g);
  }
  if (flags & Flag::kScaleGradient) {
    g = mx::divide(g, s(kGradDivisor));
    g = mx::divide(mx::multiply(g, s(kClipMultiplier)), s(kClipDivisor));
  }
  if (flags & Flag::kClipValue) {
    g = mx::minimum(mx::maximum(g, mx::negative(s(kClipValue))), s(kClipValue));
  }
  if (flags & Flag::kCoupledDecay) {
    g = mx::add(g, mx::multiply(s(kWeightDecay), p));
  }

  // --- moments ---
  const mx::array alpha = s(kAlpha), one_minus_alpha = s(kOneMinusAlpha);
  const mx::array v_old = mx::astype(inputs[v_index], compute);
  const mx::array v =
      mx::add(mx::multiply(alpha, v_old), mx::multiply(one_minus_alpha, mx::square(g)));
  // New values in input order: parameter, v, grad_avg, momentum_buffer, ema.
  std::vector<mx::array> new_values(inputs.size() - 2, zero);
  new_values[v_index - 2] = v;
  mx::array grad_avg = zero;
  if (flags & Flag::kCentered) {
    grad_avg = mx::add(
        mx::multiply(alpha, mx::astype(inputs[grad_avg_index], compute)),
        mx::multiply(one_minus_alpha, g));
    new_values[grad_avg_index - 2] = grad_avg;
  }

  // --- denominator ---
  mx::array variance = (flags & Flag::kBiasCorrection) ? mx::divide(v, s(kBiasCorrection)) : v;
  if (flags & Flag::kCentered) {
    const mx::array grad_avg_hat =
        (flags & Flag::kBiasCorrection) ? mx::divide(grad_avg, s(kBiasCorrection)) : grad_avg;
    variance = mx::maximum(mx::subtract(variance, mx::square(grad_avg_hat)), zero);
  }
  const mx::array eps = s(kEps);
  const mx::array denom = (flags & Flag::kEpsInSqrt) ? mx::sqrt(mx::add(variance, eps))
                                               : mx::add(mx::sqrt(variance), eps);

  // --- step ---
  const mx::array lr = s(kLr);
  mx::array delta = zero;
  if (flags & Flag::kMomentum) {
    const mx::array mu = s(kMomentum);
    const mx::array buf_old = mx::astype(inputs[momentum_index], compute);
    mx::array buf = zero;
    if (flags & Flag::kLrInMomentum) {
      const mx::array increment = mx::divide(mx::multiply(lr, g), denom);
      buf = mx::add(mx::multiply(mu, buf_old), increment);
      delta = (flags & Flag::kNesterov) ? mx::add(increment, mx::multiply(mu, buf)) : buf;
    } else {
      const mx::array direction = mx::divide(g, denom);
      buf = mx::add(mx::multiply(mu, buf_old), direction);
      delta = (flags & Flag::kNesterov)
          ? mx::multiply(lr, mx::add(direction, mx::multiply(mu, buf)))
          : mx::multiply(lr, buf);
    }
    new_values[momentum_index - 2] = buf;
  } else {
    delta = mx::divide(mx::multiply(lr, g), denom);
  }

  // --- decoupled decay ---
  // The shrink uses the parameter before the step; the step then applies to the result.
  mx::array p_new = p;
  if (flags & Flag::kDecoupledDecay) {
    p_new = mx::subtract(p, mx::multiply(mx::multiply(p, s(kWeightDecay)), lr));
  }
  p_new = mx::subtract(p_new, delta);

  // --- gate ---
  if (flags & Flag::kGated) {
    const mx::array keep = mx::equal(s(kUpdateGate), zero);
    p_new = mx::where(keep, p, p_new);
    for (int k = v_index; k < static_cast<int>(inputs.size()); ++k) {
      if (k != ema_index) {
        new_values[k - 2] =
            mx::where(keep, mx::astype(inputs[k], compute), new_values[k - 2]);
      }
    }
  }

  // --- EMA ---
  if (flags & Flag::kEma) {
    const mx::array ema_old = mx::astype(inputs[ema_index], compute);
    mx::array ema = mx::add(
        mx::multiply(s(kEmaMomentum), ema_old), mx::multiply(s(kEmaOneMinusMomentum), p_new));
    ema = mx::where(mx::equal(s(kEmaGate), zero), ema_old, ema);
    p_new = mx::where(mx::not_equal(s(kEmaOverwrite), zero), ema, p_new);
    new_values[ema_index - 2] = ema;
  }

  new_values[0] = p_new;
  for (size_t k = 0; k < new_values.size(); ++k) {
    new_values[k] = mx::astype(new_values[k], inputs[2 + k].dtype());
  }
  return new_values;
}

std::vector<mx::array> RMSpropUpdate::spliced(const std::vector<mx::array>& inputs) const {
  if (!has_factors_) {
    return inputs;
  }
  // The scalars with the factors' row `index` in place of the clip entries, the values the
  // reference reads (pure data movement, so the derivatives pass through unchanged).
  const mx::array& scalars = inputs[0];
  const mx::array& factors = inputs.back();
  const int rows = factors.ndim() - 2; // batched factors have a leading axis
  mx::Shape start(factors.ndim(), 0), stop = factors.shape();
  start[rows] = index_;
  stop[rows] = index_ + 1;
  mx::array row = mx::squeeze(mx::slice(factors, start, stop), rows);
  if (scalars.ndim() > row.ndim()) {
    row = mx::broadcast_to(row, {scalars.shape(0), 2});
  }
  mx::array wide = scalars;
  if (row.ndim() > scalars.ndim()) {
    wide = mx::broadcast_to(scalars, {row.shape(0), scalars.shape(0)});
  }
  auto part = [&](int from, int to) {
    mx::Shape begin(wide.ndim(), 0), end = wide.shape();
    begin[wide.ndim() - 1] = from;
    end[wide.ndim() - 1] = to;
    return mx::slice(wide, begin, end);
  };
  const int width = wide.shape(wide.ndim() - 1);
  std::vector<mx::array> result(inputs.begin(), inputs.end() - 1);
  result[0] = mx::concatenate(
      {part(0, kClipMultiplier), mx::astype(row, scalars.dtype()), part(kClipDivisor + 1, width)},
      wide.ndim() - 1);
  return result;
}

std::vector<mx::array> accumulate_ops(
    const mx::array& gradient,
    const mx::array& accumulator,
    const mx::array& gates,
    const Accumulation& accumulation,
    mx::Dtype compute) {
  // step.py's accumulate and carry_accumulators, op for op.
  mx::array scaled = mx::astype(gradient, compute);
  if (accumulation.loss_scale != 0.0) {
    scaled = mx::divide(scaled, mx::array(accumulation.loss_scale, compute));
  }
  const mx::array old = mx::astype(accumulator, compute);
  const mx::array summed = mx::add(scaled, old);
  const mx::array mean =
      mx::divide(summed, mx::array(static_cast<double>(accumulation.steps), compute));
  auto gate = [&](int k) {
    return mx::not_equal(
        mx::reshape(mx::slice(gates, {k}, {k + 1}), {}), mx::array(0.0f, mx::float32));
  };
  mx::array kept = mx::where(gate(kGateApplies), mx::zeros_like(summed), summed);
  kept = mx::where(gate(kGateSkip), old, kept);
  return {mean, mx::astype(kept, accumulator.dtype())};
}

std::vector<mx::array> RMSpropUpdate::ops(const std::vector<mx::array>& inputs) const {
  if (!accumulation_.on()) {
    return update_ops(spliced(inputs), flags_);
  }
  const size_t count = inputs.size();
  std::vector<mx::array> rest(inputs.begin(), inputs.end() - 2);
  std::vector<mx::array> accumulated = accumulate_ops(
      inputs[1], inputs[count - 2], inputs[count - 1], accumulation_, inputs[0].dtype());
  rest[1] = accumulated[0];
  std::vector<mx::array> outputs = update_ops(spliced(rest), flags_);
  outputs.push_back(accumulated[1]);
  return outputs;
}

// The storage flags (docs/transforms.md). 8-bit state: refused (the reference differentiates
// its scales through dequantize and the block maxima, which update_ops does not restate).
// Stochastic rounding: the reference differentiates each rounded store straight through, as
// the round-to-nearest cast that update_ops ends with (bit for bit, tested), so vjp and jvp
// run update_ops; vmap is refused where it rounds a store, as its random bits are drawn by
// element index, which a batch renumbers.
void RMSpropUpdate::require_transformable(
    const char* transform,
    const std::vector<mx::array>& all_inputs) const {
  // Only the parameter and state buffers are stored with stochastic rounding.
  const std::vector<mx::array> inputs(all_inputs.begin(), all_inputs.end() - trailing_inputs());
  if (flags_ & Flag::kQuantizedState) {
    throw std::invalid_argument(
        std::string("[rmsprop_update] ") + transform +
        " is not supported with quantized_state=True (8-bit state)");
  }
  if (std::string(transform) == "vmap" && stochastic_stores(flags_, inputs)) {
    throw std::invalid_argument(
        std::string("[rmsprop_update] ") + transform +
        " is not supported with stochastic_rounding=True on float16/bfloat16 outputs");
  }
}

std::vector<mx::array> RMSpropUpdate::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  require_transformable("vjp", primals);
  auto fused = [this](const std::vector<mx::array>& in) { return ops(in); };
  auto [outputs, grads] = mx::vjp(fused, primals, cotangents);
  std::vector<mx::array> selected;
  for (int index : argnums) {
    selected.push_back(grads[index]);
  }
  return selected;
}

std::vector<mx::array> RMSpropUpdate::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  require_transformable("jvp", primals);
  std::vector<mx::array> all;
  for (const auto& primal : primals) {
    all.push_back(mx::zeros_like(primal));
  }
  for (size_t j = 0; j < argnums.size(); ++j) {
    all[argnums[j]] = tangents[j];
  }
  auto fused = [this](const std::vector<mx::array>& in) { return ops(in); };
  return mx::jvp(fused, primals, all).second;
}

namespace {

// The size of the batch under vmap: that of the first batched input.
int batch_size(const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) {
      return inputs[i].shape(axes[i]);
    }
  }
  return 0;
}

} // namespace

std::pair<std::vector<mx::array>, std::vector<int>> RMSpropUpdate::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  require_transformable("vmap", inputs);
  if (accumulation_.on()) {
    // Batched accumulation is rare enough to run as ops: every output batched on axis 0.
    auto fused = [this](const std::vector<mx::array>& in) { return ops(in); };
    const std::vector<int> out_axes(inputs.size() - 2 - trailing_inputs() + 1, 0);
    return {mx::vmap(fused, axes, out_axes)(inputs), out_axes};
  }
  if (has_factors_) {
    // Splice the factors' row into the scalars (batched when either is), then batch the
    // update without factors.
    std::vector<mx::array> moved(inputs);
    std::vector<int> moved_axes(axes);
    for (size_t i : {size_t(0), inputs.size() - 1}) {
      if (axes[i] >= 0) {
        moved[i] = mx::moveaxis(inputs[i], axes[i], 0);
        moved_axes[i] = 0;
      }
    }
    std::vector<mx::array> rest = spliced(moved);
    moved_axes.pop_back();
    moved_axes[0] = (axes[0] >= 0 || axes.back() >= 0) ? 0 : -1;
    RMSpropUpdate plain(stream(), flags_, block_size_, index_);
    return plain.vmap(rest, moved_axes);
  }
  // Every input but the scalars is parameter-shaped: move each batch axis to the front and
  // broadcast the unbatched ones, so all share the shape (B, ...).
  const int batch = batch_size(inputs, axes);
  std::vector<mx::array> batched;
  const int parameter_index = 2;
  mx::Shape shape = inputs[parameter_index].shape();
  if (axes[parameter_index] >= 0) {
    shape.erase(shape.begin() + axes[parameter_index]);
  }
  shape.insert(shape.begin(), batch);
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) {
      batched.push_back(mx::moveaxis(inputs[i], axes[i], 0));
    } else if (i == 0) {
      batched.push_back(inputs[i]);
    } else {
      batched.push_back(mx::broadcast_to(mx::expand_dims(inputs[i], 0), shape));
    }
  }
  std::vector<int> out_axes(inputs.size() - 2, 0);
  if (axes[0] < 0) {
    // The update is element-wise: with one set of scalars the batch is just more elements.
    const std::vector<mx::array> state(batched.begin() + 3, batched.end());
    return {
        rmsprop_update(
            update_node(batched[0], batched[1], batched[2], state, flags_, block_size_, index_)),
        out_axes};
  }
  // Scalars per batch entry: the ops broadcast each (B, 1, ...) scalar over its entry.
  return {update_ops(batched, flags_), out_axes};
}

// A group's transforms are its members': each transforms its own inputs, as its own node would.

namespace {

// The entries of `argnums` (node input numbers) that fall in [first, first + count): their
// positions in `argnums` and their numbers within that range.
std::pair<std::vector<size_t>, std::vector<int>> member_argnums(
    const std::vector<int>& argnums,
    size_t first,
    size_t count) {
  std::vector<size_t> positions;
  std::vector<int> local;
  for (size_t j = 0; j < argnums.size(); ++j) {
    const size_t at = static_cast<size_t>(argnums[j]);
    if (at >= first && at < first + count) {
      positions.push_back(j);
      local.push_back(static_cast<int>(at - first));
    }
  }
  return {positions, local};
}

} // namespace

std::vector<mx::array> RMSpropUpdateGroup::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  std::vector<std::pair<size_t, mx::array>> found;
  size_t first_output = 0;
  for_each_member(primals, [&](const Member& member, std::vector<mx::array> own, size_t first) {
    const auto [positions, local] = member_argnums(argnums, first, member.inputs);
    const auto from = static_cast<std::ptrdiff_t>(first_output);
    const auto to = from + static_cast<std::ptrdiff_t>(member.outputs);
    first_output += member.outputs;
    if (local.empty()) {
      return;
    }
    std::vector<mx::array> grads = member.update->vjp(
        own,
        std::vector<mx::array>(cotangents.begin() + from, cotangents.begin() + to),
        local,
        std::vector<mx::array>(outputs.begin() + from, outputs.begin() + to));
    for (size_t j = 0; j < positions.size(); ++j) {
      found.emplace_back(positions[j], grads[j]);
    }
  });
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) {
    return a.first < b.first;
  });
  std::vector<mx::array> selected;
  for (auto& [position, grad] : found) {
    selected.push_back(grad);
  }
  return selected;
}

std::vector<mx::array> RMSpropUpdateGroup::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  std::vector<mx::array> result;
  for_each_member(primals, [&](const Member& member, std::vector<mx::array> own, size_t first) {
    const auto [positions, local] = member_argnums(argnums, first, member.inputs);
    if (local.empty()) {
      // Untouched by the transform: zero tangents, without transforming the member (which
      // may be one that cannot be, 8-bit state say).
      for (const auto& in : member.update->replaced(own)) {
        result.push_back(mx::zeros_like(in));
      }
      return;
    }
    std::vector<mx::array> own_tangents;
    for (size_t position : positions) {
      own_tangents.push_back(tangents[position]);
    }
    for (auto& tangent : member.update->jvp(own, own_tangents, local)) {
      result.push_back(std::move(tangent));
    }
  });
  return result;
}

std::pair<std::vector<mx::array>, std::vector<int>> RMSpropUpdateGroup::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  const int batch = batch_size(inputs, axes);
  std::vector<mx::array> result;
  std::vector<int> result_axes;
  for_each_member(inputs, [&](const Member& member, std::vector<mx::array> own, size_t first) {
    const auto from = static_cast<std::ptrdiff_t>(first);
    const std::vector<int> own_axes(
        axes.begin() + from, axes.begin() + from + static_cast<std::ptrdiff_t>(member.inputs));
    if (std::all_of(own_axes.begin(), own_axes.end(), [](int axis) { return axis < 0; })) {
      // Nothing of this member is batched: its own node, unbatched (as MLX leaves a node with
      // no batched input; the member may be one vmap refuses), repeated along the batch, since
      // MLX takes every output of a batched node as batched.
      std::vector<mx::Shape> shapes;
      std::vector<mx::Dtype> dtypes;
      for (const auto& in : member.update->replaced(own)) {
        shapes.push_back(in.shape());
        dtypes.push_back(in.dtype());
      }
      for (const auto& out : mx::array::make_arrays(shapes, dtypes, member.update, own)) {
        mx::Shape batched = out.shape();
        batched.insert(batched.begin(), batch);
        result.push_back(mx::broadcast_to(mx::expand_dims(out, 0), batched));
        result_axes.push_back(0);
      }
      return;
    }
    auto [outputs, out_axes] = member.update->vmap(own, own_axes);
    result.insert(result.end(), outputs.begin(), outputs.end());
    result_axes.insert(result_axes.end(), out_axes.begin(), out_axes.end());
  });
  return {result, result_axes};
}

} // namespace mlx_rmsprop
