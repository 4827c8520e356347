"""Model-family adapters: the only place that knows transformers' module and config names.

A ``Family`` says where a family keeps its rope parameters (one flat dict, or one per layer type), which
*scopes* a user may patch (``all``; ``global`` / ``sliding`` where layer types have separate rotary
frequencies) and why a scope is missing. Families register themselves in ``FAMILIES`` by ``model_type``.

The functions below are the rest of ctxext's contact with model internals: the rotary module (find, rebuild
from the config), the attention implementation switch, the decoder body / LM head / logit softcap used by the
chunked loss, the names of embeddings and norms (trainable extras in fine-tuning), activation checkpointing, and
the q/k/v modules whose outputs the frequency analysis measures.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctxext.errors import MethodError, UnsupportedModelError

SCOPE_LAYER_TYPES = {"global": "full_attention", "sliding": "sliding_attention"}


@dataclass(frozen=True)
class Family:
    """Args:
    name: family name shown to users.
    model_types: ``config.model_type`` values handled.
    per_layer_type: rope parameters are a dict keyed by layer type (Gemma 3) instead of one flat dict.
    default_scope: scope used when the user gives none.
    scope_note: why only ``all`` exists for a flat family with sliding layers (shown on a bad scope).
    """

    name: str
    model_types: tuple[str, ...]
    per_layer_type: bool = False
    default_scope: str = "all"
    scope_note: str = ""

    def scopes(self, config) -> dict[str, list[str | None]]:
        """Valid scopes for this config -> rope-parameter keys they cover (None = the flat dict)."""
        if not self.per_layer_type:
            return {"all": [None]}
        present = [t for t in ("full_attention", "sliding_attention") if t in set(config.layer_types)]
        scopes: dict[str, list[str | None]] = {"all": list(present)}
        for scope, layer_type in SCOPE_LAYER_TYPES.items():
            if layer_type in present:
                scopes[scope] = [layer_type]
        return scopes

    def resolve_scope(self, config, scope: str | None) -> list[str | None]:
        scopes = self.scopes(config)
        scope = scope or self.default_scope
        if scope not in scopes:
            known = scope in ("all", *SCOPE_LAYER_TYPES)
            why = (
                self.scope_note
                if known and self.scope_note
                else (
                    f"this {self.name} model has no {SCOPE_LAYER_TYPES.get(scope, scope)} layers"
                    if known
                    else "unknown scope"
                )
            )
            raise MethodError(f"scope {scope!r} is not available: {why}; valid scopes: {', '.join(scopes)}")
        return scopes[scope]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        if model_type in FAMILIES:
            raise RuntimeError(f"model_type {model_type!r} already handled by family {FAMILIES[model_type].name!r}")
        FAMILIES[model_type] = family
    return family


def family_of(config) -> Family:
    """The adapter for ``config`` or an ``UnsupportedModelError`` naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(sorted(FAMILIES))
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: ctxext patches rotary (RoPE) decoders of the families {supported}"
    )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def get_rope_parameters(config, key: str | None) -> dict[str, Any]:
    params = config.rope_parameters if key is None else config.rope_parameters[key]
    return copy.deepcopy(dict(params))


def _probe_max_positions(params: dict[str, Any], max_position_embeddings: int) -> int:
    # transformers reads max_position_embeddings where the factor is missing: a Phi-3-style longrope takes its
    # factor (and so its default attention factor) as max_position_embeddings / original_max_position_embeddings,
    # so the probe must carry the config's. With a factor it is not read; then one consistent with
    # original_max_position_embeddings * factor, so that transformers' config validation has nothing to warn about.
    original = params.get("original_max_position_embeddings")
    if not original or params.get("factor") is None:
        return max_position_embeddings
    return max(int(original) + 1, round(int(original) * float(params["factor"])))


def compute_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """transformers' own fp32 ``(inv_freq, attention_factor)`` for one flat rope-parameter dict.

    Uses transformers' ``ROPE_INIT_FUNCTIONS`` on a throw-away Llama config, so it applies to every family.
    ``max_position_embeddings``: the config's; transformers reads it where ``params`` lack a factor (``dynamic``,
    Phi-3-style ``longrope``, whose default attention factor follows from it).
    ``seq_len``: the frequencies of a forward that long (``longrope``: the long factors beyond the original context).
    """
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        hint = " (run `import ctxext` first)" if rope_type.startswith("ctxext") else ""
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not known to transformers{hint}")
    probe = LlamaConfig(
        hidden_size=head_dim,
        num_attention_heads=1,
        head_dim=head_dim,
        max_position_embeddings=_probe_max_positions(params, max_position_embeddings),
        rope_parameters=copy.deepcopy(params),
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](
        probe, None, **({"seq_len": seq_len} if seq_len else {})
    )
    return inv_freq.float(), float(attention_factor)


def find_rotary(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, module)`` of the model's single rotary embedding (also inside PEFT wrappers)."""
    found = [(name, mod) for name, mod in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"expected one rotary embedding module named 'rotary_emb', found {len(found)}: {[n for n, _ in found]}"
        )
    name, module = found[0]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, module


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    parent, _, _ = find_rotary(model)
    layers = getattr(parent, "layers", None)
    if layers is None:
        raise UnsupportedModelError("cannot find the decoder layers next to the rotary embedding")
    return [layer.self_attn for layer in layers]


def layer_inv_freq(model: nn.Module) -> list[torch.Tensor]:
    """The rotary frequencies each decoder layer uses (Gemma 3: by layer type), fp32 on CPU."""
    _, _, rotary = find_rotary(model)
    layer_types = getattr(model.config, "layer_types", None)
    per_type = isinstance(getattr(rotary, "rope_type", None), dict)
    n = len(attention_modules(model))
    if per_type:
        return [getattr(rotary, f"{layer_types[i]}_inv_freq").float().cpu() for i in range(n)]
    return [rotary.inv_freq.float().cpu()] * n


def rebuild_rotary(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """Replace the rotary module by one built from ``model.config`` exactly as ``from_pretrained`` builds it
    (on the same device; buffers in fp32). Returns ``(parent, attribute, old module)`` for undoing."""
    parent, attr, old = find_rotary(model)
    buffer = next(iter(old.buffers()), None)
    rebuilt = type(old)(model.config)
    if buffer is not None:
        rebuilt.to(buffer.device)
    setattr(parent, attr, rebuilt)
    return parent, attr, old


@contextmanager
def rope_as_input(model: nn.Module, rope_theta: float, max_position_embeddings: int):
    """Within the block the model runs plain RoPE whose frequencies and cos/sin multiplier the caller sets, per
    forward, through the yielded ``set(inv_freq, attention_scaling)``: tensors that may require grad, so a loss
    backpropagates into them (the rotary module computes cos/sin from its ``inv_freq`` and ``attention_scaling``).
    The weights do not require grad inside. The config, the rotary module and ``requires_grad`` are restored after."""
    saved = copy.deepcopy(model.config.rope_parameters), model.config.max_position_embeddings
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    model.config.max_position_embeddings = max_position_embeddings
    parent, attr, old = rebuild_rotary(model)
    rotary = getattr(parent, attr)
    model.requires_grad_(False)

    def set_rope(inv_freq: torch.Tensor, attention_scaling: torch.Tensor) -> None:
        rotary.inv_freq = inv_freq.float()
        rotary.attention_scaling = attention_scaling.float()

    try:
        yield set_rope
    finally:
        model.config.rope_parameters, model.config.max_position_embeddings = saved
        setattr(parent, attr, old)
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


def attention_implementation(model: nn.Module) -> str:
    return model.config._attn_implementation


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Switch every layer's attention function (a transformers name or one ctxext registered)."""
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT (or plain) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) that returns ``last_hidden_state``."""
    return causal_lm(model).model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order (the units FSDP shards one at a time)."""
    return list(decoder_body(model).layers)


def lm_head(model: nn.Module) -> nn.Module:
    return causal_lm(model).lm_head


def logit_softcap(config) -> float | None:
    """Gemma 2's final logit soft-capping (None for the other families)."""
    return getattr(config, "final_logit_softcapping", None)


def is_embedding_parameter(name: str) -> bool:
    """The input embedding (tied to the LM head where the family ties them)."""
    return "embed_tokens" in name


def is_norm_parameter(name: str) -> bool:
    """Every RMSNorm weight: layer norms, the final norm and Qwen3 / Gemma 3 q_norm / k_norm."""
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


def enable_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_activation_checkpointing(model: nn.Module) -> None:
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()  # no-op when off


def qkv_modules(attention: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The modules whose outputs are q and k as attention sees them before rotation (after q_norm / k_norm where
    the family has them) and v. Their outputs are ``[B, S, H * D]`` (projections) or ``[B, S, H, D]`` (norms)."""
    q = getattr(attention, "q_norm", None) or attention.q_proj
    k = getattr(attention, "k_norm", None) or attention.k_proj
    return q, k, attention.v_proj


def stock_rope_types() -> set[str]:
    """rope types stock transformers knows (ctxext's own excluded)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return {t for t in ROPE_INIT_FUNCTIONS if not t.startswith("ctxext")} | {"default"}
