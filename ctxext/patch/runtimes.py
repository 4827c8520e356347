"""Which runtimes run a checkpoint as saved: what ``ctxext info`` prints under ``runtimes``.

- transformers: stock, only after ``import ctxext`` (ctxext's attention-side types), or not at all;
- engines that build their rotary embedding from transformers' ``rope_parameters`` / ``rope_scaling`` (vLLM,
  SGLang and engines modelled on them): per rope type, from ``ROPE_PARAMETERS_ENGINES``;
- llama.cpp through ``ctxext export gguf``: the exporter's own checks on the config and the tokenizer files.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from ctxext.errors import CtxextError
from ctxext.models.native import attention_method_of

# What vLLM and SGLang do with each transformers rope_type: (verdict, note) with verdict "yes", "differs" (runs, but
# computes something else than transformers) or "no"; a type that is not listed is reported as unknown. Read in:
#   vLLM    vllm/model_executor/layers/rotary_embedding/__init__.py, get_rope (commit 41c5903d; older ones such as
#           926c71f6 raise "Unknown RoPE scaling type" for proportional; partial_rotary_factor is read from the rope
#           dict), dynamic_ntk_scaling_rope.py, phi3_long_rope_scaled_rope.py
#   SGLang  python/sglang/srt/layers/rotary_embedding/factory.py, get_rope (commit 108c36c0; the single-file
#           python/sglang/srt/layers/rotary_embedding.py of 00a66ebe has no proportional), rope_variant.py. Its
#           models/llama.py (00239548) takes partial_rotary_factor from a config attribute that transformers 5 keeps
#           inside rope_parameters, so proportional is unknown there.
# Both build one cos/sin cache for the whole context when the model loads: dynamic NTK's frequencies are those of the
# longest context at every length, and longrope takes its cos/sin scale from short_mscale / long_mscale or its own
# formula (get_rope passes no attention_factor to it; ``_engines_longrope_scale``).
ROPE_PARAMETERS_ENGINES: dict[str, tuple[str, str]] = {
    "default": ("yes", ""),
    "linear": ("yes", ""),
    "yarn": ("yes", ""),
    "llama3": ("yes", ""),
    "longrope": ("yes", ""),
    "dynamic": (
        "differs",
        "dynamic NTK runs with the frequencies of the longest context at every length (transformers recomputes "
        "them per sequence length)",
    ),
    "proportional": ("yes", "proportional needs a recent vLLM (older versions reject it); unknown for SGLang"),
}
GGUF_EXTRA = "pip install 'ctxext[gguf]'"


def transformers_runtime(types: set[str], stock: set[str]) -> str:
    """Stock transformers: yes / only after ``import ctxext`` / no, for the rope types of a checkpoint."""
    needs = sorted(types - stock)
    ours = [t for t in needs if attention_method_of({"rope_type": t})]
    if not needs:
        return "yes: stock transformers AutoModelForCausalLM.from_pretrained reproduces it"
    if ours == needs:
        return (
            f"only after `import ctxext` ({', '.join(t.removeprefix('ctxext_') for t in ours)} attention); "
            f"without it transformers raises KeyError: {ours[0]!r}"
        )
    return f"no: unknown rope type(s) {', '.join(needs)}"


def _engines_longrope_scale(params: dict[str, Any], max_positions: int | None) -> float | None:
    """The cos/sin scale vLLM's and SGLang's longrope applies where the config names no short/long_mscale (their
    Phi3LongRoPEScaledRotaryEmbedding): sqrt(1 + ln s / ln original) for s = max_position_embeddings / original."""
    original = params.get("original_max_position_embeddings")
    if not original or not max_positions or max_positions <= original:
        return 1.0 if original and max_positions else None
    return math.sqrt(1 + math.log(max_positions / original) / math.log(original))


def _longrope_notes(params: dict[str, Any], max_positions: int | None) -> list[str]:
    notes = []
    if list(params.get("short_factor") or []) != list(params.get("long_factor") or []):
        notes.append(
            "these engines switch between short_factor and long_factor differently from transformers (vLLM by its "
            "maximum model length, SGLang per batch)"
        )
    if "attention_factor" in params and not {"short_mscale", "long_mscale"} & params.keys():
        theirs = _engines_longrope_scale(params, max_positions)
        if theirs is None or abs(theirs - float(params["attention_factor"])) > 1e-6 * max(1.0, theirs):
            notes.append(
                f"these engines ignore longrope's attention_factor {float(params['attention_factor']):g} and scale "
                + (f"cos/sin by {theirs:g} instead" if theirs is not None else "cos/sin by their own formula")
            )
    return notes


def rope_parameters_engines_runtime(per_type: dict[str, dict[str, Any]], max_positions: int | None = None) -> str:
    """vLLM / SGLang for a checkpoint's rope parameters (one flat dict per layer type) and its
    max_position_embeddings."""
    no, unknown, differs, notes = [], [], [], []
    for params in per_type.values():
        params = params or {}
        rope_type = params.get("rope_type", "default")
        method = attention_method_of(params)
        if method is not None:
            no.append(f"rope_type {rope_type!r} is ctxext's own attention; it runs only in transformers")
        elif rope_type not in ROPE_PARAMETERS_ENGINES:
            unknown.append(rope_type)
        else:
            verdict, note = ROPE_PARAMETERS_ENGINES[rope_type]
            {"no": no, "differs": differs, "yes": notes}[verdict].extend([note] if note else [])
            differs += _longrope_notes(params, max_positions) if rope_type == "longrope" else []
    if no:
        return "no: " + "; ".join(dict.fromkeys(no))
    if unknown:
        return f"unknown: rope type(s) {', '.join(dict.fromkeys(unknown))} not checked against vLLM / SGLang"
    if differs:
        return "runs, but not as transformers does: " + "; ".join(dict.fromkeys(differs))
    return "yes: " + "; ".join(dict.fromkeys(notes)) if notes else "yes"


def _reason(err: Exception, src: str) -> str:
    """The exporter's message without the checkpoint path it starts with."""
    text = str(err).removeprefix(f"{src} cannot be exported to llama.cpp: ")
    for prefix in (f"{src}: ", f"{src}/"):
        text = text.removeprefix(prefix)
    return "it" + text[len(src) :] if text.startswith(src) else text


def llamacpp_runtime(src: str, config) -> str:
    """Whether ``ctxext export gguf`` would write SRC for llama.cpp, and if not why (its own checks on the config
    and the tokenizer files; the weights are not read)."""
    from ctxext.io.gguf.tokenizer import tokenizer_metadata
    from ctxext.io.gguf.write import check_exportable

    if not Path(src).is_dir():
        return "no: `ctxext export gguf` needs a local checkpoint folder"
    try:
        arch, rope = check_exportable(src, config)
        tokenizer_metadata(src, config.vocab_size)
    except CtxextError as err:
        return f"no: {_reason(err, src)}"
    scaling = "rope_freqs per pair" if rope.freq_divisors is not None else f"rope {rope.scaling_type}"
    extra = "" if importlib.util.find_spec("gguf") else f", after {GGUF_EXTRA}"
    return f"yes: `ctxext export gguf` writes it ({arch}, {scaling}{extra})"
