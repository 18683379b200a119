"""The kernel body and the native path's sources ship inside the wheel: build it, install it
into a fresh virtual environment and read the kernel source from the installed package, not
from this checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import mlx
import mlx.core as mx
import pytest

from mlx_rmsprop import RMSprop
from mlx_rmsprop.paths.native.sources import SOURCE_FILES

from locations import ROOT

BODY = "mlx_rmsprop/metal/rmsprop_update.inc"

# Run by the fresh environment's interpreter, isolated (-I) and outside the checkout.
PROBE = """
import json, sys
from importlib import resources
import mlx.core as mx
import mlx_rmsprop
from mlx_rmsprop import RMSprop
body = resources.files("mlx_rmsprop.metal").joinpath("rmsprop_update.inc")
json.dump({
    "package": mlx_rmsprop.__file__,
    "body": str(body),
    "source": RMSprop.from_torch(momentum=0.9).kernel_source(mx.bfloat16),
}, sys.stdout)
"""


@pytest.mark.slow
def test_wheel_installs_the_kernel_body(tmp_path):
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = dist.glob("mlx_rmsprop-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert BODY in names
        assert archive.read(BODY).decode() == (ROOT / "metal" / "rmsprop_update.inc").read_text()
        assert "mlx_rmsprop/paths/kernels/source.py" in names
        # The native path's loader and every source its digest covers, beside each other.
        assert "mlx_rmsprop/paths/native/__init__.py" in names
        for name in SOURCE_FILES:
            assert f"mlx_rmsprop/paths/native/{name}" in names
        license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert archive.read(license_file).decode() == (ROOT / "LICENSE").read_text()

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    # This environment's pip installs into the fresh one (faster than bootstrapping its own).
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    install += ["--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    # The fresh environment has no MLX: lend it this environment's mlx and numpy by appending
    # their directory to its path (after its own site-packages, so the installed mlx_rmsprop
    # comes first; .pth files there are not run, so this checkout's editable install is not).
    (site,) = environment.glob("lib/python*/site-packages")
    (site / "borrowed_mlx.pth").write_text(str(Path(mlx.__path__[0]).parent) + "\n")
    probe = subprocess.run(
        [str(python), "-I", "-c", PROBE], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["body"]).is_relative_to(site) and Path(found["body"]).is_file()
    expected = RMSprop.from_torch(momentum=0.9).kernel_source(mx.bfloat16)
    assert found["source"] == expected
