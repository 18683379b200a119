"""Loss curves as a PNG: with matplotlib when it is installed (``pip install -e '.[examples]'``),
otherwise a plain chart drawn here (axes and coloured lines, no text: the caller prints the
legend), so the examples need nothing beyond numpy."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def save_curves(
    path: Path, curves: dict[str, list[float]], title: str, xlabel: str, ylabel: str
) -> str:
    """Write the chart; return how it was drawn, for the caller to print."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, draw_lines(curves))
        legend = ", ".join(
            f"{name}: rgb{COLOURS[i % len(COLOURS)]}" for i, name in enumerate(curves)
        )
        return f"plain chart (matplotlib not installed); {legend}"
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in curves.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", label=name)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return "matplotlib"


def draw_lines(curves: dict[str, list[float]], width: int = 480, height: int = 320) -> np.ndarray:
    """An RGB image: white background, grey axes, one coloured polyline per curve."""
    image = np.full((height, width, 3), 255, np.uint8)
    margin = 30
    image[height - margin, margin : width - margin + 1] = 90
    image[margin : height - margin + 1, margin] = 90
    values = np.concatenate([np.asarray(v, float) for v in curves.values() if len(v)])
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0
    for index, series in enumerate(curves.values()):
        series = np.asarray(series, float)
        if len(series) == 0:
            continue
        xs = margin + np.linspace(0, width - 2 * margin, max(len(series), 2))[: len(series)]
        ys = height - margin - (series - low) / span * (height - 2 * margin)
        colour = COLOURS[index % len(COLOURS)]
        for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
            steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0, 1, steps + 1):
                x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = colour
    return image


def write_png(path: Path, image: np.ndarray) -> None:
    """A minimal PNG writer: 8-bit RGB, one zlib-compressed IDAT."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
