"""Handwritten-digit data for the examples: real MNIST when it can be had, otherwise an
embedded synthetic set that needs no download.

MNIST: the four IDX files are looked for in the cache directory (``$MLX_RMSPROP_DATA`` or
``~/.cache/mlx_rmsprop/mnist``), downloaded once from a public mirror when missing, checked
against their published MD5 sums, and parsed. The synthetic set draws each digit as pen strokes
(a skeleton per class), with a random affine transform, stroke width, wobble and noise,
rasterised at 28x28 like MNIST: deterministic for a seed, made in a few seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# The published MD5 sums of the four gzipped IDX files.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


@dataclass
class Digits:
    name: str
    train: tuple[np.ndarray, np.ndarray]  # images (n, 784) float32 in [0, 1], labels (n,) int
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def cache_directory() -> Path:
    return Path(
        os.environ.get("MLX_RMSPROP_DATA", Path.home() / ".cache" / "mlx_rmsprop" / "mnist")
    )


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_idx(data: bytes) -> np.ndarray:
    """An IDX file (MNIST's format): magic (0, 0, type 0x08 = uint8, ndim), big-endian sizes,
    then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"IDX element type 0x{data[2]:02x} is not unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"IDX file holds {values.size} values for shape {shape}: truncated")
    return values.reshape(shape)


def fetch_mnist(directory: Path, download: bool = True, timeout: float = 20.0) -> dict | None:
    """The four MNIST arrays, or None when they are neither cached nor downloadable."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, checksum in MNIST_FILES.items():
        path = directory / name
        if path.exists() and md5(path) != checksum:
            path.unlink()  # a damaged or partial file: fetch it again
        if not path.exists():
            if not download or not _download(name, path, checksum, timeout):
                return None
        arrays[name] = parse_idx(gzip.decompress(path.read_bytes()))
    return arrays


def _download(name: str, path: Path, checksum: str, timeout: float) -> bool:
    for mirror in MNIST_MIRRORS:
        partial = path.with_suffix(".part")
        try:
            with urllib.request.urlopen(mirror + name, timeout=timeout) as response:
                partial.write_bytes(response.read())
        except OSError:
            continue
        if md5(partial) == checksum:
            partial.replace(path)
            return True
        partial.unlink()
    return False


def mnist(download: bool = True) -> Digits | None:
    arrays = fetch_mnist(cache_directory(), download)
    if arrays is None:
        return None
    images = arrays["train-images-idx3-ubyte.gz"].reshape(-1, 784).astype(np.float32) / 255
    labels = arrays["train-labels-idx1-ubyte.gz"].astype(np.int64)
    test = (
        arrays["t10k-images-idx3-ubyte.gz"].reshape(-1, 784).astype(np.float32) / 255,
        arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64),
    )
    # Keras' validation_split=0.1 takes the last 10% of the training set.
    return Digits("MNIST", (images[:54000], labels[:54000]), (images[54000:], labels[54000:]), test)


# Pen strokes of each digit in a unit box (x right, y down), as polylines. Curves are sampled
# arcs: (cx, cy, rx, ry, start degrees, end degrees).
def _arc(cx, cy, rx, ry, start, end, points=14):
    t = np.radians(np.linspace(start, end, points))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


SKELETONS = {
    0: [_arc(0.5, 0.5, 0.28, 0.4, 0, 360, 24)],
    1: [np.array([[0.38, 0.25], [0.55, 0.1], [0.55, 0.9]])],
    2: [np.concatenate([_arc(0.5, 0.32, 0.25, 0.22, 200, 380), [[0.25, 0.9], [0.78, 0.9]]])],
    3: [_arc(0.48, 0.3, 0.25, 0.2, 210, 450), _arc(0.48, 0.7, 0.27, 0.2, 270, 510)],
    4: [np.array([[0.6, 0.1], [0.2, 0.65], [0.82, 0.65]]), np.array([[0.62, 0.35], [0.62, 0.92]])],
    5: [
        np.concatenate(
            [[[0.75, 0.1], [0.32, 0.1], [0.28, 0.45]], _arc(0.48, 0.65, 0.27, 0.25, 220, 480)]
        )
    ],
    6: [np.concatenate([[[0.68, 0.1]], _arc(0.5, 0.68, 0.24, 0.22, 200, 560)])],
    7: [np.array([[0.22, 0.12], [0.8, 0.12], [0.42, 0.92]])],
    8: [_arc(0.5, 0.3, 0.21, 0.19, 0, 360, 20), _arc(0.5, 0.7, 0.26, 0.21, 0, 360, 20)],
    9: [np.concatenate([_arc(0.5, 0.33, 0.24, 0.22, 20, 380), [[0.73, 0.9]]])],
}


def _segments(label: int) -> np.ndarray:
    return np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in SKELETONS[label]])


def synthetic_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 28x28 images (flattened, float32 in [0, 1]) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = np.zeros((count, 784), np.float32)
    for label in range(10):
        chosen = np.flatnonzero(labels == label)
        # Blocks of 256 keep the pixel x segment distance table near 50 MB.
        for start in range(0, len(chosen), 256):
            block = chosen[start : start + 256]
            images[block] = _draw(_segments(label), len(block), rng)
    images += rng.normal(0, 0.04, images.shape).astype(np.float32)
    return np.clip(images, 0, 1), labels.astype(np.int64)


# Each pen position inks the 5x5 pixels around it.
WINDOW = np.stack(np.meshgrid(np.arange(-2, 3), np.arange(-2, 3)), axis=-1).reshape(-1, 2)
PEN_STEPS = np.linspace(0.0, 1.0, 5, dtype=np.float32)[:-1]  # positions along each segment


def _draw(segments: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random renderings of one skeleton: wobble every end point, map by a random
    rotation, shear, scale and shift into the 28x28 frame, then move a pen along the strokes
    and ink every pixel within its (random) half-width."""
    points = segments[None] + rng.normal(0, 0.035, (n, *segments.shape))
    angle = rng.uniform(-0.3, 0.3, n)
    shear = rng.uniform(-0.35, 0.35, n)
    scale = rng.uniform(15.0, 21.0, n)[:, None] * np.stack(
        [rng.uniform(0.75, 1.1, n), np.ones(n)], 1
    )
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.stack(
        [np.stack([cos, -sin + shear * cos], 1), np.stack([sin, cos + shear * sin], 1)], 1
    )
    matrix = matrix * scale[:, None, :]
    mapped = (
        np.einsum("nij,nsej->nsei", matrix, points - 0.5) + 14 + rng.uniform(-2, 2, (n, 1, 1, 2))
    )
    a, b = mapped[:, :, 0], mapped[:, :, 1]  # (n, segments, 2)
    pen = (a[:, :, None] + PEN_STEPS[None, None, :, None] * (b - a)[:, :, None]).reshape(n, -1, 2)
    pixels = np.floor(pen)[:, :, None, :] + WINDOW[None, None]  # (n, pen positions, 25, 2)
    distance = np.linalg.norm(pixels + 0.5 - pen[:, :, None, :], axis=-1)
    half_width = rng.uniform(0.6, 1.4, (n, 1, 1))
    ink = np.clip(0.5 + half_width - distance, 0, 1) * rng.uniform(0.7, 1.0, (n, 1, 1))
    inside = ((pixels >= 0) & (pixels < 28)).all(-1) & (ink > 0)
    image_index = np.broadcast_to(np.arange(n)[:, None, None], inside.shape)[inside]
    pixel_index = (pixels[..., 1] * 28 + pixels[..., 0]).astype(np.int64)[inside]
    canvas = np.zeros((n, 784), np.float32)
    np.maximum.at(canvas, (image_index, pixel_index), ink[inside].astype(np.float32))
    return canvas


def synthetic(
    train: int = 12000, validation: int = 2000, test: int = 2000, seed: int = 0
) -> Digits:
    x, y = synthetic_digits(train + validation + test, seed)
    cut1, cut2 = train, train + validation
    return Digits(
        "embedded synthetic digits",
        (x[:cut1], y[:cut1]),
        (x[cut1:cut2], y[cut1:cut2]),
        (x[cut2:], y[cut2:]),
    )
