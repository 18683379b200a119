"""Saving and restoring an optimizer's state: atomic writes, checked reads.

A checkpoint is one safetensors file: the whole state tree (``tree_flatten`` keys, as MLX users
already save it) plus metadata: a format marker, the library version, the optimizer's
configuration, the step, the learning rate and a CRC-32 of every array. A plain
``tree_flatten(optimizer.state)`` file written from ``mlx.optimizers.RMSprop`` loads too.
"""

from __future__ import annotations

import json
import os
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


def save_state(optimizer: Any, path: str | os.PathLike) -> Path:
    """Write ``optimizer``'s whole state to ``path`` (a ``.safetensors`` file), atomically.

    The file is written under a temporary name in the same directory, flushed and fsync'ed,
    then renamed over ``path`` (and the directory fsync'ed): a process killed at any moment
    leaves either the previous checkpoint or the new one, never a mixture.
    """
    path = Path(path)
    arrays = dict(tree_flatten(optimizer.state))
    mx.eval(arrays)
    # safetensors in MLX has no float64: such arrays travel bit for bit as uint64.
    float64_keys = sorted(key for key, value in arrays.items() if value.dtype == mx.float64)
    for key in float64_keys:
        arrays[key] = arrays[key].view(mx.uint64)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": json.dumps(optimizer.get_config(), sort_keys=True),
        "step": str(optimizer.step.item()),
        "learning_rate": repr(optimizer.learning_rate.item()),
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
    try:
        checksums = json.loads(metadata["crc32"])
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: {error}") from None
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
    try:
        float64_keys = json.loads(metadata.get("float64_as_uint64", "[]"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: {error}") from None
    for key in float64_keys:
        if key not in arrays or arrays[key].dtype != mx.uint64:
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

    - a file that cannot be read, is truncated, fails a checksum, or has an unknown format;
    - per-parameter buffers other than the ones this configuration keeps (e.g. a centered
      optimizer's file into a plain one);
    - with ``strict`` (default), any hyperparameter other than the learning rate that differs
      from the saved configuration (``strict=False`` keeps this optimizer's values);
    - with ``parameters``: every parameter must have state of its exact shape and nothing
      else; buffers are converted to the dtype this optimizer would create only when that
      loses nothing (float16 -> float32, ...), else the load is refused.
      Without ``parameters`` the saved tree is compared with the optimizer's current one when
      it has one, and taken as it is otherwise.
    """
    path = Path(path)
    arrays, metadata = _read(path)
    saved_config = _check_integrity(path, arrays, metadata)

    if "step" not in arrays:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'step': not an optimizer state")
    expected_keys = set(optimizer.state_keys)
    grouped = _per_parameter(arrays)
    for name, buffers in grouped.items():
        if set(buffers) != expected_keys:
            raise CheckpointError(
                f"checkpoint {str(path)!r} keeps {sorted(buffers)} for {name!r}, but this "
                f"configuration keeps {sorted(expected_keys)}: it was saved by another "
                f"configuration"
            )
    if saved_config is not None:
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
    optimizer.state = state


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
