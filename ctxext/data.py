"""Text sources for evaluation and fine-tuning, through ``datasets`` where a format needs parsing.

A SOURCE is one of
  * ``stdlib:train`` / ``stdlib:held_out``: the Python standard library's source split by file (``ctxext.corpus``),
    the reference model's in-distribution text; ``stdlib:held_out`` is the default evaluation data;
  * a local file or folder: ``.txt``/``.md``/``.py`` files are one document each; ``.jsonl``/``.json`` and
    ``.parquet`` rows are documents (their ``text_field``);
  * otherwise a hub dataset name for ``datasets.load_dataset`` (needs a network connection).
"""

from __future__ import annotations

from pathlib import Path

from . import corpus

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_EVAL_SOURCE = "stdlib:held_out"


class DataError(ValueError):
    """A data source that cannot be read; the message says why and what to give instead."""


def load_texts(source: str, *, text_field: str = "text", split: str = "train", max_documents: int | None = None) -> list[str]:
    """Documents of ``source`` as strings (see the module docstring)."""
    if source.startswith("stdlib:"):
        part = source.split(":", 1)[1]
        if part not in ("train", "held_out"):
            raise DataError(f"{source!r}: valid builtin sources are stdlib:train and stdlib:held_out")
        files = corpus.stdlib_files(part)
        return corpus.read_texts(files[:max_documents] if max_documents else files)
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        texts = [f for f in files if f.suffix in TEXT_SUFFIXES]
        tables = [f for f in files if f.suffix in TABLE_BUILDERS]
        if not texts and not tables:
            raise DataError(f"{source} holds no readable files; use .txt/.md/.py (one document each), "
                            f".jsonl/.json or .parquet (one document per row, field {text_field!r})")
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
        raise DataError(f"cannot load data {args[0]!r}: {err}") from err


def _column(dataset, field: str, source: str) -> list[str]:
    if field not in dataset.column_names:
        raise DataError(f"{source}: no field {field!r}; its fields are {', '.join(dataset.column_names)}")
    return [t for t in dataset[field] if isinstance(t, str) and t]


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
