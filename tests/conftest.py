"""Tiny random models of every supported family, built from configs (no download)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
CONTEXT = 64  # trained context of the tiny models
HEAD_DIM = 16


def tiny_config(model_type: str, **overrides):
    kwargs = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": CONTEXT,
        "pad_token_id": 0,
    }
    if model_type == "gemma3_text":
        kwargs.update(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    if model_type in ("mistral", "qwen2", "gemma2"):
        kwargs.update(sliding_window=16)
    if model_type == "gemma2":
        kwargs.update(layer_types=["sliding_attention", "full_attention"])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, *, scale_qk: bool = True, **overrides):
    """The tests' one tiny model builder: ``tiny_config`` with ``overrides``, initialised from ``seed``. With
    ``scale_qk`` (the default for rope tests) q/k are scaled up so that positional effects show in the logits and
    greedy decoding never stops at an end-of-text token; without it the model is as transformers initialises it
    (for training and loss tests)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    if scale_qk:  # random init is tiny
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(8.0)
        model.generation_config.eos_token_id = None
    return model.eval()


def save_tiny_with_tokenizer(path, tokenizer, seed: int = 0, **overrides):
    """A tiny Llama (transformers' own init) sized to ``tokenizer``, saved with it: a checkpoint for training and
    evaluation tests."""
    model = tiny_model(
        "llama",
        seed,
        scale_qk=False,
        vocab_size=len(tokenizer),
        intermediate_size=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAST_FAMILIES = ("llama", "gemma3_text")  # one flat rope dict, one per layer type: the two shapes of the code path


@pytest.fixture(params=[f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def family(request):
    """Every supported family; `make test-fast` runs the two structurally different ones."""
    return request.param


def assert_left_padding_matches_unpadded(model, long: torch.Tensor, short: torch.Tensor, new_tokens: int = 6) -> None:
    """Greedy decoding of a left-padded batch [long, short] equals each row decoded alone (logits and tokens)."""
    pad = long.numel() - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    out = model.generate(
        batch,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for row, tokens in enumerate((long, short)):
        alone = model.generate(
            tokens[None],
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        torch.testing.assert_close(
            torch.stack(out.logits, 1)[row], torch.stack(alone.logits, 1)[0], rtol=1e-4, atol=1e-4
        )
        assert torch.equal(out.sequences[row, -new_tokens:], alone.sequences[0, -new_tokens:])
