"""The method registry: one frozen config class per method, everything else generated from it (only torch needed).

A method is one file that defines a ``MethodConfig`` subclass and decorates it with ``@register_method``::

    @register_method
    @dataclass(frozen=True)
    class PIConfig(MethodConfig):
        factor: float = param(help="extension factor s = new context / old context", gt=0)
        name: ClassVar[str] = "pi"
        role: ClassVar[str] = "rescale"
        takes_factor: ClassVar[bool] = True
        paper: ClassVar[str] = "Chen et al. 2023 ..."

        def transform(self, state, ctx):
            return RopeState(state.inv_freq / self.factor, state.attention_factor)

        def native(self, ctx):
            return {"rope_type": "linear", "factor": float(self.factor)}

From the class alone ctxext derives the CLI flags (``--factor``), the YAML method parameters, ``ctxext methods``,
the chain rules and their messages (``rope/chain.py``) and the saved ``rope_parameters`` (``ctxext/models/native.py``).

Frequencies use the Hugging Face half-split layout: ``inv_freq`` has ``head_dim // 2`` entries, pair ``i``
rotates dimensions ``(i, i + head_dim // 2)`` and entry 0 is the highest frequency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ctxext.errors import MethodError

# role -> what it means in a chain (shown by `ctxext methods` and in chain errors)
ROLES = {
    "rescale": "rescales every frequency to extend the context (at most one per chain)",
    "filter": "removes rotation pairs (combines with one rescaler, in any order)",
    "attention": "acts inside attention (last in a chain; needs `import ctxext` to load)",
}


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


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A method parameter: its help text (CLI, YAML, ``ctxext methods``) and valid range, checked on construction.

    Leave ``default`` out for a required parameter. A default of None means "derived" (the help says from what).
    """
    return dataclasses.field(default=default, metadata={"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le})


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config (see the module docstring). Subclasses set the class variables below and
    override the hooks their role needs."""

    name: ClassVar[str]
    role: ClassVar[str]  # a key of ROLES
    paper: ClassVar[str]
    takes_factor: ClassVar[bool] = False  # has a ``factor`` that ``--target-length`` sets and that extends the context
    per_forward: ClassVar[bool] = False  # frequencies depend on each forward's length: stands alone in a chain,
    #                                       keeps max_position_embeddings at the trained length (transformers reads it)
    static_alternative: ClassVar[str | None] = None  # the static method to chain instead of a per-forward one
    plain_source_only: ClassVar[bool] = False  # needs a checkpoint with plain RoPE (rope_type 'default')
    needs_rotary: ClassVar[bool] = False  # attention() also takes inv_freq= (the layer's) and positions= (query
    #                                       position ids or None); needs frequencies that do not change per forward

    def __post_init__(self) -> None:
        for f in method_fields(type(self)):
            _check_range(self.name, f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Checks between parameters (raise ``MethodError``)."""

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        """The frequency change, float64. Per-forward methods return their view at the trained length."""
        return state

    def native(self, ctx: RopeContext) -> dict[str, Any] | None:
        """transformers ``rope_parameters`` of this method alone on plain RoPE (``rope_theta`` is added when
        missing), or None: the universal ``longrope`` form is used."""
        return None

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        scaling: float | None,
        dropout: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """Attention-side methods: causal attention on rotated ``query`` ``[B, H, Q, D]``, ``key``/``value``
        ``[B, Hkv, K, D]``, boolean mask ``[B|1, 1|H, Q, K]`` or None; returns ``[B, Q, H, D]``."""
        raise NotImplementedError(f"{self.name} is not an attention-side method")

    def reach(self, context_length: int, target_length: int | None = None) -> int:
        """The context usable after this method, given the chain's rescaled ``context_length``. Methods that extend
        by themselves inside attention (selfextend) override it and raise ``MethodError`` when their parameters
        make no sense for that context or cannot reach ``target_length``."""
        return context_length

    @property
    def extension(self) -> float:
        """How much this method extends the context (its factor when it takes one)."""
        return float(self.factor) if self.takes_factor else 1.0  # type: ignore[attr-defined]


METHODS: dict[str, type[MethodConfig]] = {}


def register_method(cls: type) -> type:
    """Class decorator: add a method config class to ``METHODS`` under ``cls.name``; rejects bad declarations."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name.lower() != name:
        raise MethodError(f"method name must be a lower-case identifier, got {name!r}")
    if name in METHODS:
        raise MethodError(f"method {name!r} is already registered by {METHODS[name].__module__}")
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig) and dataclasses.is_dataclass(cls)):
        raise MethodError(f"method {name!r} must be a frozen dataclass subclass of MethodConfig")
    if getattr(cls, "role", None) not in ROLES:
        raise MethodError(f"method {name!r} has role {getattr(cls, 'role', None)!r}; valid roles: {', '.join(ROLES)}")
    fields = {f.name: f for f in method_fields(cls)}
    for f in fields.values():
        if "help" not in f.metadata:
            raise MethodError(f"method {name!r}: parameter {f.name!r} must be declared with param(help=...)")
    if cls.takes_factor and "factor" not in fields:
        raise MethodError(f"method {name!r} takes a factor but declares no 'factor' parameter")
    if cls.role == "attention" and cls.attention is MethodConfig.attention:
        raise MethodError(f"method {name!r} acts inside attention but defines no attention()")
    METHODS[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (tests that register their own)."""
    METHODS.pop(name, None)


def names_with_role(role: str) -> list[str]:
    return [n for n, c in METHODS.items() if c.role == role]


# ---------------------------------------------------------------- parameters


def method_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def required_fields(cls: type) -> list[str]:
    return [f.name for f in method_fields(cls) if f.default is dataclasses.MISSING]


def range_text(f: dataclasses.Field) -> str:
    """``"> 0"``, ``"0 < keep <= 1"``, or ``""`` when the parameter has no bounds."""
    m = f.metadata
    low = [f"{m[k]:g} {op} " for k, op in (("gt", "<"), ("ge", "<=")) if m.get(k) is not None]
    high = [f" {op} {m[k]:g}" for k, op in (("lt", "<"), ("le", "<=")) if m.get(k) is not None]
    if low and high:
        return f"{low[0]}{f.name}{high[0]}"
    if low:  # "0 < " -> "> 0"
        bound, op = low[0].split()
        return f"{'>' if op == '<' else '>='} {bound}"
    return high[0].strip() if high else ""


def _check_range(method: str, f: dataclasses.Field, value: Any) -> None:
    if value is None and f.default is None:
        return  # a derived parameter left to its default
    kind = field_type_of_field(f)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int and not float(value).is_integer():
        ok = False
    m = f.metadata
    ok = ok and (m.get("gt") is None or value > m["gt"]) and (m.get("ge") is None or value >= m["ge"])
    ok = ok and (m.get("lt") is None or value < m["lt"]) and (m.get("le") is None or value <= m["le"])
    if not ok:
        bounds = range_text(f)
        what = "an integer" if kind is int else "a finite number"
        valid = bounds if f.name in bounds else f"{what} {bounds}".strip()
        raise MethodError(f"{method}: {f.name}={value!r} is invalid; valid range: {valid}")


def field_type_of_field(f: dataclasses.Field) -> type:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return int if text.split("|")[0].strip() == "int" else float


def make_method(name: str, **params: Any) -> MethodConfig:
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
        raise MethodError(
            f"{name}: missing required parameter(s) {', '.join(missing)} (e.g. --{missing[0].replace('_', '-')})"
        )
    return cls(**params)


def all_parameters() -> dict[str, dict[str, Any]]:
    """Every parameter name across the registry -> its type, and which methods take it with which help text.

    The CLI flags and the YAML ``MethodParams`` are generated from this."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in METHODS.items():
        for f in method_fields(cls):
            entry = out.setdefault(f.name, {"type": field_type_of_field(f), "methods": {}})
            entry["methods"][name] = f.metadata["help"]
    return out
