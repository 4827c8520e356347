"""Export a Llama, Gemma 2 or Gemma 3 checkpoint to a GGUF file that llama.cpp runs with the same rope as transformers.

    export_gguf("out/yarn2", "out/yarn2.gguf", dtype="f16")    # what `ctxext export gguf` runs

Weights are read straight from the safetensors files. Llama: q_proj / k_proj rows are permuted from transformers'
half-split rotary layout (pair i = dims i, i + d/2) to llama.cpp's interleaved one (pair i = dims 2i, 2i + 1), the
inverse of what transformers' GGUF loader undoes. Gemma 2 / 3 (llama.cpp rotates them in the half-split "neox"
layout: no permutation) as llama.cpp's converter writes them: norm weights stored as 1 + weight (Gemma's RMSNorm
scales by 1 + w, llama.cpp's by w), the sliding window and, where transformers' layer types differ from llama.cpp's
default pattern, the per-layer pattern; the soft-caps llama.cpp applies; the query scale llama.cpp fixes
(1/sqrt(head_dim), or 1/sqrt(hidden / heads) at the 27B sizes) must be transformers' ``query_pre_attn_scalar``.
The rope metadata comes from ``rope.py`` (``gemma_gguf_rope``: Gemma 3's rope per layer type) and is checked
against a model of llama.cpp's rope before anything is written; SRC is checked first (``ctxext.io.validate``: config,
headers, shapes, finite weights); OUT is locked while it is written (``ctxext.io.lock``), written beside OUT and
renamed when complete.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ctxext.errors import CheckpointError
from ctxext.io.atomic import atomic_write
from ctxext.io.gguf.rope import (
    SLIDING_WINDOW_ROPE,
    GGUFRope,
    RopeExportError,
    gemma_gguf_rope,
    gguf_rope_from_parameters,
)
from ctxext.io.gguf.tokenizer import tokenizer_metadata
from ctxext.io.lock import output_lock
from ctxext.io.sources import check_source
from ctxext.io.validate import check_checkpoint, load_tokenizer
from ctxext.models.base import head_dim_of
from ctxext.options import Options, opt, takes

log = logging.getLogger(__name__)

# transformers model_type -> the llama.cpp architecture it is exported as
EXPORT_ARCHITECTURES = {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3"}
# llama.cpp's Gemma graphs (load_swa_pattern): layer il slides when il % n < n - 1, unless the file lists them
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # the size whose query scale llama.cpp takes from hidden / heads
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GEMMA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # Gemma 3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from half-split (transformers) to interleaved (llama.cpp) rotary layout."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_exportable(src: str, config) -> tuple[str, GGUFRope]:
    """``(llama.cpp architecture, rope)`` of SRC; ``CheckpointError`` for what llama.cpp would run differently."""
    arch = EXPORT_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise CheckpointError(
            f"{src} is a {config.model_type!r} model; `ctxext export gguf` writes the llama, gemma2 and gemma3 "
            f"architectures (model_type {', '.join(map(repr, EXPORT_ARCHITECTURES))}). Other families need "
            "llama.cpp's own converter and its rope handling"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise CheckpointError(
                f"{src}: {flag}=true is not exported (the {arch} architecture export writes no biases)"
            )
    if arch != "llama":
        _check_gemma(src, config, arch)
    elif (getattr(config, "hidden_act", "silu") or "silu") != "silu":
        raise CheckpointError(f"{src}: hidden_act {config.hidden_act!r}; llama.cpp's llama architecture uses silu")
    rope = dict(config.rope_parameters or {})
    try:
        if arch != "llama":
            return arch, gemma_gguf_rope(arch, rope, head_dim_of(config), config.max_position_embeddings)
        return arch, gguf_rope_from_parameters(rope, head_dim_of(config), config.max_position_embeddings)
    except RopeExportError as err:
        raise CheckpointError(f"{src} cannot be exported to llama.cpp: {err}") from err


def _check_gemma(src: str, config, arch: str) -> None:
    """What llama.cpp's gemma2 / gemma3 graph fixes and transformers' config may change."""
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"{src}: hidden_activation {config.hidden_activation!r}; llama.cpp's {arch} uses gelu_pytorch_tanh"
        )
    scalar = config.hidden_size // config.num_attention_heads
    if config.num_hidden_layers != LAYERS_27B[arch]:
        scalar = head_dim_of(config)
    if config.query_pre_attn_scalar != scalar:
        raise CheckpointError(
            f"{src}: query_pre_attn_scalar {config.query_pre_attn_scalar}, but llama.cpp's {arch} with "
            f"{config.num_hidden_layers} layers scales queries by 1/sqrt({scalar}); it would compute another model"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise CheckpointError(f"{src}: use_bidirectional_attention is true; llama.cpp's {arch} attends causally")
    if arch == "gemma3" and config.attn_logit_softcapping:
        raise CheckpointError(
            f"{src}: attn_logit_softcapping {config.attn_logit_softcapping}; llama.cpp's gemma3 does not soft-cap "
            "attention"
        )
    if arch == "gemma2" and not (config.attn_logit_softcapping and config.final_logit_softcapping):
        raise CheckpointError(
            f"{src}: attn_logit_softcapping {config.attn_logit_softcapping}, final_logit_softcapping "
            f"{config.final_logit_softcapping}; llama.cpp's gemma2 always soft-caps both (50 and 30 when unset)"
        )
    if arch == "gemma2" and not config.tie_word_embeddings:
        raise CheckpointError(f"{src}: tie_word_embeddings is false; llama.cpp's gemma2 reads no separate lm_head")
    if "sliding_attention" in (config.layer_types or []) and not config.sliding_window:
        raise CheckpointError(f"{src}: sliding_attention layers without a sliding_window")


def _check_out(out: Path, force: bool) -> Path:
    if out.suffix != ".gguf":
        raise CheckpointError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; give a file name ending in .gguf")
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another file name or pass --force to replace it")
    if not out.absolute().parent.is_dir():
        raise CheckpointError(f"cannot write {out}: its folder {out.absolute().parent} does not exist")
    return out


def _state_dict(src: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} has no *.safetensors weights; export reads safetensors only")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _gguf_tensors(weights: dict[str, torch.Tensor], config, src: str, arch: str) -> dict[str, torch.Tensor]:
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    layer_names = _LAYER_NAMES if arch == "llama" else _GEMMA_LAYER_NAMES
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER.match(name)
        if m and m.group(2) in layer_names:
            gname = f"blk.{m.group(1)}.{layer_names[m.group(2)]}"
            if arch == "llama" and m.group(2) == "self_attn.q_proj.weight":
                w = permute_rotary_rows(w, n_head)
            elif arch == "llama" and m.group(2) == "self_attn.k_proj.weight":
                w = permute_rotary_rows(w, n_kv)
        elif name in _GLOBAL_NAMES:
            gname = _GLOBAL_NAMES[name]
        else:
            raise CheckpointError(f"{src}: tensor {name!r} has no place in llama.cpp's {arch} architecture")
        if arch != "llama" and name.endswith("norm.weight"):
            w = w.to(torch.float32) + 1.0  # Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the weight
        out[gname] = w
    if config.tie_word_embeddings:
        out.pop("output.weight", None)  # llama.cpp reuses token_embd when output is absent
    elif "output.weight" not in out:
        raise CheckpointError(f"{src}: lm_head.weight is missing and tie_word_embeddings is false")
    return out


def _encode(name: str, w: torch.Tensor, dtype: str):
    """``(array, raw_dtype or None)``: 1-D tensors stay float32 (llama.cpp's convention), 2-D ones take ``dtype``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = w.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    if a.shape[-1] % 32 == 0:  # q8_0 blocks of 32 along a row
        return quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    log.info("%s: row length %d is not a multiple of 32, kept as f16", name, a.shape[-1])
    return a.astype(np.float16), None


class ExportOptions(Options):
    """``ctxext export gguf SRC OUT``."""

    src: str = opt(..., "checkpoint folder (or a .gguf file / source name, converted first)", positional=True)
    out: str = opt(..., "output file, ending in .gguf", positional=True)
    dtype: Literal["f32", "f16", "q8_0"] = opt("f32", "weights type of 2-D tensors (norms and rope_freqs stay f32)")
    force: bool = opt(False, "replace OUT if it exists")
    tokenizer_pre: str | None = opt(
        None,
        "llama.cpp pre-tokenizer name, when ctxext cannot tell it from tokenizer.json (e.g. llama-bpe, qwen2, smollm)",
    )


@takes(ExportOptions)
def export_gguf(src, out, dtype, force, tokenizer_pre) -> Path:
    """Write checkpoint SRC (folder, .gguf, or source name) as a llama.cpp GGUF file OUT (module docstring)."""
    out = _check_out(Path(out), force)
    src = check_source(src)
    if not Path(src).is_dir():
        raise CheckpointError(f"{src}: export needs a local checkpoint folder")
    config = check_checkpoint(src, finite=True).config
    arch, rope = check_exportable(src, config)
    if (Path(src) / "tokenizer.json").is_file():
        load_tokenizer(src, config.vocab_size)  # a damaged tokenizer.json fails here, naming it
    tok = tokenizer_metadata(src, config.vocab_size, pre=tokenizer_pre)
    tensors = _gguf_tensors(_state_dict(src), config, src, arch)
    with output_lock(out, "ctxext export gguf"):
        _check_out(out, force)  # again under the lock: another export may have finished meanwhile
        atomic_write(out, lambda tmp: _write_gguf(tmp, src, config, arch, rope, tok, tensors, dtype))
    log.info(
        "wrote %s (%s %s, rope %s%s)",
        out,
        arch,
        dtype,
        rope.scaling_type,
        ", per-pair rope_freqs" if rope.freq_divisors is not None else "",
    )
    return out


def _write_gguf(
    tmp: Path, src: str, config, arch: str, rope: GGUFRope, tok, tensors: dict[str, torch.Tensor], dtype: str
) -> None:
    import gguf

    head_dim = head_dim_of(config)
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(Path(src).name)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope.freq_base)
    w.add_rope_scaling_type(gguf.RopeScalingType(rope.scaling_type))
    if rope.factor is not None:
        w.add_rope_scaling_factor(rope.factor)
    if rope.original_context is not None:
        w.add_rope_scaling_orig_ctx_len(rope.original_context)
    if rope.scaling_type == "yarn":  # documentary: the llama and gemma architectures apply these values fixed
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
    if rope.attn_factor != 1.0:
        w.add_rope_scaling_attn_factors(rope.attn_factor)
    if arch != "llama":
        _add_gemma_keys(w, config, arch)
    record = json.loads((Path(src) / "config.json").read_text()).get("ctxext")
    if record:
        w.add_string("ctxext.record", json.dumps(record))

    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    if tok.merges:
        w.add_token_merges(tok.merges)
    for kind, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("unk", w.add_unk_token_id),
        ("pad", w.add_pad_token_id),
    ):
        if kind in tok.special_ids:
            add(tok.special_ids[kind])
    w.add_add_bos_token(tok.add_bos)
    if tok.model == "llama":  # SentencePiece, as llama.cpp's converter writes it (add_space_prefix defaults to true)
        w.add_add_sep_token(False)
        w.add_add_eos_token(tok.add_eos)
        w.add_add_space_prefix(bool(tok.add_space_prefix))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    if rope.freq_divisors is not None:  # llama.cpp asserts F32 for freq factors
        w.add_tensor("rope_freqs.weight", np.asarray(rope.freq_divisors, dtype=np.float32))
    for name, t in tensors.items():
        array, raw_dtype = _encode(name, t, dtype)
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_gemma_keys(w, config, arch: str) -> None:
    """Sliding window (and the per-layer pattern where it is not llama.cpp's default) and soft-caps."""
    slides = [t == "sliding_attention" for t in config.layer_types or []]
    if any(slides):  # gemma3 without one builds no sliding-window attention
        w.add_sliding_window(config.sliding_window)
    if any(slides) or arch == "gemma2":  # gemma2 always does: the pattern says where
        period = SWA_PATTERN[arch]
        if slides != [i % period < period - 1 for i in range(config.num_hidden_layers)]:
            w.add_sliding_window_pattern(slides)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(SLIDING_WINDOW_ROPE["gemma3"]["rope_theta"])  # what llama.cpp runs there anyway
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
