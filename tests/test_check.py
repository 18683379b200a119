"""``python -m mlx_rmsprop check``: its inputs are well-conditioned, it judges with the package's
tolerance table and comparator (the same the tests use), and a failure names the variant, the
element and the values."""

from __future__ import annotations

import argparse
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import check, paths
from mlx_rmsprop.paths.kernels.source import Variant
from mlx_rmsprop.paths.kernels.variants import pairwise_option_sets
from mlx_rmsprop.reference import rmsprop_reference
from mlx_rmsprop.spec import Scalar, UpdateOptions
from mlx_rmsprop.tolerance import RTOL, compare, relative_error

from tolerances import assert_close


def centred_margin(options: UpdateOptions) -> float:
    """Smallest |v/bc - (grad_avg/bc)^2| / max(v/bc, (grad_avg/bc)^2) over check's inputs and
    steps (finite elements, steps the gate lets through), from the reference's own state."""
    worst = np.inf
    shapes = check.SHAPES[False] + check.SHAPES[True]
    for small in (False, True):
        variant = Variant(options, small=small)
        for seed, shape in enumerate(shapes):
            parameter, gradient, state = check.verification_inputs(variant, shape, seed)
            for step in range(1, check.STEPS + 1):
                scalars = check.step_scalars(step)
                parameter, state = rmsprop_reference(options, scalars, parameter, gradient, state)
                if options.gated and scalars[Scalar.UPDATE_GATE].item() == 0.0:
                    continue
                bc = scalars[Scalar.BIAS_CORRECTION].item() if options.bias_correction else 1.0
                variance = np.array(state["v"], np.float64) / bc
                mean_squared = (np.array(state["grad_avg"], np.float64) / bc) ** 2
                finite = np.isfinite(variance) & np.isfinite(mean_squared)
                variance, mean_squared = variance[finite], mean_squared[finite]
                scale = np.maximum(np.maximum(variance, mean_squared), 1e-300)
                margin = np.abs(variance - mean_squared) / scale
                worst = min(worst, margin.min(initial=np.inf))
    return worst


@pytest.mark.parametrize("bias_correction", [False, True])
def test_check_inputs_keep_the_centred_variance_away_from_cancellation(bias_correction):
    # An ulp of v/bc or of the squared mean (a contracted multiply-add) must not turn into a
    # large relative change of the centred variance: at step 1 with bias correction the old
    # inputs gave differences like 5.505 - 5.4999.
    centered = [o for o in pairwise_option_sets() if o.centered]
    assert centered
    for options in centered:
        options = dataclasses.replace(options, bias_correction=bias_correction)
        assert centred_margin(options) >= 0.1, options


def _off_by(factor: float):
    """An update whose parameter is the reference's times (1 + factor): a relative error of
    exactly ``factor`` at the largest element."""

    def update(options, scalars, parameter, gradient, state):
        new_parameter, new_state = rmsprop_reference(options, scalars, parameter, gradient, state)
        return new_parameter * (1 + factor), new_state

    return update


@pytest.mark.parametrize("fraction, fails", [(0.5, False), (3.0, True)])
def test_check_and_the_tests_judge_with_the_one_tolerance_table(monkeypatch, fraction, fails):
    factor = fraction * RTOL["float32"]
    monkeypatch.setitem(
        paths.PATHS, "off", paths.UpdatePath("off", lambda: _off_by(factor), False, "off")
    )
    rows = check.verify_path("off", [Variant(UpdateOptions())], 1)
    assert bool(rows[0].failures) == fails
    # The test suite's assert_close agrees on the same arrays.
    options, scalars = UpdateOptions(), check.step_scalars(1)
    parameter, gradient, state = check.verification_inputs(Variant(options), (33,), seed=3)
    actual = _off_by(factor)(options, scalars, parameter, gradient, state)[0]
    expected = rmsprop_reference(options, scalars, parameter, gradient, state)[0]
    if fails:
        with pytest.raises(AssertionError, match="relative error"):
            assert_close(actual, expected, "float32", "parameter")
    else:
        assert_close(actual, expected, "float32", "parameter")


def test_comparator_names_the_first_failing_element():
    expected = mx.array([[1.0, 2.0, 4.0], [8.0, float("nan"), -1.0]])
    actual = mx.array([[1.0, 2.0, 4.0], [8.0, float("nan"), -1.1]])
    mismatch = compare(actual, expected)
    assert mismatch is not None and mismatch.index == (1, 2)
    assert mismatch.expected == -1.0 and mismatch.actual == pytest.approx(-1.1)
    assert mismatch.error == pytest.approx(0.1 / 8.0)
    assert "element (1, 2)" in str(mismatch) and "> 1e-06 (float32" in str(mismatch)
    finite_for_nan = mx.array([[1.0, 2.0, 4.0], [8.0, 3.0, -1.0]])
    mismatch = compare(finite_for_nan, expected)
    assert mismatch is not None and mismatch.index == (1, 1) and "non-finite" in str(mismatch)
    assert relative_error(finite_for_nan, expected) == np.inf
    # rtol=0 is equality, NaN included; a dtype difference fails whatever the values.
    assert compare(expected, expected, rtol=0.0) is None
    assert compare(expected.astype(mx.float16), expected.astype(mx.float16)) is None
    assert compare(expected.astype(mx.float16), expected).reason.startswith("dtype")


def test_check_output_names_the_first_failure_and_labels_each_column_once(capsys, monkeypatch):
    monkeypatch.setattr(check, "GPU_PATHS", ())
    monkeypatch.setattr(
        paths,
        "availability",
        lambda: {"reference": None, "off": None},
    )
    monkeypatch.setitem(
        paths.PATHS, "off", paths.UpdatePath("off", lambda: _off_by(1e-3), False, "off")
    )
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args(["--quick"])) == 1
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("path "))
    assert len(header.split()) == len(set(header.split()))
    first = next(line for line in out.splitlines() if line.startswith("First failure: "))
    # The first quick variant, its first shape, step 1, the parameter, an element and values.
    assert "off: " in first and "parameter/gradient/state float32/float32/float32" in first
    assert "step 1, output 'parameter', element (" in first and "(expected " in first
    assert "relative error 0.001 > 1e-06 (float32" in first
    assert "FAIL: 3 variant runs, 3 failed, in " in out and "(0 s;" not in out
