"""Apply a method chain to a live model, reversibly.

``plan_patch(config, "prope+pi", keep=0.25, factor=4)`` computes, from the config alone, the new
``rope_parameters`` (native transformers form where one exists), the new ``max_position_embeddings`` and the
record of what ctxext did. ``patch_model(model, ...)`` applies a plan: it rebuilds the rotary module from the
new config exactly as ``from_pretrained`` will, switches attention to xPos when the chain has it, and returns a
``PatchHandle`` whose ``remove()`` restores the original model bit for bit.

    handle = patch_model(model, "yarn", factor=8)
    ...
    handle.remove()          # or: with patch_model(...): ...
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, final

from torch import nn

from ctxext.errors import MethodError
from ctxext.models import compute_inv_freq, family_of, head_dim_of, rebuild_rotary, set_attention_implementation
from ctxext.models.base import attention_implementation, get_rope_parameters
from ctxext.models.native import (
    RECORD_KEY,
    attention_rope_type,
    extended_record,
    native_rope_parameters,
    unwrap_attention,
    uses_attention_method,
)
from ctxext.rope.chain import apply_chain, chain_to_records, format_chain, parse_chain, rescale_factor, validate_chain
from ctxext.rope.registry import RopeContext, RopeState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchPlan:
    """What a patch changes in a config (see ``plan_patch``)."""

    family: str
    scope: str
    chain: tuple
    rope_parameters: Any
    max_position_embeddings: int
    record: dict[str, Any]
    states: dict[str | None, RopeState] = field(repr=False)

    @property
    def attention_method(self) -> str | None:
        """The attention-side method the patched config uses (xpos, ...), or None."""
        return uses_attention_method(self.rope_parameters)

    def apply_to_config(self, config) -> None:
        config.rope_parameters = copy.deepcopy(self.rope_parameters)
        config.max_position_embeddings = self.max_position_embeddings
        setattr(config, RECORD_KEY, copy.deepcopy(self.record))


def _check_target_length(target_length: Any, context: int) -> int:
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < context:
        raise MethodError(
            f"target_length={target_length!r} is invalid; valid range: an integer >= the checkpoint's context {context}"
        )
    return target_length


def _check_trained_context(trained_context: Any, config) -> int:
    stated = int(config.max_position_embeddings)
    if trained_context is None:
        return stated
    if isinstance(trained_context, bool) or not isinstance(trained_context, int) or not 2 <= trained_context <= stated:
        raise MethodError(
            f"trained_context={trained_context!r} is invalid; valid range: an integer from 2 to the "
            f"config's max_position_embeddings ({stated}); a longer context is a target_length"
        )
    if getattr(config, RECORD_KEY, None):
        raise MethodError(
            "trained_context applies to an original checkpoint; this one was already patched by ctxext, "
            "whose record gives the context it extends from"
        )
    return trained_context


def plan_patch(
    config,
    chain: str | Sequence,
    *,
    scope: str | None = None,
    target_length: int | None = None,
    trained_context: int | None = None,
    **params: Any,
) -> PatchPlan:
    """Compute the patch of ``config`` by ``chain`` (a spec such as ``"prope+pi"`` or method configs).

    ``target_length`` sets the rescaling factor to ``target_length / context`` where the chain's rescaling
    method takes a factor and none was given. ``scope`` selects layer types (``all``, ``global``, ``sliding``;
    default: the family's). The checkpoint's current frequencies are the starting point, so patching a
    patched checkpoint composes on top of it; the record keeps every step.

    ``context`` is the config's ``max_position_embeddings`` unless ``trained_context`` gives the length the model
    was really trained at, for configs that state more (some Qwen2.5 and Mistral checkpoints): the methods then
    extend from it (YaRN's ramp, the factor a target length sets, ``original_max_position_embeddings``).
    """
    family = family_of(config)
    keys = family.resolve_scope(config, scope)
    context = _check_trained_context(trained_context, config)
    if target_length is not None:
        target_length = _check_target_length(target_length, context)
    if isinstance(chain, str) or all(isinstance(c, str) for c in chain):
        default_factor = target_length / context if target_length is not None else None
        methods = parse_chain(chain, default_factor=default_factor, **params)
    else:
        if any(v is not None for v in params.values()):
            raise MethodError("pass parameters inside the method configs when the chain is given as configs")
        methods = tuple(chain)
        validate_chain(methods)

    head_dim = head_dim_of(config)
    new_rope = copy.deepcopy(config.rope_parameters)
    states: dict[str | None, RopeState] = {}
    for key in keys:
        source = get_rope_parameters(config, key)
        base, _ = unwrap_attention(source)
        ctx = RopeContext(head_dim=head_dim, rope_theta=float(base["rope_theta"]), context_length=context)
        inv_freq, attention_factor = compute_inv_freq(base, head_dim, context)
        state = apply_chain(methods, RopeState(inv_freq.double(), attention_factor), ctx)
        params_for_key = native_rope_parameters(source, methods, ctx, state)
        states[key] = state
        if key is None:
            new_rope = params_for_key
        else:
            new_rope[key] = params_for_key

    extended = round(context * rescale_factor(methods))
    for m in methods:  # attention-side methods that extend by themselves (selfextend) reach further
        extended = m.reach(extended, target_length)
    extended = target_length or extended
    # transformers' per-forward types (dynamic) read max_position_embeddings as the trained length: it must not move.
    max_positions = context if any(m.per_forward for m in methods) else extended
    step = {
        "chain": chain_to_records(methods),
        "spec": format_chain(methods),
        "scope": scope or family.default_scope,
        "from_context": context,
        "to_context": extended,
    }
    record = extended_record(config, step, extended)
    return PatchPlan(
        family=family.name,
        scope=step["scope"],
        chain=methods,
        rope_parameters=new_rope,
        max_position_embeddings=max_positions,
        record=record,
        states=states,
    )


@final
class PatchHandle:
    """Undo handle returned by ``patch_model``; also a context manager."""

    def __init__(self, model: nn.Module, plan: PatchPlan):
        self.model, self.plan = model, plan
        config = model.config
        self._saved = (
            copy.deepcopy(config.rope_parameters),
            config.max_position_embeddings,
            copy.deepcopy(getattr(config, RECORD_KEY, None)),
            attention_implementation(model),
        )
        self._rotary_slot = None  # (parent, attribute, original rotary module) once applied
        self._removed = False

    def remove(self) -> None:
        """Restore the rotary module, config and attention implementation exactly as before the patch."""
        if self._removed:
            return
        rope_parameters, max_positions, record, attn = self._saved
        config = self.model.config
        config.rope_parameters = rope_parameters
        config.max_position_embeddings = max_positions
        if record is None:
            if hasattr(config, RECORD_KEY):
                delattr(config, RECORD_KEY)
        else:
            setattr(config, RECORD_KEY, record)
        if self._rotary_slot is not None:
            parent, attr, rotary = self._rotary_slot
            setattr(parent, attr, rotary)
        set_attention_implementation(self.model, attn)
        self._removed = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_plan(model: nn.Module, plan: PatchPlan) -> PatchHandle:
    handle = PatchHandle(model, plan)
    if plan.attention_method is not None:
        from ctxext.models.attention import register_with_transformers

        register_with_transformers()  # methods registered after `import ctxext` too
    plan.apply_to_config(model.config)
    handle._rotary_slot = rebuild_rotary(model)  # the same construction from_pretrained performs
    if plan.attention_method is not None:
        set_attention_implementation(model, attention_rope_type(plan.attention_method))
    return handle


def patch_model(
    model: nn.Module,
    chain: str | Sequence,
    *,
    scope: str | None = None,
    target_length: int | None = None,
    **params: Any,
) -> PatchHandle:
    """Patch a loaded model in place (see ``plan_patch`` for the arguments); returns the undo handle."""
    plan = plan_patch(model.config, chain, scope=scope, target_length=target_length, **params)
    for m in plan.chain:
        if m.per_forward:
            log.warning(
                "%s recomputes frequencies from the sequence length: a KV-cached decode differs slightly "
                "from a full forward over the same tokens (about 1e-2 in the logits)",
                m.name,
            )
    return apply_plan(model, plan)
