"""Checkpoints: exact resume in a fresh process, atomic writes under kill -9, and every way a
file can be wrong refused before anything changes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rmsprop import CheckpointError, RMSprop, load_state, save_state
from mlx_rmsprop.paths import availability

from locations import SUPPORT
from tiny_models import tiny_llama

HERE = SUPPORT
PATHS = [False] + [
    name for name, reason in availability().items() if reason is None and name != "reference"
]
RESUME_CONFIGS = {
    "mlx-default": {"learning_rate": 0.01},
    "torch-centered-momentum-wd": {
        "preset": "torch",
        "lr": 0.01,
        "momentum": 0.9,
        "centered": True,
        "weight_decay": 0.01,
    },
    "optax-bias-nesterov-schedule": {
        "preset": "optax",
        "learning_rate": "cosine",
        "momentum": 0.9,
        "nesterov": True,
        "bias_correction": True,
    },
    "keras-pipeline": {
        "preset": "keras",
        "learning_rate": 0.01,
        "momentum": 0.9,
        "centered": True,
        "weight_decay": 0.01,
        "exclude": ["bias"],
        "use_ema": True,
        "ema_overwrite_frequency": 4,
        "gradient_accumulation_steps": 3,
        "clipnorm": 1.0,
        "loss_scale_factor": 8.0,
    },
    "float16-skip-nonfinite": {
        "learning_rate": 0.01,
        "momentum": 0.5,
        "skip_nonfinite": True,
        "_dtype": "float16",
        "_nonfinite_step": 5,
    },
    "bfloat16-state": {
        "learning_rate": 0.01,
        "centered": True,
        "state_dtype": "bfloat16",
        "_dtype": "bfloat16",
    },
    # The worker's (6, 5) and (5, 3) parameters 8-bit in blocks of 32, (5,) and () float.
    "8-bit-stochastic-rounding": {
        "learning_rate": 0.01,
        "momentum": 0.9,
        "centered": True,
        "state_bits": 8,
        "state_block_size": 32,
        "min_quantized_size": 10,
        "stochastic_rounding": True,
        "rounding_seed": 4_000_000_007,
        "_dtype": "bfloat16",
    },
    "8-bit-keras-pipeline-bfloat16-ema": {
        "preset": "keras",
        "learning_rate": 0.01,
        "momentum": 0.9,
        "use_ema": True,
        "gradient_accumulation_steps": 3,
        "skip_nonfinite": True,
        "state_bits": 8,
        "min_quantized_size": 0,
        "stochastic_rounding": True,
        "state_dtype": "bfloat16",
        "_dtype": "float16",
        "_nonfinite_step": 7,
    },
}
TOTAL, SPLIT = 14, 6


def worker(config: dict, start: int, stop: int, workdir: Path, resume: bool = False) -> None:
    command = [
        sys.executable,
        str(HERE / "checkpoint_worker.py"),
        json.dumps(config),
        str(start),
        str(stop),
        str(workdir),
    ]
    if resume:
        command.append("--resume")
    subprocess.run(command, check=True, cwd=HERE, capture_output=True, timeout=600)


def loaded(path: Path) -> dict:
    # bfloat16 as its bits: NumPy has no bfloat16, and a bit-identical resume is the claim.
    return {
        k: np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
        for k, v in mx.load(str(path)).items()
    }


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("name", list(RESUME_CONFIGS))
def test_resume_in_a_fresh_process_is_bit_identical(name, fused, tmp_path):
    config = dict(RESUME_CONFIGS[name], fused=fused)
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    worker(config, 0, TOTAL, straight)
    worker(config, 0, SPLIT, split)
    worker(config, SPLIT, TOTAL, split, resume=True)
    for file in ("params.safetensors", "optimizer.safetensors"):
        expected, actual = loaded(straight / file), loaded(split / file)
        assert expected.keys() == actual.keys()
        for key in expected:
            np.testing.assert_array_equal(
                actual[key], expected[key], err_msg=f"{name} {file} {key}"
            )


def trained(config=None, steps=3):
    optimizer = RMSprop(**(config or {"learning_rate": 0.05, "momentum": 0.9}))
    params = {"layers": [{"weight": mx.ones((3, 2)), "bias": mx.zeros((2,))}], "scale": mx.ones(())}
    rng = np.random.default_rng(3)
    for _ in range(steps):
        grads = {
            "layers": [
                {
                    "weight": mx.array(rng.standard_normal((3, 2)), mx.float32),
                    "bias": mx.array(rng.standard_normal(2), mx.float32),
                }
            ],
            "scale": mx.array(rng.standard_normal(()), mx.float32),
        }
        params = optimizer.apply_gradients(grads, params)
    mx.eval(params, optimizer.state)
    return optimizer, params


def state_snapshot(optimizer):
    return {k: np.array(v) for k, v in tree_flatten(optimizer.state)}


def test_metadata_records_step_learning_rate_configuration_and_version(tmp_path):
    optimizer, _ = trained()
    path = save_state(optimizer, tmp_path / "ckpt.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    assert metadata["format"] == "mlx_rmsprop.optimizer_state"
    assert metadata["step"] == "3"
    assert float(metadata["learning_rate"]) == pytest.approx(0.05)
    assert json.loads(metadata["config"])["momentum"] == 0.9
    assert metadata["library_version"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt.safetensors"]  # no temp left


def test_builtin_mlx_state_file_loads(tmp_path):
    builtin = optim.RMSprop(0.05)
    params = {"w": mx.ones((4,)), "b": [mx.zeros((2,))]}
    params = builtin.apply_gradients({"w": mx.ones((4,)), "b": [mx.ones((2,))]}, params)
    mx.save_safetensors(str(tmp_path / "builtin.safetensors"), dict(tree_flatten(builtin.state)))
    ours = RMSprop(0.05)
    load_state(ours, tmp_path / "builtin.safetensors", params)
    grads = {"w": mx.full((4,), 0.5), "b": [mx.full((2,), -2.0)]}
    expected = builtin.apply_gradients(grads, params)
    got = ours.apply_gradients(grads, params)
    for (key, value), (_, other) in zip(tree_flatten(got), tree_flatten(expected), strict=True):
        np.testing.assert_array_equal(np.array(value), np.array(other), err_msg=key)


def test_widening_dtype_conversion_and_narrowing_refusal(tmp_path):
    half, params = trained({"learning_rate": 0.05, "state_dtype": mx.float16})
    save_state(half, tmp_path / "half.safetensors")
    full = RMSprop(0.05)
    load_state(full, tmp_path / "half.safetensors", params, strict=False)
    assert full.state["scale"]["v"].dtype == mx.float32

    save_state(full, tmp_path / "full.safetensors")
    narrow = RMSprop(0.05, state_dtype=mx.float16)
    before = state_snapshot(narrow)
    with pytest.raises(
        CheckpointError,
        match="'layers.0.weight.v' is mlx.core.float32, this optimizer keeps mlx.core.float16; converting would lose precision",
    ):
        load_state(narrow, tmp_path / "full.safetensors", params, strict=False)
    assert state_snapshot(narrow) == before


def corrupt_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def write_unknown_format(path: Path) -> None:
    mx.save_safetensors(
        str(path),
        {"step": mx.array(1)},
        metadata={"format": "something.else", "format_version": "7"},
    )


def write_foreign_metadata(path: Path) -> None:
    mx.save_safetensors(str(path), {"step": mx.array(1)}, metadata={"producer": "another tool"})


BAD_FILES = [
    (
        "truncated",
        lambda p: p.write_bytes(p.read_bytes()[:-40]),
        "cannot be read: \\[load_safetensors\\] Tensor .* exceeding the size of the file",
    ),
    (
        "garbage",
        lambda p: p.write_bytes(b"not a checkpoint at all"),
        "cannot be read: \\[load_safetensors\\] Invalid json header",
    ),
    ("missing", lambda p: p.unlink(), "cannot be read: \\[load_safetensors\\] Failed to open file"),
    ("flipped byte", corrupt_byte, "is corrupt: array '.*' fails its checksum"),
    (
        "unknown format",
        write_unknown_format,
        "has format 'something.else' version '7'; this library reads 'mlx_rmsprop.optimizer_state' version '1'",
    ),
    (
        "foreign metadata",
        write_foreign_metadata,
        "has an unknown format \\(metadata keys \\['producer'\\]\\)",
    ),
]


@pytest.mark.parametrize("name, damage, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_damaged_file_is_refused_and_nothing_changes(name, damage, message, tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    damage(path)
    target, _ = trained(steps=1)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_state(target, path, params)
    assert state_snapshot(target).keys() == before.keys()
    assert all(np.array_equal(state_snapshot(target)[k], before[k]) for k in before)


MISMATCHES = [
    (
        "centered vs not",
        {"learning_rate": 0.05, "momentum": 0.9, "centered": True},
        None,
        "keeps \\['momentum_buffer', 'v'\\] for '.*', but this configuration keeps \\['grad_avg', 'momentum_buffer', 'v'\\]",
    ),
    (
        "hyperparameter",
        {"learning_rate": 0.05, "momentum": 0.8},
        None,
        "was saved by a different configuration \\(momentum: saved 0.9, this optimizer 0.8\\); pass strict=False",
    ),
    (
        "missing parameter",
        None,
        {
            "layers": [{"weight": mx.ones((3, 2)), "bias": mx.zeros((2,))}],
            "scale": mx.ones(()),
            "extra": mx.ones((4,)),
        },
        "does not match the parameters: no state for \\['extra'\\]",
    ),
    (
        "unknown parameter",
        None,
        {"layers": [{"weight": mx.ones((3, 2)), "bias": mx.zeros((2,))}]},
        "does not match the parameters: state for unknown parameters \\['scale'\\]",
    ),
    (
        "shape",
        None,
        {"layers": [{"weight": mx.ones((2, 3)), "bias": mx.zeros((2,))}], "scale": mx.ones(())},
        "'layers.0.weight.v' has shape \\(3, 2\\), the parameter has shape \\(2, 3\\)",
    ),
]


@pytest.mark.parametrize(
    "name, config, params, message", MISMATCHES, ids=[m[0] for m in MISMATCHES]
)
def test_mismatched_checkpoint_is_refused_and_nothing_changes(
    name, config, params, message, tmp_path
):
    source, source_params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**(config or {"learning_rate": 0.05, "momentum": 0.9}))
    target.init(params or source_params)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_state(target, path, params or source_params)
    assert all(np.array_equal(state_snapshot(target)[k], before[k]) for k in before)


def test_strict_false_keeps_this_optimizers_hyperparameters(tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(0.05, momentum=0.8)
    load_state(target, path, params, strict=False)
    assert target.momentum == 0.8
    assert target.step.item() == 3


def test_without_parameters_the_current_tree_is_the_reference(tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    other = RMSprop(0.05, momentum=0.9)
    other.apply_gradients({"w": mx.ones((7,))}, {"w": mx.ones((7,))})
    with pytest.raises(CheckpointError, match="no state for \\['w'\\]"):
        load_state(other, path)
    fresh = RMSprop(0.05, momentum=0.9)
    load_state(fresh, path)  # nothing to compare with: taken as it is
    assert fresh.step.item() == 3


SAVER = """
import sys, mlx.core as mx
from mlx_rmsprop import RMSprop, save_state
optimizer = RMSprop(0.01)
params = {"w": mx.zeros((SIZE,))}
for step in range(1000):
    params = optimizer.apply_gradients({"w": mx.full((SIZE,), float(step + 1))}, params)
    mx.eval(params, optimizer.state)
    print("saving", step + 1, flush=True)
    save_state(optimizer, sys.argv[1])
    print("saved", step + 1, flush=True)
"""


def _start_saver(path: Path, size: int) -> subprocess.Popen:
    """A process that saves the state of a ``size``-element parameter to ``path`` again and
    again, printing "saving N" before and "saved N" after save N."""
    return subprocess.Popen(
        [sys.executable, "-c", SAVER.replace("SIZE", str(size)), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _read_until(process: subprocess.Popen, wanted: str, lines: list[str]) -> None:
    """Read the saver's output into ``lines`` up to the line ``wanted``."""
    for line in process.stdout:
        lines.append(line)
        if line.strip() == wanted:
            return
    raise AssertionError(f"the saver exited ({process.wait()}) before printing {wanted!r}")


def _kill_and_read_progress(process: subprocess.Popen, lines: list[str]) -> tuple[int, int]:
    """Kill the saver, then read the rest of what it printed up to its death (the pipe keeps
    it): the last step it reported saved, and the last one it started saving."""
    process.kill()
    process.wait()
    lines += process.stdout.readlines()
    process.stdout.close()
    saved = saving = 0
    for line in lines:
        word, step = line.split()
        if word == "saved":
            saved = int(step)
        elif word == "saving":
            saving = int(step)
    return saved, saving


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp.safetensors")]


def test_a_process_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    # Killed at random moments after its first save: the file on disk is a whole checkpoint of
    # a step the saver had finished ("saved N") or was finishing (renamed, not yet reported).
    # Its output is read to the end after the kill, so the check holds however far it got.
    rng = random.Random(0)
    for attempt in range(3):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        path = directory / "ckpt.safetensors"
        process, lines = _start_saver(path, 1 << 22), []
        _read_until(process, "saving 2", lines)
        time.sleep(rng.uniform(0.0, 0.4))  # only where it dies varies; no check depends on it
        saved, saving = _kill_and_read_progress(process, lines)
        target = RMSprop(0.01)
        load_state(target, path)  # a whole, checksummed checkpoint
        assert saved >= 1 and saving in (saved, saved + 1)
        assert target.step.item() in (saved, saving)


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    # Stopped (SIGSTOP, waited for) while its temporary file exists, so certainly in the middle
    # of writing save N, then killed: the file on disk must be save N - 1, whole.
    path = tmp_path / "ckpt.safetensors"
    # ~128 MiB per save: most of the saver's time is spent writing, so it is soon caught.
    process, lines = _start_saver(path, 1 << 25), []
    _read_until(process, "saved 1", lines)
    while True:
        assert process.poll() is None, "the saver exited before it was caught mid-write"
        if not _temporaries(tmp_path):
            time.sleep(0.001)  # polling interval only
            continue
        process.send_signal(signal.SIGSTOP)
        _, status = os.waitpid(process.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        if _temporaries(tmp_path):
            break  # stopped while writing: nothing can change on disk now
        process.send_signal(signal.SIGCONT)  # it renamed the file in between: try again
    saved, saving = _kill_and_read_progress(process, lines)
    assert saving == saved + 1, "it was stopped inside save_state"
    target = RMSprop(0.01)
    load_state(target, path)
    assert target.step.item() == saved
    assert len(_temporaries(tmp_path)) == 1  # the torn write, under a name load_state ignores


def test_float64_state_round_trips_bit_for_bit(tmp_path):
    # MLX's safetensors writer has no float64: such arrays are stored as their uint64 bits.
    optimizer = RMSprop(mx.array(0.01, mx.float64), momentum=0.9)
    params = {"w": mx.array([0.1, -2.5, 3.25], mx.float64)}
    params = optimizer.apply_gradients({"w": mx.array([1e-3, 2.0, -1e5], mx.float64)}, params)
    path = save_state(optimizer, tmp_path / "f64.safetensors")
    restored = RMSprop(mx.array(0.01, mx.float64), momentum=0.9)
    load_state(restored, path, params)
    for key, value in tree_flatten(optimizer.state):
        loaded = dict(tree_flatten(restored.state))[key]
        assert loaded.dtype == value.dtype, key
        np.testing.assert_array_equal(np.array(loaded), np.array(value), err_msg=key)


def builtin_state_file(path: Path, **replace) -> tuple[Path, dict]:
    """A plain MLX state file (no metadata) from mlx.optimizers.RMSprop, with some counters
    replaced (``None`` removes one)."""
    builtin = optim.RMSprop(0.05)
    params = {"w": mx.ones((4,))}
    params = builtin.apply_gradients({"w": mx.ones((4,))}, params)
    arrays = dict(tree_flatten(builtin.state))
    for key, value in replace.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    mx.save_safetensors(str(path), arrays)
    return path, params


BAD_COUNTERS = [
    (
        "learning_rate",
        mx.array(float("nan")),
        "'learning_rate' must be one finite floating value >= 0, got nan",
    ),
    (
        "learning_rate",
        mx.array(-0.1),
        "'learning_rate' must be one finite floating value >= 0, got -0.10000000149011612",
    ),
    (
        "learning_rate",
        mx.array([0.1, 0.2]),
        "'learning_rate' must be one finite floating value >= 0, got an array of shape (2,)",
    ),
    (
        "learning_rate",
        mx.array(1, mx.int32),
        "'learning_rate' must be one finite floating value >= 0, got 1 (mlx.core.int32",
    ),
    (
        "learning_rate",
        None,
        "'learning_rate' must be one finite floating value >= 0, got nothing (it is missing)",
    ),
    ("step", mx.array(1.0), "'step' must be a 0-d integer array >= 0, got 1.0 (mlx.core.float32"),
    (
        "step",
        mx.array(-1, mx.int32),
        "'step' must be a 0-d integer array >= 0, got -1 (mlx.core.int32",
    ),
    (
        "step",
        mx.array([1, 2], mx.uint64),
        "'step' must be a 0-d integer array >= 0, got an array of shape (2,)",
    ),
    ("step", None, "'step' must be a 0-d integer array >= 0 (not an optimizer state), got nothing"),
]


@pytest.mark.parametrize("key, value, message", BAD_COUNTERS, ids=[m for *_, m in BAD_COUNTERS])
def test_plain_mlx_file_with_invalid_counters_is_refused_and_nothing_changes(
    key, value, message, tmp_path
):
    path, params = builtin_state_file(tmp_path / "builtin.safetensors", **{key: value})
    target = RMSprop(0.05)
    target.init(params)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_state(target, path, params)
    after = state_snapshot(target)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def rewrite_metadata(path: Path, **replace: str | None) -> None:
    arrays, metadata = mx.load(str(path), return_metadata=True)
    for key, value in replace.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    mx.save_safetensors(str(path), arrays, metadata=metadata)


DEEP = "[" * 100_000 + "]" * 100_000
BAD_METADATA = [
    ("crc32 list", {"crc32": "[1, 2]"}, "'crc32' must be a JSON object, got '[1, 2]'"),
    (
        "crc32 string value",
        {"crc32": '{"step": "x"}'},
        "the checksum of 'step' must be an integer, got 'x'",
    ),
    ("crc32 deep", {"crc32": DEEP}, "'crc32' is not valid JSON (nested too deeply)"),
    ("crc32 missing", {"crc32": None}, "has damaged metadata: no 'crc32'"),
    ("config null", {"config": "null"}, "'config' must be a JSON object, got 'null'"),
    ("config list", {"config": "[1]"}, "'config' must be a JSON object, got '[1]'"),
    ("config deep", {"config": DEEP}, "'config' is not valid JSON (nested too deeply)"),
    ("config not json", {"config": "{"}, "'config' is not valid JSON (Expecting property name"),
    (
        "float64 object",
        {"float64_as_uint64": '{"a": 1}'},
        "'float64_as_uint64' must be a JSON array",
    ),
    ("float64 number item", {"float64_as_uint64": "[1]"}, "1 is not a stored float64 array"),
    (
        "float64 deep",
        {"float64_as_uint64": DEEP},
        "'float64_as_uint64' is not valid JSON (nested too deeply)",
    ),
    (
        "exclusions not a list",
        {"config": json.dumps({"exclude_from_weight_decay": "bias"})},
        "exclude_from_weight_decay must be a list of strings, got 'bias'",
    ),
]


@pytest.mark.parametrize("name, replace, message", BAD_METADATA, ids=[m[0] for m in BAD_METADATA])
@pytest.mark.parametrize("strict", [True, False])
def test_malformed_metadata_is_a_checkpoint_error(name, replace, message, strict, tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    rewrite_metadata(path, **replace)
    target, _ = trained(steps=1)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_state(target, path, params, strict=strict)
    assert all(np.array_equal(state_snapshot(target)[k], before[k]) for k in before)


def decaying(exclude: bool):
    optimizer = RMSprop.from_keras(learning_rate=0.1, weight_decay=0.5)
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def test_weight_decay_exclusions_are_saved_checked_and_restored(tmp_path):
    params = {"weight": mx.ones((3,)), "bias": mx.ones((3,))}
    grads = {"weight": mx.full((3,), 0.5), "bias": mx.full((3,), 0.5)}
    source = decaying(exclude=True)
    params = source.apply_gradients(grads, params)
    path = save_state(source, tmp_path / "ckpt.safetensors")
    assert json.loads(mx.load(str(path), return_metadata=True)[1]["config"])[
        "exclude_from_weight_decay"
    ] == ["bias"]
    expected = source.apply_gradients(grads, params)
    mx.eval(expected)

    forgetful = decaying(exclude=False)
    with pytest.raises(
        CheckpointError,
        match=re.escape("exclude_from_weight_decay: saved ['bias'], this optimizer []"),
    ):
        load_state(forgetful, path, params)
    load_state(forgetful, path, params, strict=False)  # restores the saved patterns
    assert forgetful.get_config()["exclude_from_weight_decay"] == ["bias"]
    got = forgetful.apply_gradients(grads, params)
    for key in params:
        np.testing.assert_array_equal(np.array(got[key]), np.array(expected[key]), err_msg=key)

    same = decaying(exclude=True)
    load_state(same, path, params)  # strict: the same patterns pass
    other = decaying(exclude=False)
    other.exclude_from_weight_decay(var_names=["weight"])
    load_state(other, path, params, strict=False)  # its own patterns are kept
    assert other.get_config()["exclude_from_weight_decay"] == ["weight"]


def test_a_checkpoint_without_saved_exclusions_loads_as_having_none(tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    config = json.loads(metadata["config"])
    del config["exclude_from_weight_decay"]  # as written before the key existed
    rewrite_metadata(path, config=json.dumps(config))
    target = RMSprop(0.05, momentum=0.9)
    load_state(target, path, params)
    assert target.step.item() == 3


def test_a_schedule_returning_a_non_scalar_is_refused_before_save_state_can_fail():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the learning_rate schedule must return a scalar floating value, got "
            "array(shape=(2,), dtype=mlx.core.float32) at step"
        ),
    ):
        RMSprop(lambda step: mx.array([0.1, 0.2]))


def test_save_state_with_a_non_scalar_learning_rate_says_so(tmp_path):
    optimizer, _ = trained()
    optimizer.state["learning_rate"] = mx.array([0.1, 0.2])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot save the optimizer state: its learning_rate must be a scalar array, got "
            "an array of shape (2,)"
        ),
    ):
        save_state(optimizer, tmp_path / "ckpt.safetensors")
    assert not list(tmp_path.iterdir())


def step_grads(seed):
    rng = np.random.default_rng(seed)
    return {
        "layers": [
            {
                "weight": mx.array(rng.standard_normal((3, 2)), mx.float32),
                "bias": mx.array(rng.standard_normal(2), mx.float32),
            }
        ],
        "scale": mx.array(rng.standard_normal(()), mx.float32),
    }


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("order", ["compile then load", "load then compile"])
def test_a_compiled_step_sees_a_loaded_state_in_either_order(order, fused, tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    expected = params
    for seed in range(3):
        expected = source.apply_gradients(step_grads(seed), expected)
    mx.eval(expected, source.state)

    target = RMSprop(0.05, momentum=0.9, fused=fused)
    target.init(params)

    def compiled():
        state = target.state
        return mx.compile(lambda g, p: target.apply_gradients(g, p), inputs=state, outputs=state)

    if order == "compile then load":
        step = compiled()
        load_state(target, path, params)
    else:
        load_state(target, path, params)
        step = compiled()
    got = params
    for seed in range(3):
        got = step(step_grads(seed), got)
    mx.eval(got, target.state)
    assert target.step.item() == 6
    for (key, value), (_, other) in zip(tree_flatten(got), tree_flatten(expected), strict=True):
        np.testing.assert_array_equal(np.array(value), np.array(other), err_msg=key)
    assert state_snapshot(target).keys() == state_snapshot(source).keys()
    for key, value in state_snapshot(source).items():
        np.testing.assert_array_equal(state_snapshot(target)[key], value, err_msg=key)


def test_saving_while_another_thread_steps_records_one_consistent_step(tmp_path):
    steps = 200
    params = {f"p{i}": mx.zeros((4,)) for i in range(32)}
    grads = [{k: mx.full((4,), float(s + 1)) for k in params} for s in range(steps)]
    # v after each step, from one uninterrupted single-thread run.
    reference = RMSprop(0.01, momentum=0.9)
    trajectory, p = [np.zeros(4, np.float32)], params
    for g in grads:
        p = reference.apply_gradients(g, p)
        mx.eval(p, reference.state)
        trajectory.append(np.array(reference.state["p0"]["v"]))

    optimizer = RMSprop(0.01, momentum=0.9)
    optimizer.init(params)
    mx.eval(grads, params, optimizer.state)
    first_saved, done, saved, errors = threading.Event(), threading.Event(), [], []

    def train():
        try:
            # MLX evaluates an array only on a stream of the thread that built it.
            mx.set_default_stream(mx.new_stream(mx.cpu))
            first_saved.wait()
            current = params
            for g in grads:
                with optimizer.update_lock:
                    current = optimizer.apply_gradients(g, current)
                    mx.eval(current, optimizer.state)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            done.set()

    def checkpoint():
        try:
            mx.set_default_stream(mx.new_stream(mx.cpu))
            while True:
                finished = done.is_set()
                saved.append(save_state(optimizer, tmp_path / f"c{len(saved)}.safetensors"))
                first_saved.set()
                if finished:
                    break
        except BaseException as error:
            errors.append(error)
            first_saved.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=train), threading.Thread(target=checkpoint)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    steps_seen = []
    for path in saved:
        arrays = mx.load(str(path))
        step = arrays["step"].item()
        steps_seen.append(step)
        for key in params:
            np.testing.assert_array_equal(
                np.array(arrays[f"{key}.v"]), trajectory[step], err_msg=f"{path.name} {key}"
            )
    assert steps_seen[0] == 0 and steps_seen[-1] == steps


def test_copies_and_unpickled_optimizers_get_a_fresh_unheld_lock():
    import copy
    import pickle

    optimizer = RMSprop(0.05, momentum=0.9)
    with optimizer.update_lock:  # held while copying: the copies must not inherit it
        copies = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    for other in copies:
        assert other.update_lock is not optimizer.update_lock
        acquired = threading.Event()

        def take(lock=other.update_lock, acquired=acquired):
            with lock:
                acquired.set()

        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
        assert acquired.is_set()


# --- Any key a dict can hold: dots, digits, lists with entries that have no state ---


def ones(*shape):
    return mx.ones(shape)


KEY_KINDS = {
    "dotted keys": {"layer1.weight": ones(3, 2), "layer1.bias": ones(2)},
    "int-like keys": {"blocks": {"0": ones(3), "1": ones(2)}, "10": ones(2)},
    "dotted beside nested": {"a.b": ones(2), "a": {"b": ones(3)}},
    # Frozen entries: trainable_parameters() gives {} there, and so do the gradients.
    "sparse list head": {"layers": [{}, {}, {"w": ones(3)}]},
    "sparse list middle": {"layers": [{"w": ones(3)}, {}, {"w": ones(2)}, {}]},
    "sparse list tail": {"layers": [ones(3), {}, {}]},
}


def gradients_like(tree, seed):
    rng = np.random.default_rng(seed)

    def draw(node):
        if isinstance(node, dict):
            return {k: draw(v) for k, v in node.items()}
        if isinstance(node, list):
            return [draw(v) for v in node]
        return mx.array(rng.standard_normal(node.shape), mx.float32)

    return draw(tree)


def steps(optimizer, params, seeds):
    for seed in seeds:
        params = optimizer.apply_gradients(gradients_like(params, seed), params)
        mx.eval(params, optimizer.state)
    return params


def file_arrays(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("with_parameters", [True, False], ids=["parameters", "no-parameters"])
@pytest.mark.parametrize("kind", list(KEY_KINDS))
def test_resume_is_bit_identical_for_any_key(kind, with_parameters, fused, tmp_path):
    config = {"learning_rate": 0.05, "momentum": 0.9, "centered": True, "fused": fused}
    straight = RMSprop(**config)
    params = steps(straight, KEY_KINDS[kind], range(3))
    save_state(straight, tmp_path / "first.safetensors")

    resumed = RMSprop(**config)
    load_state(resumed, tmp_path / "first.safetensors", params if with_parameters else None)
    expected = steps(straight, params, range(3, 6))
    got = steps(resumed, params, range(3, 6))

    for (key, want), (other, have) in zip(tree_flatten(expected), tree_flatten(got), strict=True):
        assert key == other
        np.testing.assert_array_equal(np.array(have), np.array(want), err_msg=key)
    # A later save keeps every entry: the same file as the uninterrupted run's.
    save_state(straight, tmp_path / "straight.safetensors")
    save_state(resumed, tmp_path / "resumed.safetensors")
    want_file, have_file = (
        file_arrays(tmp_path / "straight.safetensors"),
        file_arrays(tmp_path / "resumed.safetensors"),
    )
    assert sorted(have_file) == sorted(want_file)
    for key in want_file:
        np.testing.assert_array_equal(have_file[key], want_file[key], err_msg=key)


def plain_mlx_file(tmp_path, params):
    builtin = optim.RMSprop(0.05)
    params = builtin.apply_gradients(gradients_like(params, 0), params)
    path = tmp_path / "builtin.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(builtin.state)))
    return builtin, params, path


def test_plain_mlx_file_of_a_dotted_model_resumes_exactly_with_the_parameters(tmp_path):
    builtin, params, path = plain_mlx_file(tmp_path, dict(KEY_KINDS["dotted keys"]))
    ours = RMSprop(0.05)
    load_state(ours, path, params)
    grads = gradients_like(params, 1)
    expected, got = builtin.apply_gradients(grads, params), ours.apply_gradients(grads, params)
    for key in params:
        np.testing.assert_array_equal(np.array(got[key]), np.array(expected[key]), err_msg=key)


def test_plain_mlx_file_of_a_dotted_model_without_parameters_refuses_the_next_step(tmp_path):
    _, params, path = plain_mlx_file(tmp_path, dict(KEY_KINDS["dotted keys"]))
    ours = RMSprop(0.05)
    load_state(ours, path)  # MLX's reading: layer1 -> weight -> v
    before = state_snapshot(ours)
    with pytest.raises(
        ValueError,
        match="^optimizer state for 'layer1.weight' is nested under 'layer1': it was loaded "
        "from a file keyed by dotted paths without the parameters",
    ):
        ours.apply_gradients(gradients_like(params, 1), params)
    assert state_snapshot(ours).keys() == before.keys()  # nothing restarted from zero


def test_plain_mlx_file_that_cannot_tell_two_parameters_apart_is_refused(tmp_path):
    _, _, path = plain_mlx_file(tmp_path, {"a.b": ones(2)})
    target = RMSprop(0.05)
    with pytest.raises(
        CheckpointError,
        match="the parameters \\('a.b',\\) and \\('a', 'b'\\) are both 'a.b' there",
    ):
        load_state(target, path, {"a.b": ones(2), "a": {"b": ones(2)}})
    assert "a.b" not in target.state


def paths_with(path, name, key_path):
    _, metadata = mx.load(str(path), return_metadata=True)
    return json.dumps({**json.loads(metadata["state_paths"]), name: key_path})


BAD_PATHS = [
    ("not JSON", lambda p: "{", "state_paths is not JSON"),
    ("too deep", lambda p: "[" * 100000 + "]" * 100000, "state_paths is not JSON|does not list"),
    ("not a dict", lambda p: "[]", "does not list exactly the arrays of the file"),
    ("an array left out", lambda p: json.dumps({"step": ["step"]}), "does not list exactly"),
    ("huge index", lambda p: paths_with(p, "scale.v", ["scale", 2**40]), "a path is a list"),
    ("bool index", lambda p: paths_with(p, "scale.v", ["scale", True]), "a path is a list"),
    ("starts with an index", lambda p: paths_with(p, "scale.v", [0, "v"]), "a path is a list"),
    ("two arrays one path", lambda p: paths_with(p, "scale.v", ["step"]), "two arrays one path"),
]


@pytest.mark.parametrize("name, paths, message", BAD_PATHS, ids=[b[0] for b in BAD_PATHS])
def test_damaged_state_paths_are_refused_and_nothing_changes(name, paths, message, tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    rewrite_metadata(path, state_paths=paths(path))
    target, _ = trained(steps=1)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_state(target, path, params)
    with pytest.raises(CheckpointError, match=message):
        load_state(target, path)
    assert state_snapshot(target).keys() == before.keys()
    assert all(np.array_equal(state_snapshot(target)[k], before[k]) for k in before)


def test_state_paths_that_make_a_list_also_a_dict_are_refused(tmp_path):
    source, _ = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    paths = json.loads(metadata["state_paths"])
    paths["scale.v"] = ["layers", "weight", "v"]  # "layers" holds a list (layers.0...)
    paths["scale.momentum_buffer"] = ["layers", "weight", "momentum_buffer"]
    rewrite_metadata(path, state_paths=json.dumps(paths))
    fresh = RMSprop(0.05, momentum=0.9)
    with pytest.raises(
        CheckpointError,
        match="state_paths puts 'layers.*' where another array or container already is",
    ):
        load_state(fresh, path)
    assert sorted(fresh.state) == ["learning_rate", "step"]


class WithStrings(nn.Module):
    """Strings in the module's tree, as mlx-lm's ``layer_types``."""

    def __init__(self):
        super().__init__()
        self.layer_types = ["full_attention", "sliding_attention"]
        self.layers = [nn.Linear(4, 4), nn.Linear(4, 2)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def module_steps(model, optimizer, count):
    if isinstance(model, WithStrings):
        batch = mx.array(np.random.default_rng(2).standard_normal((8, 4)), mx.float32)
        loss = lambda m, x: (m(x) ** 2).mean()  # noqa: E731
    else:
        batch = mx.array([[1, 5, 2, 7, 3, 9, 4, 11]])
        loss = lambda m, x: nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()  # noqa: E731
    loss_and_grad = nn.value_and_grad(model, loss)
    for _ in range(count):
        _, grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


@pytest.mark.parametrize("fused", PATHS, ids=lambda f: f"fused={f}")
@pytest.mark.parametrize("reference", ["trainable_parameters", "module"])
@pytest.mark.parametrize("make", [WithStrings, tiny_llama], ids=["module", "mlx-lm-llama"])
def test_module_with_string_attributes_resumes_exactly(make, reference, fused, tmp_path):
    mx.random.seed(4)
    model = make()
    optimizer = RMSprop(0.01, momentum=0.9, fused=fused)
    module_steps(model, optimizer, 2)
    save_state(optimizer, tmp_path / "ckpt.safetensors")
    at_save = model.parameters()
    module_steps(model, optimizer, 2)
    expected = tree_flatten(model.parameters())

    model.update(at_save)
    resumed = RMSprop(0.01, momentum=0.9, fused=fused)
    parameters = model.trainable_parameters() if reference == "trainable_parameters" else model
    load_state(resumed, tmp_path / "ckpt.safetensors", parameters)
    module_steps(model, resumed, 2)
    for (key, want), (_, have) in zip(expected, tree_flatten(model.parameters()), strict=True):
        np.testing.assert_array_equal(np.array(have), np.array(want), err_msg=key)


# --- 8-bit state and stochastic rounding (issue 17) -----------------------------------------

EIGHT_BIT = {
    "learning_rate": 0.05,
    "momentum": 0.9,
    "state_bits": 8,
    "state_block_size": 32,
    "min_quantized_size": 6,
    "stochastic_rounding": True,
    "rounding_seed": 99,
}


def trained_8_bit(config=None, steps=3):
    """``trained``'s tree in bfloat16 plus a 70-element table (3 blocks): the (3, 2) weight and
    the table 8-bit, the bias and the scale float."""
    optimizer = RMSprop(**(config or EIGHT_BIT))
    rng = np.random.default_rng(8)
    shapes = {"layers": [{"weight": (3, 2), "bias": (2,)}], "scale": (), "table": (7, 10)}

    def tree(scale=1.0):
        return {
            "layers": [
                {k: mx.array(scale * rng.standard_normal(s), mx.bfloat16) for k, s in layer.items()}
                for layer in shapes["layers"]
            ],
            **{
                k: mx.array(scale * rng.standard_normal(shapes[k]), mx.bfloat16)
                for k in ("scale", "table")
            },
        }

    params = tree()
    for _ in range(steps):
        params = optimizer.apply_gradients(tree(), params)
    mx.eval(params, optimizer.state)
    return optimizer, params, tree


def bits(optimizer):
    return {
        k: np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
        for k, v in tree_flatten(optimizer.state)
    }


@pytest.mark.parametrize("with_parameters", [True, False], ids=["parameters", "no-parameters"])
def test_codes_scales_and_rounding_seed_round_trip_and_continue_exactly(with_parameters, tmp_path):
    source, params, tree = trained_8_bit()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**EIGHT_BIT)
    load_state(target, path, params if with_parameters else None)
    saved = dict(tree_flatten(source.state))
    restored = dict(tree_flatten(target.state))
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
    before_target, before_source = bits(target), bits(source)
    assert all(np.array_equal(before_target[k], before_source[k]) for k in before_source)
    assert restored["layers.0.weight.v"].dtype == mx.uint8
    assert restored["table.momentum_buffer_scale"].shape == (3,)
    assert restored["rounding_seed"].dtype == mx.uint32 and restored["rounding_seed"].item() == 99
    grads = [tree() for _ in range(3)]
    for gradients in grads:
        expected = source.apply_gradients(gradients, params)
        got = target.apply_gradients(gradients, params)
        params = expected
        assert all(
            mx.array_equal(a, b).item()
            for (_, a), (_, b) in zip(tree_flatten(got), tree_flatten(expected), strict=True)
        )
    after_source, after_target = bits(source), bits(target)
    assert all(np.array_equal(after_target[k], after_source[k]) for k in after_source)


FLOAT = {"learning_rate": 0.05, "momentum": 0.9}
LAYOUT_MISMATCHES = [
    (
        "float state into 8-bit",
        FLOAT,
        {**FLOAT, "state_bits": 8, "min_quantized_size": 6},
        "keeps ['momentum_buffer', 'v'] for 'layers.0.weight', but this configuration keeps "
        "['momentum_buffer', 'momentum_buffer_scale', 'v', 'v_scale'] (8-bit state: "
        "state_bits=8 and the parameter has 6 >= min_quantized_size=6 elements): it was saved "
        "by another configuration",
    ),
    (
        "8-bit state into float",
        {**FLOAT, "state_bits": 8, "min_quantized_size": 6},
        FLOAT,
        "keeps ['momentum_buffer', 'momentum_buffer_scale', 'v', 'v_scale'] for "
        "'layers.0.weight', but this configuration keeps ['momentum_buffer', 'v'] (float "
        "state: state_bits=32): it was saved by another configuration",
    ),
    (
        "8-bit state below this optimizer's threshold",
        {**FLOAT, "state_bits": 8, "min_quantized_size": 6},
        {**FLOAT, "state_bits": 8, "min_quantized_size": 7},
        "keeps ['momentum_buffer', 'momentum_buffer_scale', 'v', 'v_scale'] for "
        "'layers.0.weight', but this configuration keeps ['momentum_buffer', 'v'] (float "
        "state: the parameter is float64 or has fewer than min_quantized_size=7 elements): it "
        "was saved by another configuration",
    ),
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("with_parameters", [True, False], ids=["parameters", "no-parameters"])
@pytest.mark.parametrize(
    "name, saved, loading, message", LAYOUT_MISMATCHES, ids=[m[0] for m in LAYOUT_MISMATCHES]
)
def test_float_and_8_bit_state_never_load_into_each_other(
    name, saved, loading, message, strict, with_parameters, tmp_path
):
    source, params = trained(saved)
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**loading)
    target.init(params)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_state(target, path, params if with_parameters else None, strict=strict)
    assert all(np.array_equal(state_snapshot(target)[k], before[k]) for k in before)
    fresh = RMSprop(**loading)  # nothing to compare with: the file's own v gives the shape
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_state(fresh, path, strict=strict)
    assert fresh.state.keys() == RMSprop(**loading).state.keys()


@pytest.mark.parametrize(
    "saved, loading, difference",
    [
        # Both keep the 70-element table in one block, so only the configuration differs.
        (
            {"state_block_size": 128},
            {"state_block_size": 256},
            "state_block_size: saved 128, this optimizer 256",
        ),
        ({}, {"min_quantized_size": 5}, "min_quantized_size: saved 6, this optimizer 5"),
        ({}, {"rounding_seed": 100}, "rounding_seed: saved 99, this optimizer 100"),
        (
            {},
            {"stochastic_rounding": False},
            "stochastic_rounding: saved True, this optimizer False",
        ),
    ],
)
def test_strict_loading_compares_the_storage_arguments(saved, loading, difference, tmp_path):
    source, params, _ = trained_8_bit({**EIGHT_BIT, **saved})
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**{**EIGHT_BIT, **loading})
    with pytest.raises(CheckpointError, match=re.escape(difference)):
        load_state(target, path, params)
    load_state(target, path, params, strict=False)
    assert target.step.item() == 3


def test_another_block_size_with_other_scale_counts_is_refused_even_without_strict(tmp_path):
    source, params, _ = trained_8_bit()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**{**EIGHT_BIT, "state_block_size": 64})
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "'table.v_scale' has shape (3,), a parameter of shape (7, 10) in blocks of 64 has "
            "2 scales"
        ),
    ):
        load_state(target, path, params, strict=False)


def test_strict_false_takes_the_saved_rounding_seed_as_state(tmp_path):
    source, params, tree = trained_8_bit()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    target = RMSprop(**{**EIGHT_BIT, "rounding_seed": 5})
    load_state(target, path, params, strict=False)
    assert target.state["rounding_seed"].item() == 99
    assert target.rounding_seed == 99 and target.get_config()["rounding_seed"] == 99
    gradients = tree()
    expected = source.apply_gradients(gradients, params)
    got = target.apply_gradients(gradients, params)
    assert all(
        mx.array_equal(a, b).item()
        for (_, a), (_, b) in zip(tree_flatten(got), tree_flatten(expected), strict=True)
    )


def test_a_checkpoint_saved_before_the_storage_arguments_loads_strictly(tmp_path):
    source, params = trained()
    path = save_state(source, tmp_path / "ckpt.safetensors")
    _, metadata = mx.load(str(path), return_metadata=True)
    config = json.loads(metadata["config"])
    for key in ("state_bits", "state_block_size", "min_quantized_size", "stochastic_rounding"):
        del config[key]
    del config["rounding_seed"]
    rewrite_metadata(path, config=json.dumps(config, sort_keys=True))
    target = RMSprop(0.05, momentum=0.9)
    load_state(target, path, params)  # strict: the missing arguments read as their defaults
    assert target.step.item() == 3
    with pytest.raises(CheckpointError, match=re.escape("state_bits: saved 32, this optimizer 8")):
        load_state(RMSprop(0.05, momentum=0.9, state_bits=8), path, params)


def plain_8_bit_file(path: Path, change) -> tuple[Path, dict]:
    """A plain ``tree_flatten`` file (no metadata, so no checksums) of an 8-bit state, with
    ``change(arrays)`` applied."""
    source, params, _ = trained_8_bit()
    arrays = dict(tree_flatten(source.state))
    change(arrays)
    mx.save_safetensors(str(path), arrays)
    return path, params


BAD_8_BIT_FILES = [
    (
        "codes of another dtype",
        lambda a: a.update({"table.v": a["table.v"].astype(mx.float32)}),
        "'table.v' is mlx.core.float32, this optimizer keeps uint8 codes there",
    ),
    (
        "scales of another dtype",
        lambda a: a.update({"table.v_scale": a["table.v_scale"].astype(mx.float16)}),
        "'table.v_scale' is mlx.core.float16, this optimizer keeps float32 scales there",
    ),
    (
        "scales of another block size",
        lambda a: a.update({"table.momentum_buffer_scale": mx.ones((2,))}),
        "'table.momentum_buffer_scale' has shape (2,), a parameter of shape (7, 10) in blocks "
        "of 32 has 3 scales",
    ),
    (
        "codes of another shape",
        lambda a: a.update({"table.v": mx.zeros((10, 7), mx.uint8)}),
        "'table.v' has shape (10, 7), the parameter has shape (7, 10)",
    ),
    (
        "missing scales",
        lambda a: a.pop("table.v_scale"),
        "keeps ['momentum_buffer', 'momentum_buffer_scale', 'v'] for 'table'",
    ),
    (
        "rounding seed of another dtype",
        lambda a: a.update(rounding_seed=mx.array(99, mx.int32)),
        "'rounding_seed' must be a 0-d uint32 array, got 99 (mlx.core.int32",
    ),
    (
        "rounding seed of another shape",
        lambda a: a.update(rounding_seed=mx.array([99], mx.uint32)),
        "'rounding_seed' must be a 0-d uint32 array, got 99 (mlx.core.uint32, shape (1,))",
    ),
]


@pytest.mark.parametrize("with_parameters", [True, False], ids=["parameters", "no-parameters"])
@pytest.mark.parametrize(
    "name, change, message", BAD_8_BIT_FILES, ids=[b[0] for b in BAD_8_BIT_FILES]
)
def test_damaged_8_bit_state_is_refused_and_nothing_changes(
    name, change, message, with_parameters, tmp_path
):
    path, params = plain_8_bit_file(tmp_path / "plain.safetensors", change)
    target = RMSprop(**EIGHT_BIT)
    target.init(params)
    before = state_snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_state(target, path, params if with_parameters else None)
    after = state_snapshot(target)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_a_state_without_a_seed_gets_this_optimizers_seed(tmp_path):
    path, params = builtin_state_file(tmp_path / "builtin.safetensors")
    target = RMSprop(0.05, stochastic_rounding=True, rounding_seed=321)
    load_state(target, path, params)
    assert target.state["rounding_seed"].dtype == mx.uint32
    assert target.state["rounding_seed"].item() == 321
    # A state assigned directly (MLX's way) gets it at the next step.
    other = RMSprop(0.05, stochastic_rounding=True, rounding_seed=321)
    other.state = tree_unflatten(list(mx.load(str(path)).items()))
    other.apply_gradients({"w": mx.ones((4,))}, params)
    assert other.state["rounding_seed"].item() == 321
