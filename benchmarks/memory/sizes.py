"""Bytes: what ``optimizer.state`` holds per parameter in each configuration, and for a
GPT-2-small-shaped tree (124M parameters), read from the state the optimizer creates."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_rmsprop import RMSprop

from .workloads import state_bytes

# GPT-2 small (Radford et al. 2019; Hugging Face's gpt2): vocabulary 50257, context 1024,
# 12 layers of width 768, MLP 3072, tied output embedding. 124,439,808 parameters.
GPT2_SMALL = {"vocab": 50257, "context": 1024, "layers": 12, "width": 768, "mlp": 3072}

# The four state layouts: (label, RMSprop arguments).
LAYOUTS = (
    ("plain", {}),
    ("centered", {"centered": True}),
    ("momentum", {"momentum": 0.9}),
    ("centered + momentum", {"centered": True, "momentum": 0.9}),
)


def gpt2_small_shapes(dims: dict = GPT2_SMALL) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of GPT-2 small, by Hugging Face's names."""
    width, mlp = dims["width"], dims["mlp"]
    shapes = {"wte": (dims["vocab"], width), "wpe": (dims["context"], width)}
    for layer in range(dims["layers"]):
        prefix = f"h.{layer}."
        shapes |= {
            prefix + "ln_1.weight": (width,),
            prefix + "ln_1.bias": (width,),
            prefix + "attn.c_attn.weight": (width, 3 * width),
            prefix + "attn.c_attn.bias": (3 * width,),
            prefix + "attn.c_proj.weight": (width, width),
            prefix + "attn.c_proj.bias": (width,),
            prefix + "ln_2.weight": (width,),
            prefix + "ln_2.bias": (width,),
            prefix + "mlp.c_fc.weight": (width, mlp),
            prefix + "mlp.c_fc.bias": (mlp,),
            prefix + "mlp.c_proj.weight": (mlp, width),
            prefix + "mlp.c_proj.bias": (width,),
        }
    return shapes | {"ln_f.weight": (width,), "ln_f.bias": (width,)}


def _initialised(parameters: dict, **arguments) -> RMSprop:
    """An optimizer whose state has been created for ``parameters`` (``init``: the state an
    update would start from; its byte count follows from shapes and dtypes alone)."""
    optimizer = RMSprop(1e-3, **arguments)
    optimizer.init(parameters)
    return optimizer


def tree_state_bytes(
    shapes: dict[str, tuple[int, ...]], weights: mx.Dtype = mx.float32, **arguments
) -> int:
    """Bytes of ``optimizer.state`` for a tree of these shapes. The arrays stay unevaluated
    (MLX allocates nothing for them), so even 124M parameters cost no memory here."""
    parameters = {name: mx.zeros(shape, weights) for name, shape in shapes.items()}
    return state_bytes(_initialised(parameters, **arguments))


def gpt2_small(state_bits: int = 8) -> dict:
    """The GPT-2-small state bytes with float32 and with ``state_bits`` state."""
    shapes = gpt2_small_shapes()
    parameters = sum(int(mx.zeros(shape).size) for shape in shapes.values())
    full = tree_state_bytes(shapes)
    small = tree_state_bytes(shapes, state_bits=state_bits)
    return {
        "parameters": parameters,
        "float32_state_bytes": full,
        "quantized_state_bytes": small,
        "ratio": small / full,
    }


def bytes_per_parameter(elements: int = 1 << 20, state_bits: int = 8) -> list[dict]:
    """Weight plus optimizer-state bytes per parameter of one tensor of ``elements`` (large
    enough to be quantized; the per-tensor counters are negligible at this size), for
    float32/bfloat16 weights x float32/``state_bits`` state x the four layouts."""
    rows = []
    for label, arguments in LAYOUTS:
        for weights in (mx.float32, mx.bfloat16):
            row = {"layout": label, "weights": str(weights).removeprefix("mlx.core.")}
            for bits in (32, state_bits):
                extra = {"state_bits": bits} if bits != 32 else {}
                parameters = {"w": mx.zeros((elements,), weights)}
                optimizer = _initialised(parameters, **arguments, **extra)
                buffers = sum(
                    value.nbytes
                    for key, value in tree_flatten(optimizer.state)
                    if key.startswith("w.")
                )
                row[f"state_{bits}"] = buffers / elements
                row[f"total_{bits}"] = buffers / elements + weights.size
            rows.append(row)
    return rows
