"""Model-family adapters (import registers every family); the only package that touches transformers internals."""

from . import gemma, llama  # noqa: F401  (registration)
from .base import (
    FAMILIES,
    Family,
    causal_lm,
    compute_inv_freq,
    decoder_body,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    family_of,
    find_rotary,
    head_dim_of,
    is_embedding_parameter,
    is_norm_parameter,
    lm_head,
    logit_softcap,
    qkv_modules,
    rebuild_rotary,
    set_attention_implementation,
    stock_rope_types,
)

__all__ = [
    "FAMILIES",
    "Family",
    "causal_lm",
    "compute_inv_freq",
    "decoder_body",
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "family_of",
    "find_rotary",
    "head_dim_of",
    "is_embedding_parameter",
    "is_norm_parameter",
    "lm_head",
    "logit_softcap",
    "qkv_modules",
    "rebuild_rotary",
    "set_attention_implementation",
    "stock_rope_types",
]
