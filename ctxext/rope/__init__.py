"""RoPE extension methods: pure tensor math on per-pair inverse frequencies (only torch needed).

Importing this package registers every method in ``METHODS``.
"""

from . import dynamic, llama3, ntk, pi, prope, xpos, yarn  # noqa: F401  (registration)
from .chain import apply_chain, format_chain, parse_chain, rescale_factor, validate_chain
from .spec import METHODS, MethodError, RopeContext, RopeState, make_method

__all__ = [
    "METHODS",
    "MethodError",
    "RopeContext",
    "RopeState",
    "apply_chain",
    "format_chain",
    "make_method",
    "parse_chain",
    "rescale_factor",
    "validate_chain",
]
