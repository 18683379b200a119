"""The memory benchmark (``python -m benchmarks.memory``) on tiny sizes: its state formats,
code tables, byte counts, JSON, chart, generated doc section and target checks. Timings and
losses are never asserted beyond their structure; the formats are checked value by value."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import benchmarks.memory as memory
from benchmarks.memory import codes, report, sizes, tables
from benchmarks.memory.configurations import CONFIGURATIONS
from benchmarks.memory.emulation import AffineCodec, CodedStateRMSprop, TableCodec
from benchmarks.memory.workloads import WORKLOADS, state_bytes
from mlx_rmsprop import RMSprop, spec

from native_available import requires_native


def test_the_logarithmic_tables_restate_the_spec():
    assert tables.logarithmic(spec.UNSIGNED_CODE_OCTAVES, signed=False).tolist() == list(
        spec.UNSIGNED_CODE
    )
    assert tables.logarithmic(spec.SIGNED_CODE_OCTAVES, signed=True).tolist() == list(
        spec.SIGNED_CODE
    )


def test_every_candidate_is_256_sorted_values_in_unit_range():
    for name, (unsigned, signed) in tables.candidates().items():
        for table in (unsigned, signed):
            assert table.shape == (256,) and table.dtype == np.float32, name
            assert np.all(np.diff(table) >= 0) and table.max() == 1, name
            assert table.min() >= -1, name
        assert unsigned.min() >= 0, name


def test_the_dynamic_map_has_a_zero_and_spans_about_six_decades():
    unsigned, signed = tables.dynamic_map(False), tables.dynamic_map(True)
    assert 0 in unsigned and 0 in signed
    assert unsigned[unsigned > 0].min() == np.float32(3.25e-7)
    assert signed[signed > 0].min() == np.float32(5.5e-7)
    # Symmetric but for the 1 it adds (and no -1).
    inner = signed[(signed != 0) & (signed != 1)]
    assert np.array_equal(np.sort(-inner), inner) and signed.min() > -1


def test_table_codec_finds_the_nearest_code_by_midpoints():
    table = np.array(spec.UNSIGNED_CODE, np.float32)
    codec = TableCodec(table, block_size=32)
    rng = np.random.default_rng(0)
    x = (rng.random(100) ** 8).astype(np.float32)  # 4 blocks, the last one short
    stored = codec.encode(mx.array(x))
    scale = np.array(stored["scale"])
    assert stored["codes"].dtype == mx.uint8 and scale.shape == (4,)
    blocks = np.concatenate([x, np.zeros(28, np.float32)]).reshape(4, 32)
    assert np.array_equal(scale, np.abs(blocks).max(axis=1))
    y = blocks / scale[:, None]
    midpoints = np.array(spec.code_midpoints(spec.UNSIGNED_CODE), np.float32)
    expected = np.searchsorted(midpoints, y, side="left").reshape(-1)[:100]
    assert np.array_equal(np.array(stored["codes"]), expected)
    decoded = np.array(codec.decode(stored, x.shape))
    assert np.array_equal(decoded, table[expected] * np.repeat(scale, 32)[:100])


def test_table_codec_all_zero_and_nan_blocks():
    codec = TableCodec(np.array(spec.SIGNED_CODE, np.float32), block_size=32)
    x = np.zeros(64, np.float32)
    x[40] = np.nan
    stored = codec.encode(mx.array(x))
    scale = np.array(stored["scale"])
    assert scale[0] == 0 and math.isnan(scale[1])
    decoded = np.array(codec.decode(stored, x.shape))
    assert np.all(decoded[:32] == 0) and np.all(np.isnan(decoded[32:]))


def test_the_affine_baseline_stores_small_v_as_zero():
    """The zero-point problem the package's code avoids: in a group of 64 whose largest v is
    1, MLX's affine 8-bit quantization stores every v below about 1/510 as exactly 0."""
    v = np.full(64, 1e-4, np.float32)
    v[0] = 1.0
    codec = AffineCodec(group_size=64, bits=8)
    decoded = np.array(codec.decode(codec.encode(mx.array(v)), v.shape))
    assert decoded[0] == pytest.approx(1.0, rel=1e-2)
    assert np.all(decoded[1:] == 0)
    # On random groups the rounding of scale * q + bias even gives negative values of v.
    rng = np.random.default_rng(0)
    v = (rng.random((20000, 64)) ** 6 * rng.random((20000, 1))).astype(np.float32)
    decoded = np.array(codec.decode(codec.encode(mx.array(v)), v.shape))
    assert 0.3 < np.mean(decoded == 0) < 0.4 and not np.any(v == 0)
    assert 0 < np.mean(decoded < 0) < 1e-3
    v = np.full(64, 1e-4, np.float32)
    v[0] = 1.0
    ours = TableCodec(np.array(spec.UNSIGNED_CODE, np.float32), block_size=64)
    decoded = np.array(ours.decode(ours.encode(mx.array(v)), v.shape))
    assert np.all(np.abs(decoded[1:] - 1e-4) / 1e-4 < 0.05)


@pytest.mark.parametrize(
    "hyper",
    [
        {"learning_rate": 1e-2},
        {"learning_rate": 1e-2, "alpha": 0.9, "eps": 1e-7, "eps_in_sqrt": True},
        {"learning_rate": 1e-3, "momentum": 0.9},
    ],
)
def test_coded_state_rmsprop_has_the_reference_arithmetic(hyper):
    """Below its size threshold nothing is quantized: bit for bit the package's reference."""
    rng = np.random.default_rng(1)
    parameters = {"w": mx.array(rng.standard_normal((8, 16), np.float32))}
    ours = RMSprop(**hyper, fused=False)
    emulated = CodedStateRMSprop(**hyper, codec=TableCodec(tables.linear(False)))
    first, second = parameters, parameters
    for _ in range(5):
        gradients = {"w": mx.array(rng.standard_normal((8, 16), np.float32))}
        first = ours.apply_gradients(gradients, first)
        second = emulated.apply_gradients(gradients, second)
    assert np.array_equal(np.array(first["w"]), np.array(second["w"]))
    assert np.array_equal(np.array(ours.state["w"]["v"]), np.array(emulated.state["w"]["v"]))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_coded_state_rmsprop_with_the_spec_tables_is_the_package_8bit_state(momentum):
    """With the spec's tables the study's optimizer is RMSprop(state_bits=8) bit for bit,
    parameters, codes and scales: the other tables are measured in the same format."""
    rng = np.random.default_rng(2)
    shape = (40, 130)  # 5200 elements: quantized, the last block short
    parameters = {"w": mx.array(rng.standard_normal(shape, np.float32))}
    ours = RMSprop(1e-3, momentum=momentum, state_bits=8, fused=False)
    emulated = CodedStateRMSprop(
        1e-3,
        momentum=momentum,
        codec=TableCodec(np.array(spec.UNSIGNED_CODE, np.float32)),
        momentum_codec=TableCodec(np.array(spec.SIGNED_CODE, np.float32)),
    )
    first, second = parameters, parameters
    for _ in range(4):
        gradients = {"w": mx.array(rng.standard_normal(shape, np.float32) * 1e-2)}
        first = ours.apply_gradients(gradients, first)
        second = emulated.apply_gradients(gradients, second)
    assert np.array_equal(np.array(first["w"]), np.array(second["w"]))
    keys = ["v"] + (["momentum_buffer"] if momentum else [])
    for key in keys:
        stored = emulated.state["w"][key]
        assert np.array_equal(np.array(ours.state["w"][key]), np.array(stored["codes"]))
        assert np.array_equal(np.array(ours.state["w"][key + "_scale"]), np.array(stored["scale"]))


def test_coded_state_rmsprop_keeps_large_tensors_in_codes():
    optimizer = CodedStateRMSprop(1e-3, codec=AffineCodec())
    parameters = {"big": mx.zeros((64, 64)), "small": mx.zeros((10,))}
    gradients = {"big": mx.ones((64, 64)), "small": mx.ones((10,))}
    optimizer.apply_gradients(gradients, parameters)
    assert set(optimizer.state["big"]["v"]) == {"codes", "scales", "biases"}
    assert optimizer.state["small"]["v"].dtype == mx.float32
    assert state_bytes(optimizer) < 64 * 64 * 4


def test_gpt2_small_shapes_have_its_parameter_count():
    shapes = sizes.gpt2_small_shapes()
    assert sum(math.prod(shape) for shape in shapes.values()) == 124_439_808


def test_bytes_per_parameter_are_read_from_the_state():
    rows = {(r["layout"], r["weights"]): r for r in sizes.bytes_per_parameter(elements=1 << 12)}
    assert len(rows) == 8
    for (layout, weights), row in rows.items():
        buffers = {"plain": 1, "centered": 2, "momentum": 2, "centered + momentum": 3}[layout]
        weight = 4 if weights == "float32" else 2
        assert row["state_32"] == 4 * buffers
        assert row["total_32"] == 4 * buffers + weight
        # A uint8 code per element and a float32 scale per block of 256.
        assert row["state_8"] == buffers * (1 + 4 / 256)
        assert row["total_8"] == buffers * (1 + 4 / 256) + weight


def test_state_bytes_of_a_tree():
    shapes = {"big": (64, 128), "small": (100,)}
    full = sizes.tree_state_bytes(shapes)
    small = sizes.tree_state_bytes(shapes, state_bits=8)
    counters = full - 4 * (64 * 128 + 100)  # step, learning_rate
    assert counters < 64
    assert small == counters + 64 * 128 + 4 * (64 * 128 // 256) + 4 * 100


def test_the_configurations_build_their_optimizers():
    hyper = WORKLOADS["mnist"].hyper
    assert isinstance(CONFIGURATIONS["naive"].optimizer(hyper), CodedStateRMSprop)
    optimizer = CONFIGURATIONS["float32"].optimizer(hyper)
    assert isinstance(optimizer, RMSprop) and optimizer.eps_in_sqrt


def test_reconstruction_metrics():
    v = [np.array([1.0, 0.25, 0.0, 1e-12] + [0.5] * 60, np.float32)]
    linear = tables.linear(False)
    result = codes.reconstruction(v, linear, signed=False)
    # 1e-12 on a linear code is 0; 0 itself is not counted; 63 nonzero values.
    assert result["values"] == 63
    assert result["zeroed_share"] == result["too_small_share"] == pytest.approx(1 / 63)
    assert result["too_large_share"] == 0
    # Without a zero, 1e-12 (below 2^-32 of its block) is raised to the smallest code.
    ours = codes.reconstruction(v, np.array(spec.UNSIGNED_CODE, np.float32), signed=False)
    assert ours["zeroed_share"] == ours["too_small_share"] == 0
    assert ours["too_large_share"] == pytest.approx(1 / 63)
    assert ours["median_relative_error"] < 0.03


def _record(**quality) -> dict:
    def run(loss, finite=True):
        return {
            "curve_steps": [1, 2],
            "curve": [2.0, loss],
            "final_loss": loss,
            "accuracy": 0.5,
            "state_bytes": 1024,
            "peak_memory": 2048,
            "finite": finite,
            "seconds": 0.1,
        }

    return {
        "started": "2026-12-07T00:00:00",
        "machine": "test",
        "mlx": mx.__version__,
        "settings": {"seed": 0},
        "quality": {w: {k: run(*v) for k, v in runs.items()} for w, runs in quality.items()},
        "gpt2": {
            "parameters": 1,
            "float32_state_bytes": 400,
            "quantized_state_bytes": 100,
            "ratio": 0.25,
        },
    }


def test_targets_judge_the_figures():
    record = _record(
        mnist={"float32": (1.0,), "8bit": (1.005,)},
        lm={"float32": (1.0,), "8bit": (1.02,), "bf16-8bit-sr": (math.nan, False)},
        **{"mnist-small-lr": {"float32": (0.5,), "bf16": (0.8,), "bf16-sr": (0.55,)}},
    )
    targets = report.evaluate(record)
    # Each goes into a Markdown table cell.
    assert not any("|" in t["target"] + t["measured"] for t in targets)
    met = {t["target"]: t["met"] for t in targets}
    held_out = "8-bit state at most 1% above float32's final held-out loss (one evaluation)"
    assert met[f"mnist: {held_out}"] is True
    assert met[f"lm: {held_out}"] is False
    training = "8-bit state at most 1% above float32's final training loss (mean of the last tenth"
    assert met[f"mnist: {training} of the steps)"] is True
    assert met[f"lm: {training} of the steps)"] is False
    assert met["lm: bf16 weights, 8-bit state, stochastic rounding: no NaN or Inf"] is False
    assert met[next(k for k in met if "closer to float32" in k)] is True
    assert met["GPT-2-small state bytes, 8-bit / float32 <= 0.27"] is True


def test_quality_targets_are_one_sided():
    # Ending lower than float32 meets the target; the measured gap keeps its sign.
    record = _record(mnist={"float32": (1.0,), "8bit": (0.9,)})
    met = {t["target"]: (t["met"], t["measured"]) for t in report.evaluate(record)}
    held_out = "mnist: 8-bit state at most 1% above float32's final held-out loss (one evaluation)"
    assert met[held_out] == (True, "-10.00%")


def test_doc_section_is_replaced_between_the_markers(tmp_path):
    doc = tmp_path / "memory.md"
    doc.write_text(f"before\n{report.DOC_START}\nold\n{report.DOC_END}\nafter\n")
    record = _record(mnist={"float32": (1.0,), "naive": (math.inf, False)})
    errors = codes.reconstruction(
        [np.linspace(0, 1, 300, dtype=np.float32)], tables.linear(False), False
    )
    record["codes"] = {
        "recorded": {"mnist": {"linear": {"v": errors, "momentum_buffer": errors}}},
        "final_loss": {"linear": {"mnist": 1.5, "lm": None}},
    }
    report.update_doc(str(doc), report.markdown(record, report.evaluate(record)))
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| `mnist` | 2 | 1.0000 (50.00%) | NaN/Inf |" in text
    # The last tenth of a two-window curve is its last window.
    assert "| `mnist` | 1.0000 | NaN/Inf |" in text
    assert report.DOC_COMMAND in text
    assert "| code | `lm` | `mnist` |" in text and "| linear | NaN/Inf | 1.5000 |" in text
    assert "| code (v / momentum), state of `mnist` |" in text


def test_command_line_runs_a_tiny_quality_comparison(tmp_path):
    """Two configurations, a few steps of the MLP: the JSON, the chart and the doc."""
    doc = tmp_path / "memory.md"
    doc.write_text(f"{report.DOC_START}\n{report.DOC_END}\n")
    out = tmp_path / "out"
    code = memory.main(
        [
            "--parts", "quality", "--workloads", "mnist", "--configurations",
            "float32,naive", "--steps", "6", "--out", str(out), "--doc", str(doc), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads((out / memory.JSON_NAME).read_text())
    runs = record["quality"]["mnist"]
    assert set(runs) == {"float32", "naive"}
    for run in runs.values():
        assert run["curve_steps"][-1] == 6 and len(run["curve"]) == len(run["curve_steps"])
        assert 0 <= run["accuracy"] <= 1 and run["state_bytes"] > 0 and run["peak_memory"] > 0
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "| `mnist` | 6 |" in doc.read_text()


def test_command_line_rejects_an_unknown_workload(capsys):
    with pytest.raises(SystemExit):
        memory.main(["--workloads", "imagenet"])
    assert "--workloads takes a comma-separated list" in capsys.readouterr().err


@requires_native
def test_the_speed_part_records_the_native_side_by_side_comparison():
    result = memory.speed(exponent=10, rounds=2)
    assert result["elements"] == 1024 and result["rounds"] == 2
    assert result["float32_ms"] > 0 and result["bits8_ms"] > 0
    low, high = result["ratio_p20_p80"]
    assert low <= result["ratio"] <= high
    record = _record(mnist={"float32": (1.0,)})
    record["speed"] = result
    targets = report.evaluate(record)
    assert any(t["target"].startswith("2^24 step") for t in targets)
    assert "One native CPU update of 2^10 float32 elements" in report.markdown(record, targets)


def test_records_of_separate_processes_merge_by_workload_and_part():
    first = _record(mnist={"float32": (1.0,)})
    second = _record(mnist={"8bit": (1.001,)}, lm={"float32": (2.0,)})
    del second["gpt2"]
    second["codes"] = {"recorded": {"lm": {}}, "final_loss": {"ours": {"lm": 2.0}}}
    third = {"started": "later", "codes": {"final_loss": {"ours": {"mnist": 1.0}}}}
    merged = memory.merge([first, second, third])
    assert merged["started"] == first["started"]
    assert set(merged["quality"]["mnist"]) == {"float32", "8bit"}
    assert set(merged["quality"]) == {"mnist", "lm"}
    assert merged["codes"]["final_loss"]["ours"] == {"lm": 2.0, "mnist": 1.0}
    assert merged["gpt2"] == first["gpt2"]


def test_noise_runs_give_the_seed_spread_and_the_mean_target():
    record = _record(mnist={"float32": (1.0,), "8bit": (1.05,)})
    record["noise"] = {
        "mnist": {
            "float32": {
                "1": _record(x={"a": (1.04,)})["quality"]["x"]["a"],
                # A seed the 8-bit runs lack: left out of both means.
                "2": _record(x={"a": (9.0,)})["quality"]["x"]["a"],
            },
            "8bit": {"1": _record(x={"a": (1.0,)})["quality"]["x"]["a"]},
        }
    }
    met = {t["target"]: (t["met"], t["measured"]) for t in report.evaluate(record)}
    held_out = "mnist: 8-bit state at most 1% above float32's final held-out loss"
    assert met[f"{held_out} (one evaluation)"] == (False, "+5.00%")
    # 1.025 against 1.02 over the common seeds.
    assert met[f"{held_out}, mean over seeds 0, 1"] == (True, "+0.49%")
    text = report.markdown(record, report.evaluate(record))
    assert (
        "| `mnist` | float32 weights, float32 state | 0: 1.0000, 1: 1.0400, 2: 9.0000 | 3.6800 |"
        in text
    )
