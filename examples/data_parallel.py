"""Data-parallel training with mx.distributed: each rank takes its share of every global
batch, gradients are averaged across ranks, and every rank applies the same RMSprop step.

    mlx.launch -n 2 -- python examples/data_parallel.py [--steps N] [--fast]

(ring backend: works on one Linux machine; name the interpreter after `--`). At the end every
rank checks that all ranks hold identical parameters, and rank 0 replays the same global
batches in a single process (computing each share's gradient and averaging them the same way)
and checks that it ends with the very same parameters. Run without mlx.launch it is a
single-rank run.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_rmsprop import RMSprop

GLOBAL_BATCH = 64


def build() -> tuple[nn.Module, RMSprop]:
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    return model, RMSprop.from_torch(lr=1e-3, momentum=0.9, centered=True)


def global_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    x = rng.standard_normal((GLOBAL_BATCH, 16)).astype(np.float32)
    y = (x[:, :4] * 2 - x[:, 4:8]).argmax(axis=1)
    return x, y


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def share(array: np.ndarray, rank: int, size: int) -> mx.array:
    per_rank = GLOBAL_BATCH // size
    return mx.array(array[rank * per_rank : (rank + 1) * per_rank])


def train_distributed(group, steps: int) -> nn.Module:
    model, optimizer = build()
    value_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(steps):
        x, y = global_batch(step)
        loss, grads = value_and_grad(
            model, share(x, group.rank(), group.size()), share(y, group.rank(), group.size())
        )
        grads = nn.average_gradients(grads, group=group)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if group.rank() == 0 and (step + 1) % max(1, steps // 5) == 0:
            print(f"step {step + 1:4d}  rank-0 loss {loss.item():.4f}", flush=True)
    return model


def train_single_process(size: int, steps: int) -> nn.Module:
    """The same global batches on one process: each share's gradient, averaged as all_sum/size
    (``size=1``: each global batch's gradient at once)."""
    model, optimizer = build()
    value_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(steps):
        x, y = global_batch(step)
        shares = [
            value_and_grad(model, share(x, r, size), share(y, r, size))[1] for r in range(size)
        ]
        total = shares[0]
        for other in shares[1:]:
            total = tree_map(lambda a, b: a + b, total, other)
        optimizer.update(model, tree_map(lambda g: g / size, total))
        mx.eval(model.parameters(), optimizer.state)
    return model


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    steps = 20 if args.fast else args.steps
    group = mx.distributed.init()
    if GLOBAL_BATCH % group.size():
        sys.exit(f"the global batch {GLOBAL_BATCH} does not split over {group.size()} ranks")
    if group.rank() == 0:
        print(
            f"{group.size()} rank(s), global batch {GLOBAL_BATCH}, "
            f"{GLOBAL_BATCH // group.size()} examples per rank"
        )
    model = train_distributed(group, steps)

    flat = mx.concatenate([v.reshape(-1) for _, v in tree_flatten(model.parameters())])
    gathered = mx.distributed.all_gather(flat[None], group=group)
    same_everywhere = bool(mx.all(gathered == gathered[0]).item())
    print(
        f"rank {group.rank()}: parameters identical on every rank: "
        f"{'yes' if same_everywhere else 'NO'}",
        flush=True,
    )
    ok = same_everywhere
    if group.rank() == 0:
        single = train_single_process(group.size(), steps)
        single_flat = mx.concatenate([v.reshape(-1) for _, v in tree_flatten(single.parameters())])
        equal = bool(mx.array_equal(single_flat, flat).item())
        print(
            "rank 0: equals the single-process run on the same global batches: "
            f"{'yes' if equal else 'NO'}"
        )
        whole = train_single_process(1, steps)
        whole_flat = mx.concatenate([v.reshape(-1) for _, v in tree_flatten(whole.parameters())])
        difference = mx.abs(whole_flat - flat).max().item()
        print(
            "rank 0: largest difference from whole-batch gradients (another summation "
            f"order): {difference:.2e}"
        )
        ok = ok and equal
    if not ok:
        sys.exit(1)
    return ok


if __name__ == "__main__":
    main()
