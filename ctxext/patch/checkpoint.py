"""Patch a checkpoint on disk (what ``ctxext patch`` runs) and describe what a checkpoint's rope does."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from ctxext.io.checkpoint import claim_output, load_config, load_model, save_checkpoint
from ctxext.io.sources import check_source
from ctxext.io.validate import check_checkpoint
from ctxext.models import family_of, head_dim_of, stock_rope_types
from ctxext.models.native import RECORD_KEY
from ctxext.options import DType, Options, opt, takes
from ctxext.patch.model import apply_plan, plan_patch
from ctxext.patch.runtimes import llamacpp_runtime, rope_parameters_engines_runtime, transformers_runtime

log = logging.getLogger(__name__)


class PatchOptions(Options):
    """``ctxext patch SRC OUT --method M [method parameters]``; the method parameters' flags come from the method
    registry (``ctxext methods``) and travel in ``params``."""

    src: str = opt(
        ...,
        "checkpoint folder, 'reference' (the shipped model), a .gguf file or GGUF source name "
        "(smollm2), or an org/name hub id when online",
        positional=True,
    )
    out: str = opt(..., "output folder (must not exist unless --force)", positional=True)
    method: str = opt(..., "method or chain (`ctxext methods` lists them), e.g. yarn, prope+pi")
    scope: Literal["all", "global", "sliding"] | None = opt(
        None, "layer types to patch; default: all (Gemma 3: global)"
    )
    target_length: int | None = opt(
        None, "new context; sets factor = target / the checkpoint's context for the method that takes a factor", gt=0
    )
    trained_context: int | None = opt(
        None,
        "the context the checkpoint was trained at, where its config's "
        "max_position_embeddings states more (e.g. 32768 for a Qwen2.5 base whose "
        "config says 131072): the methods and --target-length extend from it",
        gt=0,
    )
    dtype: DType = opt("auto", "weights dtype of OUT; auto keeps the stored one")
    force: bool = opt(False, "replace OUT if it exists")
    allow_pickle: bool = opt(False, "also read pickled *.bin weights (can execute code: only for files you trust)")
    params: dict[str, Any] = opt({}, "method parameters by name (the CLI's method flags)")


@takes(PatchOptions, extra_into="params")
def patch_checkpoint(
    src, out, method, scope, target_length, trained_context, dtype, force, allow_pickle, params
) -> Path:
    """Patch the checkpoint SRC with the method chain ``method`` and write it to OUT (``ctxext patch --help``);
    keyword arguments that are not options are method parameters (``factor=8``)."""
    src = check_source(src)
    with claim_output(out, force, "ctxext patch"):
        config = load_config(src)
        plan = plan_patch(
            config, method, scope=scope, target_length=target_length, trained_context=trained_context, **params
        )  # fails before any load
        model = load_model(src, dtype=dtype, allow_pickle=allow_pickle)
        apply_plan(model, plan)
        log.info("patched %s with %s", src, plan.record["steps"][-1]["spec"])
        return save_checkpoint(model, out, source=src, force=force)


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What ``ctxext info`` shows, from config.json, after checking the checkpoint and every weight's values
    (NaN / inf) without loading the model; ``runtimes`` says which runtimes run it as saved (``patch.runtimes``)."""
    src = check_source(path)
    checked = check_checkpoint(src, finite=True)
    config = checked.config
    raw = checked.raw or config.to_dict()
    family = family_of(config)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    per_type = rope if all(isinstance(v, dict) for v in rope.values()) and rope else {"all": rope}
    types = {k: (v or {}).get("rope_type", "default") for k, v in per_type.items()}
    record = raw.get(RECORD_KEY)
    runtimes = {
        "transformers": transformers_runtime(set(types.values()), stock_rope_types()),
        "rope_parameters engines": rope_parameters_engines_runtime(per_type, raw.get("max_position_embeddings")),
        "llama.cpp": llamacpp_runtime(str(src), config),
    }
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
        "stock_transformers_loads": runtimes["transformers"],
        "runtimes": runtimes,
        "weights": weights,
        "scopes": list(family.scopes(config)),
    }
