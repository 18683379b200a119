"""Loading the native extension: it is used only when it matches this installation. One built
against another mlx (or from other sources) is rebuilt into the per-user cache where the tools
exist; otherwise ``fused="auto"`` falls back to the compiled path, saying why once (at warning
level, with the rebuild command, where a rebuild would have fixed it).

Most cases replace the extension with a stand-in module (whose update is the reference) and
break one property at a time, so the loader's checks are tested whether or not a C++ toolchain
built the real one here. Every test runs with its own empty cache directory."""

from __future__ import annotations

import fcntl
import importlib.util
import itertools
import logging
import platform
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop, paths, pipeline
from mlx_rmsprop.check import step_scalars
from mlx_rmsprop.paths import native
from mlx_rmsprop.paths.kernels.launch import accumulating_reference
from mlx_rmsprop.paths.native import build, cache
from mlx_rmsprop.paths.native.sources import source_digest
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import FLAGS, Scalar, UpdateOptions

import native_available
from locations import ROOT
from native_available import requires_native

EXTENSION = "mlx_rmsprop.paths.native._ext"


@pytest.fixture
def reprobe(monkeypatch, tmp_path):
    """Forget the loader's cached verdict before and after the test; an empty cache directory,
    with rebuilding switched off unless the test switches it on."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(cache.REBUILD_VARIABLE, "0")
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
    module.STATISTICS_LANES = pipeline.STATISTICS_LANES
    module.STATISTICS_BLOCK = pipeline.STATISTICS_BLOCK
    module.worker_threads = lambda: 2
    module.set_statistics_ops = lambda ops: setattr(module, "statistics_ops", ops)

    def update(
        scalars,
        gradient,
        parameter,
        state,
        flags,
        block_size=0,
        index=0,
        factors=None,
        accumulation_steps=0,
        loss_scale=0.0,
        accumulator=None,
        accumulation_gates=None,
    ):
        options = UpdateOptions(
            **{name: bool(flags & bit) for name, bit in module.FLAG_BITS.items()},
            block_size=block_size,
        )
        state = dict(zip(options.state_keys, state, strict=True))
        if accumulation_steps:
            new_parameter, new_state, new_accumulator = accumulating_reference(
                options,
                scalars,
                parameter,
                gradient,
                state,
                accumulator,
                accumulation_gates,
                loss_scale,
                accumulation_steps,
                index=index,
                factors=factors,
            )
            kept = [new_accumulator]
        else:
            new_parameter, new_state = rmsprop_reference(
                options, scalars, parameter, gradient, state, index=index, factors=factors
            )
            kept = []
        return [new_parameter, *(new_state[key] for key in options.state_keys), *kept]

    def gradient_statistics(gradients, accumulators, loss_scale, steps, scaled_norm):
        return module.statistics_ops(gradients + accumulators, loss_scale, steps, scaled_norm)

    module.update = update
    module.gradient_statistics = gradient_statistics
    return module


@pytest.fixture
def stand_in(monkeypatch, reprobe):
    module = _stand_in()
    monkeypatch.setitem(sys.modules, EXTENSION, module)
    monkeypatch.setattr(native, "_ext", module, raising=False)
    return module


def _assert_falls_back(reason_fragment: str, caplog, level: int = logging.DEBUG) -> None:
    """The compiled path is used, and the reason logged once at ``level``: DEBUG where a
    rebuild cannot help (not built at install), WARNING where it would have."""
    with caplog.at_level(logging.DEBUG, logger="mlx_rmsprop.paths.native"):
        with pytest.raises(RuntimeError, match=re.escape(reason_fragment)):
            native.load()
        with pytest.raises(RuntimeError, match=re.escape(reason_fragment)):
            native.load()
        assert native.status().startswith("not available: ")
        assert reason_fragment in native.status()
        path, update = paths.resolve("auto")
        assert path.name == "compiled"
        assert RMSprop(0.1).path == "compiled"
        with pytest.raises(RuntimeError, match="fused='native' cannot run on this machine: "):
            RMSprop(0.1, fused="native")
    logged = [record for record in caplog.records if record.name == "mlx_rmsprop.paths.native"]
    assert len(logged) == 1, "the reason is logged once"
    assert logged[0].levelno == level
    assert reason_fragment in logged[0].getMessage()
    assert f"to rebuild it: {build.rebuild_command()}" in logged[0].getMessage()


def test_a_matching_extension_is_used(stand_in):
    assert native.load() is native.update
    assert paths.resolve("auto")[0].name == "native"
    # The loader hands the module the MLX-ops statistics its transforms run on.
    assert stand_in.statistics_ops is native._statistics_ops
    expected = f"built at install and loaded (mlx {mx.__version__}; 2 threads from 65536 elements)"
    assert native.status() == expected


def test_extension_summing_statistics_in_another_order_is_refused(stand_in, caplog):
    stand_in.STATISTICS_LANES = pipeline.STATISTICS_LANES // 2
    _assert_falls_back("the native extension sums the statistics in another order", caplog)


def test_gpu_default_device_moves_auto_to_another_path(stand_in, monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with pytest.raises(RuntimeError, match=re.escape("the default device is Device(gpu, 0)")):
        native.load()
    assert paths.resolve("auto")[0].name == "compiled"
    # The extension itself is fine: only this device makes it step aside.
    assert native.status().startswith("built at install and loaded")


def test_missing_extension_falls_back(monkeypatch, reprobe, caplog, tmp_path):
    # As after an installation without a compiler: the sources are there, the module is not.
    monkeypatch.delitem(sys.modules, EXTENSION, raising=False)
    monkeypatch.delattr(native, "_ext", raising=False)
    monkeypatch.setattr(native, "__path__", [str(tmp_path)])
    _assert_falls_back("the native extension is not built", caplog)


def test_extension_that_cannot_load_falls_back(monkeypatch, reprobe, caplog, tmp_path):
    (tmp_path / "_ext.py").write_text("raise ImportError('undefined symbol: _ZN3mlx4core5array')")
    monkeypatch.delitem(sys.modules, EXTENSION, raising=False)
    monkeypatch.delattr(native, "_ext", raising=False)
    monkeypatch.setattr(native, "__path__", [str(tmp_path)])
    _assert_falls_back(
        "the native extension cannot be loaded (undefined symbol", caplog, logging.WARNING
    )


def test_extension_built_against_another_mlx_falls_back(stand_in, caplog):
    stand_in.MLX_VERSION = "0.0.1"
    _assert_falls_back(
        f"built against mlx 0.0.1 but mlx {mx.__version__} is installed (their C++ ABIs must "
        f"match); rebuilding it on first use is switched off ({cache.REBUILD_VARIABLE}=0)",
        caplog,
        logging.WARNING,
    )


def test_extension_from_older_sources_falls_back(stand_in, monkeypatch, caplog):
    monkeypatch.setattr(native, "source_digest", lambda: "0" * 16)
    _assert_falls_back("built from older sources", caplog, logging.WARNING)


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
    _assert_falls_back("does not run with this mlx", caplog, logging.WARNING)


def test_extension_with_wrong_results_falls_back(stand_in, caplog):
    correct = stand_in.update
    stand_in.update = lambda *args: [out + 1e-3 for out in correct(*args)]
    _assert_falls_back("probe update differs from the reference", caplog)


def test_extension_that_rounds_with_another_index_falls_back(stand_in, caplog):
    # The first probe has no storage flags; the second (8-bit state, stochastic rounding at
    # index 1) catches a module that drops the index.
    correct = stand_in.update
    stand_in.update = lambda *args: correct(*args[:6])
    _assert_falls_back("8-bit state and stochastic rounding, step 1, parameter", caplog)


def test_every_option_has_a_flag_bit(stand_in):
    # The wrapper maps each UpdateOptions field to the extension's bit by name.
    assert native._flags(UpdateOptions(decoupled_decay=True, ema=True)) == (
        stand_in.FLAG_BITS["decoupled_decay"] | stand_in.FLAG_BITS["ema"]
    )


@requires_native
def test_built_extension_is_the_cpu_default():
    extension = native._loaded()
    assert extension.MLX_VERSION == mx.__version__
    assert extension.SOURCE_DIGEST == source_digest()
    # A checkout whose C++ sources changed since its install runs a module rebuilt into the
    # cache; CI's fresh clone must run the one built at install.
    origin = "built at install" if native_available.REQUIRED else "(built at install|rebuilt .+)"
    assert re.match(f"{origin} and loaded \\(mlx {re.escape(mx.__version__)}; ", native.status())
    assert paths.AUTO_ORDER.index("native") < paths.AUTO_ORDER.index("compiled")
    assert RMSprop(0.1).path == "native"


def _setup_module():
    path = ROOT / "setup.py"
    spec = importlib.util.spec_from_file_location("mlx_rmsprop_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_native_build_leaves_an_installable_package(tmp_path, monkeypatch, capfd):
    from setuptools import Distribution, Extension

    setup_module = _setup_module()
    extension = Extension("mlx_rmsprop.paths.native._ext", sources=[])
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


# --- Rebuilding into the per-user cache (issue: an mlx upgrade silently lost the native path) --


def _build_tools_missing() -> str | None:
    try:
        build.check_compiler_and_headers()
        build.find_cmake()
        build.nanobind_cmake_dir()
    except build.MissingTool as error:
        return str(error)
    return None


BUILD_TOOLS_MISSING = _build_tools_missing()
# The test extra installs cmake and nanobind; CI has a compiler, so there a missing tool fails.
requires_build_tools = pytest.mark.skipif(
    BUILD_TOOLS_MISSING is not None and not native_available.REQUIRED,
    reason=f"cannot build the native module here: {BUILD_TOOLS_MISSING}",
)


def _expected_entry(tmp_path: Path) -> Path:
    key = f"{mx.__version__}-{source_digest()}-{sys.implementation.cache_tag}-{platform.machine()}"
    return tmp_path / "cache" / "mlx_rmsprop" / "native" / key


@pytest.mark.slow
@requires_build_tools
def test_an_extension_built_against_another_mlx_is_rebuilt_into_the_cache(
    stand_in, monkeypatch, tmp_path, caplog
):
    # As after `pip install mlx==<another version>`: the installed module's stamp differs.
    stand_in.MLX_VERSION = "0.0.1"
    monkeypatch.delenv(cache.REBUILD_VARIABLE)
    entry = _expected_entry(tmp_path)
    with caplog.at_level(logging.INFO, logger="mlx_rmsprop.paths.native"):
        assert native.load() is native.update
    notices = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in notices] == [
        f"mlx-rmsprop: the native extension was built against mlx 0.0.1 but mlx "
        f"{mx.__version__} is installed (their C++ ABIs must match); rebuilding it against "
        f"mlx {mx.__version__} into {entry} (once; about a minute)"
    ]
    rebuilt = native._loaded()
    assert rebuilt is not stand_in
    assert rebuilt.MLX_VERSION == mx.__version__ and rebuilt.SOURCE_DIGEST == source_digest()
    assert Path(rebuilt.__file__).parent == entry
    assert native.status().startswith(
        f"rebuilt into the cache at {entry} and loaded (mlx {mx.__version__}; "
    )
    assert paths.resolve("auto")[0].name == "native"
    assert RMSprop(0.1).path == "native"
    # Complete and alone: no temporary directory or build tree left beside it.
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(
        [entry.name, entry.name + ".lock"]
    )
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["build.log", cache.module_file(entry).name]
    )

    # The rebuilt module computes the reference's results bit for bit: several option sets,
    # dtypes, a size split across threads, special values, three steps with gates.
    rng = np.random.default_rng(7)
    option_sets = [
        UpdateOptions(),
        UpdateOptions(centered=True, momentum=True, nesterov=True, coupled_decay=True),
        UpdateOptions(momentum=True, eps_in_sqrt=True, lr_in_momentum=True, decoupled_decay=True),
        UpdateOptions(
            centered=True,
            maximize=True,
            bias_correction=True,
            scale_gradient=True,
            clip_value=True,
            gated=True,
            ema=True,
        ),
    ]
    for options, dtype, size in itertools.product(
        option_sets, (mx.float32, mx.float16, mx.bfloat16), (7, (1 << 17) + 3)
    ):
        values = rng.standard_normal(size).astype(np.float32)
        values[:3] = [np.nan, np.inf, 0.0]
        parameter = mx.array(values).astype(dtype)
        state = {key: mx.full((size,), 0.25, mx.float32) for key in options.state_keys}
        expected_parameter, expected_state = parameter, state
        for step in (1, 2, 3):
            scalars = step_scalars(step)
            gradient = mx.array(rng.standard_normal(size).astype(np.float32)).astype(dtype)
            parameter, state = native.update(options, scalars, parameter, gradient, state)
            expected_parameter, expected_state = rmsprop_reference(
                options, scalars, expected_parameter, gradient, expected_state
            )
            mx.eval(parameter, state, expected_parameter, expected_state)
            label = f"{options} {dtype} {size} step {step}"
            assert mx.array_equal(parameter, expected_parameter, equal_nan=True).item(), label
            for key in options.state_keys:
                assert mx.array_equal(state[key], expected_state[key], equal_nan=True).item(), (
                    f"{label} {key}"
                )

    # The next process takes the cached module without building anything.
    native._probe.cache_clear()
    native._flags.cache_clear()

    def no_build(*args, **kwargs):
        raise AssertionError("the cached module was built again")

    monkeypatch.setattr(build, "compile_extension", no_build)
    assert native.status().startswith(f"rebuilt into the cache at {entry} and loaded")


def test_without_a_compiler_it_warns_once_with_the_rebuild_command(
    stand_in, monkeypatch, tmp_path, caplog
):
    stand_in.MLX_VERSION = "0.0.1"
    monkeypatch.delenv(cache.REBUILD_VARIABLE)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++, clang++ (nor cmake) on PATH
    _assert_falls_back(
        f"built against mlx 0.0.1 but mlx {mx.__version__} is installed (their C++ ABIs must "
        "match); it cannot be rebuilt here: no C++ compiler (CXX is unset and none of c++, "
        "g++, clang++ is on PATH)",
        caplog,
        logging.WARNING,
    )
    assert not (tmp_path / "cache").exists(), "nothing is written when nothing can be built"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("nanobind", "nanobind is not installed (`pip install nanobind==3.1.0` provides it)"),
        ("cmake", "no cmake (neither the `cmake` Python package nor cmake on PATH; "),
    ],
)
def test_without_cmake_or_nanobind_it_warns_with_the_rebuild_command(
    stand_in, monkeypatch, tmp_path, caplog, missing, message
):
    stand_in.MLX_VERSION = "0.0.1"
    monkeypatch.delenv(cache.REBUILD_VARIABLE)
    monkeypatch.setattr(build, "check_compiler_and_headers", lambda: None)
    monkeypatch.setitem(sys.modules, missing, None)  # import fails
    if missing == "cmake":
        monkeypatch.setenv("PATH", str(tmp_path))
    _assert_falls_back(f"it cannot be rebuilt here: {message}", caplog, logging.WARNING)


def test_the_rebuild_command_reinstalls_from_this_checkout_with_the_build_requirements():
    root = ROOT
    python = shlex.quote(sys.executable)
    assert build.rebuild_command() == (
        f"{python} -m pip install 'setuptools>=77' wheel 'cmake>=3.18' nanobind==3.1.0 && "
        f"{python} -m pip install --no-build-isolation --no-deps --force-reinstall -e {shlex.quote(str(root))}"
    )
    # The isolated build's requirements (all but mlx, which is installed and must stay).
    pyproject = (root / "pyproject.toml").read_text()
    requires = pyproject[pyproject.index("requires = [") : pyproject.index("build-backend")]
    listed = re.findall(r'^    "([^"]+)",$', requires, re.MULTILINE)
    assert set(listed) - set(build.BUILD_REQUIREMENTS) == {
        "mlx>=0.32; sys_platform == 'darwin'",
        "mlx[cpu]>=0.32; sys_platform == 'linux'",
    }
    assert set(build.BUILD_REQUIREMENTS) <= set(listed)


def test_the_cache_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "mlx_rmsprop" / "native"
    # The XDG specification: a relative path is invalid and ignored.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache.cache_root() == Path.home() / ".cache" / "mlx_rmsprop" / "native"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == Path.home() / ".cache" / "mlx_rmsprop" / "native"


@pytest.fixture
def fake_tools(monkeypatch):
    """Build tools that are 'present', for tests that replace the compilation itself."""
    monkeypatch.setattr(build, "check_compiler_and_headers", lambda: None)
    monkeypatch.setattr(build, "find_cmake", lambda: "cmake")
    monkeypatch.setattr(build, "nanobind_cmake_dir", lambda: "nanobind")


def _ensure_built(entry: Path) -> None:
    cache.ensure_built(
        entry,
        mlx_version="9.9.9",
        mlx_package_dir=Path("mlx"),
        source_dir=Path("sources"),
        source_digest="0123456789abcdef",
        why="the test says so",
    )


def test_the_cache_entry_is_built_once_under_a_lock_and_appears_whole(
    monkeypatch, tmp_path, fake_tools
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = cache.entry("9.9.9", "0123456789abcdef")
    lock = entry.with_name(entry.name + ".lock")
    builds = []

    def compile_extension(source_dir, build_dir, output_dir, **kwargs):
        # While compiling: the lock is held (another process would wait for it) and the
        # entry does not exist yet (nobody can load a half-written module).
        with open(lock) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not entry.exists()
        assert output_dir.parent.parent == entry.parent
        assert kwargs["link_mlx_lib_dir"] and kwargs["mlx_version"] == "9.9.9"
        output_dir.mkdir(parents=True)
        (output_dir / "_ext.abi3.so").write_bytes(b"module")
        builds.append(output_dir)
        return output_dir / "_ext.abi3.so"

    monkeypatch.setattr(build, "compile_extension", compile_extension)
    _ensure_built(entry)
    _ensure_built(entry)  # present: not built again
    assert len(builds) == 1
    assert (entry / "_ext.abi3.so").read_bytes() == b"module"
    assert cache.module_file(entry) == entry / "_ext.abi3.so"
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, lock.name])
    with open(lock) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_a_failed_rebuild_keeps_its_log_and_is_not_retried(monkeypatch, tmp_path, fake_tools):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = cache.entry("9.9.9", "0123456789abcdef")
    failed_log = entry.with_name(entry.name + ".failed.log")
    attempts = []

    def compile_extension(source_dir, build_dir, output_dir, *, log, **kwargs):
        attempts.append(build_dir)
        log.write(b"error: no member named 'Primitive' in namespace 'mlx::core'\n")
        raise subprocess.CalledProcessError(2, ["cmake", "--build"])

    monkeypatch.setattr(build, "compile_extension", compile_extension)
    with pytest.raises(RuntimeError, match=re.escape(f"rebuilding it into {entry} failed (")):
        _ensure_built(entry)
    assert b"no member named 'Primitive'" in failed_log.read_bytes()
    assert not entry.exists()
    with pytest.raises(RuntimeError, match=re.escape(f"failed before (log: {failed_log}; ")):
        _ensure_built(entry)
    assert len(attempts) == 1
    failed_log.unlink()  # as the message says: deleting the log allows another try
    with pytest.raises(RuntimeError, match="failed \\("):
        _ensure_built(entry)
    assert len(attempts) == 2


def test_an_unwritable_cache_warns_instead_of_failing(stand_in, monkeypatch, tmp_path, caplog):
    stand_in.MLX_VERSION = "0.0.1"
    monkeypatch.delenv(cache.REBUILD_VARIABLE)
    monkeypatch.setattr(build, "check_compiler_and_headers", lambda: None)
    monkeypatch.setattr(build, "find_cmake", lambda: "cmake")
    monkeypatch.setattr(build, "nanobind_cmake_dir", lambda: "nanobind")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir below it fails
    entry = cache.entry(mx.__version__, source_digest())
    _assert_falls_back(f"it cannot be rebuilt into {entry} (", caplog, logging.WARNING)


def test_a_damaged_cache_entry_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = cache.entry("9.9.9", "0123456789abcdef")
    entry.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="holds 0 modules instead of one \\(delete it"):
        cache.module_file(entry)
