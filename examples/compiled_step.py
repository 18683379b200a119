"""A compiled training step with a learning-rate schedule, a checkpoint mid-run, and a resume
in a new process that ends exactly where the uninterrupted run ends.

The step is ``mx.compile(step, inputs=state, outputs=state)`` over the model and the optimizer
state, so the cosine schedule moves the learning rate without recompiling. The batches are a
function of the step number, so a resumed run sees the same data.

    python examples/compiled_step.py            # run, checkpoint at the midpoint, resume, compare
    python examples/compiled_step.py --fast
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rmsprop import RMSprop, load_state, save_state


def build(total_steps: int) -> tuple[nn.Module, RMSprop]:
    mx.random.seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    schedule = optim.cosine_decay(3e-3, total_steps, end=1e-4)
    return model, RMSprop(schedule, momentum=0.9)


def batch(step: int) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(step)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)) + 0.1 * x[:, 4:5]
    return mx.array(x), mx.array(y.astype(np.float32))


def train(model, optimizer, start: int, stop: int, report_every: int) -> None:
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    compiled = mx.compile(step, inputs=state, outputs=state)
    for index in range(start, stop):
        loss = compiled(*batch(index))
        mx.eval(state)
        if (index + 1) % report_every == 0:
            print(
                f"  step {index + 1:4d}  loss {loss.item():.5f}  "
                f"lr {optimizer.learning_rate.item():.2e}"
            )


def save(model, optimizer, directory: Path) -> None:
    mx.save_safetensors(
        str(directory / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    save_state(optimizer, directory / "optimizer.safetensors")


def resume(directory: Path, total_steps: int, report_every: int) -> None:
    """The second process: rebuild, restore, finish the run, save the end state."""
    model, optimizer = build(total_steps)
    model.update(tree_unflatten(list(mx.load(str(directory / "model.safetensors")).items())))
    load_state(optimizer, directory / "optimizer.safetensors", model.trainable_parameters())
    start = optimizer.step.item()
    print(f"resumed in a new process at step {start}")
    train(model, optimizer, start, total_steps, report_every)
    save(model, optimizer, directory)


def identical(first: Path, second: Path) -> bool:
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = mx.load(str(first / name)), mx.load(str(second / name))
        if a.keys() != b.keys() or any(
            not np.array_equal(np.array(a[k]), np.array(b[k])) for k in a
        ):
            return False
    return True


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # the second process
    args = parser.parse_args(argv)
    total = 40 if args.fast else args.steps
    report_every = max(1, total // 8)
    if args.resume:
        resume(args.resume, total, report_every)
        return True

    with tempfile.TemporaryDirectory() as workdir:
        straight, split = Path(workdir, "straight"), Path(workdir, "split")
        straight.mkdir(), split.mkdir()
        print(f"uninterrupted run, {total} steps:")
        model, optimizer = build(total)
        train(model, optimizer, 0, total, report_every)
        save(model, optimizer, straight)

        midpoint = total // 2
        print(f"interrupted run: {midpoint} steps, checkpoint, then a new process")
        model, optimizer = build(total)
        train(model, optimizer, 0, midpoint, report_every)
        save(model, optimizer, split)
        command = [sys.executable, __file__, "--resume", str(split), "--steps", str(total)]
        subprocess.run(command + (["--fast"] if args.fast else []), check=True)
        same = identical(straight, split)
    print(f"resumed run matches the uninterrupted one bit for bit: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)
    return same


if __name__ == "__main__":
    main()
