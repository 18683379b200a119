"""RMSprop for MLX: every framework's variant, exact, as one fused update per parameter."""

from ._version import __version__
from .checkpoint import CheckpointError, load_state, save_state
from .optimizer import RMSprop
from .reference import rmsprop_reference
from .spec import Scalar, UpdateOptions

__all__ = [
    "CheckpointError",
    "RMSprop",
    "Scalar",
    "UpdateOptions",
    "__version__",
    "load_state",
    "rmsprop_reference",
    "save_state",
]
