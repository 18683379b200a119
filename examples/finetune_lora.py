"""On-device fine-tuning: LoRA adapters on a small transformer language model.

A character-level transformer is pretrained briefly on one text (generated short stories),
its weights are cast to bfloat16 and frozen, and low-rank adapters on the attention query and
value projections are trained with mlx_rmsprop on another text (generated weather reports).
The adapters are bfloat16 too; the optimizer keeps its state in float32 (its default for
low-precision parameters), so small updates are not lost to bfloat16 rounding in ``v``.

    python examples/finetune_lora.py [--pretrain-steps N] [--finetune-steps M] [--fast]
"""

from __future__ import annotations

import argparse
import math
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a small boy", "the farmer"]
VERBS = ["saw", "found", "followed", "painted", "carried", "liked", "watched"]
OBJECTS = ["the red ball", "a green boat", "the tall tree", "an apple", "the quiet river", "a kite"]
PLACES = ["near the hill", "in the garden", "by the sea", "at the market", "under the bridge"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy", "stormy", "clear"]


def stories(count: int, rng: np.random.Generator) -> str:
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    return " ".join(
        f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)} {pick(PLACES)}." for _ in range(count)
    )


def weather(count: int, rng: np.random.Generator) -> str:
    reports = []
    for _ in range(count):
        low = int(rng.integers(-5, 20))
        reports.append(
            f"{DAYS[rng.integers(7)]}: {SKIES[rng.integers(7)]}, "
            f"{low} to {low + int(rng.integers(3, 12))} degrees."
        )
    return " ".join(reports)


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ a) @ b`` with ``base`` frozen; ``b`` starts at zero, so the
    adapted model starts as the base model."""

    def __init__(self, base: nn.Linear, rank: int, dtype: mx.Dtype):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base
        self.base.freeze()
        self.a = (mx.random.normal((in_features, rank)) / math.sqrt(in_features)).astype(dtype)
        self.b = mx.zeros((rank, out_features), dtype)
        self.scale = 2.0

    def __call__(self, x):
        return self.base(x) + self.scale * ((x @ self.a) @ self.b)


class Block(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dims), nn.LayerNorm(dims)
        self.attention = nn.MultiHeadAttention(dims, heads)
        self.mlp = nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(), nn.Linear(4 * dims, dims))

    def __call__(self, x, mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, mask)
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    def __init__(
        self, vocab: int, dims: int = 64, heads: int = 4, layers: int = 2, context: int = 48
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dims)
        self.position = nn.Embedding(context, dims)
        self.blocks = [Block(dims, heads) for _ in range(layers)]
        self.norm = nn.LayerNorm(dims)
        self.head = nn.Linear(dims, vocab)

    def __call__(self, tokens):
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.position(mx.arange(length))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(length).astype(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def batches(encoded: np.ndarray, context: int, size: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(encoded) - context - 1, size)
        window = np.stack([encoded[s : s + context + 1] for s in starts])
        yield mx.array(window[:, :-1]), mx.array(window[:, 1:])


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")


def train(model, optimizer, data, steps: int, label: str) -> float:
    """Returns tokens per second."""
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    compiled = mx.compile(step, inputs=state, outputs=state)
    tokens, started = 0, time.perf_counter()
    for index in range(1, steps + 1):
        x, y = next(data)
        loss = compiled(x, y)
        mx.eval(state)
        tokens += x.size
        if index % max(1, steps // 5) == 0:
            print(f"  {label} step {index:4d}  loss {loss.item():.4f}")
    return tokens / (time.perf_counter() - started)


def evaluate(model, encoded: np.ndarray, context: int) -> float:
    usable = (len(encoded) - 1) // context * context
    x = mx.array(encoded[:usable].reshape(-1, context))
    y = mx.array(encoded[1 : usable + 1].reshape(-1, context))
    return loss_fn(model, x, y).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Sized to finish in under two minutes on a 2-core CPU, where MLX's matmul is slow (about
    # 5 GFLOP/s measured); on an Apple GPU the same run takes seconds.
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    if args.fast:
        args.pretrain_steps, args.finetune_steps, args.batch_size = 20, 20, 8
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    source, target, held_out = stories(3000, rng), weather(1500, rng), weather(200, rng)
    alphabet = sorted(set(source + target + held_out))
    lookup = {c: i for i, c in enumerate(alphabet)}
    encode = lambda text: np.array([lookup[c] for c in text], np.int32)  # noqa: E731
    context = 48
    model = CharLM(len(alphabet), context=context)

    print(f"pretraining on {len(source)} characters of stories ({args.pretrain_steps} steps)")
    train(
        model,
        RMSprop(1e-3),
        batches(encode(source), context, args.batch_size, rng),
        args.pretrain_steps,
        "pretrain",
    )

    model.set_dtype(mx.bfloat16)
    model.freeze()
    for block in model.blocks:
        block.attention.query_proj = LoRALinear(block.attention.query_proj, args.rank, mx.bfloat16)
        block.attention.value_proj = LoRALinear(block.attention.value_proj, args.rank, mx.bfloat16)
    trainable = tree_flatten(model.trainable_parameters())
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    adapters = sum(v.size for _, v in trainable)
    print(
        f"base weights bfloat16 and frozen; LoRA rank {args.rank}: "
        f"{adapters} trainable of {total} parameters"
    )

    before = evaluate(model, encode(held_out), context)
    optimizer = RMSprop(2e-3, momentum=0.9)
    speed = train(
        model,
        optimizer,
        batches(encode(target), context, args.batch_size, rng),
        args.finetune_steps,
        "lora",
    )
    after = evaluate(model, encode(held_out), context)
    state_dtypes = sorted(
        {
            str(v.dtype)
            for k, v in tree_flatten(optimizer.state)
            if k.endswith((".v", ".momentum_buffer"))
        }
    )
    print(f"optimizer state dtype {', '.join(state_dtypes)}; adapters {trainable[0][1].dtype}")
    print(
        f"held-out weather loss: {before:.4f} before LoRA, {after:.4f} after "
        f"({speed:,.0f} tokens/s fine-tuning)"
    )
    return {
        "before": before,
        "after": after,
        "tokens_per_second": speed,
        "state_dtypes": state_dtypes,
    }


if __name__ == "__main__":
    main()
