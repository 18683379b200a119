"""The machine and software a run measured, recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import mlx.core as mx
import numpy as np

from .._version import __version__
from . import peers
from .implementations import NOT_INSTALLED


def cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes timings noisy."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def machine() -> dict:
    try:
        device_info = {key: str(value) for key, value in mx.device_info().items()}
    except Exception:  # older MLX, or a backend that reports nothing
        device_info = {}
    return {
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "load_average": load_average(),
        "mlx_device": str(mx.default_device()),
        "gpu": on_gpu(),
        "device_info": device_info,
    }


def versions() -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "mlx_rmsprop": __version__,
    }
    found.update(peers.versions())
    try:
        found["matplotlib"] = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        found["matplotlib"] = NOT_INSTALLED
    return found
