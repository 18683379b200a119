"""``python -m benchmarks.memory`` (from a clone's root): the evidence that 8-bit optimizer
state and stochastic rounding train as well as float32, and what they save.

Parts (``--parts``, default all):

- ``quality``: each workload (``workloads.WORKLOADS``) trained with each configuration
  (``configurations.CONFIGURATIONS``: float32 state, 8-bit state, bfloat16 weights with
  round-to-nearest and with stochastic rounding, bfloat16 + 8-bit + stochastic rounding, and
  the naive ``mx.quantize`` baseline) on the same seed and steps: loss curves, final loss and
  accuracy, state bytes, peak memory.
- ``noise``: some configurations (``--noise-configurations``, default float32 and 8-bit
  state) again with other seeds (``--noise-seeds``): how far the final loss moves when only
  the seed changes, the scale against which the differences between configurations are
  read, and their means over seeds.
- ``codes``: the code-table study (:mod:`.codes`).
- ``bytes``: bytes per parameter of every configuration, and ``optimizer.state`` of a
  GPT-2-small-shaped tree with float32 and 8-bit state.
- ``speed``: the native CPU update of a 2^24-element tensor with float32 and with 8-bit
  state, side by side (``benchmarks.native_state_bits``, whose paired rounds this records).

Every figure, setting and version goes to a JSON file; ``--chart`` draws the loss curves,
``--doc`` rewrites the generated section of docs/memory.md. Deterministic for a seed (the
runs are on the CPU unless ``--device gpu``); timings only mean something on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys

PARTS = ("quality", "noise", "codes", "bytes", "speed")
DEFAULT_OUT = "bench-results/memory"
JSON_NAME = "memory.json"


def _choices(allowed: tuple[str, ...], option: str):
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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .configurations import CONFIGURATIONS
    from .workloads import WORKLOADS

    workloads, configurations = tuple(WORKLOADS), tuple(CONFIGURATIONS)
    add = parser.add_argument
    add("--parts", type=_choices(PARTS, "--parts"), default=PARTS, help="default: all")
    add(
        "--workloads",
        type=_choices(workloads, "--workloads"),
        default=workloads,
        help=f"quality workloads, of {', '.join(workloads)}; default all",
    )
    add(
        "--configurations",
        type=_choices(configurations, "--configurations"),
        default=configurations,
        help=f"of {', '.join(configurations)}; default all",
    )
    add(
        "--code-workloads",
        type=_choices(workloads, "--code-workloads"),
        default=("mnist", "lm"),
        help="workloads of the code-table study (state recorded from the first); default mnist,lm",
    )
    add(
        "--code-no-training",
        action="store_true",
        help="the code-table study records and measures the stored state only, without "
        "a training run per table",
    )
    add(
        "--code-steps",
        type=_positive,
        default=None,
        help="training steps of the code-table study's runs (default: --steps)",
    )
    add(
        "--steps",
        type=_positive,
        default=None,
        help="training steps of every workload (default: each workload's own)",
    )
    add("--seed", type=int, default=0, help="seed of the models, the data order and the data")
    add(
        "--noise-seeds",
        type=lambda text: tuple(int(item) for item in text.split(",")),
        default=(1, 2),
        help="seeds of the noise part's runs (default 1,2)",
    )
    add(
        "--noise-configurations",
        type=_choices(configurations, "--noise-configurations"),
        default=("float32", "8bit"),
        help="configurations of the noise part (default float32,8bit)",
    )
    add("--speed-exponent", type=int, default=24, help="elements of the speed step, 2^N")
    add("--speed-rounds", type=_positive, default=30, help="timed rounds of the speed part")
    add("--device", choices=("cpu", "gpu"), default="cpu", help="MLX device (default cpu)")
    add("--out", default=DEFAULT_OUT, metavar="DIR", help="folder of the JSON (and chart)")
    add("--chart", default=None, metavar="PATH", help="loss-curve PNG (default --out/memory.png)")
    add("--doc", default=None, metavar="PATH", help="rewrite the generated section of this file")
    add(
        "--from-json",
        nargs="+",
        default=None,
        metavar="PATH",
        help="measure nothing: report recorded runs (several: their parts and workloads merged, "
        "later files winning)",
    )
    add("--quiet", action="store_true", help="no progress lines")


def _save(record: dict, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, JSON_NAME)
    with open(path, "w") as file:
        json.dump(record, file, indent=1)
    return path


def measure(args: argparse.Namespace) -> dict:
    """Run the parts ``args`` asks for. The JSON in ``args.out`` is rewritten after every run,
    so an interrupted measurement keeps what it finished."""
    import mlx.core as mx

    from .configurations import CONFIGURATIONS
    from .workloads import WORKLOADS

    mx.set_default_device(getattr(mx, args.device))
    if "quality" in args.parts and "lora" in args.workloads:
        if importlib.util.find_spec("mlx_lm") is None:
            raise SystemExit(
                "the lora workload needs mlx-lm: pip install -e '.[mlx-lm]' (or leave it out: "
                "--workloads mnist,mnist-small-lr,lm)"
            )

    def progress(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    record: dict = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mx.default_device()}",
        "mlx": mx.__version__,
        "settings": {
            "parts": list(args.parts),
            "workloads": list(args.workloads),
            "configurations": list(args.configurations),
            "steps": args.steps,
            "seed": args.seed,
        },
    }
    if "quality" in args.parts:
        record["quality"] = {}
        for name in args.workloads:
            workload = WORKLOADS[name]
            runs = record["quality"][name] = {}
            for key in args.configurations:
                configuration = CONFIGURATIONS[key]
                outcome = workload.run(
                    configuration.optimizer, configuration.weights, args.steps, args.seed
                )
                runs[key] = outcome.figures()
                _save(record, args.out)
                progress(
                    f"quality: {name} / {configuration.label}: final loss "
                    f"{outcome.final_loss:.4f}, {outcome.seconds:.0f} s"
                )
    if "noise" in args.parts:
        record["noise"] = {}
        for name in args.workloads:
            for key in args.noise_configurations:
                configuration = CONFIGURATIONS[key]
                runs = record["noise"].setdefault(name, {}).setdefault(key, {})
                for seed in args.noise_seeds:
                    outcome = WORKLOADS[name].run(
                        configuration.optimizer, configuration.weights, args.steps, seed
                    )
                    runs[str(seed)] = outcome.figures()
                    _save(record, args.out)
                    progress(
                        f"noise: {name} / {configuration.label} / seed {seed}: final loss "
                        f"{outcome.final_loss:.4f}"
                    )
    if "codes" in args.parts:
        from .codes import study

        record["codes"] = study(
            args.code_workloads,
            args.code_steps or args.steps,
            args.seed,
            progress,
            train=not args.code_no_training,
        )
    if "bytes" in args.parts:
        from .sizes import bytes_per_parameter, gpt2_small

        record["bytes_per_parameter"] = bytes_per_parameter()
        record["gpt2"] = gpt2_small()
        progress(f"bytes: GPT-2 small ratio {record['gpt2']['ratio']:.4f}")
    if "speed" in args.parts:
        record["speed"] = speed(args.speed_exponent, args.speed_rounds)
        progress(f"speed: ratio {record['speed']['ratio']:.3f}")
    return record


def _read(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def _deep_update(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def merge(records: list[dict]) -> dict:
    """One record from several runs (say, each workload measured by its own process): their
    parts merged key by key (a later run's figure wins), the start time, machine, versions and
    settings of the first."""
    merged: dict = {}
    for record in records:
        first = not merged
        for key, value in record.items():
            if key in ("started", "settings", "machine", "mlx"):
                if first:
                    merged[key] = value
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                _deep_update(merged[key], value)
            else:
                merged[key] = value
    return merged


def speed(exponent: int, rounds: int) -> dict:
    """``benchmarks.native_state_bits``' side-by-side comparison of the native update with
    float32 and 8-bit state (MLX's defaults: plain RMSprop), as a JSON-ready dict."""
    import mlx.core as mx

    from mlx_rmsprop.paths import native
    from mlx_rmsprop.spec import UpdateOptions

    from .. import native_state_bits

    native.load()
    with mx.stream(mx.cpu):
        result = native_state_bits.compare(UpdateOptions(), 1 << exponent, rounds)
    return {
        "path": "native",
        "status": native.status(),
        "elements": result.size,
        "rounds": result.rounds,
        "float32_ms": result.float32_ms,
        "bits8_ms": result.bits8_ms,
        "ratio": result.ratio[1],
        "ratio_p20_p80": [result.ratio[0], result.ratio[2]],
        "cpu_ratio": result.cpu_ratio[1],
        "cpu_ratio_p20_p80": [result.cpu_ratio[0], result.cpu_ratio[2]],
    }


def run(args: argparse.Namespace) -> int:
    from . import report

    if args.from_json:
        record = merge([_read(path) for path in args.from_json])
    else:
        record = measure(args)
        _save(record, args.out)
    targets = report.evaluate(record)
    for target in targets:
        met = {True: "met", False: "NOT MET", None: "-"}[target["met"]]
        print(f"{met:8s} {target['target']}: {target['measured']}")
    chart = args.chart or os.path.join(args.out, "memory.png")
    if "quality" in record:
        if importlib.util.find_spec("matplotlib") is None:
            print(f"no chart: matplotlib is not installed ({chart} not written)")
        else:
            os.makedirs(os.path.dirname(chart) or ".", exist_ok=True)
            report.write_chart(record, chart)
            print(f"wrote the loss curves: {chart}")
    if args.doc:
        report.update_doc(args.doc, report.markdown(record, targets))
        print(f"wrote the generated section of {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="8-bit optimizer state and stochastic rounding: quality, bytes, speed",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "main", "measure", "merge", "run", "speed"]
