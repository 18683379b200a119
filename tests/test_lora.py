"""``python -m mlx_rmsprop.lora`` (mlx-lm's fine-tuning with our RMSprop), end to end on a tiny
local model; run whenever mlx-lm is installed (the mlx-lm extra)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import optional

optional.module("mlx_lm")
os.environ["HF_HUB_OFFLINE"] = "1"

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_rmsprop import RMSprop, load_state, lora  # noqa: E402

ROOT = Path(__file__).parent.parent
WORDS = "the a cat dog saw found liked red green ball boat tree near by sea hill".split()
CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 320,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint (mlx-lm's llama keeps the strings ``layer_types`` in its
    parameter tree) with a byte-level BPE tokenizer trained here on ``WORDS``, as
    ``mlx_lm.load`` reads one. (transformers 5 rebuilds a checkpoint's tokenizer as its model
    type's class: a word-level tokenizer.json would encode to nothing.)"""
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer)
    assert tokenizer.get_vocab_size() <= CONFIG["vocab_size"]
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, count in (("train", 24), ("valid", 8), ("test", 8)):
        lines = [
            json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(4, 12)))})
            for _ in range(count)
        ]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_config(path: Path, **entries) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(entries))
    return path


def train_args(model_dir: Path, data_dir: Path, adapters: Path, config: Path, iters: int):
    return [
        "--model", str(model_dir), "--train", "--data", str(data_dir),
        "--adapter-path", str(adapters), "--config", str(config), "--iters", str(iters),
        "--batch-size", "4", "--num-layers", "2", "--val-batches", "2",
        "--steps-per-report", "2", "--steps-per-eval", "3",
    ]  # fmt: skip


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    return {key: np.array(value) for key, value in mx.load(str(path)).items()}


def assert_same_file_arrays(first: Path, second: Path) -> None:
    a, b = read_arrays(first), read_arrays(second)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def test_entry_point_fine_tunes_with_rmsprop_and_saves_its_state(tmp_path, model_dir, data_dir):
    config = write_config(
        tmp_path / "config.yaml",
        learning_rate=1e-2,
        save_every=2,
        optimizer_config={"rmsprop": {"preset": "keras", "rho": 0.8, "clipnorm": 1.0}},
    )
    adapters = tmp_path / "adapters"
    result = subprocess.run(
        [sys.executable, "-m", "mlx_rmsprop.lora", *train_args(model_dir, data_dir, adapters, config, 4), "--test"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Test loss" in result.stdout
    for stem in ("adapters", "0000002_adapters"):
        assert (adapters / f"{stem}.safetensors").exists()
        progress = json.loads((adapters / f"{stem}.progress.json").read_text())
        assert progress["iteration"] == (4 if stem == "adapters" else 2)
    saved = RMSprop.from_keras(1e-2, rho=0.8, clipnorm=1.0)
    load_state(saved, adapters / "adapters.optimizer.safetensors")
    assert saved.step.item() == 4
    # The LoRA matrices of both layers' attention and MLP projections have state.
    keys = [key for key, _ in tree_flatten(saved.state)]
    assert sum(".lora_a." in key for key in keys) == 2 * 7, keys


def test_resumed_fine_tune_continues_bit_for_bit(tmp_path, model_dir, data_dir):
    # Dropout draws from MLX's random key, a cosine schedule reads the optimizer's step,
    # validation every 3 iterations draws from NumPy's global generator, 24 examples in
    # batches of 4 make 6 batches per epoch: resuming after 4 of 10 iterations crosses an
    # epoch boundary. Each of those would break the equality if it were not restored.
    config = write_config(
        tmp_path / "config.yaml",
        save_every=4,
        lora_parameters={"rank": 4, "dropout": 0.2, "scale": 10.0},
        lr_schedule={"name": "cosine_decay", "arguments": [1e-2, 10, 1e-4]},
        optimizer_config={"rmsprop": {"momentum": 0.9, "centered": True}},
    )
    whole, first, resumed = tmp_path / "whole", tmp_path / "first", tmp_path / "resumed"
    lora.main(train_args(model_dir, data_dir, whole, config, 10))
    lora.main(train_args(model_dir, data_dir, first, config, 4))
    lora.main(
        train_args(model_dir, data_dir, resumed, config, 6)
        + ["--resume-adapter-file", str(first / "adapters.safetensors")]
    )
    assert_same_file_arrays(whole / "adapters.safetensors", resumed / "adapters.safetensors")
    assert_same_file_arrays(
        whole / "adapters.optimizer.safetensors", resumed / "adapters.optimizer.safetensors"
    )
    assert json.loads((resumed / "adapters.progress.json").read_text())["iteration"] == 10
    # The state after 4 iterations is a real intermediate: the runs did not just agree on
    # having done nothing.
    early, late = (
        read_arrays(first / "adapters.safetensors"),
        read_arrays(whole / "adapters.safetensors"),
    )
    assert any(early[key].tobytes() != late[key].tobytes() for key in early)


def test_resume_refuses_a_missing_progress_file(tmp_path, model_dir, data_dir):
    config = write_config(tmp_path / "config.yaml", save_every=10)
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {})
    with pytest.raises(ValueError, match=r"progress file .*plain\.progress\.json.* cannot be read"):
        lora.main(
            train_args(model_dir, data_dir, tmp_path / "out", config, 2)
            + ["--resume-adapter-file", str(plain)]
        )


def test_build_optimizer_takes_every_rmsprop_argument_by_name():
    # Each keyword argument RMSprop has (read from its signature, so new ones are covered),
    # given its default value, is accepted.
    parameters = list(inspect.signature(RMSprop).parameters.values())[1:]
    for parameter in parameters:
        optimizer = lora.build_optimizer(1e-3, {parameter.name: parameter.default})
        assert isinstance(optimizer, RMSprop)
    config = {"alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "state_dtype": "bfloat16"}
    optimizer = lora.build_optimizer(1e-3, config)
    expected = RMSprop(1e-3, alpha=0.9, eps=1e-6, momentum=0.5, state_dtype=mx.bfloat16)
    assert optimizer.get_config() == expected.get_config()
    assert lora.build_optimizer(1e-3, None).get_config() == RMSprop(1e-3).get_config()


@pytest.mark.parametrize("preset", ["torch", "keras", "optax", "tensorflow"])
def test_build_optimizer_presets_take_their_framework_arguments(preset):
    constructor = getattr(RMSprop, f"from_{preset}")
    names = list(inspect.signature(constructor).parameters)[1:]
    names = [name for name in names if name != "options"]
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(constructor).parameters.items()
        if name in names and parameter.default is not inspect.Parameter.empty
    }
    config = {**defaults, "clipvalue": 0.5, "fused": "compiled"}
    optimizer = lora.build_optimizer(1e-3, {"preset": preset, **config})
    assert optimizer.get_config() == constructor(1e-3, **config).get_config()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"alhpa": 0.9},
            r"optimizer_config\.rmsprop: unknown key\(s\) 'alhpa'; RMSprop accepts .*alpha",
        ),
        (
            {"preset": "keras", "alpha": 0.9},
            r"unknown key\(s\) 'alpha'; RMSprop\.from_keras accepts .*rho",
        ),
        (
            {"preset": "jax"},
            r"optimizer_config\.rmsprop\.preset: unknown preset 'jax'; choose one of keras, optax, tensorflow, torch",
        ),
        ({"preset": ["keras"]}, r"unknown preset \['keras'\]; choose one of"),
        (
            {"learning_rate": 0.1},
            r"'learning_rate' is the learning rate; set it with --learning-rate",
        ),
        ({"preset": "torch", "lr": 0.1}, r"'lr' is the learning rate"),
        (
            {"state_dtype": "float33"},
            r"optimizer_config\.rmsprop\.state_dtype: 'float33' is not an MLX dtype",
        ),
        ([0.9], r"optimizer_config\.rmsprop must be a mapping of RMSprop arguments, got \[0\.9\]"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ],
)
def test_build_optimizer_names_a_bad_key(config, message):
    with pytest.raises(ValueError, match=message):
        lora.build_optimizer(1e-3, config)


def test_entry_point_rejects_a_bad_optimizer_config_before_loading(tmp_path, data_dir):
    config = write_config(tmp_path / "config.yaml", optimizer_config={"rmsprop": {"rhoo": 0.9}})
    # The model folder does not exist: the configuration error must come first.
    with pytest.raises(ValueError, match="unknown key\\(s\\) 'rhoo'"):
        lora.main(train_args(tmp_path / "no-model", data_dir, tmp_path / "a", config, 2))


def test_other_optimizers_run_mlx_lm_unchanged(tmp_path, model_dir, data_dir):
    config = write_config(tmp_path / "config.yaml", save_every=10)
    adapters = tmp_path / "adapters"
    lora.main(train_args(model_dir, data_dir, adapters, config, 2) + ["--optimizer", "adam"])
    assert (adapters / "adapters.safetensors").exists()
    assert json.loads((adapters / "adapter_config.json").read_text())["optimizer"] == "adam"
    assert not (adapters / "adapters.optimizer.safetensors").exists()


def test_resume_refuses_another_seed(tmp_path, model_dir, data_dir):
    config = write_config(tmp_path / "config.yaml", save_every=10)
    adapters = tmp_path / "adapters.safetensors"
    mx.save_safetensors(str(adapters), {})
    progress = {"format": "mlx_rmsprop.lora_progress", "iteration": 4, "seed": 5}
    (tmp_path / "adapters.progress.json").write_text(json.dumps(progress))
    with pytest.raises(
        ValueError, match=r"was trained with seed 5, this run has seed 0: .*pass --seed 5"
    ):
        lora.main(
            train_args(model_dir, data_dir, tmp_path / "out", config, 2)
            + ["--resume-adapter-file", str(adapters)]
        )


def test_gradient_accumulation_needs_whole_windows_between_checkpoints(
    tmp_path, model_dir, data_dir
):
    config = write_config(tmp_path / "config.yaml", save_every=3, grad_accumulation_steps=2)
    message = r"save_every \(3\) and iters \(4\) must be multiples of grad_accumulation_steps \(2\)"
    with pytest.raises(ValueError, match=message):
        lora.main(train_args(model_dir, data_dir, tmp_path / "out", config, 4))
