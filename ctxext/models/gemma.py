"""Gemma families. Gemma and Gemma 2 have one rotary embedding for all layers; Gemma 3 keeps separate
frequencies for its global (``full_attention``) and local (``sliding_attention``) layers, and ctxext patches
only the global ones unless asked (local layers never see more than their window)."""

from ctxext.models.base import Family, register_family

GEMMA = register_family(Family(name="gemma", model_types=("gemma",)))
GEMMA2 = register_family(
    Family(
        name="gemma2",
        model_types=("gemma2",),
        scope_note=(
            "gemma2 shares one rotary embedding between its sliding and global layers, so they cannot be "
            "patched separately; use --scope all"
        ),
    )
)
GEMMA3 = register_family(
    Family(name="gemma3", model_types=("gemma3_text",), per_layer_type=True, default_scope="global")
)
