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


# Marks the end of a container in a structure key: {"a": {"b": x}, "c": y} and
# {"a": {"b": x, "c": y}} list the same keys and differ only in where a container ends.
_END = object()


class LeafCache:
    """What one step's :func:`gather` found, and the state buffers the step stored, so that
    the next step over the same trees is verified by identity instead of checked again.

    :func:`gather_cached` accepts the next step's trees when the gradient tree lists the same
    keys in the same nesting (its structure key: an added, removed, renamed or moved key
    differs) and every leaf's state node is the same dict object at the same position,
    holding exactly the buffers this step stored, in the same order (so their keys, shapes
    and dtypes are the ones :func:`gather` checked). Anything else (a state node or buffer
    replaced, a loaded checkpoint, a new parameter) misses, and :func:`gather` runs: it raises
    its path-naming errors or starts a new cache.

    The gradients' and parameters' shapes and dtypes are not compared here: only a step
    function compiled for exactly the shapes and dtypes it was traced with may follow a hit
    (``mx.compile`` traces again for any other; the caller then runs :func:`gather`'s checks
    before anything changes, see ``RMSprop._apply_gradients``).

    It holds no gradient and no parameter, only the containers and buffers the optimizer
    state holds anyway (holding an old buffer would keep MLX from updating it in place).
    """

    __slots__ = ("structure", "nodes", "written", "paths", "layouts", "in_order", "payload")

    def __init__(self, gradients: Any, found: Gathered, payload: Any = None) -> None:
        """Built from a step's ``gradients`` and what :func:`gather` found for them, once
        the step has stored its new buffers in the state nodes."""
        structure: list = []
        _structure_into(structure, gradients)
        self.structure = structure
        self.nodes = found.states
        # The buffers each state node must still hold, in the node's own key order.
        self.written = [tuple(node.values()) for node in found.states]
        self.paths = found.paths
        self.layouts = found.layouts
        # Whether every node holds its buffers in its layout's key order (a state made by
        # init_single), so that the nodes themselves can be the step's inputs.
        self.in_order = all(
            tuple(node) == layout.keys
            for node, layout in zip(found.states, found.layouts, strict=True)
        )
        # Whatever the caller derives from the leaves (their paths) and keeps with them.
        self.payload = payload

    def stored(self) -> None:
        """The step verified by this cache has stored its new buffers in the state nodes."""
        self.written = [tuple(node.values()) for node in self.nodes]


def _structure_into(structure: list, grad: Any) -> None:
    # The keys of every non-empty container in walk order, each container closed by _END
    # (empty containers hold no leaves and are skipped, as the walks skip them).
    if isinstance(grad, dict):
        if grad:
            for key, child in grad.items():
                structure.append(key)
                _structure_into(structure, child)
            structure.append(_END)
    elif isinstance(grad, (list, tuple)):
        if grad:
            for index, child in enumerate(grad):
                structure.append(index)
                _structure_into(structure, child)
            structure.append(_END)


class _CachedWalk:
    __slots__ = ("structure", "nodes", "written", "count", "gradients", "parameters")

    def __init__(self, cache: LeafCache) -> None:
        self.structure: list = []
        self.nodes = cache.nodes
        self.written = cache.written
        self.count = 0
        self.gradients: list[mx.array] = []
        self.parameters: list[mx.array] = []


def gather_cached(cache: LeafCache, gradients: Any, parameters: Any, state: Any) -> Gathered | None:
    """The leaves :func:`gather` would return, verified against ``cache`` (see
    :class:`LeafCache`), or ``None`` when anything differs: then :func:`gather` must run."""
    walk = _CachedWalk(cache)
    if not (
        isinstance(gradients, (dict, list, tuple))
        and gradients
        and _cached_into(walk, gradients, parameters, state)
    ):
        return None
    if walk.count != len(cache.nodes) or walk.structure != cache.structure:
        return None
    return Gathered(cache.paths, walk.gradients, walk.parameters, cache.nodes, cache.layouts)


def _cached_into(walk: _CachedWalk, grad: Any, param: Any, node: Any) -> bool:
    # The leaves are checked inline, not in a call per leaf: this loop is the whole per-leaf
    # cost of a step's tree handling.
    if isinstance(grad, dict):
        if not (isinstance(param, dict) and isinstance(node, dict)):
            return False
        pairs = ((key, child, param.get(key), node.get(key)) for key, child in grad.items())
    else:
        size = len(grad)
        if not (
            isinstance(param, (list, tuple))
            and isinstance(node, (list, tuple))
            and len(param) >= size
            and len(node) >= size
        ):
            return False
        pairs = zip(range(size), grad, param, node, strict=False)  # lengths checked above
    structure, nodes, written = walk.structure, walk.nodes, walk.written
    for key, child, child_param, child_node in pairs:
        structure.append(key)
        if type(child) is _ARRAY:
            index = walk.count
            if (
                index >= len(nodes)
                or child_node is not nodes[index]
                or type(child_param) is not _ARRAY
            ):
                return False
            held = written[index]
            if len(child_node) != len(held):
                return False
            for buffer, ours in zip(child_node.values(), held, strict=True):
                if buffer is not ours:
                    return False
            walk.count = index + 1
            walk.gradients.append(child)
            walk.parameters.append(child_param)
        elif isinstance(child, (dict, list, tuple)):
            if child and not _cached_into(walk, child, child_param, child_node):
                return False
        else:
            return False
    structure.append(_END)
    return True


_ARRAY = mx.array


def rebuild(template: Any, values: Iterator[Any]) -> Any:
    """A tree shaped like ``template`` whose leaves are taken, in order, from ``values``
    (containers without entries are kept as they are)."""
    if isinstance(template, dict):
        return {key: rebuild(child, values) for key, child in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(rebuild(child, values) for child in template)
    return next(values)
