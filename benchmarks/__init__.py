"""The benchmark harness (``python -m benchmarks`` from a clone; ``python -m mlx_rmsprop bench``
runs it too): time one optimizer step of MLX's built-in RMSprop, ours on every path this device
runs, PyTorch and optax, side by side in one run.

It lives outside the installed package: it is the project's measurement of itself (its targets
and the generator of ``docs/benchmarks.md``), not something a user's training code imports.

One step = the optimizer's update of every parameter from given gradients, with the new
parameters and state evaluated (``mx.eval``) inside the timed region; warm-up steps are not
timed. Each row reports the median and the 20th/80th percentiles, the effective GB/s (the bytes
an update must move, counted with each implementation's real dtypes: read parameter, gradient
and every state buffer, write parameter and every state buffer), that as a fraction of the
memory bandwidth measured in the same run, MLX's peak memory of a step, and the speed against
the built-in under ``mx.compile``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import report
from .environment import on_gpu
from .runner import Settings, run_benchmark
from .targets import evaluate
from .workloads import CONFIGURATIONS, DTYPES, KINDS

WORKLOAD_KINDS = KINDS
DEFAULT_EXPONENTS = (10, 14, 18, 22, 24)
GPU_EXTRA_EXPONENT = 26
DEFAULT_CONFIGURATIONS = ("plain", "centered+momentum")
DEFAULT_OUT = "bench-results"
JSON_NAME = "mlx_rmsprop_bench.json"


def _choices(allowed: tuple[str, ...], option: str):
    """An argparse type: a comma-separated subset of ``allowed`` (or ``all``)."""

    def parse(text: str) -> tuple[str, ...]:
        if text == "all":
            return allowed
        chosen = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"{option} takes a comma-separated list of {', '.join(allowed)} (or all), "
                f"got {text!r}"
            )
        return chosen

    return parse


def _exponents(text: str) -> tuple[int, ...]:
    try:
        exponents = tuple(int(item) for item in text.split(","))
    except ValueError:
        exponents = ()
    if not exponents or any(not 0 <= exponent <= 30 for exponent in exponents):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated powers of two between 0 and 30 (22 means 2^22 "
            f"elements), got {text!r}"
        )
    return exponents


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m mlx_rmsprop bench``."""
    add = parser.add_argument
    add(
        "--workloads",
        type=_choices(WORKLOAD_KINDS, "--workloads"),
        default=WORKLOAD_KINDS,
        help="single (one tensor per --sizes entry), tree (a 160-tensor, 24.8M-parameter "
        "transformer), gpt2 (GPT-2 small: 196 tensors, 124M parameters), small (200 tensors "
        "of 2^10), lora-qv (7B LoRA on q and v, rank 8: 128 tensors), lora-7b (7B LoRA on "
        "every projection, rank 16: 448 tensors), tiny (10,000 tensors of 4); default: all",
    )
    add(
        "--sizes",
        type=_exponents,
        default=None,
        help="single-tensor sizes as powers of two, comma-separated; default "
        f"{','.join(map(str, DEFAULT_EXPONENTS))} (and {GPU_EXTRA_EXPONENT} on a GPU)",
    )
    add(
        "--dtypes",
        type=_choices(DTYPES, "--dtypes"),
        default=("float32", "bfloat16"),
        help="parameter dtypes; default float32,bfloat16",
    )
    add(
        "--configurations",
        type=_choices(tuple(CONFIGURATIONS), "--configurations"),
        default=DEFAULT_CONFIGURATIONS,
        help=f"of {', '.join(CONFIGURATIONS)} or all; default {','.join(DEFAULT_CONFIGURATIONS)}",
    )
    add("--repeats", type=_positive, default=20, help="timed steps per row (default 20)")
    add(
        "--row-seconds",
        type=float,
        default=1.0,
        help="fewer timed steps (at least 5) for a row whose --repeats steps would take longer "
        "than this, judged from its warm-up; 0: always --repeats (default 1.0)",
    )
    add(
        "--rounds",
        type=_positive,
        default=5,
        help="the timed steps of one workload and configuration are taken in this many "
        "rounds, every implementation once per round, so that a burst of other load on the "
        "machine hits them all alike (default 5)",
    )
    add(
        "--warmup",
        type=_count,
        default=2,
        help="untimed steps before the timed ones: compilation, first allocations and lazily "
        "created state happen there (default 2)",
    )
    add("--no-peers", action="store_true", help="skip PyTorch and optax even if installed")
    add(
        "--device",
        choices=("default", "cpu", "gpu"),
        default="default",
        help="MLX device to run on (default: MLX's default device)",
    )
    add(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="folder for the JSON and the chart, created if missing (default %(default)s/)",
    )
    add(
        "--json",
        default=None,
        metavar="PATH",
        help=f"where to write every figure, setting and version (default --out/{JSON_NAME})",
    )
    add(
        "--chart",
        default=None,
        metavar="PATH",
        help="PNG of GB/s against size (needs matplotlib; default: the --json path with .png)",
    )
    add("--no-chart", action="store_true", help="write no chart")
    add(
        "--doc",
        default=None,
        metavar="PATH",
        help="also replace the generated section of this Markdown file (docs/benchmarks.md) "
        "with the results",
    )
    add(
        "--from-json",
        default=None,
        metavar="PATH",
        help="measure nothing: show (and with --doc, write) the results of a recorded run",
    )
    add(
        "--bandwidth-size",
        type=_exponents,
        default=(25,),
        metavar="EXPONENT",
        help="elements of each array of the bandwidth measurement, as a power of two "
        "(default 25: two 128 MiB float32 arrays)",
    )
    add("--seed", type=int, default=0, help="seed of the generated parameters and gradients")
    add("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describes; prints the table and writes the files.
    Returns 2 when the requested device does not exist, 1 when a row failed, else 0."""
    import mlx.core as mx

    if args.from_json:
        return _from_recorded(args)
    if args.device != "default":
        device = getattr(mx, args.device)
        if not mx.is_available(device):
            print(
                f"--device {args.device}: MLX has no {args.device} on this machine", file=sys.stderr
            )
            return 2
        mx.set_default_device(device)
    exponents = args.sizes
    if exponents is None:
        exponents = DEFAULT_EXPONENTS + ((GPU_EXTRA_EXPONENT,) if on_gpu() else ())
    settings = Settings(
        workloads=tuple(args.workloads),
        exponents=tuple(exponents),
        dtypes=tuple(args.dtypes),
        configurations=tuple(args.configurations),
        repeats=args.repeats,
        rounds=args.rounds,
        row_seconds=args.row_seconds,
        warmup=args.warmup,
        peers=not args.no_peers,
        bandwidth_exponent=args.bandwidth_size[0],
        seed=args.seed,
    )
    record = run_benchmark(settings, report.ProgressBar(enabled=not args.quiet))
    targets = evaluate(record)
    print(report.format_table(record, targets))
    json_path = args.json or os.path.join(args.out, JSON_NAME)
    _make_parent(json_path)
    report.write_json(record, targets, json_path)
    print(f"wrote the JSON (every sample, setting and version): {os.path.abspath(json_path)}")
    if not args.no_chart:
        chart = args.chart or json_path.removesuffix(".json") + ".png"
        if not report.matplotlib_available():
            print(f"no chart: matplotlib is not installed ({chart} not written)")
        else:
            _make_parent(chart)
            if report.write_chart(record, chart):
                print(f"wrote the chart (GB/s against size): {os.path.abspath(chart)}")
            else:
                print("no chart: this run has no single-tensor plain rows to draw")
    if args.doc:
        _write_doc(args.doc, record, targets)
    failed = [row for row in record["results"] if row["status"].startswith("failed")]
    for row in failed:
        print(
            f"{row['implementation']} on {row['dtype']} {row['workload']}: {row['status']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def _write_doc(path: str, record: dict, targets: list[dict]) -> None:
    report.update_doc(path, report.markdown(record, targets))
    print(f"wrote the generated table into {os.path.abspath(path)}")


def _from_recorded(args: argparse.Namespace) -> int:
    """Show a recorded run's table and targets; with ``--doc``, rewrite that file from it."""
    try:
        with open(args.from_json) as file:
            record = json.load(file)
    except (OSError, ValueError) as error:
        print(f"--from-json {args.from_json}: cannot read a recorded run: {error}", file=sys.stderr)
        return 2
    targets = record.pop("targets", None) or evaluate(record)
    print(report.format_table(record, targets))
    if args.doc:
        _write_doc(args.doc, record, targets)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="time one RMSprop step against MLX, PyTorch and optax",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "main", "run"]
