"""RMSprop for MLX: every framework's variant, exact, as one fused update per parameter."""

from ._version import __version__
from .optimizer import RMSprop
from .options import Scalar, UpdateOptions
from .reference import rmsprop_reference

__all__ = ["RMSprop", "Scalar", "UpdateOptions", "rmsprop_reference", "__version__"]
