"""Which implementation runs the per-parameter update: the dispatcher between paths.

Every path has the signature of :func:`~mlx_rmsprop.reference.rmsprop_reference`. A path that
cannot handle an input (a kernel given float64) hands that parameter to the reference math.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .options import UpdateOptions
from .reference import rmsprop_reference

UpdateFn = Callable[
    [UpdateOptions, mx.array, mx.array, mx.array, dict], tuple[mx.array, dict]
]

# Values accepted by ``RMSprop(fused=...)``.
FUSED_CHOICES = ("auto", False, "compiled")


def resolve(fused: str | bool) -> str:
    """The concrete path ``fused`` selects on this machine: ``"reference"`` (plain ops, not
    compiled) or ``"compiled"`` (the reference math under ``mx.compile``)."""
    if fused is False:
        return "reference"
    return "compiled"


def update_function(path: str) -> UpdateFn:
    """The per-parameter update of ``path``; the compiled path compiles the whole step around
    the reference math, so both use the same function here."""
    return rmsprop_reference


def is_compiled(path: str) -> bool:
    return path != "reference"
