"""The tokenizer recipe of the reference model and the tiny test models: byte-level BPE, one token per digit."""

from __future__ import annotations

SPECIALS = ["<|endoftext|>", "<|pad|>"]


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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIALS[0],
        bos_token=SPECIALS[0],
        pad_token=SPECIALS[1],
        model_max_length=model_max_length,
    )
