"""Patch a checkpoint on disk (what ``ctxext patch`` runs) and describe what a checkpoint's rope does."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctxext.errors import CheckpointError
from ctxext.io.checkpoint import DTYPES, check_source, claim_output, load_config, load_model, save_checkpoint
from ctxext.io.validate import check_checkpoint
from ctxext.models import family_of, head_dim_of, stock_rope_types
from ctxext.models.native import RECORD_KEY, attention_method_of
from ctxext.patch.model import apply_plan, plan_patch

log = logging.getLogger(__name__)


def patch_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    chain: str | Sequence,
    *,
    scope: str | None = None,
    target_length: int | None = None,
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    **params: Any,
) -> Path:
    """Patch the checkpoint SRC with ``chain`` and write it to OUT (see ``ctxext patch --help``)."""
    src = check_source(src)
    with claim_output(out, force, "ctxext patch"):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
        config = load_config(src)
        plan = plan_patch(config, chain, scope=scope, target_length=target_length, **params)  # fails before any load
        model = load_model(src, dtype=dtype, allow_pickle=allow_pickle)
        apply_plan(model, plan)
        log.info("patched %s with %s", src, plan.record["steps"][-1]["spec"])
        return save_checkpoint(model, out, source=src, force=force)


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What ``ctxext info`` shows, from config.json, after checking the checkpoint and every weight's values
    (NaN / inf) without loading the model."""
    src = check_source(path)
    checked = check_checkpoint(src, finite=True)
    config = checked.config
    raw = checked.raw or config.to_dict()
    family = family_of(config)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    per_type = rope if all(isinstance(v, dict) for v in rope.values()) and rope else {"all": rope}
    types = {k: (v or {}).get("rope_type", "default") for k, v in per_type.items()}
    record = raw.get(RECORD_KEY)
    needs = sorted(set(types.values()) - stock_rope_types())
    ours = [t for t in needs if attention_method_of({"rope_type": t})]
    if not needs:
        loads = "yes: stock transformers AutoModelForCausalLM.from_pretrained reproduces it"
    elif ours == needs:
        loads = (
            f"only after `import ctxext` ({', '.join(t.removeprefix('ctxext_') for t in ours)} attention); "
            f"without it transformers raises KeyError: {ours[0]!r}"
        )
    else:
        loads = f"no: unknown rope type(s) {', '.join(needs)}"
    weights = sorted(p.name for p in Path(src).glob("*.safetensors")) if Path(src).is_dir() else []
    return {
        "path": src,
        "family": family.name,
        "model_type": config.model_type,
        "head_dim": head_dim_of(config),
        "rope_parameters": per_type,
        "rope_types": types,
        "max_position_embeddings": raw.get("max_position_embeddings"),
        "original_context": (record or {}).get("original_context", raw.get("max_position_embeddings")),
        "extended_context": (record or {}).get("context", raw.get("max_position_embeddings")),
        "ctxext": record,
        "stock_transformers_loads": loads,
        "weights": weights,
        "scopes": list(family.scopes(config)),
    }
