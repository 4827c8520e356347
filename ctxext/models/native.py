"""Express a method chain as transformers ``rope_parameters`` (what config.json carries).

Preference order:
  1. the method's own native form (``MethodConfig.native``) when the chain is that one frequency method and the
     checkpoint has plain RoPE (pi -> ``linear``, ntk -> ``default`` with a new ``rope_theta``, dynamic ->
     ``dynamic``, yarn -> ``yarn``, llama3 -> ``llama3``, prope -> ``proportional``);
  2. otherwise the universal static form: ``longrope`` with ``short_factor == long_factor`` = old / new
     frequency per pair, ``factor: 1.0`` and an explicit ``attention_factor`` (1e39 stands for a removed pair:
     it overflows to inf in fp32 and gives exactly zero frequency);
  3. an attention-side method (xpos) wraps either form as ``rope_type: ctxext_<method>`` with the base type in
     ``ctxext_base_rope_type`` and its parameters as ``<method>_<parameter>``. ``import ctxext`` registers these
     types; stock transformers refuses them with a KeyError instead of silently running plain RoPE.

Every result is checked against the chain's float64 frequencies through transformers' own code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ctxext.errors import MethodError
from ctxext.models.base import compute_inv_freq
from ctxext.rope.registry import METHODS, MethodConfig, RopeContext, RopeState, field_type_of_field, method_fields

RECORD_KEY = "ctxext"  # config.json key holding what ctxext did (``ctxext info`` reads it)
ATTENTION_PREFIX = "ctxext_"
BASE_TYPE_KEY = "ctxext_base_rope_type"
REMOVED_PAIR_FACTOR = 1e39  # float32(1e39) == inf -> inv_freq exactly 0


def attention_rope_type(method: str) -> str:
    """The rope type (and attention implementation) name of an attention-side method: ``ctxext_xpos``."""
    return ATTENTION_PREFIX + method


def attention_method_of(params: dict[str, Any]) -> str | None:
    """The attention-side method a rope-parameter dict is wrapped in, or None."""
    rope_type = params.get("rope_type", "")
    name = rope_type[len(ATTENTION_PREFIX) :] if rope_type.startswith(ATTENTION_PREFIX) else None
    return name if name in METHODS and METHODS[name].role == "attention" else None


def wrap_attention(params: dict[str, Any], method: MethodConfig) -> dict[str, Any]:
    fields = {
        f"{method.name}_{f.name}": field_type_of_field(f)(getattr(method, f.name))
        for f in method_fields(type(method))
        if getattr(method, f.name) is not None
    }
    return {
        **params,
        "rope_type": attention_rope_type(method.name),
        BASE_TYPE_KEY: params.get("rope_type", "default"),
        **fields,
    }


def unwrap_attention(params: dict[str, Any]) -> tuple[dict[str, Any], MethodConfig | None]:
    """``(frequency params, attention-side method or None)`` of a possibly wrapped rope-parameter dict."""
    name = attention_method_of(params)
    if name is None:
        return dict(params), None
    fields = {f.name for f in method_fields(METHODS[name])}
    prefix = f"{name}_"
    method = METHODS[name](
        **{k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix) and k[len(prefix) :] in fields}
    )
    base = {
        k: v
        for k, v in params.items()
        if k != BASE_TYPE_KEY and not (k.startswith(prefix) and k[len(prefix) :] in fields)
    }
    base["rope_type"] = params[BASE_TYPE_KEY]
    return base, method


def uses_attention_method(rope_parameters: Any) -> str | None:
    """The attention-side method of a config's rope parameters (flat or per layer type), or None."""
    if not isinstance(rope_parameters, dict):
        return None
    flat = attention_method_of(rope_parameters)
    if flat:
        return flat
    return next((n for v in rope_parameters.values() if isinstance(v, dict) and (n := attention_method_of(v))), None)


def _is_plain(params: dict[str, Any]) -> bool:
    return params.get("rope_type", "default") == "default" and params.get("partial_rotary_factor", 1.0) == 1.0


def universal_form(
    source: dict[str, Any], result: RopeState, ctx: RopeContext, *, short: RopeState | None = None, factor: float = 1.0
) -> dict[str, Any]:
    """``longrope`` with equal short/long factors: exact for any static per-pair frequency change.

    With ``short``, transformers uses ``short``'s frequencies for forwards whose positions stay within
    ``ctx.context_length`` and ``result``'s beyond (the attention factor, ``result``'s, applies to both);
    ``factor`` only documents the extension (the attention factor is explicit)."""
    default = ctx.default_inv_freq()

    def factors(state: RopeState) -> list[float]:
        return [
            float(d / n) if n > 0 else REMOVED_PAIR_FACTOR for d, n in zip(default.tolist(), state.inv_freq.tolist())
        ]

    long = factors(result)
    return {
        "rope_type": "longrope",
        "rope_theta": float(source["rope_theta"]),
        "factor": float(factor),
        "attention_factor": float(result.attention_factor),
        "original_max_position_embeddings": int(ctx.context_length),
        "short_factor": factors(short) if short is not None else long,
        "long_factor": list(long),
    }


def _own_form(method: MethodConfig, source: dict[str, Any], ctx: RopeContext) -> dict[str, Any] | None:
    form = method.native(ctx)
    if form is None:
        return None
    return {"rope_type": form["rope_type"], "rope_theta": float(source["rope_theta"]), **form}


def native_rope_parameters(
    source: dict[str, Any], chain: Sequence[MethodConfig], ctx: RopeContext, result: RopeState, *, check: bool = True
) -> dict[str, Any]:
    """Rope parameters that make transformers compute ``result`` (see the module docstring).

    ``source`` is the checkpoint's flat rope-parameter dict for one scope, possibly wrapped by an attention method.
    """
    base, source_attention = unwrap_attention(source)
    freq_chain = [m for m in chain if m.role != "attention"]
    attention = [m for m in chain if m.role == "attention"]
    if attention and source_attention is not None:
        raise MethodError(
            f"this checkpoint already uses {source_attention.name}; patch without "
            f"{attention[0].name} (or start from the original checkpoint)"
        )
    for m in freq_chain:
        if m.plain_source_only and not _is_plain(base):
            alternative = (
                f". Use {m.static_alternative}, which applies on top of any frequencies" if m.static_alternative else ""
            )
            raise MethodError(
                f"{m.name} needs a checkpoint with plain RoPE (rope_type 'default'); this one has "
                f"{base.get('rope_type')!r}{alternative}"
            )
    wrapper = attention[0] if attention else source_attention
    if (
        wrapper is not None
        and wrapper.needs_rotary
        and (
            any(m.per_forward for m in freq_chain)
            or base.get("rope_type") == "dynamic"
            or (base.get("rope_type") == "longrope" and base.get("short_factor") != base.get("long_factor"))
        )
    ):
        raise MethodError(
            f"{wrapper.name} re-rotates q/k with the layer's frequencies, which must not change with "
            f"the input length; this checkpoint's rope_type {base.get('rope_type')!r} does. Patch a "
            "checkpoint with static frequencies (e.g. plain RoPE, or pi/ntk/yarn before it)"
        )
    source_freq, source_af = compute_inv_freq(base, ctx.head_dim, ctx.context_length)
    per_forward = any(m.per_forward for m in freq_chain)  # its static view equals the source
    unchanged = (
        not per_forward
        and torch.allclose(result.inv_freq, source_freq.double(), rtol=1e-12, atol=0.0)
        and (abs(result.attention_factor - source_af) < 1e-12)
    )
    if not freq_chain or unchanged:
        params = dict(base)
    else:
        own = _own_form(freq_chain[0], base, ctx) if len(freq_chain) == 1 and _is_plain(base) else None
        params = own or universal_form(base, result, ctx)
    if check:
        got, got_af = compute_inv_freq(params, ctx.head_dim, ctx.context_length)
        if (
            not torch.allclose(got.double(), result.inv_freq, rtol=1e-5, atol=0.0)
            or abs(got_af - result.attention_factor) > 1e-6
        ):
            raise RuntimeError(
                f"internal error: rope parameters {params['rope_type']} do not reproduce the chain's frequencies; "
                "please report this with the checkpoint's config.json"
            )
    return wrap_attention(params, wrapper) if wrapper is not None else params


def extended_record(config, step: dict[str, Any], context: int) -> dict[str, Any]:
    """The ``ctxext`` record of ``config`` after one more step that extends it to ``context`` tokens: the version,
    the context it was trained at (kept from the first step), the context now and every step so far."""
    from ctxext import __version__

    previous = copy.deepcopy(getattr(config, RECORD_KEY, None)) or {}
    return {
        "version": __version__,
        "original_context": previous.get("original_context", step.get("from_context", context)),
        "context": context,
        "steps": [*previous.get("steps", []), step],
    }
