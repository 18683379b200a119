"""Checkpoints: exact resume in a fresh process, atomic writes under kill -9, and every way a
file can be wrong refused before anything changes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import CheckpointError, RMSprop, load_state, save_state
from mlx_rmsprop.backends import availability

HERE = Path(__file__).parent
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
    return {
        k: np.array(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.array(v)
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
