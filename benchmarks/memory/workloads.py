"""The training runs of the quality comparison, each deterministic for a seed and CPU-sized.

- ``mnist``: the main job's MLP 784-128-64-10 (examples/train_mnist.py: Keras preset,
  learning rate 1e-3, rho 0.9, batch 32) on the embedded synthetic digits, 10 epochs.
- ``mnist-small-lr``: the same at learning rate 1e-4, where a bfloat16 weight's rounding
  swallows most updates (half a bfloat16 step at 0.03 is 1.2e-4).
- ``lm``: a character-level transformer language model (examples/finetune_lora.py's CharLM,
  2 layers, 64 wide) trained from scratch on generated stories with MLX's defaults.
- ``lora``: mlx-lm's LoRA fine-tuning as ``python -m mlx_rmsprop.lora`` runs it
  (``linear_to_lora_layers`` and ``mlx_lm.tuner.train``) on a tiny llama built from a config
  (no download), on token sequences made here, as examples/finetune_mlx_lm.py.

A run reports its loss curve (mean training loss per window), the final held-out loss (and
accuracy where there is one), the optimizer state's bytes, MLX's peak memory and whether any
loss or weight became NaN or Inf.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent.parent

MakeOptimizer = Callable[[dict], Optimizer]


@dataclass
class Outcome:
    """What one run of one workload produced."""

    curve_steps: list[int]
    curve: list[float]
    final_loss: float
    accuracy: float | None
    state_bytes: int
    peak_memory: int
    finite: bool
    seconds: float
    optimizer: Optimizer | None = field(default=None, repr=False)

    def figures(self) -> dict:
        return {
            "curve_steps": self.curve_steps,
            "curve": self.curve,
            "final_loss": self.final_loss,
            "accuracy": self.accuracy,
            "state_bytes": self.state_bytes,
            "peak_memory": self.peak_memory,
            "finite": self.finite,
            "seconds": self.seconds,
        }


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every array in ``optimizer.state`` (buffers, scales, counters)."""
    return sum(value.nbytes for _, value in tree_flatten(optimizer.state))


@cache
def _example(name: str):
    """A module of examples/ (not a package), loaded from its file."""
    path = ROOT / "examples" / f"{name}.py"
    specification = importlib.util.spec_from_file_location(f"_memory_example_{name}", path)
    module = importlib.util.module_from_spec(specification)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[specification.name] = module
    specification.loader.exec_module(module)
    return module


def _finite(model: nn.Module) -> bool:
    return all(
        bool(mx.all(mx.isfinite(value)).item())
        for _, value in tree_flatten(model.parameters())
        if isinstance(value, mx.array)
    )


def _train(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: Callable,
    batches: Iterator,
    steps: int,
    window: int,
) -> tuple[list[int], list[float]]:
    """``steps`` compiled training steps; the mean training loss of every ``window`` steps."""
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    compiled = mx.compile(step, inputs=state, outputs=state)
    curve_steps, curve, losses = [], [], []
    for index in range(1, steps + 1):
        losses.append(compiled(*next(batches)))
        if index % window == 0 or index == steps:
            mx.eval(losses, state)
            curve_steps.append(index)
            curve.append(float(np.mean([loss.item() for loss in losses])))
            losses = []
            if not math.isfinite(curve[-1]):
                break  # diverged: the rest of the run would only compute NaN
    return curve_steps, curve


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    # The RMSprop arguments every configuration of this workload gets.
    hyper: dict
    steps: int
    runner: Callable[..., Outcome]

    def run(
        self,
        make_optimizer: MakeOptimizer,
        weights: mx.Dtype,
        steps: int | None = None,
        seed: int = 0,
        keep_optimizer: bool = False,
    ) -> Outcome:
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        started = time.perf_counter()
        outcome = self.runner(self, make_optimizer, weights, steps or self.steps, seed)
        outcome.seconds = time.perf_counter() - started
        outcome.peak_memory = mx.get_peak_memory()
        if not keep_optimizer:
            outcome.optimizer = None
        return outcome


# --- MNIST -----------------------------------------------------------------------------------

MNIST_SIZES = (12000, 2000, 2000)
MNIST_BATCH = 32


@cache
def _digits(sizes: tuple[int, int, int], seed: int):
    return _example("digits").synthetic(*sizes, seed=seed)


def _mnist(workload: Workload, make_optimizer, weights, steps: int, seed: int) -> Outcome:
    # Fewer steps than the 10 epochs of the full data: a smaller set, so that every size
    # (the harness tests run a few steps) still sees each example about as often.
    sizes = MNIST_SIZES if steps * MNIST_BATCH >= MNIST_SIZES[0] else (2000, 500, 500)
    data = _digits(sizes, 0)
    mx.random.seed(seed)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    model.set_dtype(weights)
    optimizer = make_optimizer(workload.hyper)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")

    train_x, train_y = data.train
    rng = np.random.default_rng(seed)

    def batches():
        per_epoch = len(train_x) // MNIST_BATCH
        while True:
            order = rng.permutation(len(train_x))
            for batch in range(per_epoch):
                index = order[batch * MNIST_BATCH : (batch + 1) * MNIST_BATCH]
                yield mx.array(train_x[index]).astype(weights), mx.array(train_y[index])

    window = max(steps // 50, 1)
    curve_steps, curve = _train(model, optimizer, loss_fn, batches(), steps, window)
    test_x, test_y = data.test
    logits = model(mx.array(test_x).astype(weights)).astype(mx.float32)
    labels = mx.array(test_y)
    loss = nn.losses.cross_entropy(logits, labels, reduction="mean").item()
    accuracy = (mx.argmax(logits, axis=1) == labels).mean().item()
    return Outcome(
        curve_steps,
        curve,
        loss,
        accuracy,
        state_bytes(optimizer),
        0,
        _finite(model) and all(map(math.isfinite, curve)) and math.isfinite(loss),
        0.0,
        optimizer,
    )


# --- character-level transformer language model ----------------------------------------------

LM_CONTEXT = 32
LM_BATCH = 8


@cache
def _lm_text(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    lora_example = _example("finetune_lora")
    rng = np.random.default_rng(seed)
    train, held_out = lora_example.stories(4000, rng), lora_example.stories(300, rng)
    alphabet = sorted(set(train + held_out))
    lookup = {c: i for i, c in enumerate(alphabet)}

    def encode(text: str) -> np.ndarray:
        return np.array([lookup[c] for c in text], np.int32)

    return encode(train), encode(held_out), len(alphabet)


def _lm(workload: Workload, make_optimizer, weights, steps: int, seed: int) -> Outcome:
    lora_example = _example("finetune_lora")
    train, held_out, vocab = _lm_text(0)
    mx.random.seed(seed)
    model = lora_example.CharLM(vocab, dims=64, heads=4, layers=2, context=LM_CONTEXT)
    model.set_dtype(weights)
    optimizer = make_optimizer(workload.hyper)
    rng = np.random.default_rng(seed)
    batches = lora_example.batches(train, LM_CONTEXT, LM_BATCH, rng)
    window = max(steps // 50, 1)
    curve_steps, curve = _train(model, optimizer, lora_example.loss_fn, batches, steps, window)
    usable = (len(held_out) - 1) // LM_CONTEXT * LM_CONTEXT
    x = mx.array(held_out[:usable].reshape(-1, LM_CONTEXT))
    y = mx.array(held_out[1 : usable + 1].reshape(-1, LM_CONTEXT))
    logits = model(x).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, y, reduction="mean").item()
    accuracy = (mx.argmax(logits, axis=-1) == y).mean().item()
    return Outcome(
        curve_steps,
        curve,
        loss,
        accuracy,
        state_bytes(optimizer),
        0,
        _finite(model) and all(map(math.isfinite, curve)) and math.isfinite(loss),
        0.0,
        optimizer,
    )


# --- mlx-lm LoRA -------------------------------------------------------------------------------

# Wide enough that the rank-32 adapters of the query projection reach the 4096 elements from
# which the optimizer quantizes (those of the narrower value projection stay float32: a mixed
# tree, as in real models with small tensors).
LORA_MODEL = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 97,
    "tie_word_embeddings": True,
}
LORA_ADAPTERS = {"rank": 32, "dropout": 0.0, "scale": 10.0}
LORA_BATCH = 8


class _CountingSequences:
    """Sequences ``start, start + 7, ...`` modulo the vocabulary, of 12 to 23 tokens, as
    mlx-lm's trainer takes them (``process`` gives the token ids and prompt offset 0)."""

    def __init__(self, count: int, vocab_size: int, seed: int, stride: int = 7):
        rng = np.random.default_rng(seed)
        self.items = [
            [int(t) for t in (rng.integers(vocab_size) + stride * np.arange(rng.integers(12, 24)))
             % vocab_size]
            for _ in range(count)
        ]  # fmt: skip

    def __getitem__(self, index: int) -> list[int]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def process(self, item: list[int]) -> tuple[list[int], int]:
        return item, 0


def _lora(workload: Workload, make_optimizer, weights, steps: int, seed: int) -> Outcome:
    from mlx_lm.models import llama
    from mlx_lm.tuner import TrainingArgs, evaluate, linear_to_lora_layers, train
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset

    class Losses(TrainingCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.losses: list[float] = []

        def on_train_loss_report(self, info: dict) -> None:
            self.steps.append(info["iteration"])
            self.losses.append(info["train_loss"])

    mx.random.seed(seed)
    np.random.seed(seed)  # mlx-lm's trainer shuffles with NumPy's global generator
    model = llama.Model(llama.ModelArgs.from_dict(LORA_MODEL))
    model.freeze()
    linear_to_lora_layers(model, num_layers=2, config=LORA_ADAPTERS)
    model.set_dtype(weights)
    optimizer = make_optimizer(workload.hyper)
    train_set = CacheDataset(_CountingSequences(512, LORA_MODEL["vocab_size"], seed=1))
    valid_set = CacheDataset(_CountingSequences(64, LORA_MODEL["vocab_size"], seed=2))
    losses = Losses()
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        train(
            model=model,
            optimizer=optimizer,
            train_dataset=train_set,
            val_dataset=valid_set,
            args=TrainingArgs(
                batch_size=LORA_BATCH,
                iters=steps,
                val_batches=1,
                steps_per_report=max(steps // 50, 1),
                steps_per_eval=steps + 1,
                steps_per_save=steps + 1,
                max_seq_length=64,
                adapter_file=str(Path(folder) / "adapters.safetensors"),
            ),
            training_callback=losses,
        )
    loss = evaluate(model, valid_set, batch_size=LORA_BATCH, num_batches=-1, max_seq_length=64)
    return Outcome(
        losses.steps,
        losses.losses,
        float(loss),
        None,
        state_bytes(optimizer),
        0,
        _finite(model) and all(map(math.isfinite, losses.losses)) and math.isfinite(loss),
        0.0,
        optimizer,
    )


KERAS_MNIST = {"alpha": 0.9, "eps": 1e-7, "eps_in_sqrt": True}  # RMSprop.from_keras(rho=0.9)

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "mnist",
            "MLP 784-128-64-10 on synthetic digits, Keras preset lr 1e-3, batch 32, 10 epochs",
            {"learning_rate": 1e-3, **KERAS_MNIST},
            3750,
            _mnist,
        ),
        Workload(
            "mnist-small-lr",
            "the same MLP at learning rate 1e-4 (bf16 rounding swallows small updates)",
            {"learning_rate": 1e-4, **KERAS_MNIST},
            3750,
            _mnist,
        ),
        Workload(
            "lm",
            "character transformer LM from scratch (2 layers, 64 wide, context 32, batch 8), "
            "MLX defaults lr 1e-3",
            {"learning_rate": 1e-3},
            2000,
            _lm,
        ),
        Workload(
            "lora",
            "mlx-lm LoRA (rank 32 on q/v projections) of a tiny llama (2 layers, 128 wide), "
            "MLX defaults lr 1e-3, batch 8",
            {"learning_rate": 1e-3},
            400,
            _lora,
        ),
    )
}
