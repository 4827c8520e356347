"""The reference model that ships with ctxext (trained by ``scripts/train_reference.py``) and its tokenizer recipe."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

REFERENCE_DIR = Path(__file__).parent / "assets" / "reference"
REFERENCE_NAME = "reference"  # what users type for MODEL
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def reference_model_path() -> Path:
    if not (REFERENCE_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the reference model is not in this installation ({REFERENCE_DIR}); train it with "
            "`python scripts/train_reference.py --output ctxext/assets/reference`"
        )
    return REFERENCE_DIR


def resolve_model(name_or_path: str) -> str:
    """``"reference"`` -> the shipped model's folder; anything else unchanged."""
    return str(reference_model_path()) if name_or_path == REFERENCE_NAME else name_or_path


def has_reference_model() -> bool:
    return (REFERENCE_DIR / "config.json").is_file()


def build_stand_in(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama (context 256) with a BPE tokenizer trained on 60 stdlib files: the demo's default
    while no trained reference model ships. It shows the mechanics; its numbers mean nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .corpus import read_texts, stdlib_files

    if (path / "config.json").is_file():
        return path
    tokenizer = train_tokenizer(read_texts(stdlib_files("train")[:60]), vocab_size=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 1_000_000):
    """Byte-level BPE with every digit a single token (so keys are copied digit by digit).

    ``model_max_length`` is large on purpose: documents are tokenized whole and cut into windows later.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], model_max_length=model_max_length)
