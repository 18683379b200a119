"""The benchmark harness (``benchmarks/`` at the clone's root) on tiny sizes: its JSON, its
table, the generated section of docs/benchmarks.md, its options and the thin
``python -m mlx_rmsprop bench`` entry point.

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

import benchmarks as bench
from benchmarks import environment, implementations, report, runner, workloads
from benchmarks.implementations import NOT_INSTALLED, OK, Prepared
from benchmarks.timing import mlx_step_memory, repeat_count, time_steps
from mlx_rmsprop import __main__ as cli
from mlx_rmsprop import paths
from mlx_rmsprop.paths import UpdatePath

REPEATS = 4
DOC = """# Benchmarks

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
    centered+momentum, into the output folder ``results``, with the doc section rewritten."""
    directory = tmp_path_factory.mktemp("bench")
    doc = directory / "benchmarks.md"
    doc.write_text(DOC.format(start=report.DOC_START, end=report.DOC_END))
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
        "--out",
        str(directory / "results"),
        "--doc",
        str(doc),
        "--no-chart",
        "--quiet",
    )
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = bench.run(args)
    record = json.loads((directory / "results" / bench.JSON_NAME).read_text())
    return status, record, output.getvalue(), doc.read_text()


def measured(record, **where):
    return [
        row
        for row in record["results"]
        if row["status"] == OK and all(row[key] == value for key, value in where.items())
    ]


def test_run_succeeds_and_records_machine_versions_and_settings(tiny_run):
    status, record, _, _ = tiny_run
    assert status == 0
    assert record["schema"] == runner.SCHEMA_VERSION == 3
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
    for name in paths.PATHS:
        assert f"path:{name}" in roles
    assert {"mlx-eager", "mlx-compiled", "mlx-floor", "user-compiled"} <= set(roles)
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
            assert {"mlx-eager", "mlx-compiled", "mlx-floor"} | ours <= plain
            # MLX's built-in has no centered or momentum variant (nor has the floor).
            assert ours <= both and not both & {"mlx-eager", "mlx-compiled", "mlx-floor"}


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
    # The floor (SGD without momentum) reads parameter and gradient and writes the parameter.
    assert bytes_of("mlx-floor", "float32", "plain") == 3 * 4 * n


def test_figures_follow_from_the_samples(tiny_run):
    _, record, _, _ = tiny_run
    bandwidth = record["bandwidth"]["gbps"]
    for row in measured(record):
        samples = row["samples_s"]
        assert len(samples) == REPEATS and min(samples) > 0
        assert row["p20_s"] <= row["median_s"] <= row["p80_s"]
        assert math.isclose(row["gbps"], row["bytes_moved"] / row["median_s"] / 1e9)
        if row["cache_resident"]:
            assert row["bandwidth_fraction"] is None
        else:
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
    # A narrowed run summarises the targets it could not measure in one line.
    skipped = sum(target["met"] is None for target in record["targets"])
    assert skipped >= 10
    assert output.count("not measured") == 1
    assert f"not measured: {skipped} of {len(targets)} targets" in output


def test_terminal_table_lists_every_row(tiny_run):
    _, record, output, _ = tiny_run
    assert "float32 2^10: 1,024 elements in 1 tensors" in output
    assert "bfloat16 200x2^10: 204,800 elements in 200 tensors" in output
    for row in record["results"]:
        assert row["implementation"] in output


def test_doc_section_is_replaced_between_the_markers(tiny_run):
    _, record, _, doc = tiny_run
    assert "old table" not in doc
    assert doc.startswith("# Benchmarks\n\nText before the table stays.\n")
    assert doc.endswith("\n\nText after the table stays.\n")
    assert doc.count(report.DOC_START) == doc.count(report.DOC_END) == 1
    section = doc[doc.index(report.DOC_START) : doc.index(report.DOC_END)]
    assert record["started"][:10] in section
    assert f"mlx {record['versions']['mlx']}" in section
    assert report.DOC_COMMAND in section
    assert "| implementation | configuration | 2^8 | 2^10 | 200x2^10 |" in section
    assert "| MLX RMSprop, mx.compile | plain | " in section


@pytest.mark.skipif(not report.matplotlib_available(), reason="matplotlib is not installed")
def test_chart_of_gbps_against_size_is_a_png(tiny_run, tmp_path):
    _, record, _, _ = tiny_run
    chart = tmp_path / "bench.png"
    assert report.write_chart(record, str(chart))
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_doc_without_markers_is_refused(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# no section here\n")
    with pytest.raises(ValueError, match="has no '<!-- mlx_rmsprop bench: start -->'"):
        report.update_doc(str(doc), "table")
    assert doc.read_text() == "# no section here\n"


def test_a_path_registered_later_appears_without_changes(monkeypatch):
    def cannot_load():
        raise RuntimeError("needs a Metal GPU")

    registry = dict(paths.PATHS)
    registry["metal"] = UpdatePath("metal", cannot_load, False, "a kernel")
    registry["native"] = UpdatePath("native", registry["reference"].load, False, "a C++ op")
    monkeypatch.setattr(paths, "PATHS", registry)
    monkeypatch.setattr(paths, "AUTO_ORDER", ("compiled",))
    found = {impl.role: impl for impl in implementations.ours()}
    assert found["path:metal"].status == "unavailable: needs a Metal GPU"
    assert found["path:native"].status == OK
    assert found["path:native"].name == "mlx_rmsprop fused='native'"


def test_the_model_tree_has_the_shapes_of_a_small_transformer():
    tree = workloads.model_tree("float32")
    assert tree.tensors == 160
    assert tree.elements == 24_838_272
    assert max(tree.shapes, key=lambda shape: math.prod(shape)) == (4096, 384)


def test_the_many_tensor_workloads_have_the_shapes_they_are_named_after():
    gpt2 = workloads.gpt2_small("float32")
    assert gpt2.tensors == 196
    assert gpt2.elements == 124_439_808  # GPT-2 small's 124M
    assert gpt2.shapes[0] == (50257, 768)
    qv = workloads.lora_qv("float32")
    assert qv.tensors == 128
    assert set(qv.shapes) == {(4096, 8), (8, 4096)}
    every = workloads.lora_all("float32")
    assert every.tensors == 448
    assert set(every.shapes) == {(4096, 16), (16, 4096), (16, 11008), (11008, 16)}
    assert every.elements == 32 * (4 * 2 * 4096 * 16 + 3 * (4096 + 11008) * 16)
    tiny = workloads.many_tiny("float32")
    assert (tiny.tensors, tiny.elements) == (10_000, 40_000)
    kinds = [w.kind for w in workloads.plan_workloads(list(workloads.KINDS), [8], ["float32"])]
    assert kinds == list(workloads.KINDS)


def test_only_ours_runs_the_full_pipeline():
    full = workloads.CONFIGURATIONS["full pipeline"]
    assert dict(full.pipeline) == {
        "use_ema": True,
        "skip_nonfinite": True,
        "clipnorm": 1.0,
        "gradient_accumulation_steps": 2,
    }
    for impl in runner.implementations(include_peers=True):
        if impl.prepare is None:
            continue  # a peer that is not installed here runs nothing
        ours = impl.role.startswith("path:") or impl.role == "user-compiled"
        assert impl.supports(full) == ours, impl.name
        assert impl.supports(workloads.CONFIGURATIONS["plain"])


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A run of the 'tiny' workload cut to 4 tensors, plain and full pipeline (MLX only: the
    peers' rows are checked on tiny_run)."""
    directory = tmp_path_factory.mktemp("pipeline")
    doc = directory / "benchmarks.md"
    doc.write_text(DOC.format(start=report.DOC_START, end=report.DOC_END))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workloads, "TINY_TENSORS", 4)
        args = parse(
            "--workloads", "tiny", "--dtypes", "float32",
            "--configurations", "plain,full pipeline",
            "--repeats", "2", "--rounds", "1", "--warmup", "1", "--row-seconds", "0",
            "--bandwidth-size", "16", "--out", str(directory), "--doc", str(doc),
            "--no-chart", "--no-peers", "--quiet",
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            status = bench.run(args)
    record = json.loads((directory / bench.JSON_NAME).read_text())
    return status, record, doc.read_text()


def test_full_pipeline_rows_first_step_and_graph_nodes_are_recorded(pipeline_run):
    status, record, doc = pipeline_run
    assert status == 0
    rows = measured(record, workload="4x4")
    full = [row for row in rows if row["configuration"] == "full pipeline"]
    assert {row["role"] for row in full} == {
        impl["role"]
        for impl in record["implementations"]
        if impl["status"] == OK
        and (impl["role"].startswith("path:") or impl["role"] == "user-compiled")
    }
    for row in rows:
        assert row["tensors"] == 4
        assert row["first_step_s"] > 0
        mlx_row = row["role"].startswith(("mlx-", "path:", "user-compiled"))
        nodes = row["graph_nodes_per_tensor"]
        assert (nodes is not None) == mlx_row, row["implementation"]
        if mlx_row:
            assert nodes > 0
    # A plain step is one fused node per tensor on the native path (plus a shared few).
    native = measured(record, workload="4x4", role="path:native", configuration="plain")
    if native:
        assert 1 <= native[0]["graph_nodes_per_tensor"] < 2
    assert "first step after setup" in doc and "| 4x4 |" in doc


def test_peer_rows_record_their_first_step_and_no_graph_nodes(tiny_run):
    _, record, _, _ = tiny_run
    for row in measured(record):
        assert row["first_step_s"] > 0
        mlx_row = row["role"].startswith(("mlx-", "path:", "user-compiled"))
        assert (row["graph_nodes_per_tensor"] is not None) == mlx_row, row["implementation"]


def test_every_many_tensor_and_pipeline_target_is_reported(pipeline_run):
    _, record, _ = pipeline_run
    names = {target["target"] for target in record["targets"]}
    for expected in (
        "float32 200x2^10: auto vs optax (x)",
        "float32 7B LoRA all r16: auto vs optax (x)",
        "float32 7B LoRA all r16: auto vs mlx-compiled (x)",
        "float32 GPT-2 small: full pipeline time / plain time",
        "float32 2^24: full pipeline vs MLX mx.compile plain (x)",
    ):
        assert expected in names
    # Not in this run: reported as not measured, with the reason.
    lora = next(t for t in record["targets"] if t["target"].startswith("float32 7B LoRA all"))
    assert lora["met"] is None and "not in this run" in lora["note"]


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


def test_files_go_to_the_output_folder_and_each_path_is_printed(tiny_run):
    _, _, output, _ = tiny_run
    assert parse().out == "bench-results"
    (line,) = [line for line in output.splitlines() if line.startswith("wrote the JSON")]
    written = line.rsplit(": ", 1)[1]
    assert written.endswith(f"/results/{bench.JSON_NAME}")
    assert json.loads(open(written).read())["schema"] == runner.SCHEMA_VERSION
    assert written.startswith("/")


def test_an_implementation_that_ran_nowhere_is_one_line(tiny_run):
    _, record, output, doc = tiny_run
    section = doc[doc.index(report.DOC_START) : doc.index(report.DOC_END)]
    absent = report.not_run(record)
    # On a machine without Metal or CUDA, at least those two kernel paths ran nowhere.
    if not mx.is_available(mx.gpu):
        assert {"mlx_rmsprop fused='metal'", "mlx_rmsprop fused='cuda'"} <= set(absent)
    table_rows = [line for line in section.splitlines() if line.startswith("|")]
    terminal_rows = [line for line in output.splitlines() if line.startswith("  ")]
    for name, status in absent.items():
        assert section.count(f"- {name}: {status}") == 1
        assert not any(status in line for line in table_rows)
        assert sum(status in line for line in terminal_rows) == sum(
            other == status for other in absent.values()
        )


def test_sizes_that_fit_in_the_last_level_cache_get_no_bandwidth_fraction(tiny_run):
    _, record, output, _ = tiny_run
    cache = record["machine"]["last_level_cache"]
    assert cache["bytes"] > 0 and cache["source"] in ("sysfs", "sysctl", "fallback")
    rows = [row for row in record["results"] if row["status"] == OK]
    for row in rows:
        assert row["cache_resident"] == (
            not record["machine"]["gpu"] and row["bytes_moved"] <= cache["bytes"]
        )
    if any(row["cache_resident"] for row in rows):
        assert " cache " in output


def test_cache_resident_marking_compares_bytes_moved_with_the_cache():
    rows = [
        {
            "workload": w,
            "dtype": "float32",
            "role": role,
            "status": OK,
            "median_s": 1e-3,
            "bytes_moved": size,
            "gbps": size / 1e-3 / 1e9,
        }
        for w, size in (("small", 2**20), ("large", 2**26))
        for role in ("mlx-compiled", "path:native")
    ]
    runner._add_ratios(rows, bandwidth_gbps=10.0, cache_bytes=32 * 2**20)
    assert [row["cache_resident"] for row in rows] == [True, True, False, False]
    assert rows[0]["bandwidth_fraction"] is None
    assert math.isclose(rows[2]["bandwidth_fraction"], 2**26 / 1e-3 / 1e9 / 10.0)
    runner._add_ratios(rows, bandwidth_gbps=10.0, cache_bytes=None)  # on a GPU: never
    assert not any(row["cache_resident"] for row in rows)


def test_last_level_cache_is_read_from_sysfs_with_a_fallback(tmp_path, monkeypatch):
    for index, (level, kind, size) in enumerate(
        [
            (1, "Data", "32K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "512K"),
            (3, "Unified", "8M"),
        ]
    ):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "size").write_text(f"{size}\n")
    assert environment._sysfs_cache_bytes(str(tmp_path)) == 8 * 2**20
    assert environment._sysfs_cache_bytes(str(tmp_path / "missing")) is None
    monkeypatch.setattr(environment.sys, "platform", "linux")
    monkeypatch.setattr(environment, "_sysfs_cache_bytes", lambda: None)
    assert environment.last_level_cache() == {
        "bytes": environment.FALLBACK_CACHE_BYTES,
        "source": "fallback",
    }


def test_a_recorded_run_rewrites_the_doc_without_measuring(tiny_run, tmp_path, capsys):
    _, record, _, doc = tiny_run
    recorded = tmp_path / "run.json"
    recorded.write_text(json.dumps(record))
    again = tmp_path / "benchmarks.md"
    again.write_text(DOC.format(start=report.DOC_START, end=report.DOC_END))
    assert bench.run(parse("--from-json", str(recorded), "--doc", str(again))) == 0
    assert again.read_text() == doc
    assert bench.run(parse("--from-json", str(tmp_path / "none.json"))) == 2
    assert "cannot read a recorded run" in capsys.readouterr().err


def test_bench_outside_a_clone_says_where_benchmarks_run(monkeypatch, capsys):
    monkeypatch.setattr(cli, "clone_root", lambda: None)
    assert cli.main(["bench", "--sizes", "10"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err
