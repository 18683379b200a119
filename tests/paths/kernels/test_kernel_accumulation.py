"""Keras' gradient accumulation inside the kernel (the accumulating kernels): the Metal kernel
and its CUDA twin run on the CPU (tests/support/metal_emulation), bit for bit against the
reference path (``fused=False``), and the step on the kernel path runs no accumulation of its
own before the kernel."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_kernel_source import capture, graph_nodes

from mlx_rmsprop import RMSprop, check, paths
from mlx_rmsprop.check import STEPS, shapes_for, verification_inputs
from mlx_rmsprop.paths import probe
from mlx_rmsprop.paths.kernels import metal
from mlx_rmsprop.paths.kernels.launch import (
    Accumulation,
    KernelCall,
    make_accumulating_update,
    make_update,
    plan,
)
from mlx_rmsprop.paths.kernels.variants import accumulating_variants, verification_plan
from mlx_rmsprop.paths.probe import (
    accumulation_constants,
    reference_update,
    step_scalars,
    update_arguments,
)
from mlx_rmsprop.spec import ACCUMULATOR

from metal_emulation.harness import Emulator

BUILD_DIR = Path(tempfile.gettempdir()) / "mlx_rmsprop_emulation"
BACKENDS = ("metal", "cuda")


def assert_same(actual: mx.array, expected: mx.array, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert mx.array_equal(actual, expected, equal_nan=True).item(), what


def run_variant(emulator: Emulator, variant, shape, seed: int) -> None:
    """STEPS steps of the emulated accumulating kernel on check's inputs (an accumulating call,
    a skipped one, the end of a cycle), each compared bit for bit with the reference
    (``accumulating_reference``), every output: parameter, state and the accumulator."""
    parameter, gradient, state = verification_inputs(variant, shape, seed, len(shape) >= 2)
    reference = reference_update(variant)
    loss_scale, steps = accumulation_constants(variant)
    for step in range(1, STEPS + 1):
        arguments = update_arguments(variant, step)
        gates = arguments.pop("gates")
        scalars = step_scalars(step)
        buffers = {key: state[key] for key in variant.options.state_keys}
        accumulation = Accumulation(state[ACCUMULATOR], gates, loss_scale, steps)
        call = plan(
            variant.options,
            scalars,
            parameter,
            gradient,
            buffers,
            **arguments,
            accumulation=accumulation,
        )
        assert call is not None and call.variant == variant, (call and call.variant, variant)
        new_parameter, new_state = call.unpack(emulator.run(call, order=seed % 2))
        expected = reference(
            variant.options, scalars, parameter, gradient, state, gates=gates, **arguments
        )
        what = f"{variant} shape={shape} step={step}"
        assert_same(new_parameter, expected[0], f"{what}: parameter")
        assert new_state.keys() == expected[1].keys()
        for key, value in expected[1].items():
            assert_same(new_state[key], value, f"{what}: {key}")
        parameter, state = new_parameter, new_state


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulating_storage_variants_at_every_shape(backend):
    # The plan's accumulating kernels with 8-bit state or stochastic rounding at every shape of
    # their size classes (the test below takes two): bit for bit, the accumulator included.
    variants = [
        v
        for v in accumulating_variants()
        if v.options.quantized_state or v.options.stochastic_rounding
    ]
    assert variants
    emulator = Emulator(variants, BUILD_DIR, backend=backend)
    for k, variant in enumerate(variants):
        for j, shape in enumerate(shapes_for(variant)):
            run_variant(emulator, variant, shape, seed=k + j)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulating_kernels_every_layout(backend):
    # The plan's accumulating kernels (every buffer layout, with and without stochastic
    # rounding, both size classes; accumulator dtype, dtypes, 8-bit blocks and clip factors
    # taking turns) on two shapes of their size classes: an accumulating call, a skipped one
    # and the end of a cycle, bit for bit the reference's, the accumulator included.
    variants = [v for v in verification_plan() if v.accumulates]
    assert variants == accumulating_variants()
    assert {v.accumulator_dtype for v in variants} == {mx.float32, mx.float16, mx.bfloat16}
    assert {v.small for v in variants} == {False, True} and any(v.factors for v in variants)
    assert any(v.options.quantized_state for v in variants)
    emulator = Emulator(variants, BUILD_DIR, backend=backend)
    for k, variant in enumerate(variants):
        for j, shape in enumerate(shapes_for(variant)[:2]):
            run_variant(emulator, variant, shape, seed=k + j)


@pytest.fixture
def emulated_metal(monkeypatch):
    """The Metal path with the emulated kernel, run eagerly (the emulation cannot be traced);
    returns the variants launched."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(probe, "_verdicts", {})
    monkeypatch.setattr(probe, "_warned", set())
    launches = []

    def launch(call: KernelCall, verbose: bool = False) -> list[mx.array]:
        launches.append(call.variant)
        return Emulator([call.variant], BUILD_DIR).run(call)

    monkeypatch.setattr(metal, "launch", launch)
    eager = dataclasses.replace(paths.PATHS["metal"], compile_step=False)
    monkeypatch.setitem(paths.PATHS, "metal", eager)
    return launches


CONFIGURATIONS = {
    # Accumulation alone: no statistics, so the step computes nothing before the kernel.
    "plain": dict(gradient_accumulation_steps=3, momentum=0.5),
    # With a loss scale, per-parameter clipping (the statistics read the accumulated mean) and
    # non-finite calls skipped (the accumulator keeps its value on such a call).
    "keras": dict(
        gradient_accumulation_steps=3,
        loss_scale_factor=8.0,
        clipnorm=0.5,
        skip_nonfinite=True,
        use_ema=True,
    ),
    # Narrow parameters and state, a global clip, 8-bit state and stochastic rounding.
    "narrow": dict(
        gradient_accumulation_steps=2,
        global_clipnorm=1.0,
        skip_nonfinite=True,
        state_bits=8,
        state_block_size=32,
        min_quantized_size=64,
        stochastic_rounding=True,
        rounding_seed=3,
        state_dtype=mx.float16,
    ),
}
DTYPES = {"plain": mx.float32, "keras": mx.float16, "narrow": mx.bfloat16}


def keras_runs(configuration: str, fused_choices: tuple = ("metal", False)) -> dict:
    """7 calls of ``RMSprop.from_keras`` (call 4 has a NaN gradient) on the Metal path and on
    the reference path (``fused=False``): their parameters and states."""
    calls = 7
    dtype = DTYPES[configuration]
    rng = np.random.default_rng(17)
    params = {
        "w": mx.array(rng.standard_normal((5, 31)), dtype),
        "b": mx.array(rng.standard_normal((3,)), dtype),
        "c": mx.array(rng.standard_normal((130,)), mx.float32),
    }
    grads = [
        {k: mx.array(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
        for _ in range(calls)
    ]
    grads[3]["b"] = mx.array([1.0, float("nan"), 2.0], dtype)
    results = {}
    for fused in fused_choices:
        optimizer = RMSprop.from_keras(
            learning_rate=0.01, fused=fused, **CONFIGURATIONS[configuration]
        )
        current = dict(params)
        for g in grads:
            current = optimizer.apply_gradients(g, current)
        mx.eval(current, optimizer.state)
        results[fused] = (current, optimizer.state)
    return results


def assert_runs_equal(results: dict) -> None:
    (actual, actual_state), (expected, expected_state) = results["metal"], results[False]
    for name in expected:
        assert_same(actual[name], expected[name], f"{name}: parameter")
        assert actual_state[name].keys() == expected_state[name].keys()
        for key, value in expected_state[name].items():
            assert_same(actual_state[name][key], value, f"{name}: {key}")
    for key in ("step", "skipped_steps"):
        if key in expected_state:
            assert actual_state[key].item() == expected_state[key].item(), key


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
def test_keras_accumulation_on_the_emulated_kernel(emulated_metal, monkeypatch, configuration):
    # Several cycles, one call skipped for its NaN (where configured), every parameter through
    # the accumulating kernel (after its probe): bit for bit the reference path's parameters,
    # state buffers, accumulators and counters.
    results = keras_runs(configuration)
    assert_runs_equal(results)
    assert emulated_metal and all(v.accumulates for v in emulated_metal)
    state = results["metal"][1]
    accumulators = {s[ACCUMULATOR].dtype for s in state.values() if isinstance(s, dict)}
    assert {v.accumulator_dtype for v in emulated_metal} == accumulators
    if configuration == "keras":
        assert state["skipped_steps"].item() == 1
        assert any(v.factors for v in emulated_metal)


KEEPS_THE_SUM = ("(accumulation_applies ? 0.0f : summed)", "summed")


def test_a_kernel_that_keeps_the_accumulator_wrong_fails(mutate_source):
    # The parity checks are worth something only if a kernel that does not empty its
    # accumulator at the end of a cycle fails them: the emulated kernel against the
    # reference, and the optimizer's probe, which refuses the kernel (fused="metal" raises).
    mutate_source(*KEEPS_THE_SUM)
    variant = accumulating_variants()[0]
    with tempfile.TemporaryDirectory() as directory:
        mutant = Emulator([variant], Path(directory))
        with pytest.raises(AssertionError, match=f"step=3: {ACCUMULATOR}"):
            run_variant(mutant, variant, shapes_for(variant)[0], seed=0)


def test_the_probe_refuses_a_kernel_that_keeps_the_accumulator_wrong(emulated_metal, mutate_source):
    mutate_source(*KEEPS_THE_SUM)
    with pytest.raises(RuntimeError, match=f"its probe differs .* {ACCUMULATOR}"):
        keras_runs("plain")


def test_the_step_accumulates_nothing_before_the_kernel(emulated_metal, monkeypatch):
    # On the kernel path the kernel is the accumulation: no MLX-ops sum, mean or carried
    # accumulator per tensor before it (with nothing to clip or skip, the statistics need
    # none either), one accumulating kernel launch per parameter and call.
    from mlx_rmsprop import step

    def refused(*args, **kwargs):
        raise AssertionError("the step accumulated with MLX ops on the kernel path")

    with monkeypatch.context() as patched:
        for name in ("accumulate", "accumulate_tensor", "carry_accumulators", "carry_tensor"):
            patched.setattr(step, name, refused)
        kernel = keras_runs("plain", fused_choices=("metal",))
    # What the refused functions would have computed, on the reference path.
    results = {**kernel, **keras_runs("plain", fused_choices=(False,))}
    assert_runs_equal(results)
    probes = probe.STEPS * len(set(emulated_metal))
    assert len(emulated_metal) - probes == 3 * 7  # 3 parameters, 7 calls


def test_keras_accumulation_runs_one_accumulating_kernel_per_parameter_inside_mx_compile(
    capfd, monkeypatch
):
    # The optimizer's step on the Metal path, compiled whole (nothing runs: MLX prints the
    # sources it generates while tracing for export): each parameter's kernel is the
    # accumulating one, the source RMSprop.kernel_source reports, and MLX's own text of it.
    verbose = make_accumulating_update(partial(metal.launch, verbose=True))
    metal_path = dataclasses.replace(
        paths.PATHS["metal"],
        load=lambda: make_update(metal.launch),
        load_accumulating=lambda: verbose,
    )
    monkeypatch.setitem(paths.PATHS, "metal", metal_path)
    monkeypatch.setattr(probe, "kernel_verdict", lambda *args: None)
    optimizer = RMSprop.from_keras(
        learning_rate=0.01, gradient_accumulation_steps=4, loss_scale_factor=2.0, fused="metal"
    )

    def step(*weights):
        parameters = {f"w{k}": weight for k, weight in enumerate(weights)}
        gradients = {name: mx.ones_like(value) for name, value in parameters.items()}
        return list(optimizer.apply_gradients(gradients, parameters).values())

    sources = capture(capfd, step, *(mx.zeros((9 + k,)) for k in range(3)))
    assert sources == [optimizer.kernel_source(mx.float32)] * 3
    assert "custom_kernel_rmsprop_accumulating_" in sources[0]
    assert "device float* new_accumulator" in sources[0]
    cuda = optimizer.kernel_source(mx.float32, backend="cuda")
    assert "const float* accumulator," in cuda and "const float* gates," in cuda


@pytest.mark.parametrize("fused_accumulation", [True, False], ids=["kernel", "mlx-ops"])
def test_accumulation_adds_no_graph_node_per_parameter(monkeypatch, fused_accumulation):
    # The step's graph on the Metal path (run eagerly, counted while exporting, where MLX
    # builds each kernel's node without running it): with the kernels accumulating, each
    # parameter adds exactly one node, its kernel; the MLX-ops accumulation before the kernel
    # (the step without an accumulating update: the loss-scale division, sum, mean, the
    # carried accumulator's selects and their broadcast constants) added 10 per parameter.
    verbose = make_accumulating_update(partial(metal.launch, verbose=True))
    metal_path = dataclasses.replace(
        paths.PATHS["metal"],
        compile_step=False,
        load=lambda: make_update(partial(metal.launch, verbose=True)),
        load_accumulating=lambda: verbose,
    )
    if not fused_accumulation:
        metal_path = dataclasses.replace(metal_path, load_accumulating=None)
    monkeypatch.setitem(paths.PATHS, "metal", metal_path)
    monkeypatch.setattr(probe, "kernel_verdict", lambda *args: None)
    counts = {}
    for parameters in (2, 5):
        optimizer = RMSprop.from_keras(
            learning_rate=0.01, gradient_accumulation_steps=4, loss_scale_factor=2.0, fused="metal"
        )

        def step(*arrays, parameters=parameters, optimizer=optimizer):
            names = [f"w{k}" for k in range(parameters)]
            weights, gradients = arrays[:parameters], arrays[parameters:]
            new = optimizer.apply_gradients(
                dict(zip(names, gradients, strict=True)), dict(zip(names, weights, strict=True))
            )
            states = [optimizer.state[name][ACCUMULATOR] for name in names]
            counts[parameters] = graph_nodes(*new.values(), *states)
            return list(new.values())

        weights = [mx.zeros((9 + k,)) for k in range(parameters)]
        # The state exists before the step (no initialising nodes in the count).
        optimizer.init({f"w{k}": weight for k, weight in enumerate(weights)})
        mx.eval(optimizer.state)
        with tempfile.TemporaryDirectory() as directory:
            mx.export_function(
                os.path.join(directory, "f.mlxfn"), step, *weights, *map(mx.ones_like, weights)
            )
    per_parameter = (counts[5] - counts[2]) / 3
    assert per_parameter == (1 if fused_accumulation else 10), counts


def test_check_and_the_probe_run_the_accumulating_kernels_on_the_emulated_kernel(
    emulated_metal, monkeypatch, capsys
):
    # `check --quick` holds the accumulating kernels; on a GPU (here the Metal emulation)
    # they run against accumulating_reference with their accumulator, gates and (loss scale,
    # steps), and `auto`'s probe adopts each.
    plan = [v for v in check._gpu_plan(quick=True) if v.accumulates][::7]
    assert {v.small for v in plan} == {True, False}
    monkeypatch.setattr(check, "_gpu_plan", lambda quick: plan)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(["--quick"])) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"{len(plan)} of {len(plan)} adopted here" in out
    assert f"err:{ACCUMULATOR}" in out
    assert set(emulated_metal) == set(plan)
