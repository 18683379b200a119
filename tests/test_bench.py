"""The benchmark tool on tiny sizes: its JSON, its table, its README section and its options.

Only the structure and the arithmetic of the figures are checked (bytes counted with the real
dtypes, GB/s and ratios derived from the medians): timings themselves are never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_rmsprop import backends, bench
from mlx_rmsprop.backends import Path
from mlx_rmsprop.bench import implementations, report, runner, workloads
from mlx_rmsprop.bench.implementations import NOT_INSTALLED, OK, Prepared
from mlx_rmsprop.bench.timing import mlx_step_memory, repeat_count, time_steps

REPEATS = 4
README = """# project

## Benchmarks

Text before the table stays.

{start}
old table
{end}

Text after the table stays.
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run on 2^8 and 2^10 elements and the 200-tensor workload, both dtypes, plain and
    centered+momentum, with the README section rewritten."""
    directory = tmp_path_factory.mktemp("bench")
    readme = directory / "README.md"
    readme.write_text(README.format(start=report.README_START, end=report.README_END))
    args = parse(
        "--workloads",
        "single,small",
        "--sizes",
        "8,10",
        "--dtypes",
        "float32,bfloat16",
        "--configurations",
        "plain,centered+momentum",
        "--repeats",
        str(REPEATS),
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--row-seconds",
        "0",
        "--bandwidth-size",
        "16",
        "--json",
        str(directory / "bench.json"),
        "--readme",
        str(readme),
        "--no-chart",
        "--quiet",
    )
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = bench.run(args)
    record = json.loads((directory / "bench.json").read_text())
    return status, record, output.getvalue(), readme.read_text()


def measured(record, **where):
    return [
        row
        for row in record["results"]
        if row["status"] == OK and all(row[key] == value for key, value in where.items())
    ]


def test_run_succeeds_and_records_machine_versions_and_settings(tiny_run):
    status, record, _, _ = tiny_run
    assert status == 0
    assert record["schema"] == 1
    machine = record["machine"]
    assert machine["mlx_device"] and machine["cpu"] and machine["os"]
    assert machine["gpu"] is False or machine["gpu"] is True
    versions = record["versions"]
    for name in ("python", "mlx", "numpy", "mlx_rmsprop"):
        assert versions[name]
    for peer in ("torch", "jax", "optax"):
        installed = importlib.util.find_spec(peer) is not None
        assert (versions[peer] != NOT_INSTALLED) == installed
    assert record["settings"] == {
        "workloads": ["single", "small"],
        "exponents": [8, 10],
        "dtypes": ["float32", "bfloat16"],
        "configurations": ["plain", "centered+momentum"],
        "repeats": REPEATS,
        "rounds": 2,
        "warmup": 1,
        "row_seconds": 0.0,
        "peers": True,
        "bandwidth_exponent": 16,
        "seed": 0,
    }


def test_bandwidth_is_measured_in_the_run_and_says_how(tiny_run):
    _, record, _, _ = tiny_run
    bandwidth = record["bandwidth"]
    assert bandwidth["gbps"] > 0
    for moment in ("before", "after"):
        numpy_measurement = bandwidth[moment]["numpy"]
        assert "numpy in-place a += b" in numpy_measurement["method"]
        assert numpy_measurement["array_bytes"] == 4 * 2**16
        assert bandwidth[moment]["mlx"]["gbps"] > 0
    source = bandwidth["source"]
    assert bandwidth["gbps"] == max(bandwidth[m][source]["gbps"] for m in ("before", "after"))


def test_every_registered_path_and_peer_has_a_row_or_a_reason(tiny_run):
    _, record, _, _ = tiny_run
    roles = {impl["role"]: impl for impl in record["implementations"]}
    for name in backends.PATHS:
        assert f"path:{name}" in roles
    assert {"mlx-eager", "mlx-compiled", "user-compiled"} <= set(roles)
    assert sum(impl["auto"] for impl in record["implementations"]) == 1
    for peer in ("torch-foreach", "torch-loop", "optax"):
        status = roles[peer]["status"]
        assert status == OK or status.startswith(NOT_INSTALLED)
        if status != OK:
            # Reported once per workload, in place of its rows.
            unavailable = [r for r in record["results"] if r["role"] == peer]
            assert {r["status"] for r in unavailable} == {status}
            assert len(unavailable) == 6


def test_rows_cover_every_workload_and_configuration(tiny_run):
    _, record, _, _ = tiny_run
    for dtype in ("float32", "bfloat16"):
        for workload in ("2^8", "2^10", "200x2^10"):
            rows = measured(record, dtype=dtype, workload=workload)
            plain = {r["role"] for r in rows if r["configuration"] == "plain"}
            both = {r["role"] for r in rows if r["configuration"] == "centered+momentum"}
            ours = {"path:reference", "path:compiled", "user-compiled"}
            assert {"mlx-eager", "mlx-compiled"} | ours <= plain
            # MLX's built-in has no centered or momentum variant.
            assert ours <= both and not both & {"mlx-eager", "mlx-compiled"}


def test_bytes_are_counted_with_each_implementations_dtypes(tiny_run):
    _, record, _, _ = tiny_run

    def bytes_of(role, dtype, configuration, workload="2^10"):
        (row,) = measured(
            record, role=role, dtype=dtype, configuration=configuration, workload=workload
        )
        return row["bytes_moved"]

    n = 2**10
    # Read parameter, gradient, v; write parameter, v: 5 float32 arrays.
    assert bytes_of("mlx-compiled", "float32", "plain") == 5 * 4 * n
    # The built-in keeps v in the parameter dtype; ours keeps float32 state.
    assert bytes_of("mlx-compiled", "bfloat16", "plain") == 5 * 2 * n
    assert bytes_of("path:compiled", "bfloat16", "plain") == (3 * 2 + 2 * 4) * n
    # centered+momentum adds grad_avg and momentum_buffer, each read and written.
    assert bytes_of("path:compiled", "float32", "centered+momentum") == 9 * 4 * n
    assert bytes_of("mlx-eager", "float32", "plain", "200x2^10") == 5 * 4 * 200 * n


def test_figures_follow_from_the_samples(tiny_run):
    _, record, _, _ = tiny_run
    bandwidth = record["bandwidth"]["gbps"]
    for row in measured(record):
        samples = row["samples_s"]
        assert len(samples) == REPEATS and min(samples) > 0
        assert row["p20_s"] <= row["median_s"] <= row["p80_s"]
        assert math.isclose(row["gbps"], row["bytes_moved"] / row["median_s"] / 1e9)
        assert math.isclose(row["bandwidth_fraction"], row["gbps"] / bandwidth)
        (baseline,) = measured(
            record,
            role="mlx-compiled",
            dtype=row["dtype"],
            workload=row["workload"],
            configuration="plain",
        )
        assert math.isclose(row["speed_vs_mlx_compiled"], baseline["median_s"] / row["median_s"])
        if row["role"].startswith(("mlx-", "path:", "user-")):
            assert row["peak_memory_bytes"] >= row["resident_bytes"] > 0
        else:
            assert row["peak_memory_bytes"] is None


def test_targets_are_reported_not_asserted(tiny_run):
    _, record, output, _ = tiny_run
    targets = {target["target"]: target for target in record["targets"]}
    small = targets["float32 200x2^10: auto vs MLX mx.compile, per-step overhead (x)"]
    assert small["measured"] > 0 and small["met"] in (True, False)
    # 2^22 and the model tree were not in this run: named as not measured, with the reason.
    tree = targets["float32 model tree: auto vs MLX eager (x)"]
    assert tree["met"] is None and "not in this run" in tree["note"]
    gpu = [target for name, target in targets.items() if name.startswith("GPU")]
    assert len(gpu) == 3
    if not record["machine"]["gpu"]:
        assert all(target["met"] is None and "no GPU here" in target["note"] for target in gpu)
    assert "targets (ratios of this run's medians):" in output


def test_terminal_table_lists_every_row(tiny_run):
    _, record, output, _ = tiny_run
    assert "float32 2^10: 1,024 elements in 1 tensors" in output
    assert "bfloat16 200x2^10: 204,800 elements in 200 tensors" in output
    for row in record["results"]:
        assert row["implementation"] in output


def test_readme_section_is_replaced_between_the_markers(tiny_run):
    _, record, _, readme = tiny_run
    assert "old table" not in readme
    assert readme.startswith("# project\n\n## Benchmarks\n\nText before the table stays.\n")
    assert readme.endswith("\n\nText after the table stays.\n")
    assert readme.count(report.README_START) == readme.count(report.README_END) == 1
    section = readme[readme.index(report.README_START) : readme.index(report.README_END)]
    assert record["started"][:10] in section
    assert f"mlx {record['versions']['mlx']}" in section
    assert report.README_COMMAND in section
    assert "| implementation | configuration | 2^8 | 2^10 | 200x2^10 |" in section
    assert "| MLX RMSprop, mx.compile | plain | " in section


@pytest.mark.skipif(not report.matplotlib_available(), reason="matplotlib is not installed")
def test_chart_of_gbps_against_size_is_a_png(tiny_run, tmp_path):
    _, record, _, _ = tiny_run
    chart = tmp_path / "bench.png"
    assert report.write_chart(record, str(chart))
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no section here\n")
    with pytest.raises(ValueError, match="has no '<!-- mlx_rmsprop bench: start -->'"):
        report.update_readme(str(readme), "table")
    assert readme.read_text() == "# no section here\n"


def test_a_path_registered_later_appears_without_changes(monkeypatch):
    def cannot_load():
        raise RuntimeError("needs a Metal GPU")

    paths = dict(backends.PATHS)
    paths["metal"] = Path("metal", cannot_load, False, "a kernel")
    paths["native"] = Path("native", paths["reference"].load, False, "a C++ op")
    monkeypatch.setattr(backends, "PATHS", paths)
    monkeypatch.setattr(backends, "AUTO_ORDER", ("compiled",))
    found = {impl.role: impl for impl in implementations.ours()}
    assert found["path:metal"].status == "unavailable: needs a Metal GPU"
    assert found["path:native"].status == OK
    assert found["path:native"].name == "mlx_rmsprop fused='native'"


def test_the_model_tree_has_the_shapes_of_a_small_transformer():
    tree = workloads.model_tree("float32")
    assert tree.tensors == 160
    assert tree.elements == 24_838_272
    assert max(tree.shapes, key=lambda shape: math.prod(shape)) == (4096, 384)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtypes", "float8"], "--dtypes takes a comma-separated list of float32"),
        (["--configurations", "nesterov"], "got 'nesterov'"),
        (["--sizes", "22,x"], "expected comma-separated powers of two"),
        (["--sizes", "31"], "between 0 and 30"),
        (["--repeats", "0"], "expected a positive integer, got '0'"),
        (["--workloads", ""], "--workloads takes a comma-separated list"),
    ],
)
def test_bad_options_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_repeats_shrink_to_the_time_budget_but_not_below_the_least():
    assert repeat_count([0.01, 0.02], repeats=20, budget=1.0, least=5) == 20
    assert repeat_count([0.2, 0.1], repeats=20, budget=1.0, least=5) == 10
    assert repeat_count([0.5], repeats=20, budget=1.0, least=5) == 5
    assert repeat_count([0.5], repeats=3, budget=1.0, least=5) == 3
    assert repeat_count([0.5], repeats=20, budget=0.0, least=5) == 20


def test_step_memory_of_a_step_that_allocates_nothing_is_its_resident_size():
    held = {"x": mx.ones((2**16,)), "y": mx.ones((2**16,))}
    mx.eval(held)
    add = mx.compile(lambda x, y: x + y)

    def step():
        # One output: MLX writes it into the donated buffer of x.
        held["x"] = add(held["x"], held["y"])
        mx.eval(held)

    prepared = Prepared(step, lambda: None, bytes_moved=0, device="cpu", mlx_resident=2**19)
    step()
    assert mlx_step_memory(prepared) == (2**19, 2**19)


def test_gradients_alternate_between_g_and_minus_g_converted_once():
    data = workloads.generate(workloads.single_tensor(4, "float32"))
    calls = []

    def convert(arrays):
        calls.append(arrays)
        return [array.copy() for array in arrays]

    first = data.gradient_pair(("numpy", "float32"), convert)
    assert data.gradient_pair(("numpy", "float32"), convert) is first
    assert len(calls) == 2
    assert (first[1][0] == -first[0][0]).all() and first[0][0].any()


def test_no_implementation_changes_the_shared_workload_data():
    workload = workloads.single_tensor(6, "float32")
    data = workloads.generate(workload)
    parameters = [array.copy() for array in data.parameters]
    gradients = [array.copy() for array in data.gradients]
    configuration = workloads.CONFIGURATIONS["centered+momentum"]
    for implementation in runner.implementations(include_peers=True):
        if implementation.status == OK and implementation.supports(configuration):
            prepared = implementation.prepare(workload, data, configuration)
            time_steps(prepared, 3)
    for before, after in zip(parameters + gradients, data.parameters + data.gradients, strict=True):
        assert (before == after).all()


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="this machine has an MLX GPU")
def test_asking_for_a_missing_gpu_is_refused(capsys):
    assert bench.run(parse("--device", "gpu")) == 2
    assert "--device gpu: MLX has no gpu on this machine" in capsys.readouterr().err


def test_progress_goes_to_a_log_as_lines():
    stream = io.StringIO()
    progress = report.ProgressBar(stream, log_every=0)
    progress(0, 2, "first")
    progress(2, 2, "done")
    assert stream.getvalue().splitlines()[0].startswith("[0/2] 0s first")


@pytest.mark.skipif(
    importlib.util.find_spec("mlx_rmsprop.check") is None,
    reason="python -m mlx_rmsprop also loads mlx_rmsprop.check, not on this branch yet",
)
def test_command_line_entry_point_knows_bench():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_rmsprop", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--configurations" in result.stdout
