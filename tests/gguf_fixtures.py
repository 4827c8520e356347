"""Tiny Llama checkpoints with a real byte-level BPE tokenizer (the reference model's), for the GGUF tests."""

import shutil
from pathlib import Path

import torch
from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "ctxext" / "assets" / "reference"
VOCAB = 4096  # the reference tokenizer's size
HEAD_DIM = 32
CONTEXT = 64  # conftest's tiny trained context


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama (conftest's, q/k scaled up) with head_dim 32, vocab 4096 and the reference tokenizer."""
    kwargs = {"vocab_size": VOCAB, "head_dim": HEAD_DIM, "tie_word_embeddings": False}
    kwargs.update(overrides)
    model = tiny_model("llama", seed=seed, **kwargs)
    with torch.no_grad():  # wider logit margins: top-1 must not hinge on float32 rounding
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE / name, path / name)
    return path


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


SLIDING_WINDOW = 16
GEMMA3_LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]  # llama.cpp's (and transformers') pattern of 6


def save_tiny_gemma(path: Path, arch: str, full_rope: dict | None = None, seed: int = 0, **overrides) -> Path:
    """A tiny random Gemma 2 (``arch`` gemma2) or Gemma 3 (gemma3; six layers, ``full_rope`` on the global one,
    theta 10000 on the sliding ones) with a window of 16, the reference vocabulary and tied embeddings; ``overrides``
    go to the config."""
    kwargs = {"vocab_size": VOCAB, "sliding_window": SLIDING_WINDOW, "tie_word_embeddings": True}
    if arch == "gemma3":
        full_rope = full_rope or {"rope_type": "default", "rope_theta": 1e6}
        kwargs.update(
            num_hidden_layers=len(GEMMA3_LAYER_TYPES),
            layer_types=GEMMA3_LAYER_TYPES,
            rope_parameters={
                "full_attention": full_rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        )
    model = tiny_model({"gemma2": "gemma2", "gemma3": "gemma3_text"}[arch], seed=seed, **{**kwargs, **overrides})
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE / name, path / name)
    return path


def write_gemma_gguf(src: Path, out: Path, arch: str, *, scaling: tuple | None = None, window: bool = True) -> Path:
    """Checkpoint SRC as llama.cpp's converter writes a Gemma 2 / 3 file (float32): its tensor names, norms stored
    as 1 + weight, no q/k permutation; the rope keys describe the global layers (``scaling``: ``(type, factor)``);
    ``window``: write the sliding window; the reference tokenizer as byte-level BPE."""
    import gguf
    from transformers import AutoModelForCausalLM

    from ctxext.io.gguf.tokenizer import tokenizer_metadata

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = model.config
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    names = gguf.get_tensor_name_map({"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}[arch], 99)
    w = gguf.GGUFWriter(out, arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    if scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling[0]))
        w.add_rope_scaling_factor(scaling[1])
    if window:
        w.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    tok = tokenizer_metadata(src, config.vocab_size)
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" or "rotary_emb" in name:
            continue
        gname = names.get_name(name, try_suffixes=(".weight",))
        a = tensor.numpy()
        w.add_tensor(gname, a + 1 if "norm" in gname else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
