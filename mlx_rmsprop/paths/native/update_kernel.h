// The RMSprop update of mlx_rmsprop/reference.py as element loops over compute-typed spans.
//
// Every operation below is the reference's, in the reference's order, one IEEE operation at a
// time: the build turns FMA contraction off (-ffp-contract=off) and keeps IEEE semantics (no
// -ffast-math), so the float32 and float64 results are bit-identical to the reference's.
//
// Data layout: every span is a row-contiguous run of `n` elements in the compute type C (float
// or double). `*_out` may alias the matching input (a donated buffer updated in place): each
// element is read before it is written and no element depends on another.
#pragma once

#include <cmath>
#include <cstdint>

#include "spec.h"

namespace mlx_rmsprop {

template <typename C>
struct StepScalars {
  C value[kNumScalars];
  C operator[](ScalarIndex index) const {
    return value[index];
  }
};

// mx.maximum / mx.minimum on the CPU: a NaN first operand is returned, otherwise the comparison
// picks, so a NaN second operand is returned too (NaN propagates from either side).
template <typename C>
inline C mlx_maximum(C a, C b) {
  const C larger = a > b ? a : b;
  return a != a ? a : larger;
}
template <typename C>
inline C mlx_minimum(C a, C b) {
  const C smaller = a < b ? a : b;
  return a != a ? a : smaller;
}

#if defined(__GNUC__)
#define MLX_RMSPROP_NOINLINE __attribute__((noinline))
#else
#define MLX_RMSPROP_NOINLINE
#endif

// Before a loop whose iteration i reads and writes only element i of its spans: an output that
// aliases its input (an in-place update) then carries no dependence between iterations, and the
// compiler may vectorise without proving the spans disjoint.
#if defined(__clang__)
#define MLX_RMSPROP_ELEMENTWISE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define MLX_RMSPROP_ELEMENTWISE _Pragma("GCC ivdep")
#else
#define MLX_RMSPROP_ELEMENTWISE
#endif

// --- prepare gradient ---
// In place on `g`, before the moments:
// g <- -g; g <- g / s_div * s_cmul / s_cdiv; g <- min(max(g, -c), c); g <- g + lambda p.
// Kept out of line: inlined into the chunk loop, GCC 12 no longer vectorises the clip loop.
template <typename C>
MLX_RMSPROP_NOINLINE void prepare_gradient(
    int64_t n,
    uint32_t flags,
    const StepScalars<C>& s,
    C* __restrict g,
    const C* __restrict p) {
  if (flags & Flag::kMaximize) {
    for (int64_t i = 0; i < n; ++i) {
      g[i] = -g[i];
    }
  }
  if (flags & Flag::kScaleGradient) {
    const C divisor = s[kGradDivisor];
    const C multiplier = s[kClipMultiplier];
    const C clip_divisor = s[kClipDivisor];
    for (int64_t i = 0; i < n; ++i) {
      g[i] = g[i] / divisor * multiplier / clip_divisor;
    }
  }
  if (flags & Flag::kClipValue) {
    const C c = s[kClipValue];
    const C minus_c = -c;
    for (int64_t i = 0; i < n; ++i) {
      g[i] = mlx_minimum(mlx_maximum(g[i], minus_c), c);
    }
  }
  if (flags & Flag::kCoupledDecay) {
    const C decay = s[kWeightDecay];
    for (int64_t i = 0; i < n; ++i) {
      g[i] = g[i] + decay * p[i];
    }
  }
}

enum class Momentum { kNone, kLrOutside, kLrInside };

// The moments, the denominator, the step and the decoupled decay. Options that change which
// operations run are template parameters, so each combination is one straight loop that the
// compiler vectorises; per-step numbers come from `s`.
template <
    typename C,
    bool kCenteredT,
    Momentum kMomentumT,
    bool kNesterovT,
    bool kEpsInSqrtT,
    bool kBiasCorrectionT,
    bool kDecoupledT>
void update_core(
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
  const C alpha = s[kAlpha];
  const C one_minus_alpha = s[kOneMinusAlpha];
  const C correction = s[kBiasCorrection];
  const C eps = s[kEps];
  const C lr = s[kLr];
  const C mu = s[kMomentum];
  const C decay = s[kWeightDecay];
  MLX_RMSPROP_ELEMENTWISE
  for (int64_t i = 0; i < n; ++i) {
    const C gi = g[i];

    // --- moments ---
    const C vi = alpha * v[i] + one_minus_alpha * (gi * gi);
    v_out[i] = vi;
    C ai = C(0);
    if constexpr (kCenteredT) {
      ai = alpha * grad_avg[i] + one_minus_alpha * gi;
      grad_avg_out[i] = ai;
    }

    // --- denominator ---
    C variance = kBiasCorrectionT ? vi / correction : vi;
    if constexpr (kCenteredT) {
      const C a_hat = kBiasCorrectionT ? ai / correction : ai;
      variance = mlx_maximum(variance - a_hat * a_hat, C(0));
    }
    const C denom = kEpsInSqrtT ? std::sqrt(variance + eps) : std::sqrt(variance) + eps;

    // --- step ---
    C delta;
    if constexpr (kMomentumT == Momentum::kNone) {
      delta = lr * gi / denom;
    } else if constexpr (kMomentumT == Momentum::kLrInside) {
      const C increment = lr * gi / denom;
      const C bi = mu * buf[i] + increment;
      buf_out[i] = bi;
      delta = kNesterovT ? increment + mu * bi : bi;
    } else {
      const C direction = gi / denom;
      const C bi = mu * buf[i] + direction;
      buf_out[i] = bi;
      delta = kNesterovT ? lr * (direction + mu * bi) : lr * bi;
    }

    // --- decoupled decay ---
    // The shrink uses the parameter before the step; the step then applies to the result.
    const C pi = p[i];
    const C shrunk = kDecoupledT ? pi - pi * decay * lr : pi;
    p_out[i] = shrunk - delta;
  }
}

template <typename C>
using CoreFn = void (*)(
    int64_t,
    const StepScalars<C>&,
    const C*,
    const C*,
    C*,
    const C*,
    C*,
    const C*,
    C*,
    const C*,
    C*);

namespace detail {

template <typename F>
auto with_bool(bool value, F&& f) {
  return value ? f(std::true_type{}) : f(std::false_type{});
}

} // namespace detail

// update_core's instantiations as a type: select_core's `Kernel`, which a caller may replace
// by wrappers that compile them for another instruction set (rmsprop_update.cpp).
struct UpdateCore {
  template <
      typename C,
      bool kCenteredT,
      Momentum kMomentumT,
      bool kNesterovT,
      bool kEpsInSqrtT,
      bool kBiasCorrectionT,
      bool kDecoupledT>
  static constexpr CoreFn<C> instance = &update_core<
      C,
      kCenteredT,
      kMomentumT,
      kNesterovT,
      kEpsInSqrtT,
      kBiasCorrectionT,
      kDecoupledT>;
};

// The update_core instantiation for `flags`.
template <typename C, typename Kernel = UpdateCore>
CoreFn<C> select_core(uint32_t flags) {
  using detail::with_bool;
  const Momentum momentum = !(flags & Flag::kMomentum) ? Momentum::kNone
      : (flags & Flag::kLrInMomentum)                    ? Momentum::kLrInside
                                                         : Momentum::kLrOutside;
  auto with_momentum = [&](auto centered, auto eps_in_sqrt, auto corrected, auto decoupled) {
    auto pick = [&](auto nesterov) -> CoreFn<C> {
      switch (momentum) {
        case Momentum::kNone:
          return Kernel::template instance<
              C,
              centered(),
              Momentum::kNone,
              false,
              eps_in_sqrt(),
              corrected(),
              decoupled()>;
        case Momentum::kLrInside:
          return Kernel::template instance<
              C,
              centered(),
              Momentum::kLrInside,
              nesterov(),
              eps_in_sqrt(),
              corrected(),
              decoupled()>;
        default:
          return Kernel::template instance<
              C,
              centered(),
              Momentum::kLrOutside,
              nesterov(),
              eps_in_sqrt(),
              corrected(),
              decoupled()>;
      }
    };
    return with_bool(flags & Flag::kNesterov, pick);
  };
  return with_bool(flags & Flag::kCentered, [&](auto centered) {
    return with_bool(flags & Flag::kEpsInSqrt, [&](auto eps_in_sqrt) {
      return with_bool(flags & Flag::kBiasCorrection, [&](auto corrected) {
        return with_bool(flags & Flag::kDecoupledDecay, [&](auto decoupled) {
          return with_momentum(centered, eps_in_sqrt, corrected, decoupled);
        });
      });
    });
  });
}

// --- gate ---
// In update_range (rmsprop_update.cpp): with the update gate at 0 the chunk skips
// prepare_gradient and update_core and copies the parameter and every buffer but the EMA.

// --- EMA ---
// Exponential moving average of the parameter after the step (p_new in the compute type):
// e <- m e + (1 - m) p_new unless the EMA gate is 0; p_new <- e when the overwrite flag is set.
template <typename C>
void update_ema(
    int64_t n,
    const StepScalars<C>& s,
    C* p_new,
    const C* ema,
    C* ema_out) {
  const bool advance = !(s[kEmaGate] == C(0));
  const bool overwrite = s[kEmaOverwrite] != C(0);
  if (advance) {
    const C m = s[kEmaMomentum];
    const C one_minus_m = s[kEmaOneMinusMomentum];
    MLX_RMSPROP_ELEMENTWISE
    for (int64_t i = 0; i < n; ++i) {
      ema_out[i] = m * ema[i] + one_minus_m * p_new[i];
    }
  } else if (ema_out != ema) {
    for (int64_t i = 0; i < n; ++i) {
      ema_out[i] = ema[i];
    }
  }
  if (overwrite) {
    for (int64_t i = 0; i < n; ++i) {
      p_new[i] = ema_out[i];
    }
  }
}

} // namespace mlx_rmsprop
