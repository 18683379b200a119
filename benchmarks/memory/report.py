"""The memory benchmark's targets, its Markdown section of docs/memory.md and its chart."""

from __future__ import annotations

import math

from .configurations import CONFIGURATIONS

DOC_START = "<!-- memory benchmark: start -->"
DOC_END = "<!-- memory benchmark: end -->"
DOC_COMMAND = "python -m benchmarks.memory --doc docs/memory.md --chart docs/images/memory-loss.png"

# Issue 17's targets.
QUALITY_TOLERANCE = 0.01
GPT2_RATIO_LIMIT = 0.27
SPEED_RATIO_LIMIT = 1.15
# The workload where bfloat16 round-to-nearest stalls.
SMALL_LR_WORKLOAD = "mnist-small-lr"


def _relative(a: float | None, b: float | None) -> float | None:
    """How far ``a`` lies above ``b``, relative to ``b`` (negative: below); None unless both
    are finite. The quality targets are one-sided: 8-bit state may end lower than float32."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return (a - b) / abs(b)


def _percent(gap: float | None) -> str:
    return "diverged" if gap is None else f"{100 * gap:+.2f}%"


def _seed_losses(record: dict, workload: str, key: str) -> dict[str, float]:
    """Final loss by seed of one configuration: the quality run's seed and the noise runs'."""
    losses = {}
    run = record.get("quality", {}).get(workload, {}).get(key)
    if run is not None:
        losses[str(record["settings"]["seed"])] = run["final_loss"]
    for seed, noisy in record.get("noise", {}).get(workload, {}).get(key, {}).items():
        losses[seed] = noisy["final_loss"]
    return losses


def evaluate(record: dict) -> list[dict]:
    """Each target: ``{"target", "measured", "met"}`` (``met`` None when not measured)."""
    targets = []
    quality = record.get("quality", {})
    for workload, runs in quality.items():
        full, eight = runs.get("float32"), runs.get("8bit")
        if full and eight:
            gap = _relative(eight["final_loss"], full["final_loss"])
            targets.append(
                {
                    "target": f"{workload}: 8-bit state at most 1% above float32's final "
                    "held-out loss (one evaluation)",
                    "measured": _percent(gap),
                    "met": gap is not None and gap <= QUALITY_TOLERANCE,
                }
            )
            tail_gap = (
                _relative(tail_loss(eight), tail_loss(full))
                if eight["finite"] and full["finite"]
                else None
            )
            targets.append(
                {
                    "target": f"{workload}: 8-bit state at most 1% above float32's final "
                    "training loss (mean of the last tenth of the steps)",
                    "measured": _percent(tail_gap),
                    "met": tail_gap is not None and tail_gap <= QUALITY_TOLERANCE,
                }
            )
        full_seeds = _seed_losses(record, workload, "float32")
        eight_seeds = _seed_losses(record, workload, "8bit")
        common = [seed for seed in full_seeds if seed in eight_seeds]
        if len(common) > 1:
            full_mean = sum(full_seeds[seed] for seed in common) / len(common)
            eight_mean = sum(eight_seeds[seed] for seed in common) / len(common)
            gap = _relative(eight_mean, full_mean)
            targets.append(
                {
                    "target": f"{workload}: 8-bit state at most 1% above float32's final "
                    f"held-out loss, mean over seeds {', '.join(common)}",
                    "measured": _percent(gap),
                    "met": gap is not None and gap <= QUALITY_TOLERANCE,
                }
            )
        for key in ("8bit", "bf16-8bit-sr"):
            if key in runs:
                targets.append(
                    {
                        "target": f"{workload}: {CONFIGURATIONS[key].label}: no NaN or Inf",
                        "measured": "finite" if runs[key]["finite"] else "NaN/Inf",
                        "met": runs[key]["finite"],
                    }
                )
    small = quality.get(SMALL_LR_WORKLOAD, {})
    if all(key in small for key in ("float32", "bf16", "bf16-sr")):
        reference = small["float32"]["final_loss"]
        nearest = abs(small["bf16"]["final_loss"] - reference)
        stochastic = abs(small["bf16-sr"]["final_loss"] - reference)
        targets.append(
            {
                "target": f"{SMALL_LR_WORKLOAD}: bf16 + stochastic rounding ends closer to "
                "float32 than bf16 round-to-nearest",
                "measured": f"distance to float32: {stochastic:.4f} stochastic, {nearest:.4f} "
                "to nearest",
                "met": stochastic < nearest,
            }
        )
    if "gpt2" in record:
        ratio = record["gpt2"]["ratio"]
        targets.append(
            {
                "target": "GPT-2-small state bytes, 8-bit / float32 <= 0.27",
                "measured": f"{ratio:.4f}",
                "met": ratio <= GPT2_RATIO_LIMIT,
            }
        )
    if "speed" in record:
        ratio = record["speed"]["ratio"]
        targets.append(
            {
                "target": "2^24 step, 8-bit / float32 state <= 1.15",
                "measured": f"{ratio:.3f} wall, {record['speed']['cpu_ratio']:.3f} CPU "
                f"({record['speed']['path']} path)",
                "met": ratio <= SPEED_RATIO_LIMIT,
            }
        )
    return targets


def _loss_cell(run: dict | None) -> str:
    if run is None:
        return "-"
    if not run["finite"]:
        return "NaN/Inf"
    cell = f"{run['final_loss']:.4f}"
    if run.get("accuracy") is not None:
        cell += f" ({100 * run['accuracy']:.2f}%)"
    return cell


def tail_loss(run: dict) -> float:
    """The mean training loss of the last tenth of a run's loss-curve windows."""
    curve = run["curve"]
    tail = curve[-max(len(curve) // 10, 1) :]
    return sum(tail) / len(tail)


def _tail_cell(run: dict | None) -> str:
    if run is None:
        return "-"
    loss = tail_loss(run)
    return f"{loss:.4f}" if run["finite"] and math.isfinite(loss) else "NaN/Inf"


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f}"


def markdown(record: dict, targets: list[dict]) -> str:
    """The generated section of docs/memory.md."""
    settings = record["settings"]
    lines = [
        DOC_START,
        f"Measured {record['started'][:10]} on {record['machine']} (MLX {record['mlx']}, "
        f"seed {settings['seed']}). Regenerate with `{DOC_COMMAND}`.",
        "",
    ]
    quality = record.get("quality", {})
    if quality:
        keys = [key for key in CONFIGURATIONS if any(key in runs for runs in quality.values())]
        lines += [
            "Final held-out loss (accuracy) after the same steps on the same seed:",
            "",
            "| workload | steps | " + " | ".join(CONFIGURATIONS[k].label for k in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for workload, runs in quality.items():
            steps = next(iter(runs.values()))["curve_steps"][-1]
            cells = [_loss_cell(runs.get(key)) for key in keys]
            lines.append(f"| `{workload}` | {steps} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean training loss over the last tenth of the steps (smoother than one held-out "
            "evaluation at the last step):",
            "",
            "| workload | " + " | ".join(CONFIGURATIONS[k].label for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for workload, runs in quality.items():
            cells = [_tail_cell(runs.get(key)) for key in keys]
            lines.append(f"| `{workload}` | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Optimizer state bytes (`optimizer.state`) and MLX peak memory of the run, MiB:",
            "",
            "| workload | " + " | ".join(CONFIGURATIONS[k].label for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for workload, runs in quality.items():
            cells = [
                f"{_mib(runs[k]['state_bytes'])} / {_mib(runs[k]['peak_memory'])}"
                if k in runs
                else "-"
                for k in keys
            ]
            lines.append(f"| `{workload}` | " + " | ".join(cells) + " |")
        lines.append("")
    if record.get("noise"):
        lines += [
            "The same runs with other seeds (model initialisation and data order): how far the "
            "final loss moves when nothing but the seed changes, and the mean over seeds:",
            "",
            "| workload | configuration | final loss by seed | mean |",
            "|---|---|---|---|",
        ]
        for workload, configurations in record["noise"].items():
            for key in configurations:
                seeds = _seed_losses(record, workload, key)
                cells = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in seeds.items())
                mean = sum(seeds.values()) / len(seeds)
                lines.append(
                    f"| `{workload}` | {CONFIGURATIONS[key].label} | {cells} | {mean:.4f} |"
                )
        lines.append("")
    if "bytes_per_parameter" in record:
        lines += [
            "Bytes per parameter, weight + optimizer state, read from `optimizer.state` of a "
            "2^20-element tensor:",
            "",
            "| state layout | weights | float32 state | 8-bit state |",
            "|---|---|---|---|",
        ]
        for row in record["bytes_per_parameter"]:
            lines.append(
                f"| {row['layout']} | {row['weights']} | {row['total_32']:.3f} "
                f"({row['state_32']:.3f} state) | {row['total_8']:.3f} "
                f"({row['state_8']:.3f} state) |"
            )
        lines.append("")
    if "gpt2" in record:
        gpt2 = record["gpt2"]
        lines += [
            f"GPT-2-small shapes ({gpt2['parameters']:,} parameters), `optimizer.state` bytes: "
            f"float32 state {gpt2['float32_state_bytes']:,}, 8-bit state "
            f"{gpt2['quantized_state_bytes']:,}: ratio {gpt2['ratio']:.4f}.",
            "",
        ]
    if "speed" in record:
        speed = record["speed"]
        low, high = speed["ratio_p20_p80"]
        cpu_low, cpu_high = speed["cpu_ratio_p20_p80"]
        lines += [
            f"One native CPU update of 2^{int(math.log2(speed['elements']))} float32 elements "
            f"(`python -m benchmarks.native_state_bits`), {speed['rounds']} interleaved rounds: "
            f"float32 state {speed['float32_ms']:.1f} ms, 8-bit state {speed['bits8_ms']:.1f} ms "
            f"(medians); paired 8-bit/float32 ratio {speed['ratio']:.3f} "
            f"({low:.3f}-{high:.3f}, p20-p80) in wall time, {speed['cpu_ratio']:.3f} "
            f"({cpu_low:.3f}-{cpu_high:.3f}) in CPU time.",
            "",
        ]
    if "codes" in record:
        codes = record["codes"]
        lines += [
            "Code tables: storing the float32 state recorded at the end of a run once, over "
            "its nonzero values: median / 99th percentile relative error (of `sqrt(v)`, what "
            "divides the gradient; of the momentum); the share stored as 0; stored at under "
            "half the value (0 included; for `v` a step over 1.4x too large); stored at over "
            "twice the value (below the code's range; for `v` a smaller step):",
            "",
        ]
        for workload, errors in codes["recorded"].items():
            lines += [
                f"| code (v / momentum), state of `{workload}` | sqrt(v) error | v: as 0 "
                "| v: < half | v: > twice | momentum error | momentum: as 0 | momentum: < half "
                "| momentum: > twice |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for name, entry in errors.items():
                cells = []
                for key in ("v", "momentum_buffer"):
                    e = entry[key]
                    cells += [
                        f"{e['median_relative_error']:.4f} / {e['p99_relative_error']:.3g}",
                        f"{100 * e['zeroed_share']:.3f}%",
                        f"{100 * e['too_small_share']:.3f}%",
                        f"{100 * e['too_large_share']:.3f}%",
                    ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        workloads = sorted({w for losses in codes["final_loss"].values() for w in losses})
        lines += [
            "Final held-out loss of a run keeping `v` in each table (the same seed and steps):",
            "",
            "| code | " + " | ".join(f"`{w}`" for w in workloads) + " |",
            "|---|" + "---|" * len(workloads),
        ]
        for name, losses in codes["final_loss"].items():
            cells = [
                "-" if w not in losses else "NaN/Inf" if losses[w] is None else f"{losses[w]:.4f}"
                for w in workloads
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for target in targets:
            met = {True: "yes", False: "**no**", None: "-"}[target["met"]]
            lines.append(f"| {target['target']} | {target['measured']} | {met} |")
        lines.append("")
    lines.append(DOC_END)
    return "\n".join(lines)


def update_doc(path: str, section: str) -> None:
    """Replace the text between the memory-benchmark markers of ``path`` (markers
    included)."""
    with open(path) as file:
        text = file.read()
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no '{DOC_START}' ... '{DOC_END}' section to replace")
    with open(path, "w") as file:
        file.write(text[:start] + section + text[end + len(DOC_END) :])


def write_chart(record: dict, path: str) -> bool:
    """One panel per workload: the training-loss curve of every configuration (log scale).
    ``False`` when the record has no quality runs."""
    quality = record.get("quality", {})
    if not quality:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(quality), figsize=(4.2 * len(quality), 3.8), dpi=100, squeeze=False
    )
    for axis, (workload, runs) in zip(axes[0], quality.items(), strict=True):
        for key, run in runs.items():
            values = [v if math.isfinite(v) else float("nan") for v in run["curve"]]
            style = "--" if CONFIGURATIONS[key].naive else "-"
            axis.plot(run["curve_steps"], values, style, label=CONFIGURATIONS[key].label)
        axis.set(title=workload, xlabel="step", ylabel="training loss", yscale="log")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path)
    plt.close(figure)
    return True
