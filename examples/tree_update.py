"""Tree-mapped updates: a model that is a plain nested dict of arrays, no nn.Module.

The parameters live in ``{"layer0": {"w": ..., "b": ...}, "layer1": ..., ...}``;
``mx.value_and_grad`` gives a gradient tree of the same shape, and
``optimizer.apply_gradients(grads, params)`` returns the updated tree. The gradient tree may be
a subset of the parameters: here the first layer is frozen after a warm-up by leaving it out
(a dict key can be left out; a list entry cannot, since list positions are the paths). Biases
are excluded from weight decay by their path.

    python examples/tree_update.py [--steps N] [--fast]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from mlx_rmsprop import RMSprop


def init_params(sizes: list[int], key: mx.array) -> dict:
    params = {}
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, sub = mx.random.split(key)
        w = mx.random.normal((fan_in, fan_out), key=sub) / fan_in**0.5
        params[f"layer{index}"] = {"w": w, "b": mx.zeros((fan_out,))}
    return params


def forward(params: dict, x: mx.array) -> mx.array:
    *hidden, last = params.values()
    for layer in hidden:
        x = mx.tanh(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def loss_fn(params: dict, x: mx.array, y: mx.array) -> mx.array:
    return mx.mean(mx.square(forward(params, x) - y))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    steps = 60 if args.fast else args.steps

    key = mx.random.key(0)
    x = mx.random.uniform(-2, 2, (256, 2), key=key)
    y = mx.sin(x[:, :1]) * mx.cos(x[:, 1:])
    params = init_params([2, 32, 32, 1], mx.random.key(1))

    optimizer = RMSprop.from_keras(learning_rate=3e-3, momentum=0.5, weight_decay=1e-4)
    optimizer.exclude_from_weight_decay(var_names=[r"\.b$"])
    value_and_grad = mx.value_and_grad(loss_fn)

    first = loss_fn(params, x, y).item()
    print(f"step    0  loss {first:.5f}")
    for step in range(1, steps + 1):
        loss, grads = value_and_grad(params, x, y)
        if step > steps // 2:
            # Freeze the first layer: a gradient tree that leaves it out updates the rest.
            del grads["layer0"]
        params = {**params, **optimizer.apply_gradients(grads, params)}
        mx.eval(params, optimizer.state)
        if step % max(1, steps // 6) == 0:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    final = loss_fn(params, x, y).item()
    print(f"final loss {final:.5f} (from {first:.5f})")
    return final


if __name__ == "__main__":
    main()
