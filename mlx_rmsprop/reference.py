"""The RMSprop update for one parameter, in plain MLX ops: the single definition of the math.

The compiled CPU path is this function under ``mx.compile``; every kernel is tested against it.
"""

from __future__ import annotations

import mlx.core as mx

from .spec import Scalar, UpdateOptions


def rmsprop_reference(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
    *,
    index: int = 0,
    factors: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    r"""One RMSprop step for one parameter.

    Arithmetic runs in ``scalars.dtype`` (float32, or float64 for float64 runs); each result is
    cast back to the dtype of the array it replaces. With ``s[k]`` the entries of ``scalars``
    (see :class:`~mlx_rmsprop.spec.Scalar`), in this order:

    .. math::

        g &\leftarrow -g \quad\text{(maximize)} \\
        g &\leftarrow g / s_{div} \cdot s_{cmul} / s_{cdiv}
            \quad\text{(loss scale, clipnorm)} \\
        g &\leftarrow \min(\max(g, -c), c) \quad\text{(clipvalue; NaN stays NaN)} \\
        g &\leftarrow g + \lambda p \quad\text{(coupled weight decay)} \\
        v &\leftarrow \alpha v + (1-\alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1-\alpha) g \quad\text{(centered)} \\
        \hat v &= v / b_t,\ \hat{\bar g} = \bar g / b_t
            \quad (b_t = 1-\alpha^t \text{ with bias correction, else } 1) \\
        s &= \max(\hat v - \hat{\bar g}^2, 0) \text{ (centered) else } \hat v \\
        d &= \sqrt{s + \epsilon} \text{ (eps\_in\_sqrt) else } \sqrt{s} + \epsilon

    then the step :math:`\Delta`: without momentum :math:`\Delta = \eta g / d`; with momentum
    :math:`\mu` and ``lr_in_momentum``: :math:`b \leftarrow \mu b + \eta g/d`,
    :math:`\Delta = b` (nesterov: :math:`\Delta = \eta g/d + \mu b`); without ``lr_in_momentum``:
    :math:`b \leftarrow \mu b + g/d`, :math:`\Delta = \eta b` (nesterov:
    :math:`\Delta = \eta (g/d + \mu b)`). Decoupled weight decay first shrinks
    :math:`p \leftarrow p - p \lambda \eta`; then :math:`p \leftarrow p - \Delta`.
    With the update gate at 0, the parameter and every buffer but ``ema`` keep their values.
    With EMA: :math:`e \leftarrow m e + (1-m) p` (gated by the EMA gate), and the parameter
    becomes :math:`e` when the overwrite flag is 1.

    The centered variance is clamped at 0: it equals the frameworks' value whenever that is
    >= 0, and where float rounding makes :math:`v - \bar g^2` negative (PyTorch then returns NaN)
    we use 0. NaN and Inf in the inputs propagate, as in every framework.

    Args:
        options: the code-selecting flags.
        scalars: 1-D vector of ``len(Scalar)`` per-step values, in the arithmetic dtype.
        parameter: the parameter :math:`p`.
        gradient: its gradient :math:`g` (same shape; any floating dtype).
        state: the buffers named by ``options.state_keys``.
        index: the parameter's position in the step's parameter list.
        factors: per-parameter clip factors, a (parameters, 2) matrix whose row ``index``
            holds (:math:`s_{cmul}`, :math:`s_{cdiv}`) in place of the scalars' entries
            (clipping each gradient by its own norm); ``None``: the scalars' entries.

    Returns:
        ``(new_parameter, new_state)`` with the same dtypes as the inputs.
    """
    compute = scalars.dtype

    def s(index: Scalar) -> mx.array:
        return scalars[int(index)]

    p = parameter.astype(compute)
    g = gradient.astype(compute)

    # --- prepare gradient ---
    if options.maximize:
        g = -g
    if options.scale_gradient:
        g = g / s(Scalar.GRAD_DIVISOR)
        if factors is None:
            multiplier, divisor = s(Scalar.CLIP_MULTIPLIER), s(Scalar.CLIP_DIVISOR)
        else:
            multiplier = factors[index, 0].astype(compute)
            divisor = factors[index, 1].astype(compute)
        g = g * multiplier / divisor
    if options.clip_value:
        g = mx.minimum(mx.maximum(g, -s(Scalar.CLIP_VALUE)), s(Scalar.CLIP_VALUE))
    if options.coupled_decay:
        g = g + s(Scalar.WEIGHT_DECAY) * p

    # --- moments ---
    alpha, one_minus_alpha = s(Scalar.ALPHA), s(Scalar.ONE_MINUS_ALPHA)
    v = alpha * state["v"].astype(compute) + one_minus_alpha * mx.square(g)
    new_state = {"v": v}
    if options.centered:
        grad_avg = alpha * state["grad_avg"].astype(compute) + one_minus_alpha * g
        new_state["grad_avg"] = grad_avg

    # --- denominator ---
    variance = v / s(Scalar.BIAS_CORRECTION) if options.bias_correction else v
    if options.centered:
        grad_avg_hat = grad_avg / s(Scalar.BIAS_CORRECTION) if options.bias_correction else grad_avg
        variance = mx.maximum(variance - mx.square(grad_avg_hat), 0.0)
    eps = s(Scalar.EPS)
    denom = mx.sqrt(variance + eps) if options.eps_in_sqrt else mx.sqrt(variance) + eps

    # --- step ---
    lr = s(Scalar.LR)
    if options.momentum:
        mu = s(Scalar.MOMENTUM)
        buf_old = state["momentum_buffer"].astype(compute)
        if options.lr_in_momentum:
            increment = lr * g / denom
            buf = mu * buf_old + increment
            delta = increment + mu * buf if options.nesterov else buf
        else:
            direction = g / denom
            buf = mu * buf_old + direction
            delta = lr * (direction + mu * buf) if options.nesterov else lr * buf
        new_state["momentum_buffer"] = buf
    else:
        delta = lr * g / denom

    # --- decoupled decay ---
    # The shrink uses the parameter before the step; the step then applies to the result.
    shrunk = p - p * s(Scalar.WEIGHT_DECAY) * lr if options.decoupled_decay else p
    p_new = shrunk - delta

    # --- gate ---
    if options.gated:
        keep = s(Scalar.UPDATE_GATE) == 0
        p_new = mx.where(keep, p, p_new)
        for key in new_state:
            new_state[key] = mx.where(keep, state[key].astype(compute), new_state[key])

    # --- EMA ---
    if options.ema:
        ema_old = state["ema"].astype(compute)
        ema = s(Scalar.EMA_MOMENTUM) * ema_old + s(Scalar.EMA_ONE_MINUS_MOMENTUM) * p_new
        ema = mx.where(s(Scalar.EMA_GATE) == 0, ema_old, ema)
        p_new = mx.where(s(Scalar.EMA_OVERWRITE) != 0, ema, p_new)
        new_state["ema"] = ema

    return p_new.astype(parameter.dtype), {
        key: value.astype(state[key].dtype) for key, value in new_state.items()
    }


def spliced_scalars(scalars: mx.array, index: int, factors: mx.array | None) -> mx.array:
    """``scalars`` with the clip entries taken from row ``index`` of ``factors`` (as
    :func:`rmsprop_reference` reads them), for a body that reads only the scalars vector."""
    if factors is None:
        return scalars
    return mx.concatenate(
        [
            scalars[: int(Scalar.CLIP_MULTIPLIER)],
            factors[index].astype(scalars.dtype),
            scalars[int(Scalar.CLIP_DIVISOR) + 1 :],
        ]
    )
