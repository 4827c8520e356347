"""Express a method chain as transformers ``rope_parameters`` (what config.json carries).

Preference order:
  1. the specific native type when the checkpoint has plain RoPE and the chain maps onto one
     (pi -> ``linear``, ntk -> ``default`` with a new ``rope_theta``, dynamic -> ``dynamic``, yarn -> ``yarn``,
     llama3 -> ``llama3``, prope -> ``proportional``);
  2. otherwise the universal static form: ``longrope`` with ``short_factor == long_factor`` = old / new
     frequency per pair, ``factor: 1.0`` and an explicit ``attention_factor`` (1e39 stands for a removed pair:
     it overflows to inf in fp32 and gives exactly zero frequency);
  3. xPos wraps either form as ``rope_type: ctxext_xpos`` (registered by ``import ctxext``), which stock
     transformers refuses with a KeyError instead of silently running plain RoPE.

Every result is checked against the chain's float64 frequencies through transformers' own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .models.base import compute_inv_freq
from .rope.spec import MethodError, RopeContext, RopeState

XPOS_ROPE_TYPE = "ctxext_xpos"
REMOVED_PAIR_FACTOR = 1e39  # float32(1e39) == inf -> inv_freq exactly 0


def unwrap_xpos(params: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """``(frequency params, xpos scale_base or None)`` of a possibly xPos-wrapped rope-parameter dict."""
    if params.get("rope_type") != XPOS_ROPE_TYPE:
        return dict(params), None
    base = {k: v for k, v in params.items() if k not in ("ctxext_base_rope_type", "xpos_scale_base")}
    base["rope_type"] = params["ctxext_base_rope_type"]
    return base, float(params["xpos_scale_base"])


def wrap_xpos(params: dict[str, Any], scale_base: float) -> dict[str, Any]:
    return {
        **params,
        "rope_type": XPOS_ROPE_TYPE,
        "ctxext_base_rope_type": params.get("rope_type", "default"),
        "xpos_scale_base": float(scale_base),
    }


def _is_plain(params: dict[str, Any]) -> bool:
    return params.get("rope_type", "default") == "default" and params.get("partial_rotary_factor", 1.0) == 1.0


def _specific_form(source: dict[str, Any], chain: Sequence, ctx: RopeContext) -> dict[str, Any] | None:
    by_name = {m.name: m for m in chain}
    names = sorted(by_name)
    theta = {"rope_theta": float(source["rope_theta"])}
    L = int(ctx.context_length)
    if names == ["pi"]:
        return {"rope_type": "linear", **theta, "factor": float(by_name["pi"].factor)}
    if names == ["ntk"]:
        return {"rope_type": "default", "rope_theta": by_name["ntk"].theta(ctx)}
    if names == ["dynamic"]:
        return {"rope_type": "dynamic", **theta, "factor": float(by_name["dynamic"].factor)}
    if names == ["yarn"]:
        y = by_name["yarn"]
        return {
            "rope_type": "yarn",
            **theta,
            "factor": float(y.factor),
            "beta_fast": float(y.beta_fast),
            "beta_slow": float(y.beta_slow),
            "attention_factor": y.resolved_attention_factor(),
            "original_max_position_embeddings": L,
        }
    if names == ["llama3"]:
        m = by_name["llama3"]
        return {
            "rope_type": "llama3",
            **theta,
            "factor": float(m.factor),
            "low_freq_factor": float(m.low_freq_factor),
            "high_freq_factor": float(m.high_freq_factor),
            "original_max_position_embeddings": L,
        }
    if names == ["prope"]:
        # int(p * d // 2) must give exactly k: (2k + 1) / d is safe where 2k / d can round down.
        # (prope+pi goes to the universal form: transformers warns about `factor` on proportional at every load.)
        k = by_name["prope"].kept_pairs(ctx)
        return {"rope_type": "proportional", **theta, "partial_rotary_factor": (2 * k + 1) / ctx.head_dim}
    return None


def universal_form(source: dict[str, Any], result: RopeState, ctx: RopeContext) -> dict[str, Any]:
    """``longrope`` with equal short/long factors: exact for any static per-pair frequency change."""
    default = ctx.default_inv_freq()
    factors = [
        float(d / n) if n > 0 else REMOVED_PAIR_FACTOR for d, n in zip(default.tolist(), result.inv_freq.tolist())
    ]
    return {
        "rope_type": "longrope",
        "rope_theta": float(source["rope_theta"]),
        "factor": 1.0,
        "attention_factor": float(result.attention_factor),
        "original_max_position_embeddings": int(ctx.context_length),
        "short_factor": factors,
        "long_factor": list(factors),
    }


def native_rope_parameters(
    source: dict[str, Any], chain: Sequence, ctx: RopeContext, result: RopeState, *, check: bool = True
) -> dict[str, Any]:
    """Rope parameters that make transformers compute ``result`` (see the module docstring).

    ``source`` is the checkpoint's flat rope-parameter dict for one scope, possibly xPos-wrapped.
    """
    base, source_xpos = unwrap_xpos(source)
    freq_chain = [m for m in chain if m.kind != "attention"]
    xpos = [m for m in chain if m.name == "xpos"]
    if xpos and source_xpos is not None:
        raise MethodError("this checkpoint already uses xpos; patch without xpos (or start from the original checkpoint)")
    if any(m.name == "dynamic" for m in freq_chain) and not _is_plain(base):
        raise MethodError(
            f"dynamic needs a checkpoint with plain RoPE (rope_type 'default'); this one has "
            f"{base.get('rope_type')!r}. Use ntk, which applies on top of any frequencies"
        )
    source_freq, source_af = compute_inv_freq(base, ctx.head_dim, ctx.context_length)
    per_forward = any(m.name == "dynamic" for m in freq_chain)  # its static view equals the source
    unchanged = not per_forward and torch.allclose(result.inv_freq, source_freq.double(), rtol=1e-12, atol=0.0) and (
        abs(result.attention_factor - source_af) < 1e-12
    )
    if not freq_chain or unchanged:
        params = dict(base)
    else:
        params = (_specific_form(base, freq_chain, ctx) if _is_plain(base) else None) or universal_form(
            base, result, ctx
        )
    if check:
        got, got_af = compute_inv_freq(params, ctx.head_dim, ctx.context_length)
        if not torch.allclose(got.double(), result.inv_freq, rtol=1e-5, atol=0.0) or abs(got_af - result.attention_factor) > 1e-6:
            raise RuntimeError(
                f"internal error: rope parameters {params['rope_type']} do not reproduce the chain's frequencies; "
                "please report this with the checkpoint's config.json"
            )
    scale_base = xpos[0].scale_base if xpos else source_xpos
    return wrap_xpos(params, scale_base) if scale_base is not None else params
