"""Argument checks: every error names the argument, the allowed range and the value received."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

FLOATING_DTYPES = (mx.float16, mx.bfloat16, mx.float32, mx.float64)


def describe(value: Any) -> str:
    if isinstance(value, mx.array):
        return f"array(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


def in_float32(value: float) -> float:
    """``value`` as the update computes with it (float32 unless the parameters are float64)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def real_number(name: str, value: Any) -> float:
    """A finite real Python/NumPy number (not a bool, string or array) that stays finite in
    float32, the arithmetic of the update."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not math.isfinite(in_float32(value)):
        raise ValueError(
            f"{name} must be finite in float32 (|value| <= 3.4028235e+38, the update computes "
            f"in float32), got {value!r}"
        )
    return value


def in_range(name: str, value: Any, low: float, high: float) -> float:
    value = real_number(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def non_negative(name: str, value: Any) -> float:
    value = real_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def positive(name: str, value: Any) -> float:
    """> 0, also once rounded to float32 (1e-46 would become 0 there)."""
    value = real_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be >0, got {value!r}")
    if in_float32(value) == 0:
        raise ValueError(
            f"{name} must be >0 in float32 (at least 1.4e-45, the update computes in "
            f"float32), got {value!r}, which rounds to 0"
        )
    return value


def flag(name: str, value: Any) -> bool:
    """A real bool: ``centered="False"`` would otherwise switch the option on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {describe(value)}")
    return value


def learning_rate(name: str, value: Any) -> float | mx.array | Callable[[mx.array], mx.array]:
    """A schedule (callable of the step), a non-negative finite number, or a 0-d/size-1
    floating ``mx.array`` holding one."""
    if callable(value) and not isinstance(value, mx.array):
        return value
    if isinstance(value, mx.array):
        if value.size != 1 or value.ndim > 1 or value.dtype not in FLOATING_DTYPES:
            raise ValueError(
                f"{name} must be a number, a schedule (callable of the step) or a scalar "
                f"floating mx.array, got {describe(value)}"
            )
        number = value.item()
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be a number, a schedule (callable of the step) or a scalar "
            f"floating mx.array, got {describe(value)}"
        )
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
    if not math.isfinite(in_float32(number)):
        raise ValueError(
            f"{name} must be finite in float32 (<= 3.4028235e+38, the update computes in "
            f"float32), got {number!r}"
        )
    return number


def state_dtype(name: str, value: Any) -> mx.Dtype | None:
    if value is None:
        return None
    if not isinstance(value, mx.Dtype) or value not in FLOATING_DTYPES:
        raise ValueError(
            f"{name} must be None or one of mx.float16, mx.bfloat16, mx.float32, mx.float64, "
            f"got {value!r}"
        )
    return value


def choice(name: str, value: Any, allowed: tuple) -> Any:
    # `in` would let True match 1 and 1.0 match True: compare types too.
    for option in allowed:
        if type(value) is type(option) and value == option:
            return value
    raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def optional_positive(name: str, value: Any) -> float | None:
    return None if value is None else positive(name, value)


def integer_at_least(name: str, value: Any, low: int) -> int:
    """A Python/NumPy integer (not a bool, not a float such as 2.0) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {describe(value)}")
    return int(value)


def integer_choice(name: str, value: Any, allowed: tuple[int, ...]) -> int:
    """A Python/NumPy integer (not a bool, not a float) among ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(map(str, allowed))}, got {describe(value)}"
        )
    return int(value)


def integer_in_range(name: str, value: Any, low: int, high: int) -> int:
    """A Python/NumPy integer (not a bool, not a float) in [``low``, ``high``]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {describe(value)}")
    return int(value)


def name_patterns(name: str, value: Any) -> list[str]:
    """A list of regular-expression strings (a lone string is refused: it is almost always a
    missing pair of brackets, and would be read character by character)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise ValueError(f"{name} must be a list of strings, got {describe(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{name} must be a list of strings, got an item {describe(item)}")
    return list(value)
