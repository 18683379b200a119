"""The native CPU path: the whole update of one parameter as one MLX primitive written in C++
(``mlx_rmsprop/_native``), vectorised, split across the cores for large tensors, and updating
the parameter and state in place when MLX can donate their buffers.

The module ``mlx_rmsprop._native._ext`` is built when the package is installed where a C++
toolchain exists. It is used only after it proves to match this installation: built against
the running mlx version (it links against libmlx's C++ ABI), from the sources beside it, with
this package's option and scalar layout, and giving the reference's result on a probe update.
Otherwise :func:`load` raises ``RuntimeError`` with the reason, logged once at debug level, and
``fused="auto"`` takes the next path.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import mlx.core as mx

from . import probe
from ._native import source_digest
from .kernels.source import Variant
from .spec import FLAGS, Scalar, UpdateFn, UpdateOptions

logger = logging.getLogger(__name__)

_EXTENSION = "mlx_rmsprop._native._ext"
_REBUILD = (
    "reinstall mlx-rmsprop to rebuild it against the installed mlx (pip's isolated build "
    "compiles against the newest mlx; `pip install --no-build-isolation` against the installed "
    "one, with pyproject.toml's build requirements installed)"
)


def update(
    options: UpdateOptions,
    scalars: mx.array,
    parameter: mx.array,
    gradient: mx.array,
    state: dict[str, mx.array],
) -> tuple[mx.array, dict[str, mx.array]]:
    """:func:`~mlx_rmsprop.reference.rmsprop_reference`'s update as one native node on the
    CPU stream (same signature, same results)."""
    keys = options.state_keys
    outputs = _loaded().update(
        scalars, gradient, parameter, [state[key] for key in keys], _flags(options)
    )
    return outputs[0], dict(zip(keys, outputs[1:], strict=True))


def load() -> UpdateFn:
    """The update function, or ``RuntimeError`` saying why the native path cannot run here.

    It runs on the CPU stream, so it is offered only while the CPU is the default device (on
    a GPU, ``fused="auto"`` moves on to a path that runs there)."""
    _loaded()
    device = mx.default_device()
    if device.type != mx.cpu:
        raise RuntimeError(
            f"the default device is {device}; the native update runs on the CPU "
            "(mx.set_default_device(mx.cpu) selects it)"
        )
    return update


def status() -> str:
    """One line: whether the native path runs here, and why not when it does not."""
    extension, reason = _probe()
    if extension is None:
        return f"not available: {reason}"
    return (
        f"built and loaded (mlx {extension.MLX_VERSION}; {extension.worker_threads()} threads "
        f"from {extension.PARALLEL_THRESHOLD} elements)"
    )


def _loaded() -> ModuleType:
    extension, reason = _probe()
    if extension is None:
        raise RuntimeError(reason)
    return extension


@functools.cache
def _probe() -> tuple[ModuleType | None, str | None]:
    try:
        extension, reason = _import_checked(), None
    except RuntimeError as error:
        extension, reason = None, str(error)
        logger.debug("native CPU update unavailable: %s", reason)
    return extension, reason


def _import_checked() -> ModuleType:
    try:
        extension = importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        raise RuntimeError(
            "the native extension is not built (building it at install time needs a C++ "
            "compiler and the Python headers; `pip install -v` shows why it failed)"
        ) from None
    except ImportError as error:
        raise RuntimeError(f"the native extension cannot be loaded ({error}); {_REBUILD}") from None

    if extension.MLX_VERSION != mx.__version__:
        raise RuntimeError(
            f"the native extension was built against mlx {extension.MLX_VERSION} but mlx "
            f"{mx.__version__} is installed (their C++ ABIs must match); {_REBUILD}"
        )
    digest = source_digest()
    if digest is not None and digest != extension.SOURCE_DIGEST:
        raise RuntimeError(f"the native extension was built from older sources; {_REBUILD}")
    if tuple(extension.SCALAR_NAMES) != tuple(Scalar.__members__):
        raise RuntimeError(f"the native extension has another scalar layout; {_REBUILD}")
    if set(extension.FLAG_BITS) != set(FLAGS):
        raise RuntimeError(f"the native extension has another set of options; {_REBUILD}")
    _check_against_reference(extension)
    return extension


@functools.cache
def _flags(options: UpdateOptions) -> int:
    return _flags_from(_loaded().FLAG_BITS, options)


def _flags_from(bits: dict[str, int], options: UpdateOptions) -> int:
    return sum(bits[name] for name in FLAGS if getattr(options, name))


def _check_against_reference(extension: ModuleType) -> None:
    """The shared probe (:mod:`mlx_rmsprop.probe`: NaN, infinite, zero and overflowing rows,
    three steps) on a centered momentum update must give the reference's result bit for bit:
    this catches a module that cannot exchange arrays with this mlx (another nanobind ABI) or
    computes wrong."""
    keys = ("v", "grad_avg", "momentum_buffer")

    def update(options, scalars, parameter, gradient, state):
        flags = _flags_from(extension.FLAG_BITS, options)
        outputs = extension.update(scalars, gradient, parameter, [state[k] for k in keys], flags)
        return outputs[0], dict(zip(keys, outputs[1:], strict=True))

    variant = Variant(UpdateOptions(centered=True, momentum=True))
    assert variant.options.state_keys == keys
    try:
        difference = probe.difference(update, variant, rtol=0.0)
    except probe.RUN_ERRORS as error:
        raise RuntimeError(
            f"the native extension does not run with this mlx ({error}); {_REBUILD}"
        ) from None
    if difference is not None:
        raise RuntimeError(
            f"the native extension's probe update differs from the reference ({difference}); "
            f"{_REBUILD}"
        )
