"""Register ctxext's attention-side methods (xpos, ...) with transformers through its documented extension points.

``register_with_transformers()`` (called by ``import ctxext``; idempotent) adds, for every method whose role is
``attention``, under the name ``ctxext_<method>``:

* ``ROPE_INIT_FUNCTIONS``: frequencies of the wrapped base rope type, so a checkpoint whose config.json says
  ``rope_type: ctxext_xpos`` builds its rotary module; it also selects the attention implementation of the same
  name, which transformers does not save in config.json;
* ``AttentionInterface``: the method's ``attention()`` on layers whose rope parameters carry it (Gemma 3 sliding
  layers stay plain unless patched), SDPA elsewhere;
* ``AttentionMaskInterface``: the SDPA mask builder, so padding and sliding windows still apply;
* a validation method for the rope type, so loading does not warn about it.

Without ``import ctxext``, transformers fails on the unknown rope type with ``KeyError: 'ctxext_xpos'`` instead
of silently running plain RoPE.
"""

from __future__ import annotations

import torch

from ctxext.models.base import compute_inv_freq, head_dim_of
from ctxext.models.native import BASE_TYPE_KEY, attention_rope_type, unwrap_attention
from ctxext.rope.registry import METHODS

_REGISTERED: set[str] = set()


def _layer_rope_parameters(config, layer_idx: int | None) -> dict:
    params = config.rope_parameters
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_idx is not None and layer_types[layer_idx] in params:
        return params[layer_types[layer_idx]]
    return params


def _make_init(rope_type: str):
    def init(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
        """``ROPE_INIT_FUNCTIONS`` entry: the wrapped base type's frequencies; selects the method's attention."""
        params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
        base, _ = unwrap_attention(params)
        inv_freq, attention_factor = compute_inv_freq(base, head_dim_of(config), config.max_position_embeddings)
        if config._attn_implementation != rope_type:
            config._attn_implementation = rope_type
        return inv_freq.to(device), attention_factor

    return init


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` entry (same signature as transformers' ``sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    method, inv_freq = _layer_method(module)
    if method is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    extra = {}
    if method.needs_rotary:  # e.g. selfextend: re-rotates q/k, needs the layer's frequencies
        extra = {"inv_freq": inv_freq, "positions": kwargs.get("position_ids")}
    out = method.attention(
        query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=kwargs.get("softcap"), **extra
    )
    return out, None


def _layer_method(module) -> tuple:
    """``(attention-side method or None, fp32 inv_freq the layer's q/k were rotated with or None)`` of a layer,
    computed once per rope-parameter dict (a patch replaces the dict, so the cache follows it), not per forward."""
    params = _layer_rope_parameters(module.config, getattr(module, "layer_idx", None))
    cached = getattr(module, "_ctxext_attention", None)
    if cached is None or cached[0] is not params:
        base, method = unwrap_attention(params)
        inv_freq = None
        if method is not None and method.needs_rotary:
            inv_freq = compute_inv_freq(base, head_dim_of(module.config), module.config.max_position_embeddings)[0]
        cached = (params, method, inv_freq)  # holding params keeps its identity unique while cached
        module._ctxext_attention = cached
    return cached[1], cached[2]


def _validate(self, rope_parameters, ignore_keys=None) -> None:
    try:
        base, _ = unwrap_attention(rope_parameters)
    except Exception as err:  # a hand-edited config: say which key is wrong
        raise ValueError(f"rope_parameters of {rope_parameters.get('rope_type')!r} are invalid: {err}") from err
    validate = getattr(self, f"_validate_{base['rope_type']}_rope_parameters", None)
    if validate is None:
        raise ValueError(f"rope_parameters.{BASE_TYPE_KEY}={base['rope_type']!r} is not a transformers rope type")
    validate(base, ignore_keys=ignore_keys)


def register_with_transformers() -> None:
    """Register every attention-side method in ``METHODS`` with transformers (safe to call again)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

    for name, cls in METHODS.items():
        rope_type = attention_rope_type(name)
        if cls.role != "attention" or rope_type in _REGISTERED:
            continue
        ROPE_INIT_FUNCTIONS[rope_type] = _make_init(rope_type)
        AttentionInterface.register(rope_type, _attention_forward)
        AttentionMaskInterface.register(rope_type, sdpa_mask)
        setattr(RotaryEmbeddingConfigMixin, f"_validate_{rope_type}_rope_parameters", _validate)
        _REGISTERED.add(rope_type)
