"""The implementations a run compares, and how each one is set up for a workload.

An :class:`Implementation` turns NumPy data into its own arrays and returns a :class:`Prepared`
step: a call that applies one update to every parameter and returns only when the new
parameters and state exist. The MLX ones live here (the built-in and ours on every path);
PyTorch and optax are in :mod:`.peers`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers
import numpy as np

from mlx_rmsprop import paths
from mlx_rmsprop.optimizer import RMSprop

from .workloads import (
    ALPHA,
    EPS,
    LEARNING_RATE,
    Configuration,
    Workload,
    WorkloadData,
    bytes_moved,
)

OK = "ok"
NOT_INSTALLED = "not installed"


@dataclass
class Prepared:
    """One implementation set up on one workload.

    ``step`` applies one update and returns once the results exist; ``next_gradients``
    switches to the other gradient set and is called between timed steps, outside the timer.
    """

    step: Callable[[], None]
    next_gradients: Callable[[], None]
    bytes_moved: int
    device: str
    # Seconds of the first step after setup (tracing, compilation, and for PyTorch, which
    # creates it lazily, the state), taken by `prepare`.
    first_step_s: float | None = None
    # Bytes of its parameters, one gradient set and its state, where they live in MLX's
    # allocator (whose peak the benchmark then reads); None otherwise.
    mlx_resident: int | None = None
    # For MLX: one step whose graph is counted before it is evaluated; returns the number of
    # operations (graph nodes) it built.
    count_nodes: Callable[[], int] | None = None


Prepare = Callable[[Workload, WorkloadData, Configuration], Prepared]


@dataclass(frozen=True)
class Implementation:
    """A row label of the results, what it is, and how to set it up.

    ``role`` is a stable identifier that the JSON and the target checks use (``mlx-eager``,
    ``mlx-compiled``, ``mlx-floor``, ``path:<name>``, ``user-compiled``, ``torch-foreach``,
    ``torch-loop``, ``optax``). ``status`` is ``"ok"``, ``"not installed"`` or
    ``"unavailable: <reason>"``.
    """

    name: str
    role: str
    status: str
    prepare: Prepare | None = None
    # Configuration names this implementation has; ``None``: all of them.
    configurations: frozenset[str] | None = None
    # The path ``fused="auto"`` resolves to on this machine.
    auto: bool = False

    def supports(self, configuration: Configuration) -> bool:
        return self.configurations is None or configuration.name in self.configurations


def timed_first_step(step: Callable[[], None]) -> float:
    """Runs ``step`` once and returns its seconds."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def graph_nodes(*outputs: object) -> int:
    """Operations in the graph that evaluating ``outputs`` would run (arrays already
    evaluated count as inputs): the nodes of MLX's DOT export."""
    text = io.StringIO()
    mx.export_to_dot(text, *outputs)
    return text.getvalue().count("shape=rectangle")


def _mlx_arrays(arrays: list[np.ndarray], names: list[str], dtype: mx.Dtype) -> dict:
    tree = {name: mx.array(array).astype(dtype) for name, array in zip(names, arrays, strict=True)}
    mx.eval(tree)
    return tree


def _prepare_mlx(
    make_optimizer: Callable[[], mlx.optimizers.Optimizer],
    workload: Workload,
    data: WorkloadData,
    compiled: bool,
    state_moved: bool = True,
) -> Prepared:
    dtype = getattr(mx, workload.dtype)
    names = [f"t{index:05d}" for index in range(workload.tensors)]
    parameter_tree = _mlx_arrays(data.parameters, names, dtype)
    gradient_trees = data.gradient_pair(
        ("mlx", workload.dtype), lambda arrays: _mlx_arrays(arrays, names, dtype)
    )
    optimizer = make_optimizer()
    optimizer.init(parameter_tree)
    mx.eval(optimizer.state)
    model = {"parameters": parameter_tree}
    current = {"gradients": 0}

    def apply(gradients: dict) -> None:
        model["parameters"] = optimizer.apply_gradients(gradients, model["parameters"])

    if compiled:
        # The training-step pattern MLX documents: the whole step compiled, with the model and
        # the optimizer state captured as implicit inputs and outputs.
        captured = [model, optimizer.state]
        apply = mx.compile(apply, inputs=captured, outputs=captured)

    def step() -> None:
        apply(gradient_trees[current["gradients"]])
        mx.eval(model, optimizer.state)

    def next_gradients() -> None:
        current["gradients"] ^= 1

    def count_nodes() -> int:
        apply(gradient_trees[current["gradients"]])
        nodes = graph_nodes(model, optimizer.state)
        mx.eval(model, optimizer.state)
        return nodes

    first_step_s = timed_first_step(step)
    parameters = list(parameter_tree.values())
    gradients = list(gradient_trees[0].values())
    state_buffers = [buffer for name in names for buffer in optimizer.state[name].values()]
    return Prepared(
        step=step,
        next_gradients=next_gradients,
        bytes_moved=bytes_moved(parameters, gradients, state_buffers if state_moved else []),
        device=str(mx.default_device()),
        first_step_s=first_step_s,
        mlx_resident=sum(array.nbytes for array in parameters + gradients + state_buffers),
        count_nodes=count_nodes,
    )


def builtin(compiled: bool) -> Implementation:
    """``mlx.optimizers.RMSprop``, which has only the plain configuration."""

    def prepare(workload, data, configuration) -> Prepared:
        return _prepare_mlx(
            lambda: mlx.optimizers.RMSprop(LEARNING_RATE, ALPHA, EPS), workload, data, compiled
        )

    return Implementation(
        name="MLX RMSprop, mx.compile" if compiled else "MLX RMSprop, eager",
        role="mlx-compiled" if compiled else "mlx-eager",
        status=OK,
        prepare=prepare,
        configurations=frozenset({"plain"}),
    )


def mlx_floor() -> Implementation:
    """Not RMSprop: ``mlx.optimizers.SGD`` without momentum under ``mx.compile``, one
    elementwise node with one output per parameter (an RMSprop step has two: the parameter and
    ``v``). Its time on a tree of small tensors is MLX's own cost per tensor of a step, a
    floor that no optimizer built from MLX arrays goes below."""

    def prepare(workload, data, configuration) -> Prepared:
        # SGD keeps a `v` per parameter that it never reads without momentum.
        return _prepare_mlx(
            lambda: mlx.optimizers.SGD(LEARNING_RATE), workload, data, True, state_moved=False
        )

    return Implementation(
        name="floor: MLX SGD, mx.compile",
        role="mlx-floor",
        status=OK,
        prepare=prepare,
        configurations=frozenset({"plain"}),
    )


def _ours(fused: str | bool, compiled: bool) -> Prepare:
    def prepare(workload, data, configuration) -> Prepared:
        return _prepare_mlx(
            lambda: RMSprop(
                LEARNING_RATE,
                ALPHA,
                EPS,
                centered=configuration.centered,
                momentum=configuration.momentum,
                fused=fused,
                **dict(configuration.pipeline),
            ),
            workload,
            data,
            compiled,
        )

    return prepare


def _fused_argument(path_name: str) -> str | bool:
    # ``fused=False`` selects the plain reference ops; every other path is chosen by its name.
    return False if path_name == "reference" else path_name


def ours() -> list[Implementation]:
    """``mlx_rmsprop.RMSprop`` on every registered path (those that cannot load here are
    reported with the reason), then with ``fused="auto"`` inside a user's ``mx.compile``."""
    try:
        auto_path = paths.resolve("auto")[0].name
    except RuntimeError:
        auto_path = None
    found = []
    for name, path in paths.PATHS.items():
        fused = _fused_argument(name)
        label = f"mlx_rmsprop fused={fused!r}" + (" (auto)" if name == auto_path else "")
        try:
            path.load()
        except RuntimeError as error:
            found.append(Implementation(label, f"path:{name}", f"unavailable: {error}"))
            continue
        found.append(
            Implementation(
                label, f"path:{name}", OK, _ours(fused, compiled=False), auto=name == auto_path
            )
        )
    found.append(
        Implementation(
            "mlx_rmsprop auto, in mx.compile",
            "user-compiled",
            OK if auto_path else "unavailable: no path loads",
            _ours("auto", compiled=True),
        )
    )
    return found
