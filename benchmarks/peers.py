"""PyTorch's and optax's RMSprop, when installed: the same workloads in their own arrays.

Neither is a dependency. A missing one is reported as ``"not installed"``; one that is installed
but fails to import is reported with the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any

from .implementations import NOT_INSTALLED, OK, Implementation, Prepared, timed_first_step
from .workloads import ALPHA, EPS, LEARNING_RATE, PLAIN_RMSPROP, bytes_moved


def _import(*names: str) -> tuple[list[Any], str]:
    """The modules, and ``"ok"``, ``"not installed"`` or ``"unavailable: ..."``."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            return [], f"{NOT_INSTALLED} ({name})"
    try:
        return [importlib.import_module(name) for name in names], OK
    except Exception as error:  # a broken install must not stop the benchmark
        return [], f"unavailable: importing failed: {type(error).__name__}: {error}"


def versions() -> dict[str, str]:
    """Installed peer versions, or ``"not installed"``."""
    found = {}
    for name in ("torch", "jax", "optax"):
        if importlib.util.find_spec(name) is None:
            found[name] = NOT_INSTALLED
            continue
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as error:
            found[name] = f"unavailable: {type(error).__name__}: {error}"
    return found


def _torch_device(torch: Any) -> str:
    # Peers run where MLX runs: the GPU when MLX uses one and torch has one, else the CPU.
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
    return "cpu"


def torch_rmsprop(foreach: bool) -> Implementation:
    """``torch.optim.RMSprop`` with ``foreach`` on (one multi-tensor kernel per op) or off
    (a Python loop over parameters)."""
    name = f"torch RMSprop, foreach={foreach}"
    role = "torch-foreach" if foreach else "torch-loop"
    (modules, status) = _import("torch")
    if status != OK:
        return Implementation(name, role, status)
    (torch,) = modules

    def prepare(workload, data, configuration) -> Prepared:
        device = _torch_device(torch)
        dtype = getattr(torch, workload.dtype)

        def convert(arrays):
            # A copy: from_numpy alone would share memory, and the optimizer updates in place.
            return [torch.tensor(array, device=device, dtype=dtype) for array in arrays]

        tensors = [tensor.requires_grad_(True) for tensor in convert(data.parameters)]
        gradient_sets = data.gradient_pair(("torch", device, workload.dtype), convert)
        current = {"gradients": 0}

        def next_gradients() -> None:
            current["gradients"] ^= 1
            for tensor, gradient in zip(tensors, gradient_sets[current["gradients"]], strict=True):
                tensor.grad = gradient

        optimizer = torch.optim.RMSprop(
            tensors,
            lr=LEARNING_RATE,
            alpha=ALPHA,
            eps=EPS,
            momentum=configuration.momentum,
            centered=configuration.centered,
            foreach=foreach,
        )

        def step() -> None:
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            elif device == "mps":
                torch.mps.synchronize()

        next_gradients()
        first_step_s = timed_first_step(step)  # torch creates its state on the first step
        state_buffers = [
            buffer
            for tensor in tensors
            for buffer in optimizer.state[tensor].values()
            if torch.is_tensor(buffer) and buffer.shape == tensor.shape
        ]
        return Prepared(
            step=step,
            next_gradients=next_gradients,
            bytes_moved=bytes_moved(tensors, gradient_sets[0], state_buffers),
            device=f"{device} ({torch.get_num_threads()} threads)" if device == "cpu" else device,
            first_step_s=first_step_s,
        )

    return Implementation(name, role, OK, prepare, configurations=PLAIN_RMSPROP)


def optax_rmsprop() -> Implementation:
    """``optax.rmsprop`` applied in one ``jax.jit`` function that donates the parameters and
    the optimizer state (so XLA may update them in place)."""
    name = "optax rmsprop, jax.jit (donated)"
    (modules, status) = _import("jax", "optax")
    if status != OK:
        return Implementation(name, "optax", status)
    jax, optax = modules

    def prepare(workload, data, configuration) -> Prepared:
        dtype = getattr(jax.numpy, workload.dtype)

        def convert(arrays):
            # A copy: on the CPU asarray may alias the NumPy buffer, which donation would reuse.
            return [jax.numpy.array(array, dtype=dtype, copy=True) for array in arrays]

        transform = optax.rmsprop(
            LEARNING_RATE,
            decay=ALPHA,
            eps=EPS,
            centered=configuration.centered,
            momentum=configuration.momentum or None,
        )
        params = convert(data.parameters)
        gradient_sets = data.gradient_pair(("jax", workload.dtype), convert)

        def update(params, grads, state):
            updates, state = transform.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        update = jax.jit(update, donate_argnums=(0, 2))
        held = {"params": params, "state": transform.init(params), "gradients": 0}

        def step() -> None:
            grads = gradient_sets[held["gradients"]]
            held["params"], held["state"] = update(held["params"], grads, held["state"])
            jax.block_until_ready((held["params"], held["state"]))

        def next_gradients() -> None:
            held["gradients"] ^= 1

        with warnings.catch_warnings():
            # Where a backend cannot donate, jax warns once and copies: still a valid timing.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            first_step_s = timed_first_step(step)  # jax.jit traces and compiles here
        state_buffers = [leaf for leaf in jax.tree_util.tree_leaves(held["state"]) if leaf.ndim > 0]
        return Prepared(
            step=step,
            next_gradients=next_gradients,
            bytes_moved=bytes_moved(held["params"], gradient_sets[0], state_buffers),
            device=str(jax.devices()[0].platform),
            first_step_s=first_step_s,
        )

    return Implementation(name, "optax", OK, prepare, configurations=PLAIN_RMSPROP)


def peers() -> list[Implementation]:
    return [torch_rmsprop(foreach=True), torch_rmsprop(foreach=False), optax_rmsprop()]
