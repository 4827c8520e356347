"""Register xPos with transformers through its documented extension points (imported by ``import ctxext``).

* ``ROPE_INIT_FUNCTIONS["ctxext_xpos"]``: frequencies of the wrapped base rope type, so a checkpoint whose
  config.json says ``rope_type: ctxext_xpos`` builds its rotary module; it also selects the ``ctxext_xpos``
  attention implementation, which transformers does not save in config.json.
* ``AttentionInterface["ctxext_xpos"]``: attention with the xPos decay (``ctxext.rope.xpos.xpos_attention``) on
  layers whose rope parameters are xPos (Gemma 3 sliding layers stay plain unless patched), SDPA elsewhere.
* ``AttentionMaskInterface["ctxext_xpos"]``: the SDPA mask builder, so padding and sliding windows still apply.
* a validation method for the new rope type, so loading does not warn about it.

Without ``import ctxext``, transformers fails on the unknown rope type with ``KeyError: 'ctxext_xpos'``
instead of silently running plain RoPE.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from ..native import XPOS_ROPE_TYPE, unwrap_xpos
from ..rope.xpos import xpos_attention
from .base import compute_inv_freq, head_dim_of


def _layer_rope_parameters(config, layer_idx: int | None) -> dict:
    params = config.rope_parameters
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_idx is not None and layer_types[layer_idx] in params:
        return params[layer_types[layer_idx]]
    return params


def xpos_init(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """``ROPE_INIT_FUNCTIONS`` entry: the wrapped base type's frequencies; switches attention to xPos."""
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    base, _ = unwrap_xpos(params)
    inv_freq, attention_factor = compute_inv_freq(base, head_dim_of(config), config.max_position_embeddings)
    if config._attn_implementation != XPOS_ROPE_TYPE:
        config._attn_implementation = XPOS_ROPE_TYPE
    return inv_freq.to(device), attention_factor


def xpos_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` entry (same signature as transformers' ``sdpa_attention_forward``)."""
    params = _layer_rope_parameters(module.config, getattr(module, "layer_idx", None))
    if params.get("rope_type") != XPOS_ROPE_TYPE:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    out = xpos_attention(
        query,
        key,
        value,
        attention_mask,
        scale_base=float(params["xpos_scale_base"]),
        scaling=scaling,
        dropout=dropout,
        softcap=kwargs.get("softcap"),
    )
    return out, None


def _validate_ctxext_xpos_rope_parameters(self, rope_parameters, ignore_keys=None) -> None:
    scale_base = rope_parameters.get("xpos_scale_base")
    if not isinstance(scale_base, (int, float)) or not scale_base > 0:
        raise ValueError(f"rope_parameters.xpos_scale_base={scale_base!r} is invalid; valid range: a number > 0")
    base, _ = unwrap_xpos(rope_parameters)
    validate = getattr(self, f"_validate_{base['rope_type']}_rope_parameters", None)
    if validate is None:
        raise ValueError(f"rope_parameters.ctxext_base_rope_type={base['rope_type']!r} is not a transformers rope type")
    validate(base, ignore_keys=ignore_keys)


ROPE_INIT_FUNCTIONS[XPOS_ROPE_TYPE] = xpos_init
AttentionInterface.register(XPOS_ROPE_TYPE, xpos_attention_forward)
AttentionMaskInterface.register(XPOS_ROPE_TYPE, sdpa_mask)
RotaryEmbeddingConfigMixin._validate_ctxext_xpos_rope_parameters = _validate_ctxext_xpos_rope_parameters
