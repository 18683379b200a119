"""Configurations to sweep: the full product of RMSprop's options, and a pairwise covering subset
(every value of every option, and every pair of values of two options, appears at least once)
for paths where each configuration costs a compilation."""

from __future__ import annotations

import itertools

OPTION_VALUES = {
    "centered": (False, True),
    "momentum": (0.0, 0.9),
    "nesterov": (False, True),
    "eps_in_sqrt": (False, True),
    "lr_in_momentum": (False, True),
    "weight_decay": (0.0, 0.1),
    "decoupled_weight_decay": (False, True),
    "maximize": (False, True),
    "bias_correction": (False, True),
    "initial_accumulator_value": (0.0, 0.5),
}


def _valid(config: dict) -> bool:
    return not (config["nesterov"] and config["momentum"] == 0)


def full_product() -> list[dict]:
    names = list(OPTION_VALUES)
    configs = (
        dict(zip(names, values, strict=True))
        for values in itertools.product(*OPTION_VALUES.values())
    )
    return [c for c in configs if _valid(c)]


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
