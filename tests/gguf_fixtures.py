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
