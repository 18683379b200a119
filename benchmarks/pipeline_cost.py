"""What Keras' pipeline options cost per step (issue 18): ``python -m benchmarks.pipeline_cost``.

Side by side in one process, interleaved in rounds so that other load on the machine hits
every row alike; float32 on the CPU, an eager training loop (``apply_gradients`` then
``mx.eval``), median milliseconds of a step:

- ``plain``: ``RMSprop.from_keras()`` (the native path);
- ``full pipeline``: the same with EMA, ``skip_nonfinite``, ``clipnorm`` and
  ``gradient_accumulation_steps=2`` (a step alternates between accumulating and applying; both
  run the fused update, gated);
- ``built-in compiled``: ``mlx.optimizers.RMSprop`` with the step under ``mx.compile`` as MLX
  documents it, MLX's default allocator settings.

Workloads: GPT-2 small's parameter shapes (124M parameters in 196 tensors, q/k/v projections
apart), one tensor of 2^24 elements, and 200 tensors of 1,024.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from .workloads import FULL_PIPELINE, gpt2_shapes

IMPLEMENTATIONS = ("plain", "full pipeline", "built-in compiled")
WORKLOADS = {
    "gpt2-small": lambda: list(gpt2_shapes()),
    "2^24": lambda: [(1 << 24,)],
    "200x1024": lambda: [(1024,)] * 200,
}


def training_step(implementation: str, parameters: dict, fused: str = "auto"):
    """``(apply, model, optimizer)`` of an eager training loop: ``apply(gradients)`` runs one
    optimizer step of ``implementation`` on ``model["parameters"]`` (the built-in under
    ``mx.compile`` with model and state captured, as MLX documents it)."""
    import mlx.core as mx
    import mlx.optimizers

    from mlx_rmsprop import RMSprop

    if implementation == "plain":
        optimizer = RMSprop.from_keras(learning_rate=1e-3, fused=fused)
    elif implementation == "full pipeline":
        optimizer = RMSprop.from_keras(learning_rate=1e-3, fused=fused, **dict(FULL_PIPELINE))
    else:
        optimizer = mlx.optimizers.RMSprop(1e-3)
    optimizer.init(parameters)
    mx.eval(optimizer.state)
    model = {"parameters": parameters}

    def apply(grads: dict) -> None:
        model["parameters"] = optimizer.apply_gradients(grads, model["parameters"])

    if implementation == "built-in compiled":
        captured = [model, optimizer.state]
        apply = mx.compile(apply, inputs=captured, outputs=captured)
    return apply, model, optimizer


def prepare(implementation: str, shapes: list[tuple[int, ...]], seed: int = 0):
    """A ``step()`` running one optimizer step of ``implementation`` on fresh arrays."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    names = [f"t{index:03d}" for index in range(len(shapes))]
    parameters = {
        name: mx.array(rng.standard_normal(shape, np.float32))
        for name, shape in zip(names, shapes, strict=True)
    }
    gradients = {
        name: mx.array(rng.standard_normal(shape, np.float32) * 1e-2)
        for name, shape in zip(names, shapes, strict=True)
    }
    mx.eval(parameters, gradients)
    apply, model, optimizer = training_step(implementation, parameters)

    def step() -> None:
        apply(gradients)
        mx.eval(model, optimizer.state)

    return step


def measure(workload: str, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    shapes = WORKLOADS[workload]()
    prepared = {name: prepare(name, shapes) for name in IMPLEMENTATIONS}
    for step in prepared.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name, step in prepared.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_cost", description=__doc__)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per round (even)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    import mlx.core as mx

    from mlx_rmsprop.paths import resolve

    print(f"mlx {mx.__version__}; our path: {resolve('auto')[0].name}")
    print(
        "| workload | plain | full pipeline | built-in compiled | full / plain | full / built-in |"
    )
    print("|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        ms = measure(workload, args.rounds, args.steps, args.warmup)
        full, plain, builtin = ms["full pipeline"], ms["plain"], ms["built-in compiled"]
        print(
            f"| {workload} | {plain:.2f} ms | {full:.2f} ms | {builtin:.2f} ms | "
            f"{full / plain:.2f}x | {full / builtin:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
