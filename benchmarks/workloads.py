"""What the benchmark updates: the parameter trees, their data, and the optimizer configurations.

Data is generated once per workload in NumPy (float32, seeded) so that every framework starts
from the same numbers; each adapter converts it to its own arrays and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")

# A small decoder-only transformer: 13 blocks of width 384 (attention qkv + output, a 4x MLP,
# two layer norms, every linear with a bias) plus token and position embeddings and a final
# norm: 160 tensors, 24.8M parameters.
MODEL_WIDTH = 384
MODEL_BLOCKS = 13
MODEL_VOCABULARY = 4096
MODEL_CONTEXT = 512

SMALL_TENSORS = 200
SMALL_TENSOR_SIZE = 2**10

# GPT-2 small (124M parameters) as MLX's nn.MultiHeadAttention lays a block out: separate
# query/key/value/output projections, each with a bias: 16 tensors a block, 196 in all.
GPT2_WIDTH = 768
GPT2_BLOCKS = 12
GPT2_VOCABULARY = 50257
GPT2_CONTEXT = 1024

# LoRA adapters on a 7B Llama (width 4096, MLP width 11008, 32 layers), in mlx-lm's layout:
# lora_a (input, rank), lora_b (rank, output).
LLAMA_7B_WIDTH = 4096
LLAMA_7B_MLP = 11008
LLAMA_7B_LAYERS = 32

# Many tiny tensors: per-tensor overhead with nearly no arithmetic.
TINY_TENSORS = 10_000
TINY_TENSOR_SIZE = 4


@dataclass(frozen=True)
class Configuration:
    """An RMSprop configuration every implementation that has it is asked to run.

    ``pipeline`` holds Keras pipeline arguments of ``mlx_rmsprop.RMSprop``; only ours runs a
    configuration that has any (the peers' RMSprop has no such options)."""

    name: str
    centered: bool
    momentum: float
    pipeline: tuple[tuple[str, Any], ...] = ()


# Every pipeline option that adds per-tensor work, at once: EMA, the non-finite skip, a
# per-tensor clip norm and accumulation over 2 calls (every other timed call only adds the
# gradient to the accumulator).
FULL_PIPELINE = (
    ("use_ema", True),
    ("skip_nonfinite", True),
    ("clipnorm", 1.0),
    ("gradient_accumulation_steps", 2),
)

CONFIGURATIONS = {
    "plain": Configuration("plain", centered=False, momentum=0.0),
    "centered": Configuration("centered", centered=True, momentum=0.0),
    "momentum": Configuration("momentum", centered=False, momentum=0.9),
    "centered+momentum": Configuration("centered+momentum", centered=True, momentum=0.9),
    "full pipeline": Configuration(
        "full pipeline", centered=False, momentum=0.0, pipeline=FULL_PIPELINE
    ),
}
# The configurations every implementation runs (the others are ours alone).
PLAIN_RMSPROP = frozenset(name for name, c in CONFIGURATIONS.items() if not c.pipeline)

# Shared by every implementation: MLX's defaults, a learning rate that keeps parameters finite
# over thousands of benchmark steps.
LEARNING_RATE = 1e-3
ALPHA = 0.99
EPS = 1e-8


@dataclass(frozen=True)
class Workload:
    """A parameter tree to update: ``shapes`` in a fixed order, all of ``dtype``."""

    kind: str  # one of KINDS
    label: str
    dtype: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def elements(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    def key(self) -> str:
        return f"{self.label} {self.dtype}"


def model_shapes() -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of the model-shaped tree, in the order a model lists them."""
    d = MODEL_WIDTH
    shapes: list[tuple[int, ...]] = [(MODEL_VOCABULARY, d), (MODEL_CONTEXT, d)]
    for _ in range(MODEL_BLOCKS):
        shapes += [
            (d,), (d,),  # attention norm weight, bias
            (d, 3 * d), (3 * d,),  # query/key/value projection
            (d, d), (d,),  # attention output projection
            (d,), (d,),  # MLP norm weight, bias
            (d, 4 * d), (4 * d,),  # MLP up projection
            (4 * d, d), (d,),  # MLP down projection
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # final norm
    return tuple(shapes)


def gpt2_shapes() -> tuple[tuple[int, ...], ...]:
    """GPT-2 small's 196 trainable tensors (124.4M parameters), in the order a model lists
    them."""
    d = GPT2_WIDTH
    shapes: list[tuple[int, ...]] = [(GPT2_VOCABULARY, d), (GPT2_CONTEXT, d)]
    for _ in range(GPT2_BLOCKS):
        shapes += [
            (d,), (d,),  # attention norm weight, bias
            (d, d), (d,), (d, d), (d,), (d, d), (d,),  # query, key, value projections
            (d, d), (d,),  # output projection
            (d,), (d,),  # MLP norm weight, bias
            (d, 4 * d), (4 * d,), (4 * d, d), (d,),  # MLP up and down projections
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # final norm
    return tuple(shapes)


def lora_shapes(projections: tuple[str, ...], rank: int) -> tuple[tuple[int, ...], ...]:
    """The adapters of every 7B Llama layer's ``projections``: lora_a then lora_b of each."""
    d, mlp = LLAMA_7B_WIDTH, LLAMA_7B_MLP
    sizes = {  # (input, output) of each projection
        "q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
        "gate": (d, mlp), "up": (d, mlp), "down": (mlp, d),
    }  # fmt: skip
    shapes: list[tuple[int, ...]] = []
    for _ in range(LLAMA_7B_LAYERS):
        for projection in projections:
            inputs, outputs = sizes[projection]
            shapes += [(inputs, rank), (rank, outputs)]
    return tuple(shapes)


def single_tensor(exponent: int, dtype: str) -> Workload:
    return Workload("single", f"2^{exponent}", dtype, ((2**exponent,),))


def model_tree(dtype: str) -> Workload:
    return Workload("tree", "model tree", dtype, model_shapes())


def many_small(dtype: str) -> Workload:
    label = f"{SMALL_TENSORS}x2^{SMALL_TENSOR_SIZE.bit_length() - 1}"
    return Workload("small", label, dtype, ((SMALL_TENSOR_SIZE,),) * SMALL_TENSORS)


def gpt2_small(dtype: str) -> Workload:
    return Workload("gpt2", "GPT-2 small", dtype, gpt2_shapes())


def lora_qv(dtype: str) -> Workload:
    """mlx-lm's default LoRA targets on a 7B model: q and v of every layer, rank 8."""
    return Workload("lora-qv", "7B LoRA q,v r8", dtype, lora_shapes(("q", "v"), 8))


def lora_all(dtype: str) -> Workload:
    """Every projection of every 7B layer adapted, rank 16: 448 tensors."""
    projections = ("q", "k", "v", "o", "gate", "up", "down")
    return Workload("lora-7b", "7B LoRA all r16", dtype, lora_shapes(projections, 16))


def many_tiny(dtype: str) -> Workload:
    label = f"{TINY_TENSORS}x{TINY_TENSOR_SIZE}"
    return Workload("tiny", label, dtype, ((TINY_TENSOR_SIZE,),) * TINY_TENSORS)


# Workload kinds in the order a run measures them, and what builds each (single tensors are
# built per size).
TREES: dict[str, Callable[[str], Workload]] = {
    "tree": model_tree,
    "gpt2": gpt2_small,
    "small": many_small,
    "lora-qv": lora_qv,
    "lora-7b": lora_all,
    "tiny": many_tiny,
}
KINDS = ("single", *TREES)


def plan_workloads(kinds: list[str], exponents: list[int], dtypes: list[str]) -> list[Workload]:
    """Every workload of a run, in the order they are measured (single tensors by size)."""
    planned = []
    for dtype in dtypes:
        if "single" in kinds:
            planned += [single_tensor(exponent, dtype) for exponent in exponents]
        planned += [make(dtype) for kind, make in TREES.items() if kind in kinds]
    return planned


@dataclass
class WorkloadData:
    """The float32 NumPy parameters and gradients of a workload, and the gradients each
    framework converted from them.

    Every implementation steps with gradients that alternate between ``g`` and ``-g`` (switched
    between timed steps): a constant gradient drives the centered variance to rounding noise
    and the updates towards ``lr / eps``, which real training never sees. Gradients are
    read-only, so one converted pair per framework and dtype serves every row of the workload.
    """

    parameters: list[np.ndarray]
    gradients: list[np.ndarray]
    converted: dict = field(default_factory=dict)

    def gradient_pair(self, key: tuple, convert: Callable[[list[np.ndarray]], Any]) -> tuple:
        """``(convert(g), convert(-g))``, made once per ``key`` (framework, dtype)."""
        if key not in self.converted:
            negated = [-gradient for gradient in self.gradients]
            self.converted[key] = (convert(self.gradients), convert(negated))
        return self.converted[key]


def generate(workload: Workload, seed: int = 0) -> WorkloadData:
    """Float32 parameters (scale 0.02, as initialised weights) and gradients (scale 1e-2, far
    from float32's subnormals after squaring) for ``workload``."""
    rng = np.random.default_rng(seed)
    parameters = [0.02 * rng.standard_normal(shape, dtype=np.float32) for shape in workload.shapes]
    gradients = [1e-2 * rng.standard_normal(shape, dtype=np.float32) for shape in workload.shapes]
    return WorkloadData(parameters, gradients)


def bytes_moved(parameters: list, gradients: list, state_buffers: list) -> int:
    """Bytes one update must move at the least: read every parameter, gradient and state buffer,
    write every parameter and state buffer. Anything with ``nbytes`` counts (MLX, NumPy,
    PyTorch via ``nbytes``, JAX), so each implementation is charged its own dtypes."""
    parameter_bytes = sum(int(array.nbytes) for array in parameters)
    gradient_bytes = sum(int(array.nbytes) for array in gradients)
    state_bytes = sum(int(array.nbytes) for array in state_buffers)
    return 2 * parameter_bytes + gradient_bytes + 2 * state_bytes
