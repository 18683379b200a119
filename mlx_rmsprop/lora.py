"""``python -m mlx_rmsprop.lora``: mlx-lm's LoRA, DoRA and full fine-tuning with this RMSprop,
its optimizer state saved beside every adapter checkpoint so that a resumed run continues
exactly where the interrupted one stopped.

The command line and the YAML configuration are ``mlx_lm.lora``'s (tested with mlx-lm
``TESTED_MLX_LM``), with one more ``--optimizer`` choice, ``rmsprop`` (the default here). Its
arguments come from the configuration file, the learning rate from ``--learning-rate`` or
``lr_schedule`` as for mlx-lm's optimizers::

    optimizer: rmsprop
    optimizer_config:
      rmsprop: {alpha: 0.9, momentum: 0.9}          # any RMSprop argument
    # or a framework preset with that framework's argument names:
    #   rmsprop: {preset: keras, rho: 0.9, epsilon: 1.0e-7, clipnorm: 1.0}

Beside each adapter file mlx-lm writes (``adapters.safetensors`` and every
``NNNNNNN_adapters.safetensors``) this writes ``<stem>.optimizer.safetensors`` (the optimizer
state, :func:`mlx_rmsprop.save_state`) and ``<stem>.progress.json`` (iterations trained and the
seed). ``--resume-adapter-file F`` restores all three, and the run continues as the
uninterrupted one would have: the training batches come from their own NumPy random stream
seeded by ``--seed`` (validation does not draw from it) with those already trained on skipped,
and each iteration's dropout key is derived from the seed and the iteration number.

The other ``--optimizer`` choices run ``mlx_lm.lora`` unchanged (no optimizer state saved).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import presets
from .checkpoint import load_state, save_state
from .optimizer import RMSprop

try:
    import mlx_lm
    import mlx_lm.lora as mlx_lm_lora
    import yaml
    from mlx_lm.tuner import TrainingArgs, linear_to_lora_layers, train
    from mlx_lm.tuner.callbacks import get_reporting_callbacks
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.tuner.utils import build_schedule, print_trainable_parameters
    from mlx_lm.utils import load, save_config
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"mlx_rmsprop.lora needs mlx-lm ({error}); install it with "
        f"pip install 'mlx-rmsprop[mlx-lm]'"
    ) from error

__all__ = ["TESTED_MLX_LM", "build_optimizer", "main", "run"]

# The mlx-lm this module was tested with (pyproject's mlx-lm extra pins it). The resume relies
# on how its train() draws batches: iterate_batches(loop=True) for training, loop=False for
# validation, one training batch per iteration, adapters saved before the next batch is drawn.
TESTED_MLX_LM = "0.32.2"
OPTIMIZER = "rmsprop"
PRESET_KEY = "preset"
PROGRESS_FORMAT = "mlx_rmsprop.lora_progress"


def _presets() -> dict[str, Callable[..., RMSprop]]:
    """``{"torch": RMSprop.from_torch, ...}``: every ``from_<framework>`` constructor."""
    return {
        name.removeprefix("from_"): getattr(RMSprop, name)
        for name in dir(RMSprop)
        if name.startswith("from_")
    }


def _named_arguments(function: Callable) -> tuple[str, list[str]]:
    """The learning-rate argument (the first) and every other named argument of
    ``function``."""
    parameters = [
        parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    return parameters[0].name, [parameter.name for parameter in parameters[1:]]


def _dtype_arguments() -> set[str]:
    """RMSprop's arguments that take an MLX dtype (written by name in a configuration)."""
    return {
        name
        for name, parameter in inspect.signature(RMSprop).parameters.items()
        if "Dtype" in str(parameter.annotation)
    }


def build_optimizer(learning_rate: Any, config: dict | None) -> RMSprop:
    """The ``RMSprop`` that ``optimizer_config: {rmsprop: config}`` describes.

    ``config`` holds ``RMSprop``'s keyword arguments, or ``preset: <framework>`` (``torch``,
    ``keras``, ``optax``, ``tensorflow``) and that preset's arguments plus the options it
    forwards. The accepted keys are read from the constructors' signatures. A dtype argument
    (``state_dtype``) may be written by name (``float32``). ``learning_rate`` is mlx-lm's
    (a float or a schedule). Raises ``ValueError`` naming any unknown key or preset.
    """
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(
            f"optimizer_config.{OPTIMIZER} must be a mapping of RMSprop arguments, got {config!r}"
        )
    arguments = dict(config)
    preset = arguments.pop(PRESET_KEY, None)
    if preset is None:
        constructor, where = RMSprop, "RMSprop"
        rate_name, accepted = _named_arguments(RMSprop)
    else:
        known = _presets()
        if not isinstance(preset, str) or preset not in known:
            raise ValueError(
                f"optimizer_config.{OPTIMIZER}.{PRESET_KEY}: unknown preset {preset!r}; "
                f"choose one of {', '.join(sorted(known))}"
            )
        constructor, where = known[preset], f"RMSprop.from_{preset}"
        rate_name, accepted = _named_arguments(constructor)
        accepted += [name for name in presets.FORWARDED_OPTIONS if name not in accepted]
    if rate_name in arguments:
        raise ValueError(
            f"optimizer_config.{OPTIMIZER}: {rate_name!r} is the learning rate; set it with "
            f"--learning-rate (learning_rate) or lr_schedule, as for mlx-lm's optimizers"
        )
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer_config.{OPTIMIZER}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"{where} accepts {', '.join(sorted(accepted))}"
            + ("" if preset else f" and {PRESET_KEY!r}")
        )
    for name in _dtype_arguments() & set(arguments):
        value = arguments[name]
        if isinstance(value, str):
            dtype = getattr(mx, value, None)
            if not isinstance(dtype, mx.Dtype):
                raise ValueError(
                    f"optimizer_config.{OPTIMIZER}.{name}: {value!r} is not an MLX dtype "
                    f"(float32, bfloat16, ...)"
                )
            arguments[name] = dtype
    return constructor(learning_rate, **arguments)


def _sidecar(adapter_file: Path, kind: str) -> Path:
    """``adapters.safetensors`` -> ``adapters.optimizer.safetensors`` (kind ``optimizer``) or
    ``adapters.progress.json`` (kind ``progress``)."""
    suffix = ".optimizer.safetensors" if kind == "optimizer" else ".progress.json"
    return adapter_file.with_name(adapter_file.name.removesuffix(".safetensors") + suffix)


def _save_checkpoint(optimizer: RMSprop, adapter_file: Path, iteration: int, seed: int) -> None:
    """The optimizer state and the progress beside ``adapter_file`` (already written)."""
    save_state(optimizer, _sidecar(adapter_file, "optimizer"))
    progress = {"format": PROGRESS_FORMAT, "iteration": iteration, "seed": seed}
    path = _sidecar(adapter_file, "progress")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(progress, indent=2) + "\n")
    os.replace(temporary, path)


def _read_progress(adapter_file: Path) -> dict:
    path = _sidecar(adapter_file, "progress")
    try:
        progress = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--resume-adapter-file {str(adapter_file)!r}: its progress file {str(path)!r} "
            f"cannot be read ({error}); without it the run cannot continue exactly"
        ) from None
    if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{str(path)!r} is not an {PROGRESS_FORMAT} file")
    return progress


class _TrainingBatches:
    """The ``iterate_batches`` given to mlx-lm's ``train``: validation batches are mlx-lm's
    own; training batches are mlx-lm's too, but drawn from a NumPy random stream of their
    own (seeded with ``seed``, so validation cannot shift the order), with the first
    ``start`` batches skipped (those a resumed run has trained on). Before handing out the
    batch of local iteration ``k + 1`` the trainer has finished iteration ``k`` and written
    its adapters: that is where the optimizer state is saved beside them."""

    def __init__(
        self,
        optimizer: RMSprop,
        adapter_file: Path,
        steps_per_save: int,
        start: int,
        seed: int,
        save: bool,
    ):
        self.optimizer = optimizer
        self.adapter_file = adapter_file
        self.steps_per_save = steps_per_save
        self.start = start
        self.seed = seed
        self.save = save

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None, **kwargs):
        if not loop:
            return iterate_batches(
                dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length, **kwargs
            )
        return self._training(
            iterate_batches(
                dataset=dataset,
                batch_size=batch_size,
                max_seq_length=max_seq_length,
                loop=True,
                **kwargs,
            )
        )

    def _training(self, batches: Iterator) -> Iterator:
        stream = np.random.RandomState(self.seed).get_state()
        for index in itertools.count():
            outside = np.random.get_state()
            np.random.set_state(stream)
            try:
                batch = next(batches)
            finally:
                stream = np.random.get_state()
                np.random.set_state(outside)
            local = index - self.start
            if local < 0:
                continue
            if self.save and local > 0 and local % self.steps_per_save == 0:
                numbered = self.adapter_file.parent / f"{local:07d}_adapters.safetensors"
                for adapter_file in (self.adapter_file, numbered):
                    _save_checkpoint(self.optimizer, adapter_file, self.start + local, self.seed)
            # Dropout's random key, from the seed and the iteration alone: the same in a run
            # resumed at any iteration (MLX's key itself cannot be set from Python).
            mx.random.seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
            yield batch


def _train_model(args: types.SimpleNamespace, model, train_set, valid_set, callback) -> None:
    """``mlx_lm.lora.train_model`` with this RMSprop, its state saved and restored."""
    if args.grad_accumulation_steps > 1 and (
        args.save_every % args.grad_accumulation_steps or args.iters % args.grad_accumulation_steps
    ):
        raise ValueError(
            f"save_every ({args.save_every}) and iters ({args.iters}) must be multiples of "
            f"grad_accumulation_steps ({args.grad_accumulation_steps}): a checkpoint taken "
            f"between two optimizer updates would lose the accumulated gradient"
        )
    learning_rate = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    optimizer = build_optimizer(learning_rate, (args.optimizer_config or {}).get(OPTIMIZER))

    mx.random.seed(args.seed)
    model.freeze()
    if args.num_layers > len(model.layers):
        raise ValueError(
            f"Requested to train {args.num_layers} layers but the model only has "
            f"{len(model.layers)} layers."
        )
    if args.fine_tune_type == "full":
        for layer in model.layers[-max(args.num_layers, 0) :]:
            layer.unfreeze()
        args.lora_parameters = None
    elif args.fine_tune_type in ("lora", "dora"):
        linear_to_lora_layers(
            model,
            args.num_layers,
            args.lora_parameters,
            use_dora=args.fine_tune_type == "dora",
        )
    else:
        raise ValueError(f"Received unknown fine-tune-type {args.fine_tune_type}")

    start = 0
    if args.resume_adapter_file is not None:
        resume = Path(args.resume_adapter_file)
        progress = _read_progress(resume)
        if progress["seed"] != args.seed:
            raise ValueError(
                f"--resume-adapter-file {str(resume)!r} was trained with seed "
                f"{progress['seed']}, this run has seed {args.seed}: the batches would come "
                f"in another order; pass --seed {progress['seed']}"
            )
        model.load_weights(str(resume), strict=False)
        load_state(optimizer, _sidecar(resume, "optimizer"), model.trainable_parameters())
        start = progress["iteration"]
        print(f"Resuming after iteration {start} from {resume} and its optimizer state")
    print_trainable_parameters(model)

    adapter_path = Path(args.adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    adapter_file = adapter_path / "adapters.safetensors"
    save_config(vars(args), adapter_path / "adapter_config.json")
    training_args = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=args.val_batches,
        steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every,
        adapter_file=adapter_file,
        max_seq_length=args.max_seq_length,
        grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps,
    )
    saves = mx.distributed.init().rank() == 0
    batches = _TrainingBatches(optimizer, adapter_file, args.save_every, start, args.seed, saves)
    train(
        model=model,
        args=training_args,
        optimizer=optimizer,
        train_dataset=CacheDataset(train_set),
        val_dataset=CacheDataset(valid_set),
        training_callback=callback,
        iterate_batches=batches,
    )
    if saves:
        _save_checkpoint(optimizer, adapter_file, start + args.iters, args.seed)


def run(args: types.SimpleNamespace) -> None:
    """``mlx_lm.lora.run`` for a complete configuration namespace; ``--optimizer rmsprop``
    trains with this RMSprop, any other choice runs mlx-lm's own code."""
    if args.optimizer.lower() != OPTIMIZER:
        mlx_lm_lora.run(args)
        return
    if args.train:
        # Fail on a bad optimizer configuration before loading anything.
        build_optimizer(args.learning_rate, (args.optimizer_config or {}).get(OPTIMIZER))
    np.random.seed(args.seed)
    callback = get_reporting_callbacks(
        args.report_to,
        project_name=args.project_name,
        log_dir=args.adapter_path,
        config=vars(args),
    )
    print("Loading pretrained model")
    model, tokenizer = load(
        args.model,
        tokenizer_config={"trust_remote_code": args.trust_remote_code},
        trust_remote_code=args.trust_remote_code,
    )
    print("Loading datasets")
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    if args.test and not args.train:
        if args.adapter_path != "":
            mlx_lm.utils.load_adapters(model, args.adapter_path)
    elif args.train:
        print("Training")
        _train_model(args, model, train_set, valid_set, callback)
    else:
        raise ValueError("Must provide at least one of --train or --test")
    if args.test:
        print("Testing")
        mlx_lm_lora.evaluate_model(args, model, test_set)


def _parser() -> argparse.ArgumentParser:
    parser = mlx_lm_lora.build_parser()
    parser.prog = "python -m mlx_rmsprop.lora"
    parser.description = "mlx-lm LoRA, DoRA or full fine-tuning with mlx_rmsprop's RMSprop."
    for action in parser._actions:
        if "--optimizer" in action.option_strings:
            action.choices = [OPTIMIZER, *action.choices]
            action.help = (
                f"Optimizer: {', '.join(action.choices)} (default {OPTIMIZER}; its arguments "
                f"go in the configuration file's optimizer_config: {{{OPTIMIZER}: ...}})."
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and the ``--config`` YAML as ``mlx_lm.lora`` does, then
    :func:`run`."""
    if mlx_lm.__version__ != TESTED_MLX_LM:
        warnings.warn(
            f"mlx_rmsprop.lora was tested with mlx-lm {TESTED_MLX_LM}, this is "
            f"{mlx_lm.__version__}: pip install 'mlx-rmsprop[mlx-lm]' installs that version",
            stacklevel=2,
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = vars(_parser().parse_args(argv))
    if args["config"]:
        with open(args["config"]) as file:
            config = yaml.load(file, mlx_lm_lora.yaml_loader)
        if not isinstance(config, dict):
            raise ValueError(f"--config {args['config']!r} must hold a YAML mapping")
        for key, value in config.items():
            if args.get(key) is None:
                args[key] = value
    defaults = {
        **mlx_lm_lora.CONFIG_DEFAULTS,
        "optimizer": OPTIMIZER,
        "optimizer_config": {**mlx_lm_lora.CONFIG_DEFAULTS["optimizer_config"], OPTIMIZER: {}},
    }
    for key, value in defaults.items():
        if args.get(key) is None:
            args[key] = value
    run(types.SimpleNamespace(**args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
