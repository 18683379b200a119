"""The pipeline benchmarks (benchmarks/first_step.py, benchmarks/pipeline_cost.py) run and
report what they say, on sizes small enough for the test suite. No timing is asserted."""

from __future__ import annotations

import math

import pytest

from benchmarks import first_step, pipeline_cost

from native_available import requires_native


def test_gpt2_small_workload_is_gpt2_small():
    shapes = pipeline_cost.WORKLOADS["gpt2-small"]()
    assert len(shapes) == 196
    assert sum(math.prod(shape) for shape in shapes) == 124_439_808


@requires_native
@pytest.mark.parametrize("implementation", first_step.IMPLEMENTATIONS)
def test_first_step_runs_each_implementation(implementation):
    assert first_step.first_step_seconds(implementation, 3) > 0


def test_first_step_table_has_a_ratio_row_and_marks_timeouts():
    table = first_step.format_table(
        {"ours-full": {10: 1.0, 20: None}, "builtin-compiled": {10: 4.0, 20: 8.0}}, [10, 20]
    )
    assert "| ours, full pipeline (native) | 1.00 s | timeout |" in table
    assert "| full pipeline / built-in | 0.25x | — |" in table


@requires_native
def test_pipeline_cost_steps_every_implementation():
    for implementation in pipeline_cost.IMPLEMENTATIONS:
        step = pipeline_cost.prepare(implementation, [(4, 3), (5,)])
        step()
        step()
