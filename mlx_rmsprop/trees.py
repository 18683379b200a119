"""Pairing a gradient tree with its parameters and optimizer state, with every mismatch reported
by the leaf's path before anything is changed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import mlx.core as mx

from .validation import FLOATING_DTYPES


class Leaf(NamedTuple):
    path: str
    gradient: mx.array
    parameter: mx.array


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _shown(path: str) -> str:
    return repr(path) if path else "at the tree root"


def _floating(kind: str, path: str, array: mx.array) -> None:
    if array.dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"{kind} {_shown(path)} has dtype {array.dtype}; RMSprop updates real floating "
            f"arrays only (float16, bfloat16, float32, float64)"
        )


def _match_into(leaves: list[Leaf], grad: Any, param: Any, path: str) -> None:
    # A module function rather than a closure: a recursive closure refers to itself, and that
    # cycle kept the leaves it collected (the previous step's parameters: +100 MB for the
    # 25M-parameter benchmark tree) alive until Python's cyclic collector happened to run.
    if isinstance(grad, dict):
        if not isinstance(param, dict):
            raise ValueError(
                f"gradient {_shown(path)} is a dict but the parameter there is a "
                f"{type(param).__name__}"
            )
        for key, child in grad.items():
            if key not in param:
                raise ValueError(f"gradient {_shown(_join(path, key))} has no matching parameter")
            _match_into(leaves, child, param[key], _join(path, key))
    elif isinstance(grad, (list, tuple)):
        if not isinstance(param, (list, tuple)):
            raise ValueError(
                f"gradient {_shown(path)} is a {type(grad).__name__} but the parameter "
                f"there is a {type(param).__name__}"
            )
        if len(param) < len(grad):
            raise ValueError(
                f"gradient {_shown(path)} has {len(grad)} entries but the parameter list "
                f"has {len(param)}"
            )
        for index, child in enumerate(grad):
            _match_into(leaves, child, param[index], _join(path, index))
    elif isinstance(grad, mx.array):
        if not isinstance(param, mx.array):
            raise ValueError(
                f"gradient {_shown(path)} is an array but the parameter there is a "
                f"{type(param).__name__}"
            )
        _floating("parameter", path, param)
        _floating("gradient", path, grad)
        if grad.shape != param.shape:
            raise ValueError(
                f"gradient {_shown(path)} has shape {tuple(grad.shape)} but its parameter "
                f"has shape {tuple(param.shape)}"
            )
        leaves.append(Leaf(path, grad, param))
    else:
        raise TypeError(f"gradient {_shown(path)} must be an mx.array, got {type(grad).__name__}")


def match_gradients(gradients: Any, parameters: Any) -> list[Leaf]:
    """Walk ``gradients`` (``parameters`` may be a superset) and return its leaves in order.

    Raises ``ValueError`` for structural and shape mismatches and ``TypeError`` for
    non-array or non-floating leaves, naming the path.
    """
    leaves: list[Leaf] = []

    _match_into(leaves, gradients, parameters, "")
    return leaves


def _states_into(found: list[dict], grad: Any, node: Any, path: str) -> None:
    if isinstance(grad, dict):
        for key, child in grad.items():
            _states_into(found, child, node[key], _join(path, key))
    elif isinstance(grad, (list, tuple)):
        for index, child in enumerate(grad):
            _states_into(found, child, node[index], _join(path, index))
    else:
        found.append(node)


def state_leaves(gradients: Any, state: Any) -> list[dict]:
    """The per-parameter state dicts of ``state`` in the leaf order of ``gradients``."""
    found: list[dict] = []

    _states_into(found, gradients, state, "")
    return found


def check_state(path: str, parameter: mx.array, state: Any, keys: tuple[str, ...]) -> None:
    """The state of one parameter must hold exactly ``keys``, each a floating array of the
    parameter's shape: a state assigned from another model or configuration is refused."""
    if not isinstance(state, dict):
        raise ValueError(
            f"optimizer state for {_shown(path)} must be a dict, got {type(state).__name__}"
        )
    missing = [key for key in keys if key not in state]
    extra = [key for key in state if key not in keys]
    if missing or extra:
        raise ValueError(
            f"optimizer state for {_shown(path)} has keys {sorted(state)}, but this "
            f"configuration uses {list(keys)}: it was made by another configuration"
        )
    for key in keys:
        buffer = state[key]
        if not isinstance(buffer, mx.array):
            raise TypeError(
                f"optimizer state {_shown(_join(path, key))} must be an mx.array, got "
                f"{type(buffer).__name__}"
            )
        _floating("optimizer state", _join(path, key), buffer)
        if buffer.shape != parameter.shape:
            raise ValueError(
                f"optimizer state {_shown(_join(path, key))} has shape {tuple(buffer.shape)} "
                f"but its parameter has shape {tuple(parameter.shape)}: it belongs to "
                f"another model"
            )


class Gathered(NamedTuple):
    """One step's leaves, in the gradient tree's order."""

    paths: list[str] | None  # None unless asked for (they cost a string per leaf)
    gradients: list[mx.array]
    parameters: list[mx.array]
    states: list[dict]


def gather(
    gradients: Any, parameters: Any, state: Any, keys: tuple[str, ...], with_paths: bool
) -> Gathered:
    """Every leaf of ``gradients`` with its parameter and its per-parameter state, after the
    checks of :func:`match_gradients` and :func:`check_state`.

    One walk with cheap checks serves the usual case (about 1 us a leaf instead of 6: it is
    per-step overhead for models of many small tensors); when anything looks wrong the
    detailed walkers run to raise their path-naming error.
    """
    found = Gathered([] if with_paths else None, [], [], [])
    if not _gather_into(found, gradients, parameters, state, "", keys, frozenset(keys)):
        for leaf, node in zip(
            match_gradients(gradients, parameters), state_leaves(gradients, state), strict=True
        ):
            check_state(leaf.path, leaf.parameter, node, keys)
        raise AssertionError("gather() refused a tree that the detailed checks accept")
    return found


def _gather_into(
    found: Gathered, grad: Any, param: Any, node: Any, path: str, keys: tuple, keyset: frozenset
) -> bool:
    if isinstance(grad, dict):
        if not (isinstance(param, dict) and isinstance(node, dict)):
            return False
        for key, child in grad.items():
            if key not in param or key not in node:
                return False
            child_path = _join(path, key) if found.paths is not None else path
            if not _gather_into(found, child, param[key], node[key], child_path, keys, keyset):
                return False
        return True
    if isinstance(grad, (list, tuple)):
        if not (isinstance(param, (list, tuple)) and isinstance(node, (list, tuple))):
            return False
        if len(param) < len(grad) or len(node) < len(grad):
            return False
        for index, child in enumerate(grad):
            child_path = _join(path, index) if found.paths is not None else path
            if not _gather_into(found, child, param[index], node[index], child_path, keys, keyset):
                return False
        return True
    if not (isinstance(grad, mx.array) and isinstance(param, mx.array)):
        return False
    shape = grad.shape
    if shape != param.shape or grad.dtype not in _FLOATING or param.dtype not in _FLOATING:
        return False
    if not isinstance(node, dict) or node.keys() != keyset:
        return False
    for key in keys:
        buffer = node[key]
        if not isinstance(buffer, mx.array) or buffer.shape != shape:
            return False
        if buffer.dtype not in _FLOATING:
            return False
    if found.paths is not None:
        found.paths.append(path)
    found.gradients.append(grad)
    found.parameters.append(param)
    found.states.append(node)
    return True


_FLOATING = frozenset(FLOATING_DTYPES)


def rebuild(template: Any, values: Iterator[Any]) -> Any:
    """A tree shaped like ``template`` whose leaves are taken, in order, from ``values``."""
    if isinstance(template, dict):
        return {key: rebuild(child, values) for key, child in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(rebuild(child, values) for child in template)
    return next(values)
