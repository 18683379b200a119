"""The classic RMSprop MNIST experiment, with mlx_rmsprop.

An MLP 784-128-64-10 (ReLU, softmax cross-entropy) trained with
``RMSprop.from_keras(learning_rate=0.001, rho=0.9)`` at batch size 32, as in TensorFlow's
reference run. Real MNIST is used when it is cached or can be downloaded (checked against its
published MD5 sums); otherwise an embedded synthetic digits set that needs no network.

    python examples/train_mnist.py                 # 10 epochs
    python examples/train_mnist.py --fast          # a few seconds: small data, one epoch
    python examples/train_mnist.py --data mnist    # insist on real MNIST
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import digits
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from plotting import save_curves

from mlx_rmsprop import RMSprop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", choices=["auto", "mnist", "synthetic"], default="auto")
    parser.add_argument("--no-download", action="store_true", help="use only a cached MNIST")
    parser.add_argument("--fast", action="store_true", help="small synthetic data, one epoch")
    parser.add_argument(
        "--fused", default="auto", help='the optimizer path ("auto", "compiled", ...)'
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "output")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.data = 1, "synthetic"
    return args


def load_data(args) -> digits.Digits:
    if args.data in ("auto", "mnist"):
        found = digits.mnist(download=not args.no_download)
        if found is not None:
            print(f"data: MNIST (cache {digits.cache_directory()})")
            return found
        if args.data == "mnist":
            sys.exit(f"MNIST is neither cached in {digits.cache_directory()} nor downloadable")
        print(
            "data: MNIST not cached and not downloadable here; using the embedded synthetic digits"
        )
    sizes = (2000, 500, 500) if args.fast else (12000, 2000, 2000)
    data = digits.synthetic(*sizes, seed=args.seed)
    print(
        f"data: {data.name} (generated, {sizes[0]} train / {sizes[1]} validation / {sizes[2]} test)"
    )
    return data


def progress(epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
    filled = int(30 * done / total)
    bar = "#" * filled + "." * (30 - filled)
    end = "\n" if done == total else ""
    print(f"\repoch {epoch}/{epochs} [{bar}] {done}/{total} loss {loss:.4f}", end=end, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    mx.random.seed(args.seed)
    data = load_data(args)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = RMSprop.from_keras(learning_rate=0.001, rho=0.9, fused=args.fused)
    print(f"optimizer: RMSprop.from_keras(learning_rate=0.001, rho=0.9), path {optimizer.path!r}")

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    state = [model.state, optimizer.state]

    def train_step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(train_step, inputs=state, outputs=state)

    def evaluate(images, labels):
        logits = model(mx.array(images))
        loss = nn.losses.cross_entropy(logits, mx.array(labels), reduction="mean").item()
        accuracy = (mx.argmax(logits, axis=1) == mx.array(labels)).mean().item()
        return loss, accuracy

    rng = np.random.default_rng(args.seed)
    train_x, train_y = data.train
    batches = len(train_x) // args.batch_size
    history = {
        "train loss": [],
        "validation loss": [],
        "train accuracy": [],
        "validation accuracy": [],
    }
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(train_x))
        losses = []
        for batch in range(batches):
            index = order[batch * args.batch_size : (batch + 1) * args.batch_size]
            losses.append(step(mx.array(train_x[index]), mx.array(train_y[index])))
            if batch % 50 == 0 or batch == batches - 1:
                mx.eval(losses, state)
                progress(epoch, args.epochs, batch + 1, batches, losses[-1].item())
        train_loss, train_accuracy = evaluate(*data.train)
        val_loss, val_accuracy = evaluate(*data.validation)
        for key, value in zip(
            history, (train_loss, val_loss, train_accuracy, val_accuracy), strict=True
        ):
            history[key].append(value)
        print(
            f"  train loss {train_loss:.4f} accuracy {train_accuracy:.4f} | "
            f"validation loss {val_loss:.4f} accuracy {val_accuracy:.4f}"
        )
    seconds = time.perf_counter() - started
    test_loss, test_accuracy = evaluate(*data.test)
    print(
        f"test loss {test_loss:.4f}, test accuracy {test_accuracy:.4f} "
        f"({data.name}, {seconds:.1f} s of training)"
    )

    args.output.mkdir(parents=True, exist_ok=True)
    chart = args.output / "train_mnist_loss.png"
    how = save_curves(
        chart,
        {"train loss": history["train loss"], "validation loss": history["validation loss"]},
        f"RMSprop (Keras preset) on {data.name}",
        "epoch",
        "cross-entropy",
    )
    print(f"loss curves: {chart} ({how})")
    result = {
        "data": data.name,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "history": history,
        "epochs": args.epochs,
        "seconds": seconds,
        "path": optimizer.path,
    }
    (args.output / "train_mnist.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
