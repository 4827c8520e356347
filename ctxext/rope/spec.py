"""Core types of the RoPE method registry: pure tensor math, no transformers import.

A *method* is a frozen dataclass (its config) with:
  - ``name``: short identifier used on the command line (``pi``, ``yarn`` ...),
  - ``kind``: ``"rescale"`` (changes every frequency: pi, ntk, dynamic, yarn, llama3),
    ``"mask"`` (removes frequencies: prope) or ``"attention"`` (acts inside attention: xpos),
  - ``apply(state, ctx) -> RopeState`` for frequency methods.

Frequencies use the Hugging Face half-split layout: ``inv_freq`` has ``head_dim // 2`` entries, pair ``i``
rotates dimensions ``(i, i + head_dim // 2)`` and entry 0 is the highest frequency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch


class MethodError(ValueError):
    """A method name, parameter or chain that cannot be used. The message names the value and the fix."""


@dataclass(frozen=True)
class RopeContext:
    """What a method needs to know about the checkpoint it transforms.

    Attributes:
        head_dim: rotary dimension per head (``inv_freq`` has ``head_dim // 2`` entries).
        rope_theta: the RoPE base of the checkpoint.
        context_length: the context the checkpoint currently handles (``L``; the method extends it).
    """

    head_dim: int
    rope_theta: float
    context_length: int

    @property
    def num_pairs(self) -> int:
        return self.head_dim // 2

    def default_inv_freq(self) -> torch.Tensor:
        """Plain RoPE ``theta ** (-2 i / d)`` in float64."""
        i = torch.arange(self.num_pairs, dtype=torch.float64)
        return self.rope_theta ** (-2.0 * i / self.head_dim)


@dataclass(frozen=True)
class RopeState:
    """Per-pair inverse frequencies (float64, ``[head_dim // 2]``) and the cos/sin multiplier."""

    inv_freq: torch.Tensor
    attention_factor: float = 1.0


class Method(Protocol):
    name: ClassVar[str]
    kind: ClassVar[str]
    paper: ClassVar[str]

    def apply(self, state: RopeState, ctx: RopeContext) -> RopeState: ...


METHODS: dict[str, type] = {}
KINDS = ("rescale", "mask", "attention")


def register_method(cls: type) -> type:
    """Class decorator: add a method config class to ``METHODS`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name.lower() != name:
        raise MethodError(f"method name must be a lower-case identifier, got {name!r}")
    if name in METHODS:
        raise MethodError(f"method {name!r} is already registered by {METHODS[name].__module__}")
    if getattr(cls, "kind", None) not in KINDS:
        raise MethodError(f"method {name!r} has kind {getattr(cls, 'kind', None)!r}; valid kinds: {KINDS}")
    METHODS[name] = cls
    return cls


# ---------------------------------------------------------------- parameter checks shared by methods


def check_positive(method: str, field: str, value: Any, *, minimum: float = 0.0, inclusive: bool = False) -> None:
    """Raise ``MethodError`` unless ``value`` is a finite real number above ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise MethodError(f"{method}: {field}={value!r} is invalid; valid range: a finite number {bound}")


def check_fraction(method: str, field: str, value: Any) -> None:
    """Raise ``MethodError`` unless ``value`` lies in (0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0.0 < value <= 1.0):
        raise MethodError(f"{method}: {field}={value!r} is invalid; valid range: 0 < {field} <= 1")


def method_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def required_fields(cls: type) -> list[str]:
    return [
        f.name
        for f in method_fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def make_method(name: str, **params: Any):
    """Build a method config by name, e.g. ``make_method("pi", factor=4)``.

    Raises ``MethodError`` for an unknown name, an unknown or missing parameter, or a bad value.
    """
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    valid = {f.name for f in method_fields(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise MethodError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(sorted(valid)) or 'none'}"
        )
    missing = [f for f in required_fields(cls) if f not in params]
    if missing:
        raise MethodError(f"{name}: missing required parameter(s) {', '.join(missing)} (e.g. --{missing[0].replace('_', '-')})")
    return cls(**params)
