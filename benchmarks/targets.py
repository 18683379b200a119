"""The project's speed and memory targets, read off a run's ratios.

These are reported, never asserted: a run on a busy or different machine gives other numbers,
and docs/benchmarks.md states what was measured where. Every comparison is between rows of the
same run, on the same workload, with ``fused="auto"`` standing for ours.
"""

from __future__ import annotations

from collections.abc import Callable

from .implementations import OK

CPU_WORKLOADS = (("2^22", "float32"), ("model tree", "float32"))
SMALL_WORKLOAD = ("200x2^10", "float32")
GPU_SIZE = "2^26"
# Our step keeps a vector of per-step scalars (learning rate, step, ...) that the built-in does
# not: a peak higher by less than this counts as equal.
SCALARS_SLACK = 4096

Find = Callable[[str, str, str, str], "dict | None"]


def _index(rows: list[dict]) -> Find:
    found: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] != OK:
            continue
        key = (row["workload"], row["dtype"], row["configuration"])
        found[key + (row["role"],)] = row
        if row["auto"]:
            found[key + ("auto",)] = row
    return lambda workload, dtype, configuration, role: found.get(
        (workload, dtype, configuration, role)
    )


def _not_measured(name: str, bar: float | None, why: str) -> dict:
    return {"target": name, "measured": None, "bar": bar, "met": None, "note": why}


def _measured(name: str, measured: float, bar: float, met: bool, note: str) -> dict:
    return {"target": name, "measured": measured, "bar": bar, "met": met, "note": note}


def _timing(row: dict) -> str:
    low, median, high = (row[key] * 1e3 for key in ("p20_s", "median_s", "p80_s"))
    return f"{median:.3g} ms (p20-p80 {low:.3g}-{high:.3g})"


def _speed(find: Find, workload: str, dtype: str, base_role: str, bar: float, name: str) -> dict:
    """How many times faster ours is than ``base_role`` on the plain step."""
    ours = find(workload, dtype, "plain", "auto")
    base = find(workload, dtype, "plain", base_role)
    if not (ours and base):
        return _not_measured(name, bar, f"{dtype} {workload} plain was not in this run")
    speed = base["median_s"] / ours["median_s"]
    note = f"ours {_timing(ours)}, {base['implementation']} {_timing(base)}"
    return _measured(name, speed, bar, speed >= bar, note)


def _extra_configuration_cost(find: Find, workload: str, dtype: str) -> dict:
    """centered+momentum against plain: the time ratio may not exceed the bytes ratio."""
    name = f"{dtype} {workload}: centered+momentum time / plain time, at most its bytes ratio"
    plain = find(workload, dtype, "plain", "auto")
    both = find(workload, dtype, "centered+momentum", "auto")
    if not (plain and both):
        return _not_measured(name, None, "needs plain and centered+momentum in the run")
    bytes_ratio = both["bytes_moved"] / plain["bytes_moved"]
    cost = both["median_s"] / plain["median_s"]
    note = (
        f"the bar is the bytes ratio {both['bytes_moved']:,} / {plain['bytes_moved']:,}; "
        f"centered+momentum {_timing(both)}, plain {_timing(plain)}"
    )
    return _measured(name, cost, bytes_ratio, cost <= bytes_ratio, note)


def _peak(find: Find, workload: str, dtype: str, ours_role: str, base_role: str, mode: str):
    name = f"{dtype} {workload}: peak memory vs MLX {mode} (ratio)"
    ours = find(workload, dtype, "plain", ours_role)
    base = find(workload, dtype, "plain", base_role)
    if not (ours and base and ours["peak_memory_bytes"] and base["peak_memory_bytes"]):
        return _not_measured(name, 1.0, "workload not in this run, or no memory report")
    extra = ours["peak_memory_bytes"] - base["peak_memory_bytes"]
    ratio = ours["peak_memory_bytes"] / base["peak_memory_bytes"]
    return _measured(name, ratio, 1.0, extra <= SCALARS_SLACK, f"ours - built-in = {extra:+,} B")


def _cpu_targets(find: Find) -> list[dict]:
    targets = []
    for workload, dtype in CPU_WORKLOADS:
        where = f"{dtype} {workload}"
        targets += [
            _speed(
                find, workload, dtype, "mlx-compiled", 1.0, f"{where}: auto vs MLX mx.compile (x)"
            ),
            _speed(find, workload, dtype, "mlx-eager", 1.4, f"{where}: auto vs MLX eager (x)"),
            _extra_configuration_cost(find, workload, dtype),
        ]
    workload, dtype = SMALL_WORKLOAD
    name = f"{dtype} {workload}: auto vs MLX mx.compile, per-step overhead (x)"
    return targets + [_speed(find, workload, dtype, "mlx-compiled", 1.0, name)]


# Issue 18: many tensors against optax and the built-in, and what the full pipeline costs.
PEER_TARGETS = (
    ("200x2^10", "optax", 1.3),
    ("7B LoRA all r16", "optax", 1.2),
    ("7B LoRA all r16", "mlx-compiled", 2.5),
)
PIPELINE_WORKLOADS = ("GPT-2 small", "2^24", "200x2^10")
PIPELINE_COST_BAR = 1.5
PIPELINE_VS_BUILTIN = ("GPT-2 small", "2^24")


def _pipeline_cost(find: Find, workload: str, dtype: str) -> dict:
    name = f"{dtype} {workload}: full pipeline time / plain time"
    plain = find(workload, dtype, "plain", "auto")
    full = find(workload, dtype, "full pipeline", "auto")
    if not (plain and full):
        return _not_measured(name, PIPELINE_COST_BAR, "needs plain and full pipeline in the run")
    cost = full["median_s"] / plain["median_s"]
    note = f"full pipeline {_timing(full)}, plain {_timing(plain)}"
    return _measured(name, cost, PIPELINE_COST_BAR, cost <= PIPELINE_COST_BAR, note)


def _pipeline_vs_builtin(find: Find, workload: str, dtype: str) -> dict:
    name = f"{dtype} {workload}: full pipeline vs MLX mx.compile plain (x)"
    full = find(workload, dtype, "full pipeline", "auto")
    base = find(workload, dtype, "plain", "mlx-compiled")
    if not (full and base):
        return _not_measured(name, 1.0, "needs full pipeline and the built-in in the run")
    speed = base["median_s"] / full["median_s"]
    note = f"ours {_timing(full)}, built-in {_timing(base)}"
    return _measured(name, speed, 1.0, speed > 1.0, note)


def _many_tensor_targets(find: Find) -> list[dict]:
    dtype = "float32"
    targets = [
        _speed(find, workload, dtype, role, bar, f"{dtype} {workload}: auto vs {role} (x)")
        for workload, role, bar in PEER_TARGETS
    ]
    targets += [_pipeline_cost(find, workload, dtype) for workload in PIPELINE_WORKLOADS]
    return targets + [_pipeline_vs_builtin(find, w, dtype) for w in PIPELINE_VS_BUILTIN]


def _memory_targets(find: Find) -> list[dict]:
    """Our peak against the built-in's called the same way: ``fused="auto"`` with a plain
    ``update`` against the built-in eager, ours inside ``mx.compile`` against the built-in
    compiled."""
    return [
        _peak(find, workload, dtype, ours_role, base_role, mode)
        for workload, dtype in (*CPU_WORKLOADS, SMALL_WORKLOAD)
        for ours_role, base_role, mode in (
            ("auto", "mlx-eager", "eager"),
            ("user-compiled", "mlx-compiled", "mx.compile"),
        )
    ]


def _gpu_targets(find: Find, bandwidth_gbps: float) -> list[dict]:
    targets = []
    for dtype, bar in (("float32", 0.80), ("bfloat16", 0.75)):
        name = f"GPU {dtype} {GPU_SIZE}: auto fraction of measured bandwidth"
        row = find(GPU_SIZE, dtype, "plain", "auto")
        if row is None:
            targets.append(_not_measured(name, bar, f"{dtype} {GPU_SIZE} was not in this run"))
            continue
        fraction = row["gbps"] / bandwidth_gbps
        note = f"{row['gbps']:.1f} of {bandwidth_gbps:.1f} GB/s"
        targets.append(_measured(name, fraction, bar, fraction >= bar, note))
    name = f"GPU float32 {GPU_SIZE}: auto vs MLX mx.compile (x)"
    return targets + [_speed(find, GPU_SIZE, "float32", "mlx-compiled", 1.0, name)]


def evaluate(record: dict) -> list[dict]:
    """Every target with its measured ratio, the bar, and whether it is met (``None``: not
    measured in this run, with the reason)."""
    find = _index(record["results"])
    device = record["machine"]["mlx_device"]
    cpu = _cpu_targets(find) + _many_tensor_targets(find)
    gpu = _gpu_targets(find, record["bandwidth"]["gbps"])
    if record["machine"]["gpu"]:
        cpu = [_not_measured(t["target"], t["bar"], f"a CPU target; ran on {device}") for t in cpu]
    else:
        gpu = [_not_measured(t["target"], t["bar"], f"no GPU here (ran on {device})") for t in gpu]
    return cpu + _memory_targets(find) + gpu
