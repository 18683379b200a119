"""First-step latency on many tiny tensors (issue 18): ``python -m benchmarks.first_step``.

The first step of a training run traces and compiles the step's graph; its cost grows with
the number of graph nodes. Each measurement runs in a fresh process (nothing traced or
compiled before), times the first ``apply_gradients`` with the new parameters and state
evaluated, and reports seconds:

- ``ours, full pipeline``: ``RMSprop.from_keras`` with EMA, ``skip_nonfinite``, ``clipnorm``
  and ``gradient_accumulation_steps=2`` on the native path;
- ``ours, plain``: ``RMSprop.from_keras`` with no pipeline option on the native path;
- ``built-in, mx.compile``: ``mlx.optimizers.RMSprop`` with the step compiled as MLX documents
  (model and optimizer state captured).

Tensors have 4 float32 elements. Timings are wall-clock seconds of one step, so they say
nothing on a machine busy with other work; rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from .pipeline_cost import training_step

DEFAULT_COUNTS = (1000, 5000, 10000, 20000)
TENSOR_ELEMENTS = 4
IMPLEMENTATIONS = ("ours-full", "ours-plain", "builtin-compiled")
# pipeline_cost.training_step's name of each.
STEPS = {
    "ours-full": "full pipeline",
    "ours-plain": "plain",
    "builtin-compiled": "built-in compiled",
}
LABELS = {
    "ours-full": "ours, full pipeline (native)",
    "ours-plain": "ours, plain (native)",
    "builtin-compiled": "built-in, mx.compile",
}


def first_step_seconds(implementation: str, tensors: int) -> float:
    """The first step's seconds in this process (call it once per process)."""
    import mlx.core as mx

    names = [f"t{index:05d}" for index in range(tensors)]
    parameters = {name: mx.full((TENSOR_ELEMENTS,), 0.5) for name in names}
    gradients = {name: mx.full((TENSOR_ELEMENTS,), 0.25) for name in names}
    mx.eval(parameters, gradients)
    apply, model, optimizer = training_step(STEPS[implementation], parameters, fused="native")
    start = time.perf_counter()
    apply(gradients)
    mx.eval(model, optimizer.state)
    return time.perf_counter() - start


def measure(implementation: str, tensors: int, timeout: float) -> float | None:
    """``first_step_seconds`` in a fresh interpreter; None when it ran past ``timeout``."""
    code = (
        "from benchmarks.first_step import first_step_seconds; "
        f"print(first_step_seconds({implementation!r}, {tensors}))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def format_table(results: dict[str, dict[int, float | None]], counts: list[int]) -> str:
    header = "| implementation | " + " | ".join(f"{n:,} tensors" for n in counts) + " |"
    lines = [header, "|---|" + "---|" * len(counts)]
    for implementation, row in results.items():
        cells = ["timeout" if row[n] is None else f"{row[n]:.2f} s" for n in counts]
        lines.append(f"| {LABELS[implementation]} | " + " | ".join(cells) + " |")
    ours, builtin = results.get("ours-full"), results.get("builtin-compiled")
    if ours and builtin:
        cells = [
            "—" if ours[n] is None or builtin[n] is None else f"{ours[n] / builtin[n]:.2f}x"
            for n in counts
        ]
        lines.append("| full pipeline / built-in | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_step", description=__doc__)
    parser.add_argument(
        "--tensors",
        default=",".join(map(str, DEFAULT_COUNTS)),
        help="comma-separated tensor counts (default %(default)s)",
    )
    parser.add_argument(
        "--implementations",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated subset of {', '.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    counts = [int(item) for item in args.tensors.split(",")]
    chosen = [item for item in args.implementations.split(",") if item]
    unknown = [item for item in chosen if item not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"--implementations: unknown {', '.join(unknown)}")
    results: dict[str, dict[int, float | None]] = {name: {} for name in chosen}
    for tensors in counts:
        for name in chosen:
            results[name][tensors] = measure(name, tensors, args.timeout)
            print(f"{LABELS[name]}, {tensors} tensors: {results[name][tensors]}", flush=True)
    print(format_table(results, counts))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"tensors": counts, "seconds": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
