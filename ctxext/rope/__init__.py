"""RoPE extension methods: pure tensor math on per-pair inverse frequencies (only torch needed).

Importing this package registers every built-in method in ``METHODS`` (a new method is one file here plus its
line below; see ``registry.py``).
"""

from ctxext.errors import MethodError
from ctxext.rope.registry import (
    METHODS,
    ROLES,
    MethodConfig,
    RopeContext,
    RopeState,
    make_method,
    param,
    register_method,
)

# isort: off
from ctxext.rope import pi, ntk, dynamic, yarn, llama3, prope, xpos, selfextend  # noqa: F401  (registration, in display order)

# isort: on
from ctxext.rope.chain import apply_chain, format_chain, parse_chain, rescale_factor, validate_chain

__all__ = [
    "METHODS",
    "ROLES",
    "MethodConfig",
    "MethodError",
    "RopeContext",
    "RopeState",
    "apply_chain",
    "format_chain",
    "make_method",
    "param",
    "parse_chain",
    "register_method",
    "rescale_factor",
    "validate_chain",
]
