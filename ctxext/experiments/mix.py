"""A recipe's fine-tuning documents: stdlib code mixed with passkey and RULER-style retrieval documents."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)


def build_finetune_data(
    tokenizer,
    path: Path,
    lengths: list[int],
    n_passkey: int,
    train_docs: int | None,
    seed: int = 0,
    edge_depth_share: float = 0.2,
    full_length_share: float = 0.0,
    task_documents: dict[str, int] | None = None,
    code: bool = True,
) -> Path:
    """stdlib train files (``code``) plus retrieval documents up to the fine-tuning lengths, as JSONL (a document a
    row).

    Passkey documents are 1/4 to 1 of a stage length long, or (``full_length_share`` of them) a whole stage block,
    so that keys as far back as evaluation asks for are trained on (fine-tuning never cuts a document that fits a
    block: ``data.stage_blocks``); ``edge_depth_share`` of them put the key exactly at the start or the end (the
    depths 0 and 1 that evaluation asks for and a uniform depth almost never gives).
    ``task_documents`` adds RULER-style task documents (``ctxext.evals.retrieval``) with their own seed; the filler
    is stdlib *train* code, so no training document repeats an evaluation prompt (held-out filler). Retrieval rows
    carry their answer's character span (``answers``), which ``data.answer_weight`` weighs in the loss."""
    from ctxext.data.corpus import read_texts, stdlib_files
    from ctxext.data.text import join_documents
    from ctxext.evals import passkey, retrieval

    rng = random.Random(seed)
    texts = read_texts(stdlib_files("train"))
    if train_docs:
        texts = texts[:train_docs]
    filler = join_documents(tokenizer, texts[:400]).tolist()
    rows = [{"text": t} for t in texts] if code else []
    for _ in range(n_passkey):
        length = rng.choice(lengths)
        start = rng.randrange(0, len(filler) - 2 * length)
        size = length - 16 if rng.random() < full_length_share else rng.randint(length // 4, length - 16)
        rows.append(
            _row(
                tokenizer,
                *passkey.training_parts(tokenizer, filler[start : start + 2 * length], rng, size, edge_depth_share),
            )
        )
    task_rng = random.Random(f"training-tasks-{seed}")  # never the evaluation seeds (f"{task}-{seed}")
    for task, count in (task_documents or {}).items():
        for _ in range(count):
            length = task_rng.choice(lengths)
            start = task_rng.randrange(0, len(filler) - 2 * length)
            rows.append(
                _row(
                    tokenizer,
                    *retrieval.training_parts(
                        tokenizer,
                        filler[start : start + 2 * length],
                        task_rng,
                        task,
                        task_rng.randint(length // 2, length),
                    ),
                )
            )
    code_chars = sum(map(len, texts)) if code else 0
    share = 1 - code_chars / sum(len(r["text"]) for r in rows)
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = "".join(f" + {n} {task} documents" for task, n in (task_documents or {}).items())
    log.info(
        "fine-tuning data: %d stdlib files + %d passkey documents%s (%.1f%% of the text) -> %s",
        len(texts) if code else 0,
        n_passkey,
        extra,
        100 * share,
        path,
    )
    return path


def _row(tokenizer, prompt: list[int], answer: list[int]) -> dict:
    """A JSONL row: the document's text and the character span of its answer (``data.answer_weight`` weighs the
    answer's tokens in the loss)."""
    head, tail = tokenizer.decode(prompt), tokenizer.decode(answer)
    return {"text": head + tail, "answers": [[len(head), len(head) + len(tail.rstrip())]]}
