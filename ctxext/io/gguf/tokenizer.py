"""Tokenizer metadata for a GGUF file, read from a checkpoint's ``tokenizer.json``.

Byte-level BPE (GPT-2 style): llama.cpp needs ``tokenizer.ggml.model`` ``gpt2``, the token strings by id, their
types, the merges, the special ids, and a pre-tokenizer name (``tokenizer.ggml.pre``) that selects its split regexes
(``src/llama-vocab.cpp``). The name is read off the ``pre_tokenizer`` of tokenizer.json for the layouts we know
(``PRE_TOKENIZERS``); for any other, pass the llama.cpp name yourself (``--tokenizer-pre``).

SentencePiece BPE as Gemma writes it in tokenizer.json (spaces replaced by ``▁``, byte fallback, no prefix space):
model ``llama`` as llama.cpp's converter writes Gemma's ``tokenizer.model``. llama.cpp merges the adjacent pair
whose joined token has the highest *score*; transformers applies the merges by rank. So the merges must come in
vocabulary order (they do where transformers derived them from SentencePiece) and each normal token's score is
minus its rank among them; byte tokens ``<0xNN>`` score 0, control and user-defined ones -1000, and runs of two or
more ``▁`` are the runs of spaces Gemma holds as user-defined pieces (transformers respells them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ctxext.errors import CheckpointError

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"

_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
# pre_tokenizer layout -> llama.cpp pre-tokenizer name with the same split regexes
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],  # GPT-2 regex only
    "smollm": [_DIGITS, _BYTE_LEVEL],  # \p{N} then the GPT-2 regex (SmolLM/SmolLM2, StarCoder)
}


def pre_tokenizer_json(pre: str) -> dict | None:
    """tokenizer.json ``pre_tokenizer`` for a llama.cpp pre-tokenizer name we know, else None."""
    layout = PRE_TOKENIZERS.get(pre)
    if layout is None:
        return None
    steps = [
        {**step, "add_prefix_space": False, "trim_offsets": True} if step["type"] == "ByteLevel" else dict(step)
        for step in layout
    ]
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def restore_pre_tokenizer(folder: str | Path, pre: str) -> bool:
    """Make FOLDER's tokenizer.json split text like llama.cpp's PRE (transformers' GGUF loader drops e.g. the
    digit split of ``smollm``). True when the file was changed."""
    path = Path(folder) / "tokenizer.json"
    want = pre_tokenizer_json(pre)
    if want is None or not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if detect_pre(data) == pre:
        return False
    data["pre_tokenizer"] = want
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True


@dataclass
class TokenizerMetadata:
    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    chat_template: str | None = None
    scores: list[float] | None = None  # SentencePiece (model llama) only
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece: written (llama.cpp's default for model llama is true)


def _matches(pre: dict, layout: list[dict]) -> bool:
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return len(steps) == len(layout) and all(
        all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, layout)
    )


def detect_pre(tokenizer_json: dict) -> str | None:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return next((name for name, layout in PRE_TOKENIZERS.items() if _matches(pre, layout)), None)


def tokenizer_metadata(src: str | Path, vocab_size: int, *, pre: str | None = None) -> TokenizerMetadata:
    """Read SRC's tokenizer files; ``CheckpointError`` when llama.cpp could not use them (says what to do)."""
    src = Path(src)
    path = src / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{src} has no tokenizer.json; llama.cpp needs the tokenizer inside the GGUF. Save the model's fast "
            "tokenizer there (tokenizer.save_pretrained) and export again"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") == "BPE" and _is_sentencepiece(data):
        return _sentencepiece_metadata(src, data, vocab_size)
    if model.get("type") != "BPE" or not byte_level:
        raise CheckpointError(
            f"{path}: only byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM, Qwen...) and Gemma's SentencePiece "
            f"BPE are exported; this one is {model.get('type')} with decoder {(data.get('decoder') or {}).get('type')} "
            f"and normalizer {json.dumps(data.get('normalizer'))}"
        )
    pre = pre or detect_pre(data)
    if pre is None:
        raise CheckpointError(
            f"{path}: its pre_tokenizer {json.dumps(data.get('pre_tokenizer'))} is not one ctxext recognises "
            f"({', '.join(PRE_TOKENIZERS)}); pass --tokenizer-pre with the llama.cpp name whose split regexes "
            "match it (src/llama-vocab.cpp lists them)"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        by_id[i] = t["content"]
    if max(by_id) >= vocab_size:
        raise CheckpointError(
            f"{path} has token id {max(by_id)} but the model's vocab_size is {vocab_size}: tokenizer and model "
            "do not belong together"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok_config, special, template = _tokenizer_config(src, tokens)
    return TokenizerMetadata(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special,
        add_bos=bool(tok_config.get("add_bos_token", False)),
        chat_template=template,
    )


def _tokenizer_config(src: Path, tokens: list[str]) -> tuple[dict, dict[str, int], str | None]:
    """``(tokenizer_config.json, special ids, chat template)`` of SRC."""
    config_path = src / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = tok_config.get(f"{kind}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and value in ids:
            special[kind] = ids[value]
    template = tok_config.get("chat_template")
    jinja = src / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return tok_config, special, template if isinstance(template, str) else None


def _is_sentencepiece(data: dict) -> bool:
    """Gemma's SentencePiece BPE: spaces replaced by ``▁`` (no prefix space), byte fallback, ``▁`` decoded back."""
    normalizer = data.get("normalizer") or {}
    decoders = (data.get("decoder") or {}).get("decoders") or [data.get("decoder") or {}]
    replaces = normalizer.get("type") == "Replace" and normalizer.get("content") == SPIECE_SPACE
    return (
        bool((data.get("model") or {}).get("byte_fallback"))
        and replaces
        and (normalizer.get("pattern") or {}).get("String") == " "
        and any(d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == SPIECE_SPACE for d in decoders)
    )


def _template_adds(data: dict, bos: str | None, eos: str | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor starts a single sequence with BOS / ends it with EOS."""
    single = (data.get("post_processor") or {}).get("single") or [{}]
    first, last = ((step.get("SpecialToken") or {}).get("id") for step in (single[0], single[-1]))
    return bos is not None and first == bos, eos is not None and last == eos


def _sentencepiece_metadata(src: Path, data: dict, vocab_size: int) -> TokenizerMetadata:
    path = src / "tokenizer.json"
    model = data["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise CheckpointError(
            f"{path} has token id {max(by_id)} but the model's vocab_size is {vocab_size}: tokenizer and model "
            "do not belong together"
        )
    vocab = model["vocab"]
    last = -1
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        joined = vocab.get(left + right)
        if joined is None or joined < last:
            raise CheckpointError(
                f"{path}: merge {rank} ({left!r} + {right!r}) is not in vocabulary order; llama.cpp's SentencePiece "
                "tokenizer ranks merges by the joined token's score, so this tokenizer cannot be exported"
            )
        last = joined
    tokens, types, scores = [], [], []
    rank = 0
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            scores.append(-1000.0)
        elif i in added:
            tokens.append(token)
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
            scores.append(-1000.0)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(TOKEN_BYTE)
            scores.append(0.0)
        elif len(token) > 1 and set(token) == {SPIECE_SPACE}:
            tokens.append(" " * len(token))
            types.append(TOKEN_USER_DEFINED)
            scores.append(-1000.0)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL)
            scores.append(-float(rank))
            rank += 1
    tok_config, special, template = _tokenizer_config(src, tokens)
    bos, eos = _template_adds(data, *(tokens[special[k]] if k in special else None for k in ("bos", "eos")))
    return TokenizerMetadata(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=types,
        merges=[],
        special_ids=special,
        add_bos=bool(tok_config.get("add_bos_token", bos)),
        chat_template=template,
        scores=scores,
        add_eos=bool(tok_config.get("add_eos_token", eos)),
        add_space_prefix=False,
    )
