"""``fused="auto"`` adopts a GPU kernel variant only after it proves itself on the device
(``mlx_rmsprop.paths.probe``). There is no GPU here, so the Metal launcher is replaced: by the Metal
emulation (the exact kernel text, compiled with g++ and run on the CPU) or by a stand-in
computing the reference with MLX ops, which also runs inside the optimizer's compiled step."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_rmsprop import RMSprop, check, paths
from mlx_rmsprop.paths import probe
from mlx_rmsprop.paths.kernels import metal, source
from mlx_rmsprop.paths.kernels.launch import KernelCall
from mlx_rmsprop.paths.kernels.source import Variant
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import UpdateOptions

from metal_emulation.harness import Emulator

BUILD_DIR = Path(tempfile.gettempdir()) / "mlx_rmsprop_emulation"
OPTIONS = UpdateOptions(centered=True, momentum=True)
LARGE = Variant(OPTIONS)
SMALL = Variant(OPTIONS, small=True)


@pytest.fixture
def fake_metal(monkeypatch):
    """Metal reported available, fresh probe verdicts; returns a setter for the launcher."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(probe, "_verdicts", {})
    monkeypatch.setattr(probe, "_warned", set())
    launches: list[Variant] = []

    def use(launch):
        def counted(call: KernelCall, verbose: bool = False) -> list[mx.array]:
            launches.append(call.variant)
            return launch(call)

        monkeypatch.setattr(metal, "launch", counted)
        return launches

    return use


def emulated(call: KernelCall) -> list[mx.array]:
    return Emulator([call.variant], BUILD_DIR).run(call)


def reference_launch(scale_small: float = 1.0, scale_large: float = 1.0):
    """A launcher made of MLX ops (traceable): the reference's outputs, the parameter scaled
    by ``scale_small`` / ``scale_large`` for the variant's size class."""

    def launch(call: KernelCall) -> list[mx.array]:
        options = call.variant.options
        parameter, gradient, *buffers, scalars = call.inputs
        state = dict(zip(options.state_keys, buffers, strict=True))
        new_parameter, new_state = rmsprop_reference(options, scalars, parameter, gradient, state)
        new_parameter = new_parameter * (scale_small if call.variant.small else scale_large)
        outputs = [new_parameter, *(new_state[key] for key in options.state_keys)]
        return [o.reshape(shape) for o, shape in zip(outputs, call.output_shapes, strict=True)]

    return launch


def inputs(shape: tuple[int, ...]) -> tuple[mx.array, mx.array, mx.array, dict[str, mx.array]]:
    rng = np.random.default_rng(1)
    parameter = mx.array(rng.normal(size=shape).astype(np.float32))
    gradient = mx.array(rng.normal(size=shape).astype(np.float32))
    state = {key: mx.full(shape, 0.5) for key in OPTIONS.state_keys}
    return probe.step_scalars(1), parameter, gradient, state


def assert_equal(a: tuple, b: tuple) -> None:
    assert mx.array_equal(a[0], b[0], equal_nan=True).item()
    assert all(mx.array_equal(a[1][k], b[1][k], equal_nan=True).item() for k in b[1])


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mlx_rmsprop.paths.probe"]


def test_a_correct_kernel_is_adopted(fake_metal, caplog):
    launches = fake_metal(emulated)
    path, update = paths.resolve("auto")
    assert path.name == "metal"
    scalars, parameter, gradient, state = inputs((33,))
    with caplog.at_level(logging.WARNING):
        result = update(OPTIONS, scalars, parameter, gradient, state)
        update(OPTIONS, scalars, parameter, gradient, state)
    assert_equal(result, rmsprop_reference(OPTIONS, scalars, parameter, gradient, state))
    # Probed once (STEPS launches on the probe input), then one launch per call.
    assert launches == [LARGE] * (probe.STEPS + 2)
    assert probe.kernel_verdicts() == {("metal", LARGE): None}
    assert warnings_of(caplog) == []


@pytest.fixture
def faulty_body(mutate_source):
    """The body with a planted fault: the parameter scaled once more before it is stored."""
    store = re.search(
        r"^ *new_parameter\[i\] = static_cast<P>\(stored\[0\]\);$", source.body_text(), re.M
    )
    assert store, "the body stores the parameter in a line of its own"
    mutate_source(store.group(), "stored[0] = stored[0] * 1.0001f;\n" + store.group())


def test_a_faulty_kernel_falls_back_once_with_a_warning(fake_metal, faulty_body, caplog):
    launches = fake_metal(emulated)
    path, update = paths.resolve("auto")
    assert path.name == "metal"
    scalars, parameter, gradient, state = inputs((33,))
    compiled = mx.compile(lambda *args: rmsprop_reference(OPTIONS, *args))
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            result = update(OPTIONS, scalars, parameter, gradient, state)
            assert_equal(result, compiled(scalars, parameter, gradient, state))
    # The probe's first step failed; the user's parameter never reached the kernel.
    assert launches == [LARGE]
    [warning] = warnings_of(caplog)
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "fused='auto': the metal kernel is not used for centered+momentum, " in message
    assert "parameter/gradient/state float32/float32/float32, >=8 elements" in message
    assert "its probe differs from the reference: step 1, parameter element (" in message


def test_explicit_metal_raises_instead(fake_metal, faulty_body):
    fake_metal(emulated)
    path, update = paths.resolve("metal")
    with pytest.raises(
        RuntimeError,
        match=r"fused='metal': the kernel for centered\+momentum, parameter/gradient/state "
        r"float32/float32/float32, >=8 elements cannot be used on this device: its probe "
        r"differs from the reference: step 1, parameter",
    ):
        update(OPTIONS, *inputs((33,)))


def test_a_launch_error_falls_back(fake_metal, caplog):
    def broken(call: KernelCall) -> list[mx.array]:
        raise RuntimeError("[metal::Device] Unable to build metal library from source")

    fake_metal(broken)
    update = paths.resolve("auto")[1]
    scalars, parameter, gradient, state = inputs((33,))
    with caplog.at_level(logging.WARNING):
        result = update(OPTIONS, scalars, parameter, gradient, state)
    assert_equal(result, rmsprop_reference(OPTIONS, scalars, parameter, gradient, state))
    [warning] = warnings_of(caplog)
    assert "it does not run: RuntimeError: [metal::Device] Unable to build" in warning.getMessage()
    with pytest.raises(RuntimeError, match="cannot be used on this device: it does not run"):
        paths.resolve("metal")[1](OPTIONS, scalars, parameter, gradient, state)


def test_each_variant_is_probed_on_its_own(fake_metal, caplog):
    # Wrong only below 8 elements (Metal's constant address space): the large variant runs
    # the kernel, the small one the reference.
    launches = fake_metal(reference_launch(scale_small=1.001))
    update = paths.resolve("auto")[1]
    with caplog.at_level(logging.WARNING):
        for shape in [(33,), (5,), (3, 11), (2, 3)]:
            scalars, parameter, gradient, state = inputs(shape)
            result = update(OPTIONS, scalars, parameter, gradient, state)
            assert_equal(result, rmsprop_reference(OPTIONS, scalars, parameter, gradient, state))
    verdicts = probe.kernel_verdicts()
    assert verdicts[("metal", LARGE)] is None and verdicts[("metal", SMALL)] is not None
    assert len(warnings_of(caplog)) == 1
    assert launches.count(LARGE) == probe.STEPS + 2 and launches.count(SMALL) == 1


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = mx.array(np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32))
        self.bias = mx.array([0.5, -0.25, 1.0], mx.float32)


@pytest.mark.parametrize("scale_small, adopted", [(1.0, True), (1.001, False)])
def test_probe_inside_the_optimizers_compiled_step(fake_metal, caplog, scale_small, adopted):
    # The kernel paths compile the whole step: the first use of each variant, and so its
    # probe, happens while mx.compile traces it.
    launches = fake_metal(reference_launch(scale_small=scale_small))
    models = {fused: Model() for fused in ("auto", "compiled")}
    optimizers = {
        fused: RMSprop(0.01, centered=True, momentum=0.9, fused=fused) for fused in models
    }
    assert optimizers["auto"].path == "metal"
    gradients = {"weight": mx.full((4, 9), 0.3), "bias": mx.array([1.0, float("nan"), -2.0])}
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            for fused, model in models.items():
                optimizers[fused].update(model, gradients)
                mx.eval(model.parameters(), optimizers[fused].state)
    for name in ("weight", "bias"):
        expected = getattr(models["compiled"], name)
        assert mx.array_equal(getattr(models["auto"], name), expected, equal_nan=True).item()
    verdicts = {variant.small: why for (_, variant), why in probe.kernel_verdicts().items()}
    assert verdicts[False] is None and (verdicts[True] is None) == adopted
    assert len(warnings_of(caplog)) == (0 if adopted else 1)
    # The weight (36 elements) ran the kernel after its probe; the bias (3) only if adopted.
    assert sum(not v.small for v in launches) > probe.STEPS
    assert (sum(v.small for v in launches) > probe.STEPS) == adopted


def test_check_reports_the_variants_auto_would_not_use(fake_metal, monkeypatch, capsys):
    fake_metal(reference_launch(scale_small=1.001))
    monkeypatch.setattr(check, "_gpu_plan", lambda quick: [LARGE, SMALL])
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(["--quick"])) == 1
    out = capsys.readouterr().out
    assert (
        "fused='auto' probes each metal kernel variant on first use: 1 of 2 adopted here, 1 " in out
    )
    assert (
        "First refused: centered+momentum, parameter/gradient/state float32/float32/float32, "
        "<8 elements: its probe differs from the reference: step 1, parameter element (0,)"
    ) in out


def test_check_and_the_probe_run_the_storage_variants_on_the_emulated_kernel(
    fake_metal, monkeypatch, capsys
):
    # `check` on a GPU (here the Metal emulation) runs the 8-bit state and stochastic rounding
    # rows of its plan like every other variant: codes, scales and rounded stores against the
    # reference, and `auto`'s probe adopts each (its probe input quantized the same way).
    storage = [
        variant
        for variant in check._gpu_plan(quick=True)
        if variant.options.quantized_state or variant.options.stochastic_rounding
    ]
    plan = storage[::13]
    assert {v.options.quantized_state for v in plan} == {True, False}
    assert any(v.options.stochastic_rounding for v in plan)
    assert any(v.options.quantized_state and not v.small_scales for v in plan)
    emulator = Emulator(plan, BUILD_DIR)
    fake_metal(emulator.run)
    # The emulation runs eagerly: check's runs are not traced by mx.compile here.
    eager = dataclasses.replace(paths.PATHS["metal"], compile_step=False)
    monkeypatch.setitem(paths.PATHS, "metal", eager)
    monkeypatch.setattr(check, "_gpu_plan", lambda quick: plan)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(["--quick"])) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"{len(plan)} of {len(plan)} adopted here" in out
    assert "err:v_scale" in out


def test_optimizer_with_8_bit_state_and_stochastic_rounding_on_the_emulated_kernel(
    fake_metal, monkeypatch
):
    # The optimizer's own steps on the Metal path (the emulated kernel, run eagerly): a mixed
    # tree (an 8-bit weight, a small bias with float state), bfloat16 parameters rounded
    # stochastically at each parameter's position; bit for bit the reference path's.
    launches = fake_metal(lambda call: Emulator([call.variant], BUILD_DIR).run(call))
    eager = dataclasses.replace(paths.PATHS["metal"], compile_step=False)
    monkeypatch.setitem(paths.PATHS, "metal", eager)
    config = dict(
        state_bits=8,
        state_block_size=32,
        min_quantized_size=64,
        stochastic_rounding=True,
        rounding_seed=7,
        centered=True,
        momentum=0.9,
    )
    rng = np.random.default_rng(11)
    params = {
        "w": mx.array(rng.standard_normal((6, 41)), mx.bfloat16),
        "b": mx.array(rng.standard_normal((5,)), mx.bfloat16),
    }
    grads = [
        {k: mx.array(rng.standard_normal(v.shape), mx.bfloat16) for k, v in params.items()}
        for _ in range(3)
    ]
    results = {}
    for fused in ("metal", False):
        optimizer = RMSprop(0.01, fused=fused, **config)
        current = dict(params)
        for g in grads:
            current = optimizer.apply_gradients(g, current)
        mx.eval(current, optimizer.state)
        results[fused] = (current, optimizer.state)
    assert results["metal"][1]["w"]["v"].dtype == mx.uint8  # the weight's state is 8-bit
    for name in ("w", "b"):
        actual, expected = results["metal"][0][name], results[False][0][name]
        assert mx.array_equal(actual, expected, equal_nan=True).item(), name
        for key, value in results[False][1][name].items():
            assert mx.array_equal(results["metal"][1][name][key], value, equal_nan=True).item()
    # Both parameters ran the kernel (after their probes), each its own variant.
    assert {v.options.quantized_state for v in launches} == {True, False}
    assert all(v.options.stochastic_rounding for v in launches)


@pytest.mark.parametrize("wide", [False, True], ids=["float32", "with-float64"])
def test_optimizer_clipping_by_each_norm_on_the_emulated_kernel(fake_metal, monkeypatch, wide):
    # Keras' clipnorm on the Metal path (the emulated kernel, run eagerly): several parameters
    # with norms below and above the bound, so that each row of the step's clip factors is
    # another; each kernel reads its parameter's row. Bit for bit the reference path's. With a
    # float64 parameter in the tree the factors are float64, which a float32 parameter's
    # kernel receives as float32 (the reference's rounding).
    launches = fake_metal(lambda call: Emulator([call.variant], BUILD_DIR).run(call))
    eager = dataclasses.replace(paths.PATHS["metal"], compile_step=False)
    monkeypatch.setitem(paths.PATHS, "metal", eager)
    rng = np.random.default_rng(5)
    shapes = {"a": (7, 9), "b": (33,), "c": (3,), "d": (2, 2)}
    params = {k: mx.array(rng.standard_normal(shape), mx.float32) for k, shape in shapes.items()}
    if wide:
        params["e"] = mx.array(rng.standard_normal((6,)), mx.float64)
    scales = {"a": 3.0, "b": 0.01, "c": 0.7, "d": 5.0, "e": 2.0}
    grads = [
        {k: mx.array(scales[k] * rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
        for _ in range(3)
    ]
    results = {}
    for fused in ("metal", False):
        optimizer = RMSprop.from_keras(learning_rate=0.01, clipnorm=1.0, momentum=0.5, fused=fused)
        current = dict(params)
        for g in grads:
            current = optimizer.apply_gradients(g, current)
        mx.eval(current, optimizer.state)
        results[fused] = (current, optimizer.state)
    for name in params:
        actual, expected = results["metal"][0][name], results[False][0][name]
        assert actual.dtype == expected.dtype
        assert mx.array_equal(actual, expected, equal_nan=True).item(), name
        for key, value in results[False][1][name].items():
            assert mx.array_equal(results["metal"][1][name][key], value, equal_nan=True).item()
    # Every float32 parameter ran the kernel that reads the factors (after its probe).
    assert launches and all(v.factors for v in launches)
    assert {v.small for v in launches} == {False, True}


def test_check_and_the_probe_run_the_factor_kernels_on_the_emulated_kernel(
    fake_metal, monkeypatch, capsys
):
    # `check --quick` holds the kernels reading per-parameter clip factors; on a GPU (here the
    # Metal emulation) they run against the reference with their factor matrix, and `auto`'s
    # probe adopts each.
    factor_kernels = [v for v in check._gpu_plan(quick=True) if v.factors]
    plan = factor_kernels[::9]
    assert {v.small_factors for v in plan} == {True, False}
    emulator = Emulator(plan, BUILD_DIR)
    launches = fake_metal(emulator.run)
    eager = dataclasses.replace(paths.PATHS["metal"], compile_step=False)
    monkeypatch.setitem(paths.PATHS, "metal", eager)
    monkeypatch.setattr(check, "_gpu_plan", lambda quick: plan)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(["--quick"])) == 0, capsys.readouterr().out
    assert f"{len(plan)} of {len(plan)} adopted here" in capsys.readouterr().out
    assert set(launches) == set(plan)
