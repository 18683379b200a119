"""Every example runs as-is in its fast mode; the data and plotting helpers they use."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from locations import ROOT

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import digits  # noqa: E402
import plotting  # noqa: E402

import optional  # noqa: E402


def run(*args: str, timeout: int = 900) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_train_mnist_fast(tmp_path):
    output = run("examples/train_mnist.py", "--fast", "--no-download", "--output", str(tmp_path))
    assert "data: embedded synthetic digits" in output
    result = json.loads((tmp_path / "train_mnist.json").read_text())
    assert result["test_accuracy"] > 0.5  # one epoch on 2000 images; chance is 0.1
    assert result["history"]["train loss"][0] < np.log(10)
    assert (tmp_path / "train_mnist_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tree_update_fast():
    output = run("examples/tree_update.py", "--fast")
    first = float(output.split("step    0  loss ")[1].split()[0])
    final = float(output.split("final loss ")[1].split()[0])
    assert final < 0.2 * first


def test_compiled_step_resumes_bit_for_bit():
    output = run("examples/compiled_step.py", "--fast")
    assert "resumed in a new process at step 20" in output
    assert "resumed run matches the uninterrupted one bit for bit: yes" in output


@pytest.mark.slow
def test_finetune_lora_fast():
    output = run("examples/finetune_lora.py", "--fast")
    line = output.split("held-out weather loss: ")[1]
    before, after = float(line.split()[0]), float(line.split(", ")[1].split()[0])
    assert after < before
    assert "optimizer state dtype mlx.core.float32; adapters mlx.core.bfloat16" in output


def test_finetune_mlx_lm_fast():
    optional.module("mlx_lm")
    output = run("examples/finetune_mlx_lm.py", "--fast")
    line = output.split("validation loss: ")[1]
    before, after = float(line.split()[0]), float(line.split(", ")[1].split()[0])
    assert after < 0.8 * before
    assert "model: llama, 2 layers" in output
    assert "optimizer state (step 40)" in output


def test_data_parallel_two_local_ranks():
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.fail(f"mlx.launch is not installed next to {sys.executable}")
    # mlx.launch exits 0 even when a rank fails: judge by what every rank printed.
    result = subprocess.run(
        [
            str(launcher),
            "-n",
            "2",
            "--backend",
            "ring",
            "--",
            sys.executable,
            "examples/data_parallel.py",
            "--fast",
        ],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert "2 rank(s)" in output, output
    assert "rank 0: parameters identical on every rank: yes" in output, output
    assert "rank 1: parameters identical on every rank: yes" in output, output
    assert "rank 0: equals the single-process run on the same global batches: yes" in output, output


def test_quickstart():
    output = run("examples/quickstart.py", "--steps", "100")
    losses = [float(line.split("loss ")[1]) for line in output.splitlines() if "loss" in line]
    assert losses[-1] < 0.5 * losses[0]


def idx_bytes(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def test_idx_parser():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(digits.parse_idx(idx_bytes(images)), images)
    with pytest.raises(ValueError, match="truncated"):
        digits.parse_idx(idx_bytes(images)[:-1])
    with pytest.raises(ValueError, match="bad magic"):
        digits.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not unsigned bytes"):
        digits.parse_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\x00" * 4)


def test_mnist_cache_is_checked_and_parsed(tmp_path, monkeypatch):
    labels = np.array([3, 1, 4], np.uint8)
    images = np.zeros((3, 28, 28), np.uint8)
    files = {
        "train-images-idx3-ubyte.gz": images,
        "train-labels-idx1-ubyte.gz": labels,
        "t10k-images-idx3-ubyte.gz": images,
        "t10k-labels-idx1-ubyte.gz": labels,
    }
    checksums = {}
    for name, array in files.items():
        (tmp_path / name).write_bytes(gzip.compress(idx_bytes(array)))
        checksums[name] = digits.md5(tmp_path / name)
    monkeypatch.setattr(digits, "MNIST_FILES", checksums)
    arrays = digits.fetch_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(arrays["train-labels-idx1-ubyte.gz"], labels)
    # A damaged cached file is dropped, and without a download there is no MNIST.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    assert digits.fetch_mnist(tmp_path, download=False) is None
    assert not (tmp_path / "t10k-labels-idx1-ubyte.gz").exists()


def test_synthetic_digits_are_deterministic_and_balanced():
    x, y = digits.synthetic_digits(500, seed=3)
    x2, y2 = digits.synthetic_digits(500, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert x.shape == (500, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))
    means = np.stack([x[y == d].mean(0) for d in range(10)])
    assert np.linalg.matrix_rank(means) == 10  # ten different shapes, not one blob


def test_plain_png_writer(tmp_path):
    image = plotting.draw_lines({"a": [3.0, 2.0, 1.0], "b": [1.0, 1.5, 1.2]}, width=64, height=48)
    plotting.write_png(tmp_path / "chart.png", image)
    data = (tmp_path / "chart.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (64, 48)
    raw = zlib.decompress(data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8])
    assert len(raw) == 48 * (1 + 64 * 3)
    pixels = np.frombuffer(raw, np.uint8).reshape(48, 1 + 64 * 3)[:, 1:].reshape(48, 64, 3)
    assert {tuple(c) for c in pixels.reshape(-1, 3)} >= {plotting.COLOURS[0], plotting.COLOURS[1]}
