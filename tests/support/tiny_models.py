"""Small models the tests train without a download."""

from __future__ import annotations

import mlx.core as mx

import optional


def tiny_llama():
    """A two-layer model from mlx-lm's own llama classes, whose ``layer_types`` are strings in
    the module and ``{}`` in its parameters and gradients (built from a config, seeded)."""
    llama = optional.module("mlx_lm.models.llama")
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        vocab_size=32,
        layer_types=["full_attention", "sliding_attention"],
        sliding_window=4,
    )
    mx.random.seed(3)
    return llama.Model(args)
