"""Which implementation runs the per-parameter update: the dispatcher between the paths.

One subpackage per path that needs more than the reference math: :mod:`.native` (the C++
primitive on the CPU, its loader beside its sources) and :mod:`.kernels` (the Metal and CUDA
launchers around the kernel body in :mod:`mlx_rmsprop.metal`); :mod:`.probe` proves a path on
this machine before it is used.

Every path's update has the signature of :func:`~mlx_rmsprop.reference.rmsprop_reference` and
the same semantics. A path that cannot handle some input (a GPU kernel given float64) hands
that parameter to the reference math itself, so the choice here is per optimizer, not per
array.

A GPU kernel variant is used only after it proves itself on this device: on its first use in
the process, :func:`mlx_rmsprop.paths.probe.kernel_verdict` runs it on a small awkward input
against the reference. With ``fused="auto"`` a variant that fails (or does not compile or
launch) runs the reference math instead, inside the same compiled step, after one warning;
with ``fused="metal"`` / ``"cuda"`` it raises ``RuntimeError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ..reference import rmsprop_reference
from ..spec import UpdateFn, UpdateOptions
from . import native, probe
from .kernels.source import Variant


@dataclass(frozen=True)
class UpdatePath:
    """One way of running the update.

    ``load`` returns the per-parameter update function, or raises ``RuntimeError`` saying why
    this machine cannot run the path. ``compile_step`` wraps the whole optimizer step in
    ``mx.compile`` (one compiled call per step, or per 1,024 parameters of a larger tree,
    instead of one Python dispatch per parameter).
    ``load_accumulating``, where the path has one, returns its update with Keras' gradient
    accumulation as the first stage (signature of
    :func:`~mlx_rmsprop.paths.kernels.launch.accumulating_reference`); the native path's is
    part of its pipeline primitives instead.
    """

    name: str
    load: Callable[[], UpdateFn]
    compile_step: bool
    description: str
    load_accumulating: Callable[[], Callable] | None = None


def _load_metal() -> UpdateFn:
    from .kernels import metal

    return metal.load()


def _load_cuda() -> UpdateFn:
    from .kernels import cuda

    return cuda.load()


def _load_metal_accumulating() -> Callable:
    from .kernels import metal

    return metal.load_accumulating()


def _load_cuda_accumulating() -> Callable:
    from .kernels import cuda

    return cuda.load_accumulating()


# The kernel paths compile the whole step too: each kernel call builds its generated source
# string and Python sets up every launch; under mx.compile that happens once, at trace time.
PATHS: dict[str, UpdatePath] = {
    "reference": UpdatePath(
        "reference", lambda: rmsprop_reference, False, "plain MLX ops, not compiled"
    ),
    "compiled": UpdatePath(
        "compiled", lambda: rmsprop_reference, True, "the reference math under mx.compile"
    ),
    "metal": UpdatePath(
        "metal",
        _load_metal,
        True,
        "one Metal kernel launch per parameter",
        _load_metal_accumulating,
    ),
    "cuda": UpdatePath(
        "cuda", _load_cuda, True, "one CUDA kernel launch per parameter", _load_cuda_accumulating
    ),
    "native": UpdatePath(
        "native",
        native.load,
        True,
        "native C++ MLX primitives on the CPU (medium tensors 8 to one): SIMD, all cores, in place",
    ),
}
# The paths whose update runs a GPU kernel: probed per kernel variant before use.
KERNEL_PATHS = ("metal", "cuda")
# `fused="auto"` takes the first of these that loads on this machine.
AUTO_ORDER = ("metal", "cuda", "native", "compiled")
# Values accepted by ``RMSprop(fused=...)``: False is the plain reference ops.
FUSED_CHOICES = ("auto", False, *(name for name in PATHS if name != "reference"))


def resolve(fused: str | bool) -> tuple[UpdatePath, UpdateFn]:
    """The path ``fused`` selects on this machine, and its update function, which takes the
    keyword ``index`` (the parameter's position in the step).

    Raises ``RuntimeError`` when an explicitly requested path cannot run here.
    """
    path, update = _resolved(fused)
    return path, _with_storage(update)


def resolve_accumulating(path: UpdatePath, fused: str | bool) -> Callable | None:
    """``path``'s accumulating update as ``fused`` resolved it (each kernel variant proven as
    :func:`resolve` proves the update's), or ``None`` where the path has none: the step then
    accumulates with MLX ops before the update."""
    if path.load_accumulating is None:
        return None
    return _proven_accumulating(path.name, path.load_accumulating(), fall_back=fused == "auto")


def _takes_index(update: UpdateFn) -> bool:
    return "index" in inspect.signature(update).parameters


def _with_storage(update: UpdateFn) -> UpdateFn:
    """``update`` when it takes ``index``: such a path implements the storage flags (8-bit
    state, stochastic rounding). Otherwise the update of every parameter with a storage flag
    runs the reference math (``rmsprop_reference(..., index=index)``) and the others run
    ``update`` as before."""
    if _takes_index(update):
        return update

    def with_storage(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        *,
        index: int = 0,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        if options.quantized_state or options.stochastic_rounding:
            return rmsprop_reference(options, scalars, parameter, gradient, state, index=index)
        return update(options, scalars, parameter, gradient, state)

    return with_storage


def _resolved(fused: str | bool) -> tuple[UpdatePath, UpdateFn]:
    if fused is False:
        path = PATHS["reference"]
        return path, path.load()
    if fused == "auto":
        reasons = []
        for name in AUTO_ORDER:
            try:
                return PATHS[name], _proven(name, PATHS[name].load(), fall_back=True)
            except RuntimeError as error:
                reasons.append(f"{name}: {error}")
        raise RuntimeError("no update path can run here: " + "; ".join(reasons))
    path = PATHS[fused]
    try:
        update = path.load()
    except RuntimeError as error:
        raise RuntimeError(f"fused={fused!r} cannot run on this machine: {error}") from None
    return path, _proven(fused, update, fall_back=False)


def _proven(name: str, update: UpdateFn, fall_back: bool) -> UpdateFn:
    """For a kernel path: ``update`` for each kernel variant its probe admits; for one it does
    not, the reference math (``fall_back``) or ``RuntimeError`` naming the variant and the
    difference. The probe runs on first use, eagerly on its own small arrays, so also when
    the first use is inside the trace of the compiled step."""
    if name not in KERNEL_PATHS:
        return update
    from .kernels.launch import plan

    def proven(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        *,
        index: int = 0,
        factors: mx.array | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        # The kernels store 8-bit state, round stochastically and read their row of the clip
        # factors themselves (index: the parameter's position).
        if parameter.size:
            call = plan(options, scalars, parameter, gradient, state, index, factors)
        else:
            call = None
        if call is not None and not _admitted(name, call.variant, update, fall_back):
            return rmsprop_reference(
                options, scalars, parameter, gradient, state, index=index, factors=factors
            )
        return update(options, scalars, parameter, gradient, state, index=index, factors=factors)

    return proven


def _admitted(name: str, variant: Variant, update: UpdateFn, fall_back: bool) -> bool:
    """Whether the kernel of ``name`` may run ``variant`` (``update`` runs its probe); without
    ``fall_back`` a refusal raises ``RuntimeError``."""
    verdict = probe.kernel_verdict(name, variant, update, fall_back)
    if verdict is not None and not fall_back:
        raise RuntimeError(
            f"fused={name!r}: the kernel for {probe.describe(variant)} cannot be used on this "
            f"device: {verdict}"
        )
    return verdict is None


def _proven_accumulating(name: str, accumulating_update: Callable, fall_back: bool) -> Callable:
    """:func:`_proven` for the accumulating update: each accumulating kernel variant is probed
    on its first use (with the probe's own gates, loss scale and steps: the kernel takes them
    as inputs, so one verdict holds for every configuration); a refused one runs
    ``accumulating_reference``."""
    from .kernels.launch import (
        Accumulation,
        accumulating_reference,
        plan,
        with_accumulator_in_state,
    )

    def proven(
        options: UpdateOptions,
        scalars: mx.array,
        parameter: mx.array,
        gradient: mx.array,
        state: dict[str, mx.array],
        accumulator: mx.array,
        gates: mx.array,
        loss_scale: float,
        accumulation_steps: int,
        *,
        index: int = 0,
        factors: mx.array | None = None,
    ) -> tuple[mx.array, dict[str, mx.array], mx.array]:
        arguments = (options, scalars, parameter, gradient, state, accumulator, gates)
        arguments += (loss_scale, accumulation_steps)
        call = None
        if parameter.size:
            accumulation = Accumulation(accumulator, gates, loss_scale, accumulation_steps)
            call = plan(options, scalars, parameter, gradient, state, index, factors, accumulation)
        if call is not None:
            probed = with_accumulator_in_state(
                accumulating_update, *probe.accumulation_constants(call.variant)
            )
            if not _admitted(name, call.variant, probed, fall_back):
                return accumulating_reference(*arguments, index=index, factors=factors)
        return accumulating_update(*arguments, index=index, factors=factors)

    return proven


def availability() -> dict[str, str | None]:
    """For every path: ``None`` when it runs here, else the reason it does not."""
    found = {}
    for name, path in PATHS.items():
        try:
            path.load()
            found[name] = None
        except RuntimeError as error:
            found[name] = str(error)
    return found
