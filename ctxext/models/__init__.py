"""Model-family adapters (import registers every family)."""

from . import gemma, llama  # noqa: F401  (registration)
from .base import FAMILIES, Family, UnsupportedModelError, family_of

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "family_of"]
