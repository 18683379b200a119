"""Pairing a gradient tree with its parameters and optimizer state, with every mismatch reported
by the leaf's path before anything is changed.

The trees accepted are the ones MLX's optimizers accept (``tree_map`` over the gradients): a
gradient container with no entries (the ``{}`` that ``nn.Module`` gives for a string attribute
such as mlx-lm's ``layer_types``) updates nothing, whatever the parameter holds there; every
array gradient needs an array parameter of its shape. A parameter without state (a first step,
a parameter added mid-training, list entries that had no gradient so far) gets the state
``init`` would create, attached only once the whole tree has passed its checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx

from .validation import FLOATING_DTYPES

if TYPE_CHECKING:
    from .config import StateLayout

NewState = Callable[[mx.array], dict]
# The state buffers a parameter keeps (``RMSprop.state_layout``).
LayoutOf = Callable[[mx.array], "StateLayout"]


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
        if not grad:
            return  # nothing to update here, whatever the parameter holds (MLX's tree_map)
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
        if not grad:
            return
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


def _missing(node: Any) -> bool:
    """No state yet: absent, or the ``{}`` placeholder MLX's ``init`` and ``tree_unflatten``
    leave for entries without leaves."""
    return node is None or (isinstance(node, dict) and not node)


def _split_by_dots(node: dict, key: Any) -> bool:
    """True when ``node`` holds the state of dict key ``"a.b"`` nested as a -> b: what a
    state file keyed by dotted paths gives when read without the parameters. Starting a fresh
    state beside it would silently restart that parameter."""
    if not (isinstance(key, str) and "." in key):
        return False
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return not _missing(node)


def _explain_states(leaves: list, grad: Any, node: Any, path: str) -> None:
    """The per-parameter state of every leaf of ``gradients`` (None where there is none yet),
    raising for a state tree whose containers differ from the gradients'."""
    if isinstance(grad, (dict, list, tuple)) and not grad:
        return
    if _missing(node) and not isinstance(grad, mx.array):
        node = {} if isinstance(grad, dict) else []
    if isinstance(grad, dict):
        if not isinstance(node, dict):
            raise ValueError(
                f"optimizer state {_shown(path)} is a {type(node).__name__} but the gradient "
                f"there is a dict (a state file keyed by dotted paths cannot tell dict keys "
                f"such as '0' from list indices: pass the parameters to load_state)"
            )
        for key, child in grad.items():
            if node.get(key) is None and _split_by_dots(node, key):
                raise ValueError(
                    f"optimizer state for {_shown(_join(path, key))} is nested under "
                    f"{_shown(_join(path, key.split('.')[0]))}: it was loaded from a file keyed "
                    f"by dotted paths without the parameters (pass them to load_state)"
                )
            _explain_states(leaves, child, node.get(key), _join(path, key))
    elif isinstance(grad, (list, tuple)):
        if not isinstance(node, (list, tuple)):
            raise ValueError(
                f"optimizer state {_shown(path)} is a {type(node).__name__} but the gradient "
                f"there is a {type(grad).__name__}"
            )
        for index, child in enumerate(grad):
            _explain_states(
                leaves, child, node[index] if index < len(node) else None, _join(path, index)
            )
    else:
        leaves.append(None if _missing(node) else node)


def check_state(path: str, parameter: mx.array, state: Any, layout: StateLayout) -> None:
    """The state of one parameter must hold exactly ``layout.keys``, each of the shape and
    dtype the layout gives it (floating arrays of the parameter's shape; with 8-bit state,
    uint8 codes of the parameter's shape and float32 scales, one per block): a state assigned
    from another model or configuration is refused."""
    if not isinstance(state, dict):
        raise ValueError(
            f"optimizer state for {_shown(path)} must be a dict, got {type(state).__name__}"
        )
    keys = layout.keys
    missing = [key for key in keys if key not in state]
    extra = [key for key in state if key not in keys]
    if missing or extra:
        kind = (
            f" (8-bit state, for a parameter of {parameter.size} elements)"
            if layout.quantized
            else ""
        )
        raise ValueError(
            f"optimizer state for {_shown(path)} has keys {sorted(state)}, but this "
            f"configuration uses {list(keys)}{kind}: it was made by another configuration"
        )
    for key in keys:
        buffer = state[key]
        where = _shown(_join(path, key))
        if not isinstance(buffer, mx.array):
            raise TypeError(
                f"optimizer state {where} must be an mx.array, got {type(buffer).__name__}"
            )
        dtype = layout.dtype(key)
        if dtype is None:
            _floating("optimizer state", _join(path, key), buffer)
        elif buffer.dtype != dtype:
            kept = "uint8 codes" if key in layout.code_keys else "float32 scales"
            raise TypeError(
                f"optimizer state {where} has dtype {buffer.dtype}; 8-bit state keeps {kept} there"
            )
        expected = layout.shape(key, parameter.shape)
        if key in layout.scale_keys and buffer.shape != expected:
            raise ValueError(
                f"optimizer state {where} has shape {tuple(buffer.shape)} but its parameter "
                f"(shape {tuple(parameter.shape)}) in blocks of {layout.block_size} has "
                f"{expected[0]} scales: it belongs to another model or block size"
            )
        if buffer.shape != expected:
            raise ValueError(
                f"optimizer state {where} has shape {tuple(buffer.shape)} "
                f"but its parameter has shape {tuple(parameter.shape)}: it belongs to "
                f"another model"
            )


class Gathered(NamedTuple):
    """One step's leaves, in the gradient tree's order."""

    paths: list[str] | None  # None unless asked for (they cost a string per leaf)
    gradients: list[mx.array]
    parameters: list[mx.array]
    states: list[dict]
    layouts: list[StateLayout]


class _Walk(NamedTuple):
    layout_of: LayoutOf
    new_state: NewState
    # (container, key, value) to store once every leaf has passed: state for parameters that
    # had none. Containers made during the walk are detached until then.
    attach: list


_FAILED = object()


def gather(
    gradients: Any,
    parameters: Any,
    state: Any,
    layout_of: LayoutOf,
    with_paths: bool,
    new_state: NewState,
) -> Gathered:
    """Every leaf of ``gradients`` with its parameter, its per-parameter state and that
    state's layout (``layout_of(parameter)``), after the checks of :func:`match_gradients` and
    :func:`check_state`. A parameter without state gets ``new_state(parameter)``, stored in
    ``state`` only after every check has passed.

    One walk with cheap checks serves the usual case (about 1 us a leaf instead of 6: it is
    per-step overhead for models of many small tensors); when anything looks wrong the
    detailed walkers run to raise their path-naming error.
    """
    found = Gathered([] if with_paths else None, [], [], [], [])
    walk = _Walk(layout_of, new_state, [])
    if _gather_into(found, gradients, parameters, state, "", walk) is _FAILED:
        leaves = match_gradients(gradients, parameters)
        nodes: list = []
        _explain_states(nodes, gradients, state, "")
        for leaf, node in zip(leaves, nodes, strict=True):
            if node is not None:
                check_state(leaf.path, leaf.parameter, node, layout_of(leaf.parameter))
        raise AssertionError("gather() refused a tree that the detailed checks accept")
    for container, key, value in walk.attach:
        if isinstance(container, list):
            container.extend({} for _ in range(key + 1 - len(container)))
        container[key] = value
    return found


def _gather_into(
    found: Gathered,
    grad: Any,
    param: Any,
    node: Any,
    path: str,
    walk: _Walk,
) -> Any:
    """The state node for ``grad`` (a new one where it had none), or ``_FAILED``."""
    if isinstance(grad, dict):
        if not grad:
            return node
        if not isinstance(param, dict):
            return _FAILED
        if _missing(node):
            node = {}
        elif not isinstance(node, dict):
            return _FAILED
        paths = found.paths is not None
        for key, child in grad.items():
            if key not in param:
                return _FAILED
            had = node.get(key)
            if had is None and _split_by_dots(node, key):
                return _FAILED
            now = _gather_into(
                found,
                child,
                param[key],
                had,
                _join(path, key) if paths else path,
                walk,
            )
            if now is not had:
                if now is _FAILED:
                    return _FAILED
                walk.attach.append((node, key, now))
        return node
    if isinstance(grad, (list, tuple)):
        if not grad:
            return node
        if not isinstance(param, (list, tuple)) or len(param) < len(grad):
            return _FAILED
        if _missing(node):
            node = []
        elif not isinstance(node, (list, tuple)):
            return _FAILED
        paths = found.paths is not None
        size = len(node)
        for index, child in enumerate(grad):
            had = node[index] if index < size else None
            now = _gather_into(
                found,
                child,
                param[index],
                had,
                _join(path, index) if paths else path,
                walk,
            )
            if now is not had:
                if now is _FAILED:
                    return _FAILED
                if isinstance(node, tuple):  # a state container from a tuple of parameters
                    node = list(node)
                walk.attach.append((node, index, now))
        return node
    if not (isinstance(grad, mx.array) and isinstance(param, mx.array)):
        return _FAILED
    shape = grad.shape
    if shape != param.shape or grad.dtype not in _FLOATING or param.dtype not in _FLOATING:
        return _FAILED
    layout = walk.layout_of(param)
    if not isinstance(node, dict) or node.keys() != layout.key_set:
        if not _missing(node):
            return _FAILED
        node = walk.new_state(param)
    if layout.quantized:
        for key in layout.keys:
            buffer = node[key]
            if not isinstance(buffer, mx.array):
                return _FAILED
            if key in layout.scale_keys:
                if buffer.dtype != mx.float32 or buffer.shape != layout.shape(key, shape):
                    return _FAILED
            elif buffer.shape != shape:
                return _FAILED
            elif key in layout.code_keys:
                if buffer.dtype != mx.uint8:
                    return _FAILED
            elif buffer.dtype not in _FLOATING:
                return _FAILED
    else:
        for key in layout.keys:
            buffer = node[key]
            if not isinstance(buffer, mx.array) or buffer.shape != shape:
                return _FAILED
            if buffer.dtype not in _FLOATING:
                return _FAILED
    if found.paths is not None:
        found.paths.append(path)
    found.gradients.append(grad)
    found.parameters.append(param)
    found.states.append(node)
    found.layouts.append(layout)
    return node


_FLOATING = frozenset(FLOATING_DTYPES)


def rebuild(template: Any, values: Iterator[Any]) -> Any:
    """A tree shaped like ``template`` whose leaves are taken, in order, from ``values``
    (containers without entries are kept as they are)."""
    if isinstance(template, dict):
        return {key: rebuild(child, values) for key, child in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(rebuild(child, values) for child in template)
    return next(values)
