"""Llama-style decoders with one rotary embedding shared by every layer: Llama, Mistral, Qwen2, Qwen3."""

from ctxext.models.base import Family, register_family

LLAMA = register_family(Family(name="llama", model_types=("llama",)))
MISTRAL = register_family(
    Family(
        name="mistral",
        model_types=("mistral",),
        scope_note="mistral shares one rotary embedding across all layers (sliding or not); use --scope all",
    )
)
QWEN2 = register_family(
    Family(
        name="qwen2",
        model_types=("qwen2",),
        scope_note="qwen2 shares one rotary embedding across all layers (sliding or not); use --scope all",
    )
)
QWEN3 = register_family(
    Family(
        name="qwen3",
        model_types=("qwen3",),
        scope_note="qwen3 shares one rotary embedding across all layers (sliding or not); use --scope all",
    )
)
