"""The speed and memory targets of the project, read off a run's ratios.

These are reported, never asserted: a run on a busy or different machine gives other numbers,
and the README states what was measured where.
"""

from __future__ import annotations

from collections.abc import Callable

from .implementations import OK

CPU_WORKLOADS = (("2^22", "float32"), ("model tree", "float32"))
SMALL_WORKLOAD = "200x2^10"
GPU_SIZE = "2^26"


def _index(rows: list[dict]) -> Callable[[str, str, str, str], dict | None]:
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


def _target(
    name: str,
    measured: float | None,
    bar: float,
    higher_is_better: bool,
    missing: str,
    note: str = "",
) -> dict:
    """``missing`` says why a target was not measured; ``note`` explains a measured one."""
    if measured is None:
        return _not_measured(name, bar, missing)
    met = measured >= bar if higher_is_better else measured <= bar
    return {"target": name, "measured": measured, "bar": bar, "met": met, "note": note}


def _not_measured(name: str, bar: float | None, why: str) -> dict:
    return {"target": name, "measured": None, "bar": bar, "met": None, "note": why}


def _speed(find, workload, dtype, ours_role, base_role) -> float | None:
    ours, base = (
        find(workload, dtype, "plain", ours_role),
        find(workload, dtype, "plain", base_role),
    )
    return base["median_s"] / ours["median_s"] if ours and base else None


def _cpu_targets(find) -> list[dict]:
    targets = []
    for workload, dtype in CPU_WORKLOADS:
        where = f"{dtype} {workload}"
        missing = f"{where} plain was not in this run"
        targets.append(
            _target(
                f"{where}: auto vs MLX mx.compile (speed, x)",
                _speed(find, workload, dtype, "auto", "mlx-compiled"),
                1.0,
                True,
                missing,
            )
        )
        targets.append(
            _target(
                f"{where}: auto vs MLX eager (speed, x)",
                _speed(find, workload, dtype, "auto", "mlx-eager"),
                1.4,
                True,
                missing,
            )
        )
        plain = find(workload, dtype, "plain", "auto")
        both = find(workload, dtype, "centered+momentum", "auto")
        name = f"{where}: centered+momentum time / plain time, at most its bytes ratio"
        if plain and both:
            bytes_ratio = both["bytes_moved"] / plain["bytes_moved"]
            targets.append(
                _target(
                    name,
                    both["median_s"] / plain["median_s"],
                    bytes_ratio,
                    False,
                    missing="",
                    note=f"the bar is the bytes ratio, {both['bytes_moved']:,} / "
                    f"{plain['bytes_moved']:,}",
                )
            )
        else:
            targets.append(_not_measured(name, None, "needs plain and centered+momentum"))
    targets.append(
        _target(
            "float32 200 x 2^10 tensors: auto vs MLX mx.compile (per-step time, x)",
            _speed(find, SMALL_WORKLOAD, "float32", "auto", "mlx-compiled"),
            1.0,
            True,
            "many-small workload was not in this run",
        )
    )
    return targets


def _memory_targets(find) -> list[dict]:
    """Our peak against the built-in's called the same way: ``fused="auto"`` with a plain
    ``update`` against the built-in eager, ours inside ``mx.compile`` against the built-in
    compiled."""
    targets = []
    pairs = (("auto", "mlx-eager", "eager"), ("user-compiled", "mlx-compiled", "mx.compile"))
    for workload, dtype in (*CPU_WORKLOADS, (SMALL_WORKLOAD, "float32")):
        for ours_role, base_role, mode in pairs:
            ours = find(workload, dtype, "plain", ours_role)
            base = find(workload, dtype, "plain", base_role)
            measured = None
            if ours and base and ours["peak_memory_bytes"] and base["peak_memory_bytes"]:
                measured = ours["peak_memory_bytes"] / base["peak_memory_bytes"]
            targets.append(
                _target(
                    f"{dtype} {workload}: peak memory vs MLX {mode} (ratio)",
                    measured,
                    1.0,
                    False,
                    "not measured (workload not in this run, or no memory report)",
                )
            )
    return targets


def _gpu_targets(find, bandwidth_gbps: float) -> list[dict]:
    targets = []
    for dtype, bar in (("float32", 0.80), ("bfloat16", 0.75)):
        row = find(GPU_SIZE, dtype, "plain", "auto")
        targets.append(
            _target(
                f"GPU {dtype} {GPU_SIZE}: auto fraction of measured bandwidth",
                row["gbps"] / bandwidth_gbps if row else None,
                bar,
                True,
                f"{dtype} {GPU_SIZE} was not in this run",
            )
        )
    targets.append(
        _target(
            f"GPU float32 {GPU_SIZE}: auto vs MLX mx.compile (speed, x)",
            _speed(find, GPU_SIZE, "float32", "auto", "mlx-compiled"),
            1.0,
            True,
            f"float32 {GPU_SIZE} was not in this run",
        )
    )
    return targets


def evaluate(record: dict) -> list[dict]:
    """Every target with its measured ratio, the bar, and whether it is met (``None``: not
    measured in this run, with the reason)."""
    find = _index(record["results"])
    on_gpu = record["machine"]["gpu"]
    device = record["machine"]["mlx_device"]
    cpu = _cpu_targets(find)
    gpu = _gpu_targets(find, record["bandwidth"]["gbps"])
    if on_gpu:
        cpu = [_not_measured(t["target"], t["bar"], f"CPU target; device is {device}") for t in cpu]
    else:
        gpu = [_not_measured(t["target"], t["bar"], f"no GPU (device {device})") for t in gpu]
    return cpu + _memory_targets(find) + gpu
