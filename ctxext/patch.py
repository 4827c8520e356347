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
from typing import Any

from torch import nn

from . import __version__
from .models import family_of
from .models.base import compute_inv_freq, find_rotary, get_rope_parameters, head_dim_of
from .native import XPOS_ROPE_TYPE, native_rope_parameters, unwrap_xpos
from .rope.chain import apply_chain, chain_to_records, format_chain, parse_chain, rescale_factor, validate_chain
from .rope.spec import MethodError, RopeContext, RopeState

RECORD_KEY = "ctxext"  # config.json key holding what ctxext did
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
    def uses_xpos(self) -> bool:
        return _uses_xpos(self.rope_parameters)

    def apply_to_config(self, config) -> None:
        config.rope_parameters = copy.deepcopy(self.rope_parameters)
        config.max_position_embeddings = self.max_position_embeddings
        setattr(config, RECORD_KEY, copy.deepcopy(self.record))


def _uses_xpos(rope_parameters: Any) -> bool:
    if not isinstance(rope_parameters, dict):
        return False
    if rope_parameters.get("rope_type") == XPOS_ROPE_TYPE:
        return True
    return any(isinstance(v, dict) and v.get("rope_type") == XPOS_ROPE_TYPE for v in rope_parameters.values())


def _check_target_length(target_length: Any, context: int) -> int:
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < context:
        raise MethodError(
            f"target_length={target_length!r} is invalid; valid range: an integer >= the checkpoint's context {context}"
        )
    return target_length


def plan_patch(
    config,
    chain: str | Sequence,
    *,
    scope: str | None = None,
    target_length: int | None = None,
    **params: Any,
) -> PatchPlan:
    """Compute the patch of ``config`` by ``chain`` (a spec such as ``"prope+pi"`` or method configs).

    ``target_length`` sets the rescaling factor to ``target_length / context`` where the chain's rescaling
    method takes a factor and none was given. ``scope`` selects layer types (``all``, ``global``, ``sliding``;
    default: the family's). The checkpoint's current frequencies are the starting point, so patching a
    patched checkpoint composes on top of it; the record keeps every step.
    """
    family = family_of(config)
    keys = family.resolve_scope(config, scope)
    context = int(config.max_position_embeddings)
    if target_length is not None:
        target_length = _check_target_length(target_length, context)
    if isinstance(chain, str) or all(isinstance(c, str) for c in chain):
        names = chain.split("+") if isinstance(chain, str) else list(chain)
        takes_factor = {"pi", "ntk", "yarn", "llama3"} & {n.split(":")[0].strip() for n in names}
        if target_length is not None and takes_factor and params.get("factor") is not None:
            raise MethodError("give either factor or target_length, not both")
        if target_length is not None and takes_factor and ":factor=" not in str(chain):
            params["factor"] = target_length / context
        methods = parse_chain(chain, **params)
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
        base, _ = unwrap_xpos(source)
        ctx = RopeContext(head_dim=head_dim, rope_theta=float(base["rope_theta"]), context_length=context)
        inv_freq, attention_factor = compute_inv_freq(base, head_dim, context)
        state = apply_chain(methods, RopeState(inv_freq.double(), attention_factor), ctx)
        params_for_key = native_rope_parameters(source, methods, ctx, state)
        states[key] = state
        if key is None:
            new_rope = params_for_key
        else:
            new_rope[key] = params_for_key

    is_dynamic = any(m.name == "dynamic" for m in methods)
    extended = target_length or round(context * rescale_factor(methods))
    # transformers' dynamic type reads max_position_embeddings as the trained length: it must not move.
    max_positions = context if is_dynamic else extended
    previous = copy.deepcopy(getattr(config, RECORD_KEY, None)) or {}
    step = {
        "chain": chain_to_records(methods),
        "spec": format_chain(methods),
        "scope": scope or family.default_scope,
        "from_context": context,
        "to_context": extended,
    }
    record = {
        "version": __version__,
        "original_context": previous.get("original_context", context),
        "context": extended,
        "steps": [*previous.get("steps", []), step],
    }
    return PatchPlan(
        family=family.name,
        scope=step["scope"],
        chain=methods,
        rope_parameters=new_rope,
        max_position_embeddings=max_positions,
        record=record,
        states=states,
    )


class PatchHandle:
    """Undo handle returned by ``patch_model``; also a context manager."""

    def __init__(self, model: nn.Module, plan: PatchPlan):
        self.model, self.plan = model, plan
        config = model.config
        self._saved = (
            copy.deepcopy(config.rope_parameters),
            config.max_position_embeddings,
            copy.deepcopy(getattr(config, RECORD_KEY, None)),
            config._attn_implementation,
        )
        self._parent, self._attr, self._rotary = find_rotary(model)
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
        setattr(self._parent, self._attr, self._rotary)
        if config._attn_implementation != attn:
            self.model.set_attn_implementation(attn)
        self._removed = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_plan(model: nn.Module, plan: PatchPlan) -> PatchHandle:
    handle = PatchHandle(model, plan)
    old = handle._rotary
    plan.apply_to_config(model.config)
    device = next(iter(old.buffers()), None)
    rebuilt = type(old)(model.config)  # the same construction from_pretrained performs
    if device is not None:
        rebuilt.to(device.device)
    setattr(handle._parent, handle._attr, rebuilt)
    if plan.uses_xpos and model.config._attn_implementation != XPOS_ROPE_TYPE:
        model.set_attn_implementation(XPOS_ROPE_TYPE)
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
    if any(m.name == "dynamic" for m in plan.chain):
        log.warning("dynamic NTK recomputes frequencies from the sequence length: a KV-cached decode differs "
                    "slightly from a full forward over the same tokens (about 1e-2 in the logits)")
    return apply_plan(model, plan)
