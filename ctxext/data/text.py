"""Text sources, tokenization and packing for evaluation and fine-tuning, through ``datasets``.

A SOURCE is one of
  * ``stdlib:train`` / ``stdlib:held_out``: the Python standard library's source split by file (``ctxext.data.corpus``),
    the reference model's in-distribution text; ``stdlib:held_out`` is the default evaluation data;
  * ``package:<name>``: the ``.py`` files of an installed package (e.g. ``package:numpy``: code outside the
    stdlib domain that every ctxext installation has), one document each;
  * a local file or folder: ``.txt``/``.md``/``.py`` files are one document each; ``.jsonl``/``.json`` and
    ``.parquet`` rows are documents (their ``text_field``). Every file must be non-empty UTF-8 text (a parquet file
    non-empty): an empty, binary or mis-encoded file is a ``DataError`` naming it (``check_data_file``);
  * otherwise a hub dataset name for ``datasets.load_dataset`` (needs a network connection).

Fine-tuning tokenizes a source once (``datasets`` map, batched, on disk) into a flat token file of uint32 ids
(documents joined with EOS) that is memory-mapped, so corpora larger than RAM work, plus the offsets where its
documents start. ``stage_blocks`` cuts it into blocks of a stage's length that never cut a document short enough to
fit one (a passkey document keeps its key and its question together), read in a seeded order that a resumed run
reproduces.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctxext.data import corpus
from ctxext.errors import DataError
from ctxext.io.atomic import atomic_write

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_EVAL_SOURCE = "stdlib:held_out"
ANSWERS = "answers"  # a table row's optional [[start, end], ...] character spans weighted by data.answer_weight
BINARY_SHARE = 0.1  # a file whose first 64 KiB are more than this share control characters is binary
_CONTROL = bytes(c for c in range(32) if chr(c) not in "\t\n\r\f\v")


def check_data_file(path: Path) -> None:
    """A ``DataError`` naming ``path`` when it is empty, binary (a NUL byte, or mostly control characters) or not
    UTF-8 (a parquet file only needs to be non-empty); read in 1 MiB blocks, so any size works."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes); remove it from the data or give a file with text")
    if path.suffix == ".parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, visible = 0, False
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            if offset == 0 and sum(block[:65536].count(c) for c in _CONTROL) > BINARY_SHARE * len(block[:65536]):
                raise DataError(
                    f"{path} is binary, not text (control characters in its first bytes); data files "
                    "must be UTF-8 text (.txt/.md/.py, or .jsonl/.json/.parquet rows)"
                )
            if (nul := block.find(b"\0")) >= 0:
                raise DataError(
                    f"{path} is binary, not text (a NUL byte at offset {offset + nul:,}); data files "
                    "must be UTF-8 text (.txt/.md/.py, or .jsonl/.json/.parquet rows)"
                )
            try:
                visible = bool(decoder.decode(block).strip()) or visible
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not UTF-8 text (byte 0x{block[err.start]:02x} at offset "
                    f"{offset + err.start:,}); convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(
            f"{path} is not UTF-8 text (it ends inside a multi-byte character); it may be cut short"
        ) from None
    if not visible:
        raise DataError(f"{path} holds only whitespace; remove it from the data or give a file with text")


def _data_files(path: Path) -> list[Path]:
    """The files of a local source (a file or every file under a folder), each checked by ``check_data_file``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix in TEXT_SUFFIXES or f.suffix in TABLE_BUILDERS:
            check_data_file(f)
    return files


def load_texts(
    source: str, *, text_field: str = "text", split: str = "train", max_documents: int | None = None
) -> list[str]:
    """Documents of ``source`` as strings (see the module docstring)."""
    if source.startswith("package:"):
        files = corpus.package_files(source.split(":", 1)[1])
        return corpus.read_texts(files[:max_documents] if max_documents else files)
    if source.startswith("stdlib:"):
        part = source.split(":", 1)[1]
        if part not in ("train", "held_out"):
            raise DataError(f"{source!r}: valid builtin sources are stdlib:train and stdlib:held_out")
        files = corpus.stdlib_files(part)
        return corpus.read_texts(files[:max_documents] if max_documents else files)
    path = Path(source)
    if path.exists():
        files = _data_files(path)
        texts = [f for f in files if f.suffix in TEXT_SUFFIXES]
        tables = [f for f in files if f.suffix in TABLE_BUILDERS]
        if not texts and not tables:
            raise DataError(
                f"{source} holds no readable files; use .txt/.md/.py (one document each), "
                f".jsonl/.json or .parquet (one document per row, field {text_field!r})"
            )
        docs = corpus.read_texts(texts)
        for builder in sorted({TABLE_BUILDERS[f.suffix] for f in tables}):
            data_files = [str(f) for f in tables if TABLE_BUILDERS[f.suffix] == builder]
            docs += _column(_load_dataset(builder, data_files=data_files, split="train"), text_field, source)
        return docs[:max_documents] if max_documents else docs
    if "/" in source and not source.startswith((".", "/")):
        return _column(_load_dataset(source, split=split), text_field, source)[:max_documents]
    raise DataError(f"data source {source!r} does not exist; give a file or folder, stdlib:held_out, or a hub dataset")


def _load_dataset(*args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "cannot read this source"
        what = ", ".join(kwargs["data_files"]) if kwargs.get("data_files") else repr(args[0])
        why = f"{err}; {err.__cause__}" if err.__cause__ else str(err)
        raise DataError(f"cannot load data {what}: {why}") from err


def _column(dataset, field: str, source: str) -> list[str]:
    if field not in dataset.column_names:
        raise DataError(f"{source}: no field {field!r}; its fields are {', '.join(dataset.column_names)}")
    return [t for t in dataset[field] if isinstance(t, str) and t]


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens. A process remembers its last few results, keyed by the
    tokenizer's content (fast tokenizers) and the texts, so evaluating several models that share a tokenizer (a
    leaderboard's rows, a model and its fine-tuned copy) tokenizes each text once."""
    key = _tokenizer_fingerprint(tokenizer)
    if key is not None:
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        key = (key, digest.hexdigest())
        if key in _TOKENIZED:
            _TOKENIZED.move_to_end(key)
            return [ids.tolist() for ids in _TOKENIZED[key]]
    ids = _token_ids(tokenizer, texts)
    if key is not None:
        _TOKENIZED[key] = [np.asarray(doc, dtype=np.int64) for doc in ids]
        while len(_TOKENIZED) > _TOKENIZED_KEPT:
            _TOKENIZED.popitem(last=False)
    return ids


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenize_documents`` without remembering: for the fine-tuning token file's batches, each seen once."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


_TOKENIZED: OrderedDict = OrderedDict()  # (tokenizer fingerprint, texts sha256) -> ids per document
_TOKENIZED_KEPT = 4
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's whole definition (vocabulary, merges, normalizer, pre-tokenizer); None for
    others, which are not remembered."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    found = hashlib.sha256(backend.to_str().encode()).hexdigest()
    try:
        _FINGERPRINTS[tokenizer] = found
    except TypeError:  # not weak-referenceable: fingerprinted on every call
        pass
    return found


def eos_id(tokenizer) -> int:
    """The id that separates joined documents (0 when the tokenizer has no EOS)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def join_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """In memory: every document's ids followed by EOS, as one int64 array."""
    eos = eos_id(tokenizer)
    return np.asarray([t for doc in tokenize_documents(tokenizer, texts) for t in (*doc, eos)], dtype=np.int64)


# ---------------------------------------------------------------- token files (fine-tuning)

TOKEN_DTYPE = np.uint32


def _text_dataset(source: str, text_field: str, max_documents: int | None):
    """The source's documents as a ``datasets.Dataset`` with one ``text`` column. Table files (.jsonl, .parquet)
    and hub datasets stay on disk (Arrow), so they may be larger than RAM; text files are one document each."""
    import datasets

    path = Path(source)
    if source.startswith(("stdlib:", "package:")) or not (
        path.exists() or ("/" in source and not source.startswith((".", "/")))
    ):
        return datasets.Dataset.from_dict(
            {"text": load_texts(source, text_field=text_field, max_documents=max_documents)}
        )
    if path.exists():
        files = _data_files(path)
        builders = {TABLE_BUILDERS[p.suffix] for p in files if p.suffix in TABLE_BUILDERS}
        if len(builders) != 1 or any(p.suffix in TEXT_SUFFIXES for p in files):  # text files or a mixed folder
            docs = load_texts(source, text_field=text_field, max_documents=max_documents)
            return datasets.Dataset.from_dict({"text": docs})
        ds = _load_dataset(
            builders.pop(), data_files=[str(p) for p in files if p.suffix in TABLE_BUILDERS], split="train"
        )
    else:
        ds = _load_dataset(source, split="train")
    if text_field not in ds.column_names:
        raise DataError(f"{source}: no field {text_field!r}; its fields are {', '.join(ds.column_names)}")
    keep = [text_field] + ([ANSWERS] if ANSWERS in ds.column_names and text_field != ANSWERS else [])
    ds = ds.select_columns(keep).filter(lambda b: [isinstance(t, str) and bool(t) for t in b[text_field]], batched=True)
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _mix(dataset, rows: list[dict], seed: int):
    """``dataset`` and ``rows`` as one dataset with ``text`` and ``answers`` columns, documents shuffled."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), ANSWERS: datasets.Sequence(datasets.Sequence(datasets.Value("int64")))}
    )
    extra = datasets.Dataset.from_list([{"text": r["text"], ANSWERS: r.get(ANSWERS, [])} for r in rows], features)
    if ANSWERS not in dataset.column_names:
        dataset = dataset.add_column(ANSWERS, [[] for _ in range(len(dataset))])
    return datasets.concatenate_datasets([dataset.cast(features), extra]).shuffle(seed=seed).flatten_indices()


def _answer_token_spans(tokenizer, texts: list[str], answers: list) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids per document and, per document, the [start, end) token ranges that overlap its ``answers``
    character spans (a row without answers has none)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the data's {ANSWERS!r} spans need a fast tokenizer (character offsets); "
            f"{type(tokenizer).__name__} is not one: drop the {ANSWERS!r} field or set answer_weight 1"
        )
    enc = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
    spans = []
    for text, offsets, doc_answers in zip(texts, enc["offset_mapping"], answers):
        mine = []
        for span in doc_answers or []:
            if not (
                isinstance(span, (list, tuple))
                and len(span) == 2
                and all(isinstance(x, int) for x in span)
                and 0 <= span[0] < span[1] <= len(text)
            ):
                raise DataError(
                    f"an {ANSWERS!r} entry must be [start, end] character offsets of its row's text "
                    f"(0 <= start < end <= {len(text)}); got {span!r}"
                )
            a, b = span
            hit = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
            if hit:
                mine.append([hit[0], hit[-1] + 1])
        spans.append(mine)
    return enc["input_ids"], spans


def write_token_file(
    tokenizer,
    source: str,
    path: str | Path,
    *,
    text_field: str = "text",
    max_documents: int | None = None,
    extra_rows: Callable[[], list[dict]] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Tokenize ``source`` once into ``path`` (uint32 ids, documents joined with EOS), ``path.starts`` (uint64
    offsets where the documents start) and ``path.json`` (counts). ``extra_rows`` makes more ``{"text", "answers"}``
    rows (e.g. ``ctxext.data.needles.training_rows``), called only when the file is written; they are mixed in and
    the documents of both shuffled with ``seed``.

    Written atomically: an interrupted run leaves no half file, and existing files are reused as they are."""
    path = Path(path)
    if all(p.is_file() for p in (path, _starts_path(path), path.with_suffix(".json"))):
        return path
    dataset = _text_dataset(source, text_field, max_documents)
    rows = extra_rows() if extra_rows is not None else None
    if rows:
        dataset = _mix(dataset, rows, seed)
    if len(dataset) == 0:
        raise DataError(f"data source {source!r} has no documents (no text in field {text_field!r} of any row)")
    eos = eos_id(tokenizer)
    if len(tokenizer) > np.iinfo(TOKEN_DTYPE).max:
        raise DataError(f"vocabulary of {len(tokenizer)} tokens does not fit the uint32 token file")
    with_answers = ANSWERS in dataset.column_names

    def tokenize(batch):
        if not with_answers:
            return {"ids": _token_ids(tokenizer, batch["text"])}
        ids, spans = _answer_token_spans(tokenizer, batch["text"], batch[ANSWERS])
        return {"ids": ids, "spans": spans}

    try:
        ids = dataset.map(
            tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            desc="tokenizing",
            keep_in_memory=len(dataset) < 100_000,
        )
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    counts = {"documents": len(ids), "tokens": 0}
    starts: list[int] = []
    spans: list[list[int]] = []

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            for batch in ids.iter(batch_size=1000):
                doc_spans = batch.get("spans") or [[]] * len(batch["ids"])
                for doc, mine in zip(batch["ids"], doc_spans):
                    starts.append(counts["tokens"])
                    spans.extend([counts["tokens"] + a, counts["tokens"] + b] for a, b in mine)
                    counts["tokens"] += len(doc) + 1
                np.asarray([t for doc in batch["ids"] for t in (*doc, eos)], dtype=TOKEN_DTYPE).tofile(f)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    atomic_write(_starts_path(path), lambda tmp: np.asarray(starts, dtype=np.uint64).tofile(tmp))
    atomic_write(_answers_path(path), lambda tmp: np.asarray(spans, dtype=np.uint64).reshape(-1, 2).tofile(tmp))
    atomic_write(
        path.with_suffix(".json"),
        lambda tmp: tmp.write_text(json.dumps({"source": source, **counts, "answer_spans": len(spans)})),
    )
    return path


def _starts_path(path: Path) -> Path:
    return path.with_suffix(".starts")


def _answers_path(path: Path) -> Path:
    return path.with_suffix(".answers")


def open_token_file(path: str | Path) -> np.ndarray:
    """The token file as a read-only memory map (no copy in RAM)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def document_starts(path: str | Path) -> np.ndarray:
    """Where the documents of the token file ``path`` start (token offsets, increasing, the first 0)."""
    return np.fromfile(_starts_path(Path(path)), dtype=np.uint64).astype(np.int64)


def answer_spans(path: str | Path) -> np.ndarray:
    """The [start, end) token ranges of the answers in the token file ``path`` (``[n, 2]``, increasing; empty when
    its source marked none)."""
    file = _answers_path(Path(path))
    spans = np.fromfile(file, dtype=np.uint64) if file.is_file() else np.zeros(0, dtype=np.uint64)
    return spans.astype(np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class Blocks:
    """A stage's training blocks: the windows ``tokens[s : s + length]`` for ``s`` in ``starts``; ``answers``: the
    [start, end) token ranges of answers in ``tokens`` (weighted in the loss by ``data.answer_weight``)."""

    tokens: np.ndarray
    starts: np.ndarray
    length: int
    answers: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, starts: np.ndarray) -> torch.Tensor:
        """The blocks that start at ``starts``, ``[len(starts), length]`` int64."""
        return torch.from_numpy(
            np.stack([np.asarray(self.tokens[s : s + self.length], dtype=np.int64) for s in starts])
        )

    def answer_mask(self, starts: np.ndarray) -> torch.Tensor:
        """``[len(starts), length]`` bool: True on the tokens of an answer."""
        mask = np.zeros((len(starts), self.length), dtype=bool)
        begins, ends = self.answers[:, 0], self.answers[:, 1]
        for row, s in enumerate(starts):
            lo = int(np.searchsorted(ends, s, side="right"))  # the first answer that ends after the block starts
            hi = int(np.searchsorted(begins, s + self.length, side="left"))  # ... and those beginning before its end
            for a, b in zip(begins[lo:hi], ends[lo:hi]):
                mask[row, max(a - s, 0) : min(b - s, self.length)] = True
        return torch.from_numpy(mask)


def stage_blocks(tokens: np.ndarray, doc_starts: np.ndarray, length: int, answers: np.ndarray | None = None) -> Blocks:
    """Consecutive blocks of ``length`` tokens, except that a document which a block's end would cut and which fits
    in one block starts the next block instead, so it is trained on whole.

    A block is then read again from that document's start: its head appears twice (at the end of one block and
    the start of the next) while nothing is lost. Documents longer than a block are cut as in plain packing.
    """
    starts, total = [], len(tokens)
    doc_starts = doc_starts[doc_starts < total]
    doc_ends = np.append(doc_starts[1:], total)
    s = 0
    while s + length <= total:
        starts.append(s)
        end = s + length
        i = int(np.searchsorted(doc_starts, end, side="left")) - 1  # the document that holds token end - 1
        cut = i >= 0 and doc_ends[i] > end and doc_starts[i] > s and doc_ends[i] - doc_starts[i] <= length
        s = int(doc_starts[i]) if cut else end
    answers = np.zeros((0, 2), dtype=np.int64) if answers is None else answers[answers[:, 1] <= total]
    return Blocks(tokens, np.asarray(starts, dtype=np.int64), length, answers)


@dataclass
class Cursor:
    """Where a stage is in its blocks: blocks consumed and the epoch over its blocks (saved in checkpoints)."""

    stage: int = 0
    cursor: int = 0
    epoch: int = 0


def block_order(n_blocks: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, epoch]).permutation(n_blocks)


def next_starts(blocks: Blocks, count: int, where: Cursor, seed: int) -> np.ndarray:
    """Where the next ``count`` blocks of the stage start; advances ``where`` (wraps into a new epoch with a new
    order)."""
    starts = []
    order = None
    for _ in range(count):
        if where.cursor >= len(blocks):
            where.cursor, where.epoch, order = 0, where.epoch + 1, None
        if order is None:
            order = block_order(len(blocks), seed, where.stage, where.epoch)
        starts.append(int(blocks.starts[order[where.cursor]]))
        where.cursor += 1
    return np.asarray(starts, dtype=np.int64)


def pose_position_ids(window: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """PoSE position ids (Zhu et al. 2023, two chunks): a window of ``window`` tokens split at a random point; the
    second chunk's positions jump ahead by a random skip, so the ids stay increasing and span up to ``seq_len``."""
    split = int(rng.integers(1, window))
    skip = int(rng.integers(0, seq_len - window + 1))
    return torch.cat([torch.arange(split), torch.arange(split, window) + skip])


def first_blocks(stream: np.ndarray, seq_len: int, count: int) -> Iterable[torch.Tensor]:
    """The first ``count`` consecutive blocks (held-out evaluation), one ``[1, seq_len]`` tensor at a time."""
    for i in range(min(count, len(stream) // seq_len)):
        yield torch.from_numpy(np.asarray(stream[i * seq_len : (i + 1) * seq_len], dtype=np.int64))[None]
