"""What a run shows: a progress bar while it runs, the terminal table, the JSON file, the
generated section of ``docs/benchmarks.md`` and (with matplotlib installed) a chart of GB/s
against size."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from typing import TextIO

from .implementations import OK
from .timing import MIN_REPEATS

DOC_START = "<!-- mlx_rmsprop bench: start -->"
DOC_END = "<!-- mlx_rmsprop bench: end -->"
DOC_COMMAND = "python -m benchmarks --doc docs/benchmarks.md"


class ProgressBar:
    """``[#####-----] 12/80 1m05s label`` redrawn in place on a terminal; where the stream is
    not a terminal (a CI log) a plain line every ``log_every`` seconds; nothing when disabled."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True, log_every: float = 10):
        self.stream = stream
        self.enabled = enabled
        self.interactive = enabled and stream.isatty()
        self.log_every = log_every
        self.started = time.perf_counter()
        self.logged = -float("inf")

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = _duration(now - self.started)
        if not self.interactive:
            if now - self.logged >= self.log_every or done >= total:
                print(f"[{done}/{total}] {elapsed} {label}", file=self.stream, flush=True)
                self.logged = now
            return
        width = 24
        filled = width * done // max(total, 1)
        line = f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {elapsed} {label}"
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + line[: columns - 1].ljust(columns - 1))
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_time(seconds: float) -> str:
    """Milliseconds with three significant digits (``44.4 ms``, ``0.512 ms``)."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def _spread(row: dict) -> str:
    return f"{row['p20_s'] * 1e3:.3g}-{row['p80_s'] * 1e3:.3g}"


def _first_step(row: dict) -> str:
    first = row.get("first_step_s")
    return "-" if first is None else format_time(first)


def _nodes(row: dict) -> str:
    nodes = row.get("graph_nodes_per_tensor")
    return "-" if nodes is None else f"{nodes:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def describe_machine(record: dict) -> str:
    machine = record["machine"]
    load = machine.get("load_average")
    busy = f", load average {load:.1f} at the start" if load is not None else ""
    device = "the GPU" if machine["gpu"] else "the CPU"
    gpu_name = machine["device_info"].get("device_name", "") if machine["gpu"] else ""
    where = f"{device} ({gpu_name})" if gpu_name else device
    return f"MLX on {where}; {machine['cpu']}, {machine['cpu_count']} CPUs{busy}; {machine['os']}"


def describe_versions(record: dict) -> str:
    names = ("mlx", "mlx_rmsprop", "numpy", "torch", "jax", "optax", "python")
    return ", ".join(f"{name} {record['versions'][name]}" for name in names)


def describe_bandwidth(record: dict) -> str:
    bandwidth = record["bandwidth"]
    measured = bandwidth["before"][bandwidth["source"]]
    return (
        f"{bandwidth['gbps']:.1f} GB/s ({measured['method']}, "
        f"{_size(measured['array_bytes'])} arrays, 3 arrays' bytes per pass, best of "
        f"{measured['passes']} passes before and after the rows)"
    )


def _groups(record: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in record["results"]:
        groups.setdefault((row["dtype"], row["workload"]), []).append(row)
    return groups


def not_run(record: dict) -> dict[str, str]:
    """Implementation name -> why it ran nowhere in this run (not installed, unavailable here).
    Their per-workload rows all carry this one status, so it is shown once."""
    return {
        impl["name"]: impl["status"] for impl in record["implementations"] if impl["status"] != OK
    }


def describe_cache(record: dict) -> str:
    cache = record["machine"].get("last_level_cache")
    if record["machine"]["gpu"] or not cache:
        return "no cache-resident marking on a GPU"
    source = "not reported by the OS; assumed" if cache["source"] == "fallback" else cache["source"]
    return f"last-level cache {_size(cache['bytes'])} ({source})"


def _fraction(row: dict) -> str:
    if row.get("cache_resident"):
        return "cache"
    fraction = row.get("bandwidth_fraction")
    return "-" if fraction is None else f"{fraction:.0%}"


def format_table(record: dict, targets: list[dict]) -> str:
    settings = record["settings"]
    lines = [
        f"mlx_rmsprop bench, {record['started']}: {describe_machine(record)}",
        describe_versions(record),
        f"memory bandwidth: {describe_bandwidth(record)}",
        f"after {settings['warmup']} warm-up steps, median of {_steps(settings)}, taken "
        f"in {_rounds(settings['rounds'])} "
        "(p20-p80 in ms); GB/s from the bytes an update must move; %BW: that as a fraction "
        "of the memory bandwidth, or 'cache' where the bytes moved fit in the "
        f"{describe_cache(record)}; x: speed against MLX "
        "RMSprop under mx.compile on the same workload (its plain step)",
    ]
    absent = not_run(record)
    if absent:
        lines += ["", "not run here:"]
        lines += [f"  {name}: {status}" for name, status in absent.items()]
    header = (
        f"  {'implementation':<36} {'configuration':<18} {'median':>10} {'p20-p80':>14} "
        f"{'GB/s':>7} {'%BW':>5} {'peak MB':>8} {'x':>6} {'first':>9} {'nodes/t':>7}"
    )
    for (dtype, workload), rows in _groups(record).items():
        first = rows[0]
        lines += [
            "",
            f"{dtype} {workload}: {first['elements']:,} elements in {first['tensors']} tensors",
            header,
        ]
        for row in rows:
            name = f"  {row['implementation']:<36} "
            if row["status"] != OK:
                if row["configuration"] is not None:  # failed here; not-run rows are above
                    lines.append(name + f"{row['configuration']:<18} {row['status']}")
                continue
            peak = row["peak_memory_bytes"]
            lines.append(
                name + f"{row['configuration']:<18} {format_time(row['median_s']):>10} "
                f"{_spread(row):>14} {row['gbps']:>7.2f} {_fraction(row):>5} "
                f"{peak / 1e6 if peak else float('nan'):>8.1f} "
                f"{_ratio(row['speed_vs_mlx_compiled']):>6} {_first_step(row):>9} "
                f"{_nodes(row):>7}"
            )
    lines += ["", "targets (ratios of this run's medians):"]
    lines += [f"  {_target_line(target)}" for target in targets if target["met"] is not None]
    skipped = [target for target in targets if target["met"] is None]
    if skipped:
        lines.append(f"  {_skipped_summary(skipped, len(targets))}; the JSON gives each reason")
    return "\n".join(lines)


def _skipped_summary(skipped: list[dict], total: int) -> str:
    gpu = sum(target["target"].startswith("GPU") for target in skipped)
    kinds = []
    if len(skipped) > gpu:
        kinds.append(f"{len(skipped) - gpu} whose workload or device was not in this run")
    if gpu:
        kinds.append(f"{gpu} GPU")
    return f"not measured: {len(skipped)} of {total} targets ({', '.join(kinds)})"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def _rounds(count: int) -> str:
    return "1 round" if count == 1 else f"{count} interleaved rounds"


def _steps(settings: dict) -> str:
    if settings["row_seconds"] <= 0 or settings["repeats"] <= MIN_REPEATS:
        return f"{settings['repeats']} steps"
    repeats = settings["repeats"]
    budget = settings["row_seconds"]
    return (
        f"{repeats} steps, or at least {MIN_REPEATS} where {repeats} would take over {budget:g} s"
    )


def _verdict(target: dict) -> str:
    if target["met"] is None:
        return "not measured"
    return "met" if target["met"] else "MISSED"


def _target_line(target: dict) -> str:
    measured = "-" if target["measured"] is None else f"{target['measured']:.2f}"
    note = f"; {target['note']}" if target["note"] else ""
    return f"{_verdict(target):<12} {target['target']}: {measured} (bar {_bar(target)}{note})"


def _bar(target: dict) -> str:
    return "-" if target["bar"] is None else f"{target['bar']:.2f}"


def write_json(record: dict, targets: list[dict], path: str) -> None:
    with open(path, "w") as file:
        json.dump(record | {"targets": targets}, file, indent=2)
        file.write("\n")


def markdown(record: dict, targets: list[dict]) -> str:
    """The generated section of ``docs/benchmarks.md``: one table per dtype (rows:
    implementation and configuration, columns: workloads), one line per implementation that
    ran nowhere, then the targets."""
    lines = [
        DOC_START,
        f"Measured {record['started'][:10]} with {describe_machine(record)}; "
        f"{describe_versions(record)}. Memory bandwidth measured in the same run: "
        f"{describe_bandwidth(record)}. Regenerate with `{DOC_COMMAND}`.",
        "",
        f"Each cell: median time of one optimizer step (over {_steps(record['settings'])}; "
        "gradients given, alternating between g and -g, parameters and state evaluated, "
        "warm-up excluded) and its "
        "speed against MLX's `RMSprop` under `mx.compile` on the same workload (higher is "
        "faster; the built-in has only the plain configuration, so every configuration is "
        "compared with its plain step). Full figures (p20/p80, GB/s, fraction of bandwidth, "
        "peak memory) are in the JSON the command writes.",
    ]
    absent = not_run(record)
    groups = _groups(record)
    for dtype in record["settings"]["dtypes"]:
        workloads = [workload for (d, workload) in groups if d == dtype]
        if not workloads:
            continue
        cells: dict[tuple[str, str], dict[str, str]] = {}
        for workload in workloads:
            for row in groups[(dtype, workload)]:
                if row["configuration"] is None and row["implementation"] in absent:
                    continue
                key = (row["implementation"], row["configuration"] or "")
                if row["status"] == OK:
                    text = (
                        f"{format_time(row['median_s'])} ({_ratio(row['speed_vs_mlx_compiled'])})"
                    )
                else:
                    text = row["status"]
                cells.setdefault(key, {})[workload] = text
        lines += [
            "",
            f"**{dtype}**",
            "",
            "| implementation | configuration | " + " | ".join(workloads) + " |",
            "|---|---|" + "---|" * len(workloads),
        ]
        for (name, configuration), by_workload in cells.items():
            values = " | ".join(by_workload.get(workload, "") for workload in workloads)
            lines.append(f"| {name} | {configuration} | {values} |")
        lines += _latency_table(dtype, workloads, groups)
    if absent:
        lines += ["", "Not run here (every size):", ""]
        lines += [f"- {name}: {status}" for name, status in absent.items()]
    if any(target["met"] is not None for target in targets):
        lines += ["", "| target | measured | bar | |", "|---|---|---|---|"]
    for target in targets:
        if target["met"] is not None:
            measured = f"{target['measured']:.2f}"
            lines.append(
                f"| {target['target']} | {measured} | {_bar(target)} | {_verdict(target)} |"
            )
    skipped = [target for target in targets if target["met"] is None]
    if skipped:
        reasons = sorted({target["note"] for target in skipped})
        names = "; ".join(target["target"] for target in skipped)
        lines += ["", f"Not measured in this run: {names} ({'; '.join(reasons)})."]
    lines.append(DOC_END)
    return "\n".join(lines)


def _latency_table(dtype: str, workloads: list[str], groups: dict) -> list[str]:
    """First-step latency and graph nodes per tensor of every measured row of ``dtype``."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for workload in workloads:
        for row in groups[(dtype, workload)]:
            if row["status"] == OK:
                key = (row["implementation"], row["configuration"] or "")
                cells.setdefault(key, {})[workload] = f"{_first_step(row)} / {_nodes(row)}"
    if not cells:
        return []
    lines = [
        "",
        f"{dtype}, first step after setup (tracing and compilation included; MLX state made "
        "by `init` before it, PyTorch's made in it) / graph nodes per tensor of one step "
        "(MLX only: operations the step adds to MLX's graph as called; a compiled function "
        "shows as the nodes of its compiled graph)",
        "",
        "| implementation | configuration | " + " | ".join(workloads) + " |",
        "|---|---|" + "---|" * len(workloads),
    ]
    for (name, configuration), by_workload in cells.items():
        values = " | ".join(by_workload.get(workload, "") for workload in workloads)
        lines.append(f"| {name} | {configuration} | {values} |")
    return lines


def update_doc(path: str, section: str) -> None:
    """Replace the text between the bench markers of ``path`` (markers included)."""
    with open(path) as file:
        text = file.read()
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(
            f"{path} has no '{DOC_START}' ... '{DOC_END}' section to replace; add the two "
            "markers where the benchmark table belongs"
        )
    with open(path, "w") as file:
        file.write(text[:start] + section + text[end + len(DOC_END) :])


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_chart(record: dict, path: str) -> bool:
    """GB/s against tensor size for the single-tensor workloads (plain configuration), one
    panel per dtype, with the measured bandwidth as a line. ``False`` when there is nothing to
    draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        row
        for row in record["results"]
        if row["status"] == OK and row["kind"] == "single" and row["configuration"] == "plain"
    ]
    dtypes = [
        dtype for dtype in record["settings"]["dtypes"] if any(r["dtype"] == dtype for r in rows)
    ]
    if not dtypes:
        return False
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["dtype"] == dtype:
                lines.setdefault(row["implementation"], []).append((row["elements"], row["gbps"]))
        for name, points in lines.items():
            points.sort()
            axis.plot(*zip(*points, strict=True), marker="o", label=name)
        axis.axhline(
            record["bandwidth"]["gbps"], color="black", linestyle="--", label="measured bandwidth"
        )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("elements")
        axis.set_ylabel("GB/s (bytes an update must move / median step)")
        axis.set_title(f"{dtype}, plain RMSprop, {record['machine']['mlx_device']}")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
