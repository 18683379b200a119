"""Which kernel variants verification runs: every option set, and every dtype combination.

A variant is options x dtypes x address-space class (``Variant``). The full product is
``len(option_space())`` option sets x 15 dtype combinations x 2 classes, too many to
compile, so verification (``python -m mlx_rmsprop check`` on a GPU, the emulation tests on
Linux) runs:

- every option set of :func:`~mlx_rmsprop.spec.option_space` with float32 parameter, gradient
  and state, and
- for each of the 15 dtype combinations and both address-space classes, a pairwise covering
  set of option sets of the whole space, storage flags included
  (``pairwise_option_sets(storage=True)``): every value of every flag together with every
  value of every other flag appears at least once (where the spec allows the pair). Its 8-bit
  state rows take the block sizes of ``spec.BLOCK_SIZES`` in turn, and the large ones both
  classes of scales (fewer than 8 blocks, passed in Metal's ``constant`` address space, or
  more): the storage flags are crossed pairwise, not multiplied into every option set;
- the kernels reading per-parameter clip factors (:func:`factor_variants`): every buffer
  layout, with and without stochastic rounding, with every flag on, in both address-space
  classes of the factors matrix. Reading the factors does not depend on the other flags or
  the dtypes, so those take turns instead of being crossed;
- the kernels accumulating gradients (:func:`accumulating_variants`): every buffer layout,
  with and without stochastic rounding, with every flag on, in both size classes, the
  accumulator's dtype, the dtype combination and reading clip factors taking turns.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import cache

import mlx.core as mx

from ...spec import (
    BLOCK_SIZES,
    EMA,
    FLAGS,
    GRAD_AVG,
    MOMENTUM_BUFFER,
    UpdateOptions,
    V,
    option_space,
    scale_key,
)
from .source import KERNEL_DTYPES, Variant


@cache
def pairwise_option_sets(storage: bool = False) -> tuple[UpdateOptions, ...]:
    """A small subset of ``option_space(storage)`` in which every pair of (flag, value) that
    some valid option set holds appears: greedy, deterministic (each row is the first option
    set covering most uncovered pairs)."""
    space = option_space(storage)
    # Each (flag, value) pair as a bit, each option set as the mask of the pairs it holds.
    index: dict[tuple, int] = {}
    masks = []
    for options in space:
        values = [(name, getattr(options, name)) for name in FLAGS]
        mask = 0
        for pair in itertools.combinations(values, 2):
            mask |= 1 << index.setdefault(pair, len(index))
        masks.append(mask)
    uncovered = (1 << len(index)) - 1
    rows = []
    while uncovered:
        best = max(range(len(space)), key=lambda k: (masks[k] & uncovered).bit_count())
        uncovered &= ~masks[best]
        rows.append(space[best])
    return tuple(rows)


def every_flag_on(
    state_keys: tuple[str, ...], stochastic_rounding: bool = False, block_size: int = 0
) -> UpdateOptions:
    """The option set with the buffer layout ``state_keys`` (8-bit state when it holds scales,
    with ``block_size`` or the default) and as many other flags on as the spec allows
    (decoupled weight decay over coupled, nesterov and lr_in_momentum with momentum): the
    longest code for that layout."""
    momentum = MOMENTUM_BUFFER in state_keys
    quantized = scale_key(V) in state_keys
    return UpdateOptions(
        quantized_state=quantized,
        stochastic_rounding=stochastic_rounding,
        block_size=block_size if quantized else 0,
        centered=GRAD_AVG in state_keys,
        momentum=momentum,
        nesterov=momentum,
        ema=EMA in state_keys,
        eps_in_sqrt=True,
        lr_in_momentum=momentum,
        decoupled_decay=True,
        maximize=True,
        bias_correction=True,
        scale_gradient=True,
        clip_value=True,
        gated=True,
    )


def dtype_combinations() -> list[tuple[mx.Dtype, mx.Dtype, mx.Dtype]]:
    """(parameter, gradient, state) dtypes: every kernel dtype for parameter and gradient,
    state float32 or the parameter's dtype (what ``state_dtype`` can produce)."""
    combos = []
    for parameter, gradient in itertools.product(KERNEL_DTYPES, KERNEL_DTYPES):
        for state in dict.fromkeys((mx.float32, parameter)):
            combos.append((parameter, gradient, state))
    return combos


def plan_variant(
    options: UpdateOptions,
    dtypes: tuple[mx.Dtype, mx.Dtype, mx.Dtype],
    small: bool,
    turn: int,
) -> Variant:
    """The variant of ``options`` in ``dtypes`` and size class ``small`` for row ``turn`` of a
    plan: with 8-bit state the block size is ``BLOCK_SIZES[turn % 6]`` and a large parameter
    has fewer than 8 blocks on even turns, more on odd ones."""
    if not options.quantized_state:
        return Variant(options, *dtypes, small)
    options = dataclasses.replace(options, block_size=BLOCK_SIZES[turn % len(BLOCK_SIZES)])
    return Variant(options, *dtypes, small, small_scales=small or turn % 2 == 0)


def _layouts() -> list[tuple[tuple[str, ...], bool]]:
    """Every (buffer layout, stochastic rounding) of the option space, in a fixed order."""
    return sorted({(o.state_keys, o.stochastic_rounding) for o in option_space(storage=True)})


def _every_flag_variant(keys: tuple[str, ...], rounding: bool, small: bool, turn: int) -> Variant:
    """The option set with every flag on for this layout, as :func:`plan_variant` makes it for
    row ``turn``, the dtype combination taking turns."""
    combinations = dtype_combinations()
    return plan_variant(
        every_flag_on(keys, rounding), combinations[turn % len(combinations)], small, turn
    )


def factor_variants() -> list[Variant]:
    """The kernels that read per-parameter clip factors: for every (buffer layout, stochastic
    rounding) the option set with every flag on, once with a factors matrix of 8 elements or
    more and once with fewer (Metal's ``constant`` address space), the dtype combination,
    the parameter's size class and 8-bit state's block size and scale class taking turns."""
    variants = []
    for k, (keys, rounding) in enumerate(_layouts()):
        for small_factors in (False, True):
            turn = 2 * k + small_factors
            variant = _every_flag_variant(keys, rounding, small=turn % 3 == 0, turn=turn)
            variants.append(dataclasses.replace(variant, factors=True, small_factors=small_factors))
    return variants


def accumulating_variants() -> list[Variant]:
    """The kernels that accumulate gradients first: for every (buffer layout, stochastic
    rounding) the option set with every flag on, in both size classes; the accumulator's dtype
    (each of KERNEL_DTYPES), the dtype combination, 8-bit state's block size and scale class
    and reading the clip factors from the factors matrix (every other layout, Keras' clipnorm
    with accumulation) take turns. The stage reads the accumulator, the gates and (loss scale,
    steps) whatever the other flags, so those are not crossed."""
    variants = []
    for k, (keys, rounding) in enumerate(_layouts()):
        for small in (False, True):
            turn = 2 * k + small
            variant = _every_flag_variant(keys, rounding, small=small, turn=turn)
            factors = k % 2 == 1
            variants.append(
                dataclasses.replace(
                    variant,
                    accumulator_dtype=KERNEL_DTYPES[(k + small) % len(KERNEL_DTYPES)],
                    factors=factors,
                    small_factors=factors and small,
                )
            )
    return variants


def verification_plan() -> list[Variant]:
    """Every variant verification runs (see the module docstring), without repeats."""
    plan = [Variant(options) for options in option_space()]
    for k, (dtypes, small) in enumerate(itertools.product(dtype_combinations(), (False, True))):
        plan += [
            plan_variant(options, dtypes, small, k + row)
            for row, options in enumerate(pairwise_option_sets(storage=True))
        ]
    plan += factor_variants()
    plan += accumulating_variants()
    return list(dict.fromkeys(plan))
