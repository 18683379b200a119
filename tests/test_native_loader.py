"""Loading the native extension: it is used only when it matches this installation, and
otherwise ``fused="auto"`` falls back to the compiled path, saying why once at debug level.

Most cases replace the extension with a stand-in module (whose update is the reference) and
break one property at a time, so the loader's checks are tested whether or not a C++ toolchain
built the real one here."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import types
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_rmsprop._native
from mlx_rmsprop import RMSprop, backends, native
from mlx_rmsprop._native import source_digest
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import FLAGS, Scalar, UpdateOptions

from native_available import requires_native

EXTENSION = "mlx_rmsprop._native._ext"


@pytest.fixture
def reprobe():
    """Forget the loader's cached verdict before and after the test."""
    native._probe.cache_clear()
    native._flags.cache_clear()
    yield
    native._probe.cache_clear()
    native._flags.cache_clear()


def _stand_in() -> types.ModuleType:
    module = types.ModuleType(EXTENSION)
    module.MLX_VERSION = mx.__version__
    module.SOURCE_DIGEST = source_digest()
    module.SCALAR_NAMES = tuple(Scalar.__members__)
    module.FLAG_BITS = {name: 1 << bit for bit, name in enumerate(FLAGS)}
    module.PARALLEL_THRESHOLD = 65536
    module.worker_threads = lambda: 2

    def update(scalars, gradient, parameter, state, flags):
        options = UpdateOptions(
            **{name: bool(flags & bit) for name, bit in module.FLAG_BITS.items()}
        )
        new_parameter, new_state = rmsprop_reference(
            options, scalars, parameter, gradient, dict(zip(options.state_keys, state, strict=True))
        )
        return [new_parameter, *(new_state[key] for key in options.state_keys)]

    module.update = update
    return module


@pytest.fixture
def stand_in(monkeypatch, reprobe):
    module = _stand_in()
    monkeypatch.setitem(sys.modules, EXTENSION, module)
    monkeypatch.setattr(mlx_rmsprop._native, "_ext", module, raising=False)
    return module


def _assert_falls_back(reason_fragment: str, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="mlx_rmsprop.native"):
        with pytest.raises(RuntimeError, match=re.escape(reason_fragment)):
            native.load()
        with pytest.raises(RuntimeError, match=re.escape(reason_fragment)):
            native.load()
        assert native.status().startswith("not available: ")
        assert reason_fragment in native.status()
        path, update = backends.resolve("auto")
        assert path.name == "compiled"
        assert RMSprop(0.1).path == "compiled"
        with pytest.raises(RuntimeError, match="fused='native' cannot run on this machine: "):
            RMSprop(0.1, fused="native")
    logged = [record for record in caplog.records if record.name == "mlx_rmsprop.native"]
    assert len(logged) == 1, "the reason is logged once"
    assert logged[0].levelno == logging.DEBUG
    assert reason_fragment in logged[0].getMessage()


def test_a_matching_extension_is_used(stand_in):
    assert native.load() is native.update
    assert backends.resolve("auto")[0].name == "native"
    expected = f"built and loaded (mlx {mx.__version__}; 2 threads from 65536 elements)"
    assert native.status() == expected


def test_gpu_default_device_moves_auto_to_another_path(stand_in, monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with pytest.raises(RuntimeError, match=re.escape("the default device is Device(gpu, 0)")):
        native.load()
    assert backends.resolve("auto")[0].name == "compiled"
    # The extension itself is fine: only this device makes it step aside.
    assert native.status().startswith("built and loaded")


def test_missing_extension_falls_back(monkeypatch, reprobe, caplog, tmp_path):
    # As after an installation without a compiler: the sources are there, the module is not.
    monkeypatch.delitem(sys.modules, EXTENSION, raising=False)
    monkeypatch.delattr(mlx_rmsprop._native, "_ext", raising=False)
    monkeypatch.setattr(mlx_rmsprop._native, "__path__", [str(tmp_path)])
    _assert_falls_back("the native extension is not built", caplog)


def test_extension_that_cannot_load_falls_back(monkeypatch, reprobe, caplog, tmp_path):
    (tmp_path / "_ext.py").write_text("raise ImportError('undefined symbol: _ZN3mlx4core5array')")
    monkeypatch.delitem(sys.modules, EXTENSION, raising=False)
    monkeypatch.delattr(mlx_rmsprop._native, "_ext", raising=False)
    monkeypatch.setattr(mlx_rmsprop._native, "__path__", [str(tmp_path)])
    _assert_falls_back("the native extension cannot be loaded (undefined symbol", caplog)


def test_extension_built_against_another_mlx_falls_back(stand_in, caplog):
    stand_in.MLX_VERSION = "0.0.1"
    _assert_falls_back(f"built against mlx 0.0.1 but mlx {mx.__version__} is installed", caplog)


def test_extension_from_older_sources_falls_back(stand_in, monkeypatch, caplog):
    monkeypatch.setattr(native, "source_digest", lambda: "0" * 16)
    _assert_falls_back("built from older sources", caplog)


def test_extension_with_another_scalar_layout_falls_back(stand_in, caplog):
    stand_in.SCALAR_NAMES = stand_in.SCALAR_NAMES[::-1]
    _assert_falls_back("another scalar layout", caplog)


def test_extension_without_an_option_falls_back(stand_in, caplog):
    del stand_in.FLAG_BITS["ema"]
    _assert_falls_back("another set of options", caplog)


def test_extension_that_cannot_take_mlx_arrays_falls_back(stand_in, caplog):
    def incompatible(*args):
        raise TypeError("update(): incompatible function arguments")

    stand_in.update = incompatible
    _assert_falls_back("does not run with this mlx", caplog)


def test_extension_with_wrong_results_falls_back(stand_in, caplog):
    correct = stand_in.update
    stand_in.update = lambda *args: [out + 1e-3 for out in correct(*args)]
    _assert_falls_back("probe update differs from the reference", caplog)


def test_every_option_has_a_flag_bit(stand_in):
    # The wrapper maps each UpdateOptions field to the extension's bit by name.
    assert native._flags(UpdateOptions(decoupled_decay=True, ema=True)) == (
        stand_in.FLAG_BITS["decoupled_decay"] | stand_in.FLAG_BITS["ema"]
    )


@requires_native
def test_built_extension_is_the_cpu_default():
    from mlx_rmsprop._native import _ext

    assert _ext.MLX_VERSION == mx.__version__
    assert _ext.SOURCE_DIGEST == source_digest()
    assert native.status().startswith(f"built and loaded (mlx {mx.__version__}; ")
    assert backends.AUTO_ORDER.index("native") < backends.AUTO_ORDER.index("compiled")
    assert RMSprop(0.1).path == "native"


def _setup_module():
    path = Path(__file__).resolve().parents[1] / "setup.py"
    spec = importlib.util.spec_from_file_location("mlx_rmsprop_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_native_build_leaves_an_installable_package(tmp_path, monkeypatch, capfd):
    from setuptools import Distribution, Extension

    setup_module = _setup_module()
    extension = Extension("mlx_rmsprop._native._ext", sources=[])
    distribution = Distribution({"name": "mlx-rmsprop", "ext_modules": [extension]})
    command = setup_module.OptionalNativeBuild(distribution)
    command.build_lib = str(tmp_path / "lib")
    command.build_temp = str(tmp_path / "temp")
    command.ensure_finalized()
    # No cmake, compiler or anything else on PATH: the build cannot run.
    monkeypatch.setenv("PATH", str(tmp_path))
    command.build_extensions()
    assert command.extensions == []
    assert command.get_outputs() == []
    assert "the native CPU update was not built" in capfd.readouterr().err
