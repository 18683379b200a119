"""Configurations to sweep through the constructor: the update-rule part of
``spec.option_space()`` projected onto constructor arguments, crossed with the initial
accumulator value, and a pairwise covering subset (every value of every argument, and every
pair of values of two arguments, appears at least once) for paths where each configuration
costs a compilation.

The projection: pipeline flags (``spec.PIPELINE_FLAGS``, set by the Keras pipeline arguments
and swept by test_pipeline) and storage flags (``spec.STORAGE_FLAGS``, constructor arguments of
other names) stay off; ``momentum`` becomes the number 0.0 or 0.9, the two decay
flags become ``weight_decay`` and ``decoupled_weight_decay``; every other flag is the
constructor argument of the same name.
"""

from __future__ import annotations

import itertools

from mlx_rmsprop.spec import FLAGS, PIPELINE_FLAGS, STORAGE_FLAGS, UpdateOptions, option_space

MOMENTUM = 0.9
WEIGHT_DECAY = 0.1
INITIAL_ACCUMULATOR_VALUES = (0.0, 0.5)


def constructor_arguments(options: UpdateOptions) -> dict:
    """The ``RMSprop`` arguments whose optimizer runs ``options`` (pipeline flags off)."""
    config: dict = {}
    for name in FLAGS:
        value = getattr(options, name)
        if name == "momentum":
            config["momentum"] = MOMENTUM if value else 0.0
        elif name in ("coupled_decay", "decoupled_decay"):
            decays = options.coupled_decay or options.decoupled_decay
            config["weight_decay"] = WEIGHT_DECAY if decays else 0.0
            config["decoupled_weight_decay"] = options.decoupled_decay
        elif name not in PIPELINE_FLAGS and name not in STORAGE_FLAGS:
            config[name] = value
    return config


def full_product() -> list[dict]:
    rules = [o for o in option_space() if not any(getattr(o, n) for n in PIPELINE_FLAGS)]
    return [
        {**constructor_arguments(options), "initial_accumulator_value": initial}
        for options, initial in itertools.product(rules, INITIAL_ACCUMULATOR_VALUES)
    ]


def _pairs(config: dict) -> set:
    items = sorted(config.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def pairwise() -> list[dict]:
    """A greedy pairwise covering array over ``full_product()`` (deterministic)."""
    candidates = full_product()
    uncovered = set().union(*(_pairs(c) for c in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda c: len(_pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def label(config: dict) -> str:
    parts = [
        k if v is True else f"{k}={v}" for k, v in config.items() if v is not False and v != 0.0
    ]
    return ",".join(parts) or "plain"
