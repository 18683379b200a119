"""An independent float64 NumPy statement of RMSprop, written from the frameworks' documented
update rules (not from mlx_rmsprop's code), used to check every combination of options."""

from __future__ import annotations

import numpy as np


def numpy_rmsprop(config: dict, x0: np.ndarray, grads: np.ndarray, lrs: np.ndarray):
    """Run ``len(grads)`` steps; return (parameter after each step incl. x0, final state)."""
    alpha, eps = config.get("alpha", 0.99), config.get("eps", 1e-8)
    mu = config.get("momentum", 0.0)
    wd = config.get("weight_decay", 0.0)
    decoupled = config.get("decoupled_weight_decay", False)
    x = x0.astype(np.float64).copy()
    v = np.full_like(x, config.get("initial_accumulator_value", 0.0))
    mean_grad = np.zeros_like(x)
    buf = np.zeros_like(x)
    trajectory = [x.copy()]
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = g.astype(np.float64)
        if config.get("maximize"):
            g = -g
        if wd and not decoupled:
            g = g + wd * x  # PyTorch: the decay term joins the gradient before v sees it
        v = alpha * v + (1 - alpha) * g**2
        correction = 1 - alpha**t if config.get("bias_correction") else 1.0
        if config.get("centered"):
            mean_grad = alpha * mean_grad + (1 - alpha) * g
            second = np.maximum(v / correction - (mean_grad / correction) ** 2, 0.0)
        else:
            second = v / correction
        if config.get("eps_in_sqrt"):
            denom = np.sqrt(second + eps)
        else:
            denom = np.sqrt(second) + eps
        if mu > 0:
            if config.get("lr_in_momentum"):  # Keras / TF / optax
                buf = mu * buf + lr * g / denom
                step = lr * g / denom + mu * buf if config.get("nesterov") else buf
            else:  # PyTorch
                buf = mu * buf + g / denom
                step = lr * (g / denom + mu * buf) if config.get("nesterov") else lr * buf
        else:
            step = lr * g / denom
        if wd and decoupled:
            x = x - x * wd * lr  # Keras: decay with the current learning rate, before the step
        x = x - step
        trajectory.append(x.copy())
    state = {"v": v}
    if config.get("centered"):
        state["grad_avg"] = mean_grad
    if mu > 0:
        state["momentum_buffer"] = buf
    return np.stack(trajectory), state
