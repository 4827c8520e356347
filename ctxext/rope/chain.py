"""Method chains: parse ``"prope+pi"``-style specs, refuse chains that make no sense, apply them.

The rules follow from each method's declared role (``registry.ROLES``); each refusal says why:
  * at most one ``rescale`` method (pi, ntk, dynamic, yarn, llama3, ...): two rescalers fight over the same
    frequencies; fold them into one factor instead;
  * ``filter`` methods (prope) go with one rescaler, in either order (removing pairs and rescaling the rest commute);
  * ``attention`` methods (xpos) act inside attention and must come last;
  * a ``per_forward`` method (dynamic) recomputes the frequencies at every forward and stands alone;
  * no method twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ctxext.errors import MethodError
from ctxext.rope.registry import METHODS, RopeContext, RopeState, make_method, method_fields, names_with_role


def _parse_value(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        raise MethodError(f"parameter value {text!r} is not a number") from None
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _items(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"prope:keep=0.5+pi"`` -> ``[("prope", "keep=0.5"), ("pi", "")]``; unknown names are refused."""
    items = []
    for item in spec.split("+") if isinstance(spec, str) else list(spec):
        name, _, inline = item.strip().partition(":")
        if name not in METHODS:
            raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
        items.append((name, inline))
    return items


def chain_classes(spec: str | Sequence[str]) -> list[type]:
    """The method classes of a chain spec, without building the methods (no parameters needed)."""
    return [METHODS[name] for name, _ in _items(spec)]


def parse_chain(spec: str | Sequence[str], *, default_factor: float | None = None, **params: Any) -> tuple:
    """Build a validated chain from ``"prope+pi"`` (or ``["prope", "pi"]``) plus shared parameters.

    A parameter given by keyword goes to every method of the chain that has a field of that name; a parameter
    no method takes is an error. Parameters can also be written inline: ``"prope:keep=0.25+pi:factor=4"``.
    Keyword values that are None are ignored (convenient for CLI flags left unset). ``default_factor`` (from a
    target length) goes to the methods that take a factor and got none; together with ``factor`` it is an error.
    """
    params = {k: v for k, v in params.items() if v is not None}
    if default_factor is not None and "factor" in params:
        raise MethodError("give either factor or target_length, not both")
    used: set[str] = set()
    methods = []
    for name, inline in _items(spec):
        fields = {f.name for f in method_fields(METHODS[name])}
        kwargs = {k: v for k, v in params.items() if k in fields}
        used |= set(kwargs)
        for pair in filter(None, inline.split(",")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise MethodError(f"{name}: inline parameter {pair!r} must look like key=value, e.g. pi:factor=4")
            kwargs[key.strip()] = _parse_value(value.strip())
        if default_factor is not None and METHODS[name].takes_factor and "factor" not in kwargs:
            kwargs["factor"] = default_factor
        methods.append(make_method(name, **kwargs))
    unused = sorted(set(params) - used)
    if unused:
        owners = {k: sorted(n for n, c in METHODS.items() if k in {f.name for f in method_fields(c)}) for k in unused}
        detail = "; ".join(f"{k} belongs to {', '.join(v) or 'no method'}" for k, v in owners.items())
        raise MethodError(
            f"parameter(s) {', '.join(unused)} not used by the chain {'+'.join(m.name for m in methods)} ({detail})"
        )
    validate_chain(methods)
    return tuple(methods)


def validate_chain(methods: Sequence) -> None:
    """Raise ``MethodError`` if the chain makes no sense (see the module docstring)."""
    if not methods:
        raise MethodError(f"empty method chain; valid methods: {', '.join(sorted(METHODS))}")
    names = [m.name for m in methods]
    chain = "+".join(names)
    for name in set(names):
        if names.count(name) > 1:
            raise MethodError(
                f"chain {chain}: method {name!r} appears twice; give it once with the combined parameters"
            )
    rescalers = [m.name for m in methods if m.role == "rescale"]
    if len(rescalers) > 1:
        others = names_with_role("filter") + names_with_role("attention")
        raise MethodError(
            f"chain {chain}: {' and '.join(rescalers)} both rescale every frequency; use one rescaling method "
            f"({' and '.join(others)} combine with any one of {', '.join(names_with_role('rescale'))})"
        )
    for i, m in enumerate(methods):
        if m.role == "attention" and i != len(methods) - 1:
            raise MethodError(f"chain {chain}: {m.name} acts inside attention and must come last, e.g. pi+{m.name}")
    for m in methods:
        if m.per_forward and len(methods) > 1:
            alternative = f"; use {m.static_alternative} (its static form) in a chain" if m.static_alternative else ""
            raise MethodError(
                f"chain {chain}: {m.name} recomputes the frequencies at every forward and cannot be chained"
                f"{alternative}"
            )


def apply_chain(methods: Sequence, state: RopeState, ctx: RopeContext) -> RopeState:
    """Run the frequency part of a chain on ``state`` (float64). Models rotate in float32: a chain whose parameters
    push a rotating pair's frequency out of float32's range (a factor of 1e308 underflows it to 0, one of 1e-300
    overflows it) is refused, naming the chain, instead of silently removing or breaking those pairs."""
    before = state.inv_freq
    for method in methods:
        state = method.transform(state, ctx)
    as_f32 = state.inv_freq.float()
    lost = (before != 0) & (state.inv_freq != 0) & ((as_f32 == 0) | ~torch.isfinite(as_f32))
    if lost.any() or not torch.isfinite(torch.as_tensor(state.attention_factor, dtype=torch.float32)):
        raise MethodError(
            f"chain {format_chain(methods)}: its parameters put {int(lost.sum())} rotation frequencies (or the "
            "attention factor) outside float32's range; use an extension factor of a sensible size (e.g. 2 to 64)"
        )
    return state


def rescale_factor(methods: Sequence) -> float:
    """How much the chain extends the context (1 when no method of it takes a factor)."""
    return math.prod(m.extension for m in methods)


def chain_to_records(methods: Sequence) -> list[dict[str, Any]]:
    """JSON-ready description: ``[{"method": "pi", "factor": 4.0}, ...]``."""
    return [{"method": m.name, **{f.name: getattr(m, f.name) for f in method_fields(type(m))}} for m in methods]


def chain_from_records(records: Sequence[Mapping[str, Any]]) -> tuple:
    methods = [make_method(r["method"], **{k: v for k, v in r.items() if k != "method"}) for r in records]
    validate_chain(methods)
    return tuple(methods)


def format_chain(methods: Sequence) -> str:
    def one(m) -> str:
        fields = [f"{f.name}={getattr(m, f.name):g}" for f in method_fields(type(m)) if getattr(m, f.name) is not None]
        return m.name + (":" + ",".join(fields) if fields else "")

    return "+".join(one(m) for m in methods)
