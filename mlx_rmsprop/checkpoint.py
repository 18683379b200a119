"""Saving and restoring an optimizer's state: atomic writes, checked reads.

A checkpoint is one safetensors file: the whole state tree (``tree_flatten`` keys, as MLX users
already save it) plus metadata: a format marker, the library version, the optimizer's
configuration, the step, the learning rate and a CRC-32 of every array. A plain
``tree_flatten(optimizer.state)`` file written from ``mlx.optimizers.RMSprop`` loads too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ._version import __version__

FORMAT = "mlx_rmsprop.optimizer_state"
FORMAT_VERSION = "1"
# Counters kept at the top of the state tree (MLX's and ours); everything else is per parameter.
COUNTERS = ("step", "learning_rate", "skipped_steps")
# Conversions that lose nothing.
WIDENING = {
    (mx.float16, mx.float32),
    (mx.float16, mx.float64),
    (mx.bfloat16, mx.float32),
    (mx.bfloat16, mx.float64),
    (mx.float32, mx.float64),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this optimizer; nothing was changed."""


def _crc(array: mx.array) -> int:
    return zlib.crc32(memoryview(mx.contiguous(array)))


def _exclusive(optimizer: Any) -> Any:
    """The optimizer's update lock (ours), so that a save or a load never falls between the
    writes of one update; a no-op for optimizers without one (MLX's own)."""
    return getattr(optimizer, "_update_lock", None) or contextlib.nullcontext()


def save_state(optimizer: Any, path: str | os.PathLike) -> Path:
    """Write ``optimizer``'s whole state to ``path`` (a ``.safetensors`` file), atomically.

    The file is written under a temporary name in the same directory, flushed and fsync'ed,
    then renamed over ``path`` (and the directory fsync'ed): a process killed at any moment
    leaves either the previous checkpoint or the new one, never a mixture.
    """
    path = Path(path)
    with _exclusive(optimizer):
        learning_rate = optimizer.state.get("learning_rate")
        if not isinstance(learning_rate, mx.array) or learning_rate.size != 1:
            raise ValueError(
                "cannot save the optimizer state: its learning_rate must be a scalar array, "
                f"got {_describe(learning_rate)}"
            )
        arrays = dict(tree_flatten(optimizer.state))
        mx.eval(arrays)
        step, learning_rate = optimizer.step.item(), learning_rate.item()
        config = optimizer.get_config()
    # safetensors in MLX has no float64: such arrays travel bit for bit as uint64.
    float64_keys = sorted(key for key, value in arrays.items() if value.dtype == mx.float64)
    for key in float64_keys:
        arrays[key] = arrays[key].view(mx.uint64)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": json.dumps(config, sort_keys=True),
        "step": str(step),
        "learning_rate": repr(learning_rate),
        "crc32": json.dumps({key: _crc(value) for key, value in arrays.items()}, sort_keys=True),
        "float64_as_uint64": json.dumps(float64_keys),
    }
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp.safetensors", dir=directory
    )
    try:
        with os.fdopen(handle, "wb") as file:
            mx.save_safetensors(file, arrays, metadata=metadata)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory_handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)
    return path


def _read(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        mx.eval(arrays)
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {error}") from None
    return arrays, metadata


def _describe(value: Any) -> str:
    if isinstance(value, mx.array):
        if value.size == 1:
            return f"{value.item()!r} ({value.dtype}, shape {tuple(value.shape)})"
        return f"an array of shape {tuple(value.shape)} ({value.dtype})"
    return repr(value)


def _json(path: Path, metadata: dict, key: str, kind: type, default: str | None = None) -> Any:
    """``metadata[key]`` parsed as JSON and checked to be a ``kind`` (dict or list)."""
    if key not in metadata and default is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: no {key!r}")
    try:
        value = json.loads(metadata.get(key, default))
    except (json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CheckpointError(
            f"checkpoint {str(path)!r} has damaged metadata: {key!r} is not valid JSON ({reason})"
        ) from None
    if not isinstance(value, kind):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has damaged metadata: {key!r} must be a JSON "
            f"{'object' if kind is dict else 'array'}, got {metadata[key][:80]!r}"
        )
    return value


def _check_counters(path: Path, arrays: dict) -> None:
    """The counters as the constructor would accept them: an integer step >= 0 (0-d), a
    finite learning rate >= 0 (one floating value), an integer skipped_steps >= 0."""

    def refuse(key: str, requirement: str) -> None:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {key!r} must be {requirement}, got "
            f"{_describe(arrays[key]) if key in arrays else 'nothing (it is missing)'}"
        )

    for key in ("step", "skipped_steps"):
        if key not in arrays:
            if key == "step":
                refuse(key, "a 0-d integer array >= 0 (not an optimizer state)")
            continue
        value = arrays[key]
        if not (value.ndim == 0 and mx.issubdtype(value.dtype, mx.integer) and value.item() >= 0):
            refuse(key, "a 0-d integer array >= 0")
    value = arrays.get("learning_rate")
    if not (
        value is not None
        and value.size == 1
        and value.ndim <= 1
        and mx.issubdtype(value.dtype, mx.floating)
        and math.isfinite(value.item())
        and value.item() >= 0
    ):
        refuse("learning_rate", "one finite floating value >= 0")
    arrays["learning_rate"] = value.reshape(())


def _check_integrity(path: Path, arrays: dict, metadata: dict) -> dict | None:
    """Our checkpoints: check the format and every checksum, return the saved configuration.
    A plain MLX state file (no metadata): return None."""
    if "format" not in metadata:
        if metadata:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has an unknown format (metadata keys "
                f"{sorted(metadata)}); expected an mlx_rmsprop checkpoint or a plain MLX "
                f"optimizer state"
            )
        return None
    if metadata["format"] != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {metadata['format']!r} version "
            f"{metadata.get('format_version')!r}; this library reads {FORMAT!r} version "
            f"{FORMAT_VERSION!r}"
        )
    checksums = _json(path, metadata, "crc32", dict)
    config = _json(path, metadata, "config", dict)
    for key, value in checksums.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has damaged metadata: the checksum of {key!r} "
                f"must be an integer, got {value!r}"
            )
    if set(checksums) != set(arrays):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: it lists arrays {sorted(checksums)} but "
            f"holds {sorted(arrays)}"
        )
    for key, value in arrays.items():
        if _crc(value) != checksums[key]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt: array {key!r} fails its checksum"
            )
    float64_keys = _json(path, metadata, "float64_as_uint64", list, default="[]")
    for key in float64_keys:
        if not isinstance(key, str) or key not in arrays or arrays[key].dtype != mx.uint64:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: {key!r} is not a stored float64 array"
            )
        arrays[key] = arrays[key].view(mx.float64)
    return config


def _per_parameter(arrays: dict) -> dict[str, dict[str, mx.array]]:
    """``{"layers.0.weight": {"v": ..., "grad_avg": ...}}`` from the flat keys."""
    grouped: dict[str, dict[str, mx.array]] = {}
    for key, value in arrays.items():
        if key in COUNTERS:
            continue
        parameter, _, buffer = key.rpartition(".")
        grouped.setdefault(parameter, {})[buffer] = value
    return grouped


def load_state(
    optimizer: Any,
    path: str | os.PathLike,
    parameters: dict | None = None,
    *,
    strict: bool = True,
) -> None:
    """Restore a state written by :func:`save_state` (or a ``tree_flatten`` of MLX's own
    RMSprop state) into ``optimizer``.

    Everything is checked before anything changes; on any error the optimizer keeps its
    previous state and a :class:`CheckpointError` (a ``ValueError``) says what differs:

    - a file that cannot be read, is truncated, fails a checksum, has an unknown format or
      malformed metadata;
    - counters the constructor would refuse (``step`` not a 0-d integer >= 0,
      ``learning_rate`` not one finite floating value >= 0, or missing);
    - per-parameter buffers other than the ones this configuration keeps (e.g. a centered
      optimizer's file into a plain one);
    - with ``strict`` (default), any hyperparameter other than the learning rate that differs
      from the saved configuration, weight-decay exclusion patterns included
      (``strict=False`` keeps this optimizer's values, and takes the saved patterns when
      this optimizer has none);
    - with ``parameters``: every parameter must have state of its exact shape and nothing
      else; buffers are converted to the dtype this optimizer would create only when that
      loses nothing (float16 -> float32, ...), else the load is refused.
      Without ``parameters`` the saved tree is compared with the optimizer's current one when
      it has one, and taken as it is otherwise.

    The loaded tree replaces the contents of ``optimizer.state`` in place, so a function
    compiled earlier with ``inputs=optimizer.state`` sees it.
    """
    path = Path(path)
    arrays, metadata = _read(path)
    saved_config = _check_integrity(path, arrays, metadata)

    _check_counters(path, arrays)
    expected_keys = set(optimizer.state_keys)
    grouped = _per_parameter(arrays)
    for name, buffers in grouped.items():
        if set(buffers) != expected_keys:
            raise CheckpointError(
                f"checkpoint {str(path)!r} keeps {sorted(buffers)} for {name!r}, but this "
                f"configuration keeps {sorted(expected_keys)}: it was saved by another "
                f"configuration"
            )
    restore_exclusions = None
    if saved_config is not None:
        # Checkpoints written before the exclusions were saved had none.
        exclusions = saved_config.setdefault("exclude_from_weight_decay", [])
        if not isinstance(exclusions, list) or not all(isinstance(p, str) for p in exclusions):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has damaged metadata: exclude_from_weight_decay "
                f"must be a list of strings, got {exclusions!r}"
            )
        try:
            re.compile("|".join(exclusions))
        except re.error as error:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: exclude_from_weight_decay {exclusions!r} is not a "
                f"regular expression: {error}"
            ) from None
        current = optimizer.get_config()
        differences = [
            f"{key}: saved {saved_config.get(key)!r}, this optimizer {current.get(key)!r}"
            for key in sorted(set(saved_config) | set(current))
            if key not in ("learning_rate", "fused", "name")
            and saved_config.get(key) != current.get(key)
        ]
        if differences and strict:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was saved by a different configuration ("
                + "; ".join(differences)
                + "); pass strict=False to keep this optimizer's hyperparameters"
            )
        # A resume that forgot exclude_from_weight_decay() gets the saved patterns (a
        # configuration with patterns of its own keeps them).
        if exclusions and not current.get("exclude_from_weight_decay", True):
            restore_exclusions = exclusions

    if optimizer.pipeline.skip_nonfinite and "skipped_steps" not in arrays:
        arrays["skipped_steps"] = mx.array(0, mx.uint64)

    reference = _reference_shapes(optimizer, parameters)
    if reference is not None:
        missing = sorted(set(reference) - set(grouped))
        extra = sorted(set(grouped) - set(reference))
        if missing or extra:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the parameters: "
                + (f"no state for {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"state for unknown parameters {extra}" if extra else "")
            )
        for name, (shape, dtype) in reference.items():
            for buffer, value in grouped[name].items():
                key = f"{name}.{buffer}"
                if tuple(value.shape) != shape:
                    raise CheckpointError(
                        f"checkpoint {str(path)!r}: {key!r} has shape {tuple(value.shape)}, the "
                        f"parameter has shape {shape}"
                    )
                if dtype is not None and value.dtype != dtype:
                    if (value.dtype, dtype) not in WIDENING:
                        raise CheckpointError(
                            f"checkpoint {str(path)!r}: {key!r} is {value.dtype}, this optimizer "
                            f"keeps {dtype}; converting would lose precision"
                        )
                    arrays[key] = value.astype(dtype)

    state = tree_unflatten(list(arrays.items()))
    if reference is not None and parameters is not None:
        state = _shaped_like(parameters, state)
    with _exclusive(optimizer):
        if restore_exclusions is not None:
            optimizer._set_decay_exclusion(restore_exclusions)
        current_state = optimizer.state
        if type(current_state) is dict:
            # In place: a function compiled before the load (mx.compile(..., inputs=
            # optimizer.state)) captured this dict, and must see the loaded arrays.
            current_state.clear()
            current_state.update(state)
            state = current_state
        optimizer.state = state  # also marks the optimizer uninitialised, as MLX's setter does


def _reference_shapes(optimizer: Any, parameters: dict | None) -> dict | None:
    """``{path: (shape, dtype or None)}`` the loaded state must match, or None."""
    if parameters is not None:
        return {
            name: (tuple(value.shape), optimizer.buffer_dtype(value.dtype))
            for name, value in tree_flatten(parameters)
        }
    current = _per_parameter(dict(tree_flatten(optimizer.state)))
    if not current:
        return None
    return {
        name: (tuple(buffers["v"].shape), None)
        for name, buffers in current.items()
        if "v" in buffers
    }


def _shaped_like(parameters: Any, state: dict) -> dict:
    """Rebuild the per-parameter part with the containers (lists) of ``parameters``: flat keys
    such as "layers.0.weight" unflatten to lists already; this keeps tuples and dict keys that
    look like integers as the parameters have them."""

    def rebuild(node: Any, saved: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: rebuild(v, saved[k] if isinstance(saved, dict) else saved[int(k)])
                for k, v in node.items()
            }
        if isinstance(node, (list, tuple)):
            return [
                rebuild(v, saved[i] if isinstance(saved, list) else saved[str(i)])
                for i, v in enumerate(node)
            ]
        return saved

    shaped = rebuild(parameters, {k: v for k, v in state.items() if k not in COUNTERS})
    shaped.update({k: v for k, v in state.items() if k in COUNTERS})
    return shaped
