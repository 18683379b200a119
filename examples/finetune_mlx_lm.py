"""mlx-lm's own LoRA fine-tuning loop with mlx_rmsprop's RMSprop, on a tiny model: no download.

A two-layer Llama model is built from a config dict with mlx-lm's own class (which keeps the
strings ``layer_types`` in its parameter tree: the optimizer passes them by), its
linear layers get LoRA adapters from mlx-lm's ``linear_to_lora_layers``, and mlx-lm's
``tuner.trainer.train`` runs with our optimizer on token sequences made here (each sequence
counts up by a fixed stride from a random start, modulo the vocabulary: learnable from the
first few tokens). mlx-lm's trainer only needs a dataset whose items ``process`` turns into
``(token ids, prompt offset)``, so no tokenizer is involved. The adapters and the optimizer
state are saved side by side, as ``python -m mlx_rmsprop.lora`` does.

Needs the mlx-lm extra: ``pip install 'mlx-rmsprop[mlx-lm]'``.

    python examples/finetune_mlx_lm.py [--iters N] [--output DIR] [--fast]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner import TrainingArgs, evaluate, linear_to_lora_layers, train
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset

from mlx_rmsprop import RMSprop, save_state

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 97,
    "tie_word_embeddings": True,
}


class CountingSequences:
    """Token sequences ``start, start + stride, ...`` (mod the vocabulary) of varying length,
    in the form mlx-lm's trainer takes: ``process(item)`` gives ``(token ids, prompt offset)``
    (offset 0: every token counts in the loss)."""

    def __init__(self, count: int, vocab_size: int, seed: int, stride: int = 7):
        rng = np.random.default_rng(seed)
        self.items = [
            [
                int(token)
                for token in (rng.integers(vocab_size) + stride * np.arange(rng.integers(12, 24)))
                % vocab_size
            ]
            for _ in range(count)
        ]

    def __getitem__(self, index: int) -> list[int]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def process(self, item: list[int]) -> tuple[list[int], int]:
        return item, 0


class Losses(TrainingCallback):
    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.train.append((info["iteration"], info["train_loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--output", type=Path, default=None, help="adapter folder (default: temp)")
    parser.add_argument("--fast", action="store_true", help="a short run (the smoke test)")
    args = parser.parse_args()
    iters = 40 if args.fast else args.iters

    mx.random.seed(0)
    np.random.seed(0)  # mlx-lm's trainer shuffles its batches with NumPy's global generator
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    model.freeze()
    linear_to_lora_layers(model, num_layers=2, config={"rank": 8, "dropout": 0.0, "scale": 20.0})
    trainable = sum(value.size for _, value in tree_flatten(model.trainable_parameters()))
    print(f"model: llama, {CONFIG['num_hidden_layers']} layers; {trainable} LoRA parameters")

    train_set = CacheDataset(CountingSequences(256, CONFIG["vocab_size"], seed=1))
    valid_set = CacheDataset(CountingSequences(32, CONFIG["vocab_size"], seed=2))
    optimizer = RMSprop(learning_rate=1e-3)

    def validation_loss() -> float:
        return evaluate(model, valid_set, batch_size=8, num_batches=-1, max_seq_length=64)

    before = validation_loss()
    folder = args.output or Path(tempfile.mkdtemp(prefix="finetune_mlx_lm_"))
    folder.mkdir(parents=True, exist_ok=True)
    losses = Losses()
    train(
        model=model,
        optimizer=optimizer,
        train_dataset=train_set,
        val_dataset=valid_set,
        args=TrainingArgs(
            batch_size=8,
            iters=iters,
            val_batches=4,
            steps_per_report=10,
            steps_per_eval=iters,
            steps_per_save=iters,
            max_seq_length=64,
            adapter_file=str(folder / "adapters.safetensors"),
        ),
        training_callback=losses,
    )
    after = validation_loss()
    state_file = save_state(optimizer, folder / "adapters.optimizer.safetensors")

    for iteration, loss in losses.train:
        print(f"iteration {iteration:4d}  train loss {loss:.3f}")
    print(f"validation loss: {before:.3f} before, {after:.3f} after {iters} iterations")
    print(f"adapters: {folder / 'adapters.safetensors'}")
    print(f"optimizer state (step {optimizer.step.item()}): {state_file}")


if __name__ == "__main__":
    main()
