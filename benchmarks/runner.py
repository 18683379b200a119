"""A run: every implementation on every workload and configuration, measured one after the
other in one process, with the bandwidth they are compared with measured in the same run."""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx

from . import environment
from .implementations import OK, Implementation, builtin, mlx_floor, ours
from .peers import peers
from .timing import (
    Bandwidth,
    Timing,
    mlx_bandwidth,
    mlx_step_memory,
    numpy_bandwidth,
    repeat_count,
    time_steps,
)
from .workloads import CONFIGURATIONS, Configuration, Workload, generate, plan_workloads

# Identifies the JSON layout; bump when a field changes meaning.
# 3: rows gain first_step_s and graph_nodes_per_tensor.
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Settings:
    workloads: tuple[str, ...]
    exponents: tuple[int, ...]
    dtypes: tuple[str, ...]
    configurations: tuple[str, ...]
    repeats: int
    rounds: int
    warmup: int
    row_seconds: float
    peers: bool
    bandwidth_exponent: int
    seed: int


def implementations(include_peers: bool) -> list[Implementation]:
    """Every row label of a run, the strongest baseline (MLX compiled) second."""
    found = [builtin(compiled=False), builtin(compiled=True), *ours(), mlx_floor()]
    return found + (peers() if include_peers else [])


Progress = Callable[[int, int, str], None]


def _release() -> None:
    # Each row starts from the same allocator state: nothing left from the previous one.
    gc.collect()
    mx.synchronize()
    mx.clear_cache()


def _row(workload: Workload, configuration: str | None, implementation: Implementation) -> dict:
    """A result row; measured figures are added to it as they are taken."""
    return {
        "workload": workload.label,
        "kind": workload.kind,
        "dtype": workload.dtype,
        "elements": workload.elements,
        "tensors": workload.tensors,
        "configuration": configuration,
        "implementation": implementation.name,
        "role": implementation.role,
        "auto": implementation.auto,
        "status": implementation.status,
    }


def _failed(row: dict, error: Exception) -> dict:
    return row | {"status": f"failed: {type(error).__name__}: {error}"}


def _measure_workload(
    workload: Workload,
    members: list[tuple[Configuration, Implementation]],
    settings: Settings,
    advance: Callable[[str], None],
) -> list[dict]:
    """Every implementation and configuration on one workload, timed in interleaved rounds.

    All of them are set up first; then each round times every one for its share of its steps,
    starting one later each round. Load from elsewhere on the machine then falls on all of
    them alike, and every ratio within the workload compares times taken side by side.
    """
    data = generate(workload, settings.seed)
    rows: list[dict] = []
    ready = []
    for configuration, implementation in members:
        advance(f"{workload.key()}: setting up {implementation.name}, {configuration.name}")
        row = _row(workload, configuration.name, implementation)
        try:
            prepared = implementation.prepare(workload, data, configuration)
            warmup = time_steps(prepared, settings.warmup)
            memory = mlx_step_memory(prepared)
            nodes = prepared.count_nodes() if prepared.count_nodes else None
        except Exception as error:  # one failing implementation must not hide the others
            rows.append(_failed(row, error))
            continue
        row |= {
            "device": prepared.device,
            "bytes_moved": prepared.bytes_moved,
            "peak_memory_bytes": memory[0] if memory else None,
            "resident_bytes": memory[1] if memory else None,
            "first_step_s": prepared.first_step_s,
            # Operations one step adds to MLX's graph as the step is called (a function
            # under mx.compile shows as the nodes of its compiled graph).
            "graph_nodes_per_tensor": None if nodes is None else nodes / workload.tensors,
        }
        rows.append(row)
        repeats = repeat_count(warmup, settings.repeats, settings.row_seconds)
        ready.append((row, prepared, repeats, []))

    rounds = min(settings.rounds, settings.repeats)
    for round_index in range(rounds):
        advance(f"{workload.key()}: round {round_index + 1}/{rounds}")
        shift = round_index % max(len(ready), 1)
        for row, prepared, repeats, samples in ready[shift:] + ready[:shift]:
            count = repeats * (round_index + 1) // rounds - repeats * round_index // rounds
            if row["status"] != OK or count == 0:
                continue
            try:
                samples += time_steps(prepared, count)
            except Exception as error:
                row |= _failed(row, error)

    for row, _, _, samples in ready:
        if row["status"] != OK:
            continue
        timing = Timing.of(samples)
        row |= {
            "median_s": timing.median,
            "p20_s": timing.p20,
            "p80_s": timing.p80,
            "samples_s": list(timing.samples),
            "gbps": row["bytes_moved"] / timing.median / 1e9,
        }
    del ready, data
    _release()
    return rows


def _bandwidth(exponent: int) -> dict:
    measured: dict[str, Bandwidth] = {
        "numpy": numpy_bandwidth(2**exponent),
        "mlx": mlx_bandwidth(2**exponent),
    }
    _release()
    return {name: asdict(value) for name, value in measured.items()}


def _add_ratios(rows: list[dict], bandwidth_gbps: float, cache_bytes: int | None) -> None:
    """Speed against MLX's built-in under ``mx.compile`` on the same workload (its plain step:
    the built-in has no other configuration), and the fraction of the measured bandwidth.

    A row whose bytes moved fit in ``cache_bytes`` (the CPU's last-level cache; ``None`` on a
    GPU) is marked cache-resident and gets no fraction: its data need not come from memory, so
    the memory bandwidth is not its bound (such rows exceeded 100%)."""
    baseline = {
        (row["workload"], row["dtype"]): row["median_s"]
        for row in rows
        if row["role"] == "mlx-compiled" and row["status"] == OK
    }
    for row in rows:
        if row["status"] != OK:
            continue
        resident = cache_bytes is not None and row["bytes_moved"] <= cache_bytes
        row["cache_resident"] = resident
        row["bandwidth_fraction"] = None if resident else row["gbps"] / bandwidth_gbps
        base = baseline.get((row["workload"], row["dtype"]))
        row["speed_vs_mlx_compiled"] = base / row["median_s"] if base else None


def run_benchmark(settings: Settings, progress: Progress) -> dict:
    """Measure everything ``settings`` asks for; returns the JSON-ready record of the run."""
    started = datetime.datetime.now(datetime.timezone.utc)
    candidates = implementations(settings.peers)
    workloads = plan_workloads(list(settings.workloads), list(settings.exponents), settings.dtypes)
    configurations = [CONFIGURATIONS[name] for name in settings.configurations]
    runnable = [impl for impl in candidates if impl.status == OK]
    groups = [
        (
            workload,
            [(c, impl) for c in configurations for impl in runnable if impl.supports(c)],
        )
        for workload in workloads
    ]
    rounds = min(settings.rounds, settings.repeats)
    total = sum(len(members) + rounds for _, members in groups) + 2
    done = 0

    def advance(label: str) -> None:
        nonlocal done
        progress(done, total, label)
        done += 1

    advance("memory bandwidth")
    bandwidth_before = _bandwidth(settings.bandwidth_exponent)
    rows: list[dict] = []
    for workload, members in groups:
        rows += _measure_workload(workload, members, settings, advance)
        rows += [_row(workload, None, impl) for impl in candidates if impl.status != OK]
    advance("memory bandwidth")
    bandwidth_after = _bandwidth(settings.bandwidth_exponent)
    progress(total, total, "done")

    # The denominator: on a GPU its own memory (MLX streaming there), on the CPU NumPy's
    # in-place add; the better of the two measurements of the run.
    gpu = environment.on_gpu()
    source = "mlx" if gpu else "numpy"
    bandwidth_gbps = max(bandwidth_before[source]["gbps"], bandwidth_after[source]["gbps"])
    machine = environment.machine()
    _add_ratios(rows, bandwidth_gbps, None if gpu else machine["last_level_cache"]["bytes"])
    finished = datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA_VERSION,
        "tool": "python -m benchmarks",
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((finished - started).total_seconds(), 1),
        "machine": machine,
        "versions": environment.versions(),
        "settings": asdict(settings),
        "bandwidth": {
            "gbps": bandwidth_gbps,
            "source": source,
            "before": bandwidth_before,
            "after": bandwidth_after,
        },
        "implementations": [
            {"name": impl.name, "role": impl.role, "status": impl.status, "auto": impl.auto}
            for impl in candidates
        ],
        "results": rows,
    }
