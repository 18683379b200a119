"""The native update's worker pool (worker_pool.h): every part of a job runs exactly once
before the job returns, whatever the number of parts and callers; the pool spins only
briefly after a job (kSpinTime), so an idle process's workers sleep on their condition
variable and use no CPU; and the updates it splits across them give the reference's bits."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop
from mlx_rmsprop.paths import native
from mlx_rmsprop.paths.native import sources

from locations import SUPPORT
from native_available import requires_native

pytestmark = requires_native

# Long enough for any bounded spin (kSpinTime is 200 us) to have ended on a loaded machine.
SETTLE_SECONDS = 5.0
IDLE_SECONDS = 1.0
# A worker that never slept would use about IDLE_SECONDS of CPU; a sleeping pool, none.
IDLE_CPU_BOUND = 0.25


def parallel_steps(fused, steps=3):
    """A few updates of tensors large enough to be split across the pool (the tensors of a
    step back to back, where the workers spin between them)."""
    size = 4 * native._loaded().PARALLEL_THRESHOLD
    rng = np.random.default_rng(0)
    params = {f"w{i}": mx.array(rng.standard_normal(size), mx.float32) for i in range(4)}
    optimizer = RMSprop(0.01, momentum=0.9, centered=True, fused=fused)
    for _ in range(steps):
        grads = {k: mx.array(rng.standard_normal(size), mx.float32) for k in params}
        params = optimizer.apply_gradients(grads, params)
        mx.eval(params, optimizer.state)
    return params, optimizer.state


def settled(extension):
    """Waits (bounded) until every worker sleeps; returns whether they did."""
    workers = extension.worker_threads() - 1
    deadline = time.monotonic() + SETTLE_SECONDS
    while extension.sleeping_workers() != workers:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_idle_pool_sleeps_and_uses_no_cpu():
    extension = native._loaded()
    parallel_steps("native")
    assert settled(extension), (
        f"{extension.sleeping_workers()} of {extension.worker_threads() - 1} workers asleep "
        f"{SETTLE_SECONDS} s after the last update"
    )
    before = time.process_time()
    time.sleep(IDLE_SECONDS)
    used = time.process_time() - before
    assert used < IDLE_CPU_BOUND, f"an idle second used {used:.3f} s of CPU"
    assert extension.sleeping_workers() == extension.worker_threads() - 1


def test_split_updates_give_the_reference_bits():
    ours = parallel_steps("native")
    reference = parallel_steps(False)
    for a, b in zip(tree_flatten(ours), tree_flatten(reference), strict=True):
        assert a[0] == b[0]
        assert np.array_equal(np.array(a[1]), np.array(b[1])), a[0]


@pytest.mark.parametrize("parts", [2, 3, 7, 64, 1000])
def test_every_part_runs_once_per_job(parts):
    # Jobs back to back: workers still claiming from one job meet the next one's ticket.
    assert native._loaded().worker_pool_misruns(jobs=2000, parts=parts) == 0


def test_a_job_larger_than_one_ticket_runs_in_batches():
    # The ticket counts up to 2^20 parts; a larger job runs as consecutive batches.
    assert native._loaded().worker_pool_misruns(jobs=2, parts=(1 << 20) + 5) == 0


def test_concurrent_callers_each_run_their_parts():
    # A second caller finds the pool owned and runs its parts itself.
    extension = native._loaded()
    results = []

    def caller():
        results.append(extension.worker_pool_misruns(jobs=500, parts=16))

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [0, 0, 0]


# More workers than this machine has cores, so threads are preempted mid-claim.
RACE_CHECK_WORKERS = 7


@pytest.mark.slow
def test_the_pool_has_no_data_race_under_thread_sanitizer(tmp_path):
    # The pool's headers alone, compiled with ThreadSanitizer and a fixed pool size, running
    # the jobs of the tests above (tests/support/worker_pool_race.cpp). Both headers are
    # copied: worker_pool_check.h includes worker_pool.h from its own directory.
    header = (sources.SOURCE_DIR / "worker_pool.h").read_text()
    pool_size = "new WorkerPool(usable_cores() - 1)"
    assert pool_size in header, "worker_pool.h no longer sizes its pool as this test expects"
    (tmp_path / "worker_pool.h").write_text(
        header.replace(pool_size, f"new WorkerPool({RACE_CHECK_WORKERS})")
    )
    check = sources.SOURCE_DIR / "worker_pool_check.h"
    (tmp_path / check.name).write_text(check.read_text())
    executable = tmp_path / "worker_pool_race"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{tmp_path}"]
        + [str(SUPPORT / "worker_pool_race.cpp"), "-o", str(executable)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run(
        [str(executable)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"},
    )
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0 and run.stdout.strip() == "misruns 0", run.stdout + run.stderr
