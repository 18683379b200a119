"""Saving and restoring an optimizer's state: atomic writes, checked reads.

A checkpoint is one safetensors file: the whole state tree (``tree_flatten`` keys, as MLX users
already save it) plus metadata: a format marker, the library version, the optimizer's
configuration, the step, the learning rate, a CRC-32 of every array and the exact key path of
every array (``state_paths``: dict keys as JSON strings, list indices as JSON integers), so that
keys holding dots or looking like integers, and lists with entries that have no state, come
back as they were (files without it, from earlier releases, are read as plain MLX files are:
the array names are the same). A plain ``tree_flatten(optimizer.state)`` file written from
``mlx.optimizers.RMSprop`` loads too: its dotted keys are matched against the parameters' own
paths when they are given.
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
from mlx.utils import tree_unflatten

from ._version import __version__
from .config import STORAGE_DEFAULTS, StateLayout

FORMAT = "mlx_rmsprop.optimizer_state"
FORMAT_VERSION = "1"
# Deepest key path accepted from a file, and the largest list index (a padded list is built).
MAX_PATH_DEPTH = 64
MAX_LIST_INDEX = 1 << 20
# Counters kept at the top of the state tree (MLX's and ours); everything else is per parameter.
COUNTERS = ("step", "learning_rate", "skipped_steps", "rounding_seed")
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


KeyPath = tuple  # dict keys (str) and list indices (int), from the root of the state tree


def _dotted(key_path: KeyPath) -> str:
    """The ``tree_flatten`` name of a key path."""
    return ".".join(str(key) for key in key_path)


def _leaves(tree: Any, prefix: KeyPath = ()) -> list[tuple[KeyPath, Any]]:
    """``(key path, leaf)`` for every leaf, in ``tree_flatten``'s order."""
    if isinstance(tree, dict):
        found = []
        for key, child in tree.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"optimizer state key {key!r} under {_dotted(prefix)!r} is a "
                    f"{type(key).__name__}; a checkpoint keeps string keys only"
                )
            found.extend(_leaves(child, (*prefix, key)))
        return found
    if isinstance(tree, (list, tuple)):
        return [
            leaf for index, child in enumerate(tree) for leaf in _leaves(child, (*prefix, index))
        ]
    return [(prefix, tree)]


def _names(key_paths: list[KeyPath]) -> list[str]:
    """Array names for the file: the ``tree_flatten`` names MLX users know, except where two
    paths share one (a key holding a dot beside the nesting it spells): those take their JSON
    key path. ``state_paths`` maps every name back to its exact path either way."""
    dotted = [_dotted(key_path) for key_path in key_paths]
    counts: dict[str, int] = {}
    for name in dotted:
        counts[name] = counts.get(name, 0) + 1
    names = [
        name if counts[name] == 1 else json.dumps(list(key_path))
        for name, key_path in zip(dotted, key_paths, strict=True)
    ]
    if len(set(names)) != len(names):  # a dotted name that reads like a JSON path
        names = [f"#{index}" for index in range(len(names))]
    return names


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
        leaves = _leaves(optimizer.state)
        names = _names([key_path for key_path, _ in leaves])
        arrays = {name: array for name, (_, array) in zip(names, leaves, strict=True)}
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
        "state_paths": json.dumps(
            {name: list(key_path) for name, (key_path, _) in zip(names, leaves, strict=True)}
        ),
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
    finite learning rate >= 0 (one floating value), an integer skipped_steps >= 0, a 0-d
    uint32 rounding_seed."""

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
    seed = arrays.get("rounding_seed")
    if seed is not None and not (seed.ndim == 0 and seed.dtype == mx.uint32):
        refuse("rounding_seed", "a 0-d uint32 array")


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


def _saved_paths(path: Path, arrays: dict, metadata: dict) -> dict[str, KeyPath] | None:
    """The exact key path of every array, from ``state_paths``; None for a file without it."""
    if "state_paths" not in metadata:
        return None
    damaged = f"checkpoint {str(path)!r} has damaged metadata: state_paths "
    try:
        saved = json.loads(metadata["state_paths"])
    except (json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(damaged + f"is not JSON ({type(error).__name__})") from None
    if not isinstance(saved, dict) or set(saved) != set(arrays):
        raise CheckpointError(damaged + "does not list exactly the arrays of the file")
    key_paths = {}
    for name, key_path in saved.items():
        if not (
            isinstance(key_path, list)
            and 1 <= len(key_path) <= MAX_PATH_DEPTH
            and isinstance(key_path[0], str)
            and all(
                isinstance(key, str) or (type(key) is int and 0 <= key <= MAX_LIST_INDEX)  # noqa: E721 (not bool)
                for key in key_path
            )
        ):
            raise CheckpointError(
                damaged + f"gives {name!r} the path {str(key_path)[:200]}; a path is a list "
                f"of 1 to {MAX_PATH_DEPTH} string keys and list indices (0 to "
                f"{MAX_LIST_INDEX}), starting with a key"
            )
        key_paths[name] = tuple(key_path)
    if len(set(key_paths.values())) != len(key_paths):
        raise CheckpointError(damaged + "gives two arrays one path")
    return key_paths


def _dotted_paths(
    path: Path, arrays: dict, reference: dict[KeyPath, Any] | None
) -> dict[str, KeyPath]:
    """Key paths for a file keyed by ``tree_flatten`` names only (written by MLX, or by an
    earlier release): a name is split at its last dot into parameter and buffer, and the
    parameter is found among the reference's paths by its own dotted name, which tells dict
    keys holding dots or digits from nesting and list indices. Without a reference the names
    are split at every dot, as MLX's ``tree_unflatten`` does."""
    by_name: dict[str, KeyPath] = {}
    shared: dict[str, list[str]] = {}
    for key_path in reference or ():
        name = _dotted(key_path)
        if name in by_name:
            shared.setdefault(name, [repr(by_name[name])]).append(repr(key_path))
        by_name[name] = key_path
    key_paths = {}
    for name in arrays:
        if name in COUNTERS:
            key_paths[name] = (name,)
            continue
        parameter, _, buffer = name.rpartition(".")
        if parameter in shared:
            raise CheckpointError(
                f"checkpoint {str(path)!r} names arrays by dotted paths, and the parameters "
                f"{' and '.join(shared[parameter])} are both {parameter!r} there: it cannot "
                f"say whose state {name!r} is (a checkpoint written by save_state keeps them "
                f"apart)"
            )
        if parameter in by_name:
            key_paths[name] = (*by_name[parameter], buffer)
        else:
            key_paths[name] = tuple(name.split("."))
    return key_paths


def _per_parameter(key_paths: dict[str, KeyPath]) -> dict[KeyPath, dict[str, str]]:
    """``{parameter path: {"v": array name, ...}}``, the counters left out."""
    grouped: dict[KeyPath, dict[str, str]] = {}
    for name, key_path in key_paths.items():
        if len(key_path) == 1 and key_path[0] in COUNTERS:
            continue
        grouped.setdefault(key_path[:-1], {})[str(key_path[-1])] = name
    return grouped


def _unflatten(path: Path, entries: list[tuple[KeyPath, mx.array]]) -> dict:
    """The state tree with each array at its key path: an integer makes a list (entries
    without state padded with ``{}``, as ``tree_unflatten`` pads), a string a dict."""
    root: dict = {}
    for key_path, value in entries:
        node: Any = root
        for depth, key in enumerate(key_path):
            last = depth == len(key_path) - 1
            if isinstance(key, int):
                if not isinstance(node, list):
                    break
                node.extend({} for _ in range(key + 1 - len(node)))
                present = not (isinstance(node[key], dict) and not node[key])
            else:
                if not isinstance(node, dict):
                    break
                present = key in node
            if last:
                if present:
                    break
                node[key] = value
            else:
                kind = list if isinstance(key_path[depth + 1], int) else dict
                if not present:
                    node[key] = kind()
                node = node[key]
        else:
            continue
        raise CheckpointError(
            f"checkpoint {str(path)!r} has damaged metadata: state_paths puts "
            f"{_dotted(key_path)!r} where another array or container already is"
        )
    return root


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
    reference = _reference_shapes(optimizer, parameters)
    key_paths = _saved_paths(path, arrays, metadata)
    exact = key_paths is not None or reference is not None
    if key_paths is None:
        key_paths = _dotted_paths(path, arrays, reference)
    grouped = _per_parameter(key_paths)
    layouts = _layouts(path, optimizer, arrays, grouped, reference)
    restore_exclusions = None
    if saved_config is not None:
        # Checkpoints written before these arguments existed had their defaults.
        for key, default in STORAGE_DEFAULTS.items():
            saved_config.setdefault(key, default)
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
        key_paths["skipped_steps"] = ("skipped_steps",)
    if optimizer.stochastic_rounding and "rounding_seed" not in arrays:
        # A state saved without stochastic rounding (strict=False, or a plain MLX file).
        arrays["rounding_seed"] = mx.array(optimizer._config.rounding_seed, mx.uint32)
        key_paths["rounding_seed"] = ("rounding_seed",)

    if reference is not None:
        # Parameters in a list whose entries had no gradient have no state: nothing to match.
        missing = sorted(_dotted(p) for p in set(reference) - set(grouped))
        extra = sorted(_dotted(p) for p in set(grouped) - set(reference))
        if missing or extra:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the parameters: "
                + (f"no state for {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"state for unknown parameters {extra}" if extra else "")
            )
        for key_path, (_, dtype) in reference.items():
            layout = layouts[key_path]
            for buffer, name in grouped[key_path].items():
                value = arrays[name]
                key = _dotted((*key_path, buffer))
                if dtype is None or layout.dtype(buffer) is not None:
                    continue  # codes and scales were checked with the layout
                wanted = optimizer.buffer_dtype(dtype)
                if value.dtype != wanted:
                    if (value.dtype, wanted) not in WIDENING:
                        raise CheckpointError(
                            f"checkpoint {str(path)!r}: {key!r} is {value.dtype}, this optimizer "
                            f"keeps {wanted}; converting would lose precision"
                        )
                    arrays[name] = value.astype(wanted)

    if exact:
        state = _unflatten(path, [(key_paths[name], value) for name, value in arrays.items()])
    else:
        # A plain file and nothing to match it with: read as MLX reads it. Should a key have
        # held a dot, the first step finds its state nested and refuses (trees.gather).
        state = tree_unflatten(list(arrays.items()))
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


def _reference_shapes(optimizer: Any, parameters: Any) -> dict[KeyPath, tuple] | None:
    """``{key path: (shape, parameter dtype or None)}`` the loaded state must match, or None:
    the array leaves of ``parameters`` (strings and other attributes a module keeps are not
    parameters), else the parameters the optimizer holds state for now (``v``, float or
    codes, has the parameter's shape)."""
    if parameters is not None:
        return {
            key_path: (tuple(value.shape), value.dtype)
            for key_path, value in _leaves(parameters)
            if isinstance(value, mx.array)
        }
    current = {}
    for key_path, value in _leaves(optimizer.state):
        if key_path[-1] == "v" and len(key_path) > 1 and isinstance(value, mx.array):
            current[key_path[:-1]] = (tuple(value.shape), None)
    return current or None


def _layouts(
    path: Path,
    optimizer: Any,
    arrays: dict[str, mx.array],
    grouped: dict[KeyPath, dict[str, str]],
    reference: dict[KeyPath, tuple] | None,
) -> dict[KeyPath, StateLayout]:
    """The layout this optimizer keeps for each parameter of the file, checked against the
    saved buffers: the same keys (8-bit codes and scales, or float buffers, as
    ``state_bits``, ``min_quantized_size`` and the parameter make them), codes uint8 of the
    parameter's shape, scales float32, one per block. The parameter's shape and dtype come
    from ``reference``; without it the shape is ``v``'s (the first step checks the parameter
    itself). 8-bit and float state never convert into each other: requantizing loses
    precision, and a silent dequantization would hide a configuration mistake."""
    config = optimizer._config
    layouts = {}
    for key_path, buffers in grouped.items():
        known = reference.get(key_path) if reference is not None else None
        shape, dtype = known if known is not None else (None, None)
        if "v" in buffers:
            saved_v = arrays[buffers["v"]]
            shape = tuple(saved_v.shape) if shape is None else shape
            # Only a float64 parameter keeps float64 state beside 8-bit state (state_bits=8
            # refuses state_dtype=float64): the dtype where the layouts differ.
            if dtype is None:
                dtype = mx.float64 if saved_v.dtype == mx.float64 else mx.float32
        expected = config.layout(shape or (), dtype or mx.float32)
        if expected.key_set != set(buffers) or shape is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} keeps {sorted(buffers)} for {_dotted(key_path)!r}, "
                f"but this configuration keeps {sorted(expected.keys)}"
                f"{_layout_reason(config, expected, shape or ())}: it was saved by another "
                f"configuration"
            )
        layout = expected
        for buffer, name in buffers.items():
            value = arrays[name]
            key = _dotted((*key_path, buffer))
            wanted = layout.shape(buffer, shape)
            if tuple(value.shape) != wanted:
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: {key!r} has shape {tuple(value.shape)}, "
                    + (
                        f"the parameter has shape {shape}"
                        if wanted == shape
                        else f"a parameter of shape {shape} in blocks of "
                        f"{layout.block_size} has {wanted[0]} scales"
                    )
                )
            dtype_kept = layout.dtype(buffer)
            if dtype_kept is not None and value.dtype != dtype_kept:
                kept = "uint8 codes" if buffer in layout.code_keys else "float32 scales"
                raise CheckpointError(
                    f"checkpoint {str(path)!r}: {key!r} is {value.dtype}, this optimizer keeps "
                    f"{kept} there"
                )
        layouts[key_path] = layout
    return layouts


def _layout_reason(config: Any, layout: StateLayout, shape: tuple | None) -> str:
    """Why this configuration keeps 8-bit or float state for a parameter, in its arguments."""
    if layout.quantized:
        return (
            f" (8-bit state: state_bits=8 and the parameter has {math.prod(shape)} >= "
            f"min_quantized_size={config.min_quantized_size} elements)"
        )
    if config.state_bits == 32:
        return " (float state: state_bits=32)"
    return (
        f" (float state: the parameter is float64 or has fewer than "
        f"min_quantized_size={config.min_quantized_size} elements)"
    )
