"""The smallest real use: fit a two-layer MLP to a noisy sine with mlx_rmsprop.RMSprop.

python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn

from mlx_rmsprop import RMSprop


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    mx.random.seed(0)
    x = mx.random.uniform(-3, 3, (512, 1))
    y = mx.sin(x) + 0.05 * mx.random.normal(x.shape)

    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = RMSprop(learning_rate=3e-3)

    def loss_fn(model):
        return nn.losses.mse_loss(model(x), y)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(args.steps + 1):
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
