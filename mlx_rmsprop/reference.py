"""The RMSprop update for one parameter, in plain MLX ops: the single definition of the math.

The compiled CPU path is this function under ``mx.compile``; every kernel is tested against it.
How results are stored (8-bit state, stochastic rounding) is defined in :mod:`.storage`.
"""

from __future__ import annotations

import mlx.core as mx

from .spec import QUANTIZED_KEYS, Scalar, UpdateOptions, code_table, scale_key
from .storage import ROUNDED_DTYPES, dequantize, quantize, stochastic_round


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
    With the update gate at 0, the parameter and every buffer but ``ema`` keep their values
    (8-bit buffers: their codes and scales, bit for bit).
    With EMA: :math:`e \leftarrow m e + (1-m) p` (gated by the EMA gate), and the parameter
    becomes :math:`e` when the overwrite flag is 1.

    The centered variance is clamped at 0: it equals the frameworks' value whenever that is
    >= 0, and where float rounding makes :math:`v - \bar g^2` negative (PyTorch then returns NaN)
    we use 0. NaN and Inf in the inputs propagate, as in every framework.

    Storage (:mod:`~mlx_rmsprop.storage`). With ``quantized_state`` (float32 arithmetic only),
    ``v``, ``grad_avg`` and ``momentum_buffer`` arrive as uint8 codes :math:`c` with float32
    scales :math:`s_b` per block of ``options.block_size`` elements and are read as
    :math:`x = T[c] \cdot s_b` (:math:`T` = ``spec.code_table(key)``); the update above runs
    on those values, and each new buffer is stored as :math:`s_b = \max_b |x|` (NaN if the
    block holds a NaN) and :math:`c = \#\{m \in M : m < x / s_b\}` (:math:`x / s_b := 0` when
    :math:`s_b = 0`; :math:`M` = ``spec.code_midpoints(T)``). With ``stochastic_rounding`` and
    float32 arithmetic, every result stored as float16/bfloat16 is rounded stochastically
    (:func:`~mlx_rmsprop.storage.stochastic_round`) with the step's ``ROUNDING_KEY``, this
    parameter's ``index``, and output 0 for the parameter, 1 + its position in
    ``options.state_keys`` for a state buffer; otherwise results round to nearest even.

    Args:
        options: the code-selecting flags.
        scalars: 1-D vector of ``len(Scalar)`` per-step values, in the arithmetic dtype.
        parameter: the parameter :math:`p`.
        gradient: its gradient :math:`g` (same shape; any floating dtype).
        state: the buffers named by ``options.state_keys``.
        index: the parameter's position in the step's parameter list (0 for a lone update):
            the stochastic rounding of different parameters draws different bits, and the
            row of ``factors`` it reads.
        factors: per-parameter clip factors, a (parameters, 2) matrix whose row ``index``
            holds (:math:`s_{cmul}`, :math:`s_{cdiv}`) in place of the scalars' entries
            (clipping each gradient by its own norm); ``None``: the scalars' entries.

    Returns:
        ``(new_parameter, new_state)`` with the same dtypes as the inputs.

    Raises:
        ValueError: ``quantized_state`` with float64 arithmetic, a negative ``index``, or codes
            whose shape is not the parameter's.
    """
    compute = scalars.dtype
    if options.quantized_state and compute != mx.float32:
        raise ValueError(
            f"quantized_state needs float32 arithmetic (scalars of dtype float32), got {compute}"
        )
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")

    def s(entry: Scalar) -> mx.array:
        return scalars[int(entry)]

    def quantized(key: str) -> bool:
        return options.quantized_state and key in QUANTIZED_KEYS

    def read(key: str) -> mx.array:
        if not quantized(key):
            return state[key].astype(compute)
        codes = state[key]
        if codes.shape != parameter.shape:
            raise ValueError(
                f"state[{key!r}] must have the parameter's shape {parameter.shape}, "
                f"got {codes.shape}"
            )
        return dequantize(codes, state[scale_key(key)], code_table(key), options.block_size)

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
    # Every moment buffer is read here, 8-bit ones dequantized.
    old = {key: read(key) for key in QUANTIZED_KEYS if key in options.state_keys}
    alpha, one_minus_alpha = s(Scalar.ALPHA), s(Scalar.ONE_MINUS_ALPHA)
    v = alpha * old["v"] + one_minus_alpha * mx.square(g)
    new_state = {"v": v}
    if options.centered:
        grad_avg = alpha * old["grad_avg"] + one_minus_alpha * g
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
        buf_old = old["momentum_buffer"]
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
    # 8-bit buffers are gated in the store, on their codes and scales: requantizing the
    # dequantized old values need not give back the old codes.
    keep = s(Scalar.UPDATE_GATE) == 0 if options.gated else None
    if keep is not None:
        p_new = mx.where(keep, p, p_new)
        for key in new_state:
            if not quantized(key):
                new_state[key] = mx.where(keep, old[key], new_state[key])

    # --- EMA ---
    if options.ema:
        ema_old = state["ema"].astype(compute)
        ema = s(Scalar.EMA_MOMENTUM) * ema_old + s(Scalar.EMA_ONE_MINUS_MOMENTUM) * p_new
        ema = mx.where(s(Scalar.EMA_GATE) == 0, ema_old, ema)
        p_new = mx.where(s(Scalar.EMA_OVERWRITE) != 0, ema, p_new)
        new_state["ema"] = ema

    # --- store ---
    # Stochastic rounding needs float32 results (its operands are exact there); float64 runs
    # round to nearest.
    rounding = options.stochastic_rounding and compute == mx.float32

    def store(value: mx.array, dtype: mx.Dtype, output: int) -> mx.array:
        if rounding and dtype in ROUNDED_DTYPES:
            return stochastic_round(value, dtype, s(Scalar.ROUNDING_KEY), index, output)
        return value.astype(dtype)

    stored = {}
    for key, value in new_state.items():
        if quantized(key):
            codes, scales = quantize(value, code_table(key), options.block_size)
            if keep is not None:
                codes = mx.where(keep, state[key], codes)
                scales = mx.where(keep, state[scale_key(key)], scales)
            stored[key], stored[scale_key(key)] = codes, scales
        else:
            stored[key] = store(value, state[key].dtype, 1 + options.state_keys.index(key))
    return store(p_new, parameter.dtype, 0), stored
