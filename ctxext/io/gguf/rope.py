"""Transformers ``rope_parameters`` <-> llama.cpp's GGUF rope metadata, checked through a model of llama.cpp's math.

llama.cpp (``src/llama-model.cpp`` load_hparams, ``src/llama-context.cpp``, ``ggml/src/ggml-cpu/ops.cpp``
``rope_yarn`` / ``ggml_rope_cache_init``) rotates pair i (interleaved layout, see ``write.py``) of a Llama layer by
``position * inv_freq_i`` and multiplies cos/sin by ``mscale`` where

    extrap_i  = freq_base^(-2i/d) / rope_freqs[i]          (rope_freqs: optional per-pair divisors, 1 when absent)
    interp_i  = freq_scale * extrap_i,  freq_scale = 1 / {arch}.rope.scaling.factor  (type linear / yarn; none: 1)
    yarn:       inv_freq_i = interp_i (1 - mix_i) + extrap_i mix_i, mix_i = 1 - clamp((i - lo) / max(1e-3, hi - lo))
                with lo/hi = floor/ceil of the correction dims for beta_fast = 32 / beta_slow = 1 at
                {arch}.rope.scaling.original_context_length (the llama architecture reads no beta keys),
                mscale = {arch}.rope.scaling.attn_factor * (1 + 0.1 ln factor)
    otherwise:  inv_freq_i = interp_i, mscale = {arch}.rope.scaling.attn_factor (default 1)

A ``longrope`` scaling type would make llama.cpp pick long or short factors by the *context size* it was started
with, not by sequence length as transformers does, so it is never written; equal long/short factors are written
as ``rope_freqs`` divisors instead, which llama.cpp applies at every length. A removed pair (p-RoPE, frequency 0)
gets the divisor ``FLT_MAX``: finite (``--check-tensors`` rejects inf), and position / FLT_MAX is below 1e-32 rad
for any position llama.cpp can hold, so cos is exactly 1 and the sine term vanishes below float32 resolution.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ctxext.models.base import compute_inv_freq
from ctxext.models.native import REMOVED_PAIR_FACTOR, attention_method_of

FLT_MAX = 3.4028234663852886e38
LLAMA_YARN_BETA_FAST = 32.0  # llama.cpp's defaults; LLM_ARCH_LLAMA does not read the yarn beta keys
LLAMA_YARN_BETA_SLOW = 1.0
# The rope of the sliding-window layers where an architecture gives them their own: llama.cpp fixes their scale to
# 1 and their base to 10000 (llama_hparams: rope_freq_base_train_swa, rope_freq_scale_train_swa; recent builds read
# the base from {arch}.rope.freq_base_swa, older ones ignore that key), so the file's rope keys and scaling
# describe only the global layers.
SLIDING_WINDOW_ROPE = {"gemma3": {"rope_type": "default", "rope_theta": 10000.0}}


class RopeExportError(ValueError):
    """Rope parameters that llama.cpp cannot run (the message says why)."""


@dataclass(frozen=True)
class GGUFRope:
    """What a GGUF file says about rotary embeddings (llama.cpp's view).

    Args:
        freq_base: ``{arch}.rope.freq_base``.
        scaling_type: ``{arch}.rope.scaling.type``: none, linear or yarn.
        factor: ``{arch}.rope.scaling.factor`` (linear, yarn).
        original_context: ``{arch}.rope.scaling.original_context_length`` (yarn).
        attn_factor: ``{arch}.rope.scaling.attn_factor`` (cos/sin multiplier; yarn multiplies it by 1 + 0.1 ln s).
        freq_divisors: the ``rope_freqs`` tensor, one divisor per pair, or None.
    """

    freq_base: float
    scaling_type: str = "none"
    factor: float | None = None
    original_context: int | None = None
    attn_factor: float = 1.0
    freq_divisors: tuple[float, ...] | None = None


def llamacpp_inv_freq(rope: GGUFRope, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq float64 [head_dim/2], cos/sin multiplier)`` as llama.cpp computes them (module docstring)."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    extrap = rope.freq_base ** (-2.0 * i / head_dim)
    if rope.freq_divisors is not None:
        extrap = extrap / torch.tensor(rope.freq_divisors, dtype=torch.float64)
    scale = 1.0 / rope.factor if rope.scaling_type in ("linear", "yarn") and rope.factor else 1.0
    interp = scale * extrap
    if rope.scaling_type != "yarn":
        return interp, float(rope.attn_factor)

    def corr_dim(n_rot: float) -> float:
        return head_dim * math.log(rope.original_context / (n_rot * 2 * math.pi)) / (2 * math.log(rope.freq_base))

    lo = max(0.0, math.floor(corr_dim(LLAMA_YARN_BETA_FAST)))
    hi = min(head_dim - 1.0, math.ceil(corr_dim(LLAMA_YARN_BETA_SLOW)))
    mix = 1 - torch.clamp((i - lo) / max(0.001, hi - lo), 0, 1)
    mscale = rope.attn_factor * (1 + 0.1 * math.log(1.0 / scale)) if scale < 1 else rope.attn_factor
    return interp * (1 - mix) + extrap * mix, float(mscale)


def _matches(rope: GGUFRope, inv_freq: torch.Tensor, attention_factor: float, head_dim: int) -> bool:
    got, mscale = llamacpp_inv_freq(rope, head_dim)
    want = inv_freq.double()
    zero = want == 0
    close = torch.allclose(got[~zero], want[~zero], rtol=1e-5, atol=0.0) and bool((got[zero] < 1e-30).all())
    return close and abs(mscale - attention_factor) <= 1e-5 * max(1.0, abs(attention_factor))


def _refusal(params: dict[str, Any]) -> str | None:
    rope_type = params.get("rope_type", "default")
    method = attention_method_of(params)
    if method == "selfextend":
        return (
            "it uses Self-Extend (rope_type 'ctxext_selfextend'), which lives in ctxext's attention function; "
            "llama.cpp runs Self-Extend only as runtime flags (--grp-attn-n G --grp-attn-w W) on a plain export. "
            "Export the checkpoint before the selfextend patch and pass those flags"
        )
    if method is not None:
        name = {"xpos": "xPos"}.get(method, method)
        return (
            f"it uses {name} (rope_type {rope_type!r}): it lives in ctxext's attention function, which "
            "llama.cpp does not have; exporting only its frequencies would silently run plain RoPE"
        )
    if rope_type == "dynamic":
        return (
            "it uses dynamic NTK (rope_type 'dynamic'), whose frequencies change with the sequence length at "
            "every forward; llama.cpp has no such scaling. Patch with ntk (a fixed theta) or yarn instead"
        )
    if rope_type == "longrope" and list(params.get("short_factor") or []) != list(params.get("long_factor") or []):
        return (
            "it uses longrope with short_factor != long_factor: transformers switches factors by sequence length, "
            "llama.cpp by the context size it is started with, so the two would not compute the same model"
        )
    return None


def gguf_rope_from_parameters(params: dict[str, Any], head_dim: int, max_position_embeddings: int) -> GGUFRope:
    """llama.cpp metadata that reproduces transformers' frequencies for ``params`` (a flat rope-parameter dict).

    Native forms where llama.cpp has one (none, linear, yarn with its fixed betas); every other static per-pair
    change (llama3, longrope with equal factors, proportional, NTK's new theta, yarn with other betas) as
    ``rope_freqs`` divisors plus ``attn_factor``. Raises ``RopeExportError`` for what llama.cpp cannot run.
    """
    why = _refusal(params)
    if why:
        raise RopeExportError(why)
    inv_freq, attention_factor = compute_inv_freq(params, head_dim, max_position_embeddings)
    if inv_freq.numel() != head_dim // 2:
        raise RopeExportError(
            f"it rotates only {2 * inv_freq.numel()} of {head_dim} head dimensions (partial_rotary_factor); "
            "the llama architecture in llama.cpp rotates all of them"
        )
    theta = float(params["rope_theta"])
    rope_type = params.get("rope_type", "default")
    candidates = []
    if rope_type == "default":
        candidates.append(GGUFRope(freq_base=theta))
    elif rope_type == "linear":
        candidates.append(GGUFRope(freq_base=theta, scaling_type="linear", factor=float(params["factor"])))
    elif rope_type == "yarn" and float(params.get("factor") or 0) > 1:
        factor = float(params["factor"])
        candidates.append(
            GGUFRope(
                freq_base=theta,
                scaling_type="yarn",
                factor=factor,
                original_context=int(params.get("original_max_position_embeddings") or max_position_embeddings),
                attn_factor=attention_factor / (1 + 0.1 * math.log(factor)),
            )
        )
    default = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    divisors = tuple(float(d / n) if n > 0 else FLT_MAX for d, n in zip(default.tolist(), inv_freq.double().tolist()))
    candidates.append(GGUFRope(freq_base=theta, attn_factor=attention_factor, freq_divisors=divisors))
    for rope in candidates:
        if _matches(rope, inv_freq, attention_factor, head_dim):
            return rope
    raise RuntimeError(
        f"internal error: no llama.cpp rope metadata reproduces rope_type {rope_type!r}; please report this with "
        "the checkpoint's config.json"
    )


def parameters_from_gguf_rope(rope: GGUFRope, head_dim: int, context_length: int) -> dict[str, Any]:
    """transformers ``rope_parameters`` that compute what llama.cpp computes for ``rope`` (GGUF in)."""
    theta = float(rope.freq_base)
    if rope.freq_divisors is None and rope.scaling_type == "none" and rope.attn_factor == 1.0:
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    elif rope.freq_divisors is None and rope.scaling_type == "linear" and rope.attn_factor == 1.0:
        params = {"rope_type": "linear", "rope_theta": theta, "factor": float(rope.factor)}
    elif rope.freq_divisors is None and rope.scaling_type == "yarn":
        params = {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": float(rope.factor),
            "original_max_position_embeddings": int(rope.original_context or context_length),
            "beta_fast": LLAMA_YARN_BETA_FAST,
            "beta_slow": LLAMA_YARN_BETA_SLOW,
            "attention_factor": rope.attn_factor * (1 + 0.1 * math.log(float(rope.factor))),
        }
    elif rope.scaling_type in ("none", "linear"):
        inv_freq, mscale = llamacpp_inv_freq(rope, head_dim)
        default = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        factors = [
            float(d / n) if n > 1e-30 else REMOVED_PAIR_FACTOR for d, n in zip(default.tolist(), inv_freq.tolist())
        ]
        params = {
            "rope_type": "longrope",
            "rope_theta": theta,
            "factor": 1.0,
            "attention_factor": mscale,
            "original_max_position_embeddings": int(context_length),
            "short_factor": factors,
            "long_factor": list(factors),
        }
    else:
        raise RopeExportError(
            f"its rope scaling (type {rope.scaling_type!r} with per-pair rope_freqs) has no transformers equivalent"
        )
    want, want_mscale = llamacpp_inv_freq(rope, head_dim)
    got, got_af = compute_inv_freq(params, head_dim, context_length)
    zero = want < 1e-30
    if not (
        torch.allclose(got.double()[~zero], want[~zero], rtol=1e-5, atol=0)
        and bool((got[zero] == 0).all())
        and abs(got_af - want_mscale) <= 1e-5 * max(1.0, want_mscale)
    ):
        raise RuntimeError(f"internal error: rope parameters {params['rope_type']} do not reproduce the GGUF's rope")
    return params


def gemma_gguf_rope(arch: str, rope_parameters: dict[str, Any], head_dim: int, max_positions: int) -> GGUFRope:
    """llama.cpp metadata for a Gemma 2 (``arch`` gemma2, one rope for all layers) or Gemma 3 (gemma3, keyed by
    layer type) checkpoint's rope; ``RopeExportError`` where llama.cpp's graph would compute something else.

    Both graphs (``src/models/gemma2.cpp``, ``gemma3.cpp``) call ggml_rope_ext without ``rope_freqs``, so only the
    native forms reach them (none, linear, yarn with beta 32 / 1). Gemma 3's sliding layers run
    ``SLIDING_WINDOW_ROPE`` (another base reaches them only in builds that read ``rope.freq_base_swa``, so only
    theta 10,000 is exported), and ``attn_factor`` multiplies the rotation of every layer, the sliding ones
    included, so a Gemma 3 export needs the global rope's to be 1.
    """
    params = dict(rope_parameters)
    if arch == "gemma3":
        sliding = dict(params.get("sliding_attention") or SLIDING_WINDOW_ROPE[arch])
        fixed = SLIDING_WINDOW_ROPE[arch]
        want, _ = compute_inv_freq(fixed, head_dim, max_positions)
        why = _refusal(sliding)
        if why is None:
            got, factor = compute_inv_freq(sliding, head_dim, max_positions)
            if not torch.allclose(got.double(), want.double(), rtol=1e-6, atol=0.0) or abs(factor - 1.0) > 1e-6:
                why = f"rope_type {sliding.get('rope_type', 'default')!r}, theta {sliding.get('rope_theta')}"
        if why is not None:
            raise RopeExportError(
                f"its sliding-window layers' rope differs from llama.cpp's fixed one ({why}; a patch with --scope "
                f"sliding or all does this): llama.cpp's gemma3 runs them unscaled at base {fixed['rope_theta']:g}. "
                "Patch the original with the default scope (global) and export that"
            )
        params = dict(params.get("full_attention") or {})
    its = "its global layers' rope" if arch == "gemma3" else "its rope"
    try:
        rope = gguf_rope_from_parameters(params, head_dim, max_positions)
    except RopeExportError as err:
        raise RopeExportError(f"{its}: {err}") from None
    if rope.freq_divisors is not None:
        raise RopeExportError(
            f"{its} (rope_type {params.get('rope_type', 'default')!r}) needs per-pair rope_freqs divisors, which "
            f"llama.cpp's {arch} graph does not apply (it runs plain, linear or yarn rope with beta_fast 32 / "
            "beta_slow 1 only); patch with pi, ntk or yarn (default betas) to export"
        )
    if arch == "gemma3" and abs(rope.attn_factor - 1.0) > 1e-6:
        raise RopeExportError(
            f"{its} has attention factor {rope.attn_factor:g} on top of yarn's own 1 + 0.1 ln(factor): llama.cpp's "
            "gemma3 would apply it to the sliding-window layers too; patch without attention_factor to export"
        )
    return dataclasses.replace(rope, attn_factor=1.0) if arch == "gemma3" else rope
