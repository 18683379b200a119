"""Which kernel variants verification runs: every option set, and every dtype combination.

A variant is options x dtypes x address-space class (``Variant``). The full product is
4608 option sets x 15 dtype combinations x 2 classes, too many to compile, so verification
(``python -m mlx_rmsprop check`` on a GPU, the emulation tests on Linux) runs:

- every option set (4608) with float32 parameter, gradient and state, and
- for each of the 15 dtype combinations and both address-space classes, a pairwise covering
  set of option sets: every value of every option together with every value of every other
  option appears at least once.
"""

from __future__ import annotations

import itertools
from functools import cache

import mlx.core as mx

from ...options import WEIGHT_DECAY_MODES, UpdateOptions
from .source import KERNEL_DTYPES, Variant

# Each factor with its values; momentum and nesterov form one factor because nesterov
# requires momentum.
FACTORS: dict[str, tuple] = {
    "centered": (False, True),
    "momentum": ("none", "momentum", "nesterov"),
    "eps_in_sqrt": (False, True),
    "lr_in_momentum": (False, True),
    "weight_decay": WEIGHT_DECAY_MODES,
    "maximize": (False, True),
    "bias_correction": (False, True),
    "scale_gradient": (False, True),
    "clip_value": (False, True),
    "gated": (False, True),
    "ema": (False, True),
}


def _options(row: dict[str, object]) -> UpdateOptions:
    values = dict(row)
    mode = values.pop("momentum")
    return UpdateOptions(momentum=mode != "none", nesterov=mode == "nesterov", **values)


@cache
def every_option_set() -> tuple[UpdateOptions, ...]:
    """All valid ``UpdateOptions`` (the product of FACTORS)."""
    names = list(FACTORS)
    return tuple(
        _options(dict(zip(names, values, strict=True)))
        for values in itertools.product(*FACTORS.values())
    )


@cache
def pairwise_option_sets() -> tuple[UpdateOptions, ...]:
    """A small set of option sets in which every pair of (factor, value) appears: greedy,
    deterministic (each row starts from the first uncovered pair, then each remaining factor
    takes the value covering most uncovered pairs)."""
    names = list(FACTORS)
    uncovered = {
        ((a, x), (b, y))
        for a, b in itertools.combinations(names, 2)
        for x in FACTORS[a]
        for y in FACTORS[b]
    }
    rows = []
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=lambda pair: (names.index(pair[0][0]), repr(pair)))
        row = {a: x, b: y}
        for name in names:
            if name in row:
                continue

            def gain(
                value: object, name: str = name, row: dict = row, uncovered: set = uncovered
            ) -> int:
                return sum(
                    ((c, row[c]), (name, value)) in uncovered
                    or ((name, value), (c, row[c])) in uncovered
                    for c in row
                )

            row[name] = max(FACTORS[name], key=gain)
        uncovered -= {((c, row[c]), (d, row[d])) for c, d in itertools.combinations(names, 2)}
        rows.append(_options(row))
    return tuple(rows)


def every_flag_on(state_keys: tuple[str, ...]) -> UpdateOptions:
    """The option set with the buffer layout ``state_keys`` and every other option switched
    on (decoupled weight decay, nesterov with momentum): the longest code for that layout."""
    momentum = "momentum_buffer" in state_keys
    return UpdateOptions(
        centered="grad_avg" in state_keys,
        momentum=momentum,
        nesterov=momentum,
        ema="ema" in state_keys,
        eps_in_sqrt=True,
        lr_in_momentum=True,
        weight_decay="decoupled",
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


def verification_plan() -> list[Variant]:
    """Every variant verification runs (see the module docstring), without repeats."""
    plan = [Variant(options) for options in every_option_set()]
    for (parameter, gradient, state), small in itertools.product(
        dtype_combinations(), (False, True)
    ):
        plan += [
            Variant(options, parameter, gradient, state, small)
            for options in pairwise_option_sets()
        ]
    return list(dict.fromkeys(plan))
