"""The machine and software a run measured, recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import mlx.core as mx
import numpy as np

from mlx_rmsprop import __version__

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


# Used when the OS does not report a last-level cache: larger than the last-level cache of
# most desktop and laptop CPUs (8-36 MiB), so a size below it is treated as possibly cached
# rather than credited with more than the memory bandwidth.
FALLBACK_CACHE_BYTES = 32 * 2**20


def _sysfs_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The largest data or unified cache of the highest level Linux lists for cpu0."""
    found: list[tuple[int, int]] = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return None
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(root, entry, "type")) as file:
                if file.read().strip() == "Instruction":
                    continue
            with open(os.path.join(root, entry, "level")) as file:
                level = int(file.read())
            with open(os.path.join(root, entry, "size")) as file:
                size = _parse_size(file.read().strip())
        except (OSError, ValueError):
            continue
        if size:
            found.append((level, size))
    return max(found)[1] if found else None


def _parse_size(text: str) -> int | None:
    """``32768K`` / ``8M`` / ``512`` as bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text) if text.isdigit() else None


def _sysctl_cache_bytes() -> int | None:
    """macOS: the L3 where there is one (Intel), else the performance cores' L2 (Apple
    silicon reports no L3 to sysctl)."""
    for key in ("hw.l3cachesize", "hw.perflevel0.l2cachesize", "hw.l2cachesize"):
        try:
            text = subprocess.run(
                ["sysctl", "-n", key], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def last_level_cache() -> dict:
    """``{"bytes": ..., "source": ...}``: the CPU's last-level cache as the OS reports it
    (Linux sysfs, macOS sysctl), or :data:`FALLBACK_CACHE_BYTES` with source ``"fallback"``."""
    size = _sysctl_cache_bytes() if sys.platform == "darwin" else _sysfs_cache_bytes()
    if size:
        return {"bytes": size, "source": "sysctl" if sys.platform == "darwin" else "sysfs"}
    return {"bytes": FALLBACK_CACHE_BYTES, "source": "fallback"}


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
        "last_level_cache": last_level_cache(),
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
