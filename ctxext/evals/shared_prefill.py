"""Multi-needle passkey retrieval with one shared prefill: several named keys per long prompt, prefilled once.

A prompt of ``length`` tokens is code filler holding one key line per needle, each under its own four-letter name
(``# The QXBR pass key is 48213. Remember it.``). The prompt without a question is run through the model once into
a ``DynamicCache``; then, per needle, the question ``# What is the QXBR pass key? The QXBR pass key is`` is appended
and answered by greedy ``generate`` on the cached prefix (exact match of the first digit run, as
``ctxext.evals.passkey.score``), and the cache is cropped back to the prefix before the next question. The prefill,
which dominates on a CPU at 8k-16k tokens, is paid once per prompt instead of once per needle; the answers are the
ones a fresh forward over prefix + question gives (tests/test_shared_prefill.py, xPos and Self-Extend included).
Frequencies that change with the forward's length (``dynamic``) are refused: there a cached prefix is not exact.

Depth bands are explicit: every prompt holds ``per_band`` needles in each band ``(lo, hi)`` of the filler, at a
uniform depth within it (``(d, d)`` pins depth ``d``), so a cell ``(length, band)`` gets ``prompts * per_band``
needles. Needles that share a prompt are each other's distractors (RULER's multi-key), so this is a harder task than
one-needle passkey for a model that cannot tell keys apart by name (docs/results/shared_prefill/: the reference
model cannot): compare models at the same bands and ``per_band`` only; ``swapped`` counts answers that gave another
needle's key. Prompt plus question plus answer fit ``length``. Prompts are a function of ``seed`` (the same for
every model). Batch size 1 (no padding); run on CPU in float32 for numbers comparable across machines.

    grid = shared_prefill_accuracy(model, tokenizer, filler_stream(tokenizer), [8192, 16384],
                                   [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)], prompts=10, per_band=1)
    grid["accuracy"]["8192"]["0-0.25"], grid["wilson95"]["8192"]["0-0.25"], grid["seconds"]["8192"]["prefill"]
"""

from __future__ import annotations

import inspect
import random
import time

import torch
from tqdm.auto import tqdm

from ctxext.data import needles as needles_format
from ctxext.data.needles import draw_needles
from ctxext.errors import EvalError
from ctxext.evals.passkey import score
from ctxext.evals.retrieval import wilson
from ctxext.models.native import unwrap_attention


def band_label(band: tuple[float, float]) -> str:
    """``"0.25-0.5"`` for a band, ``"0.5"`` for a pinned depth: the key of a band in the result grids."""
    lo, hi = band
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def check_bands(bands) -> list[tuple[float, float]]:
    """The bands as ``(lo, hi)`` float pairs with ``0 <= lo <= hi <= 1``, distinct labels; EvalError otherwise."""
    try:
        out = [(float(lo), float(hi)) for lo, hi in bands]
    except (TypeError, ValueError):
        raise EvalError(f"bands={bands!r} is invalid; give (lo, hi) depth pairs, e.g. [(0, 0.5), (0.5, 1)]") from None
    bad = [b for b in out if not 0.0 <= b[0] <= b[1] <= 1.0]
    if not out or bad:
        raise EvalError(
            f"bands={bands!r} is invalid{f' at {bad}' if bad else ' (empty)'}; each band is (lo, hi) with "
            "0 <= lo <= hi <= 1, e.g. [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]"
        )
    if len({band_label(b) for b in out}) < len(out):
        raise EvalError(f"bands={bands!r} repeats a band; give each band once and raise per_band for more needles")
    return out


def build_prompt(tokenizer, filler_ids: list[int], length: int, needles: list[dict]) -> tuple[list[int], list]:
    """``ctxext.data.needles.build_prompt``, a too-short ``length`` as an EvalError."""
    try:
        return needles_format.build_prompt(tokenizer, filler_ids, length, needles)
    except ValueError as err:
        raise EvalError(f"{err} (bands, per_band)") from None


def _check_static_frequencies(model) -> None:
    params = getattr(model.config, "rope_parameters", None) or {}
    flat = [params] if "rope_type" in params else [p for p in params.values() if isinstance(p, dict)]
    if any(unwrap_attention(p)[0].get("rope_type") == "dynamic" for p in flat):
        raise EvalError(
            "rope_type 'dynamic' recomputes frequencies from each forward's length, so a cached prefix is not the "
            "computation a fresh forward over prefix + question does; evaluate it with passkey_accuracy, or patch "
            "with ntk (its static alternative)"
        )


@torch.no_grad()
def answer_questions(
    model, prefix: list[int], questions: list[list[int]], max_new_tokens: int, *, pad_token_id: int = 0, logits=False
) -> tuple[list, float, list[float]]:
    """Prefill ``prefix`` once, then greedy-answer each question appended to it, cropping the cache back after each.

    Returns ``(answers, prefill seconds, seconds per answer)``; an answer is the generated token ids (a list), or
    ``(ids, logits [new tokens, vocab])`` with ``logits=True``. Batch size 1, so no padding.
    """
    from transformers import DynamicCache

    _check_static_frequencies(model)
    device = next(model.parameters()).device
    cache = DynamicCache()  # no config: every layer keeps all keys (sliding layers mask instead), so crop can rewind
    # transformers 5.24 renamed past_key_values to cache (the old name warns); 5.23 and before know only the old one
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    model(torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1, **{name: cache})
    prefill_s = time.perf_counter() - start
    answers, answer_s = [], []
    for question in questions:
        start = time.perf_counter()
        ids = torch.tensor([prefix + question], device=device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            output_logits=logits,
            return_dict_in_generate=True,
            **{name: cache},
        )
        new = out.sequences[0, ids.shape[1] :].tolist()
        answers.append((new, torch.cat(out.logits).float().cpu()) if logits else new)
        cache.crop(len(prefix) - cache.get_seq_length())  # negative: tokens to remove (5.24 refuses a length)
        if cache.get_seq_length() != len(prefix):
            raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after crop, not {len(prefix)}")
        answer_s.append(time.perf_counter() - start)
    return answers, prefill_s, answer_s


def shared_prefill_accuracy(
    model,
    tokenizer,
    filler_ids: list[int],
    lengths: list[int],
    bands: list[tuple[float, float]],
    prompts: int,
    *,
    per_band: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Exact-match accuracy per ``(length, band)`` over ``prompts * per_band`` needles, Wilson 95% intervals.

    Result (plain JSON): ``accuracy[length][band]``, ``wilson95[length][band]`` = ``[lo, hi]``,
    ``cells[length][band]`` = ``{correct, needles, prompts, swapped, prefill_s, answer_s}`` (``prefill_s``: the
    band's share of its prompts' prefill), ``seconds[length]`` = ``{prefill, answer}`` totals, and ``examples``
    (up to three answers per cell, wrong ones first). Band keys are ``band_label(band)``.
    """
    bands = check_bands(bands)
    for name, value in (("prompts", prompts), ("per_band", per_band)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalError(f"{name}={value!r} is invalid; give an integer >= 1")
    _check_static_frequencies(model)
    rng = random.Random(f"shared-prefill-{seed}")
    labels = [band_label(b) for b in bands]
    empty = {"correct": 0, "needles": 0, "prompts": 0, "swapped": 0, "prefill_s": 0.0, "answer_s": 0.0}
    cells = {str(L): {lab: dict(empty) for lab in labels} for L in lengths}
    answered: dict[tuple[str, str], list] = {}
    bar = tqdm(total=len(lengths) * prompts, desc="shared prefill", disable=not progress, leave=False)
    for length in lengths:
        bar.set_postfix(length=length)
        for _ in range(prompts):
            needles = draw_needles(rng, bands, per_band)
            offset = rng.randrange(0, max(1, len(filler_ids) - 2 * length))
            prefix, questions = build_prompt(tokenizer, filler_ids[offset:], length, needles)
            new_tokens = length - len(prefix) - max(map(len, questions))  # the answer and one token more
            answers, prefill_s, answer_s = answer_questions(
                model, prefix, questions, new_tokens, pad_token_id=tokenizer.pad_token_id or 0
            )
            keys = {n["key"] for n in needles}
            for lab in labels:
                cells[str(length)][lab]["prompts"] += 1
                cells[str(length)][lab]["prefill_s"] += prefill_s / len(labels)
            for n, ids, seconds in zip(needles, answers, answer_s):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                ok = score(text, n["key"])
                cell = cells[str(length)][labels[n["band"]]]
                cell["needles"] += 1
                cell["correct"] += ok
                cell["swapped"] += any(score(text, k) for k in keys - {n["key"]})
                cell["answer_s"] += seconds
                example = {"length": length, "band": labels[n["band"]], "prefix": len(prefix), "answer": text}
                example.update(position=n["position"], name=n["name"], key=n["key"], correct=ok)
                answered.setdefault((str(length), labels[n["band"]]), []).append(example)
            bar.update(1)
    bar.close()
    seconds = {}
    for L, row in cells.items():
        seconds[L] = {k: round(sum(c[f"{k}_s"] for c in row.values()), 3) for k in ("prefill", "answer")}
        for c in row.values():
            c["prefill_s"], c["answer_s"] = round(c["prefill_s"], 3), round(c["answer_s"], 3)
    return {
        "lengths": list(lengths),
        "bands": [list(b) for b in bands],
        "per_band": per_band,
        "needles_per_prompt": per_band * len(bands),
        "prompts": prompts,
        "needles_per_cell": prompts * per_band,
        "seed": seed,
        "accuracy": {L: {lab: c["correct"] / c["needles"] for lab, c in row.items()} for L, row in cells.items()},
        "wilson95": {
            L: {lab: [round(x, 4) for x in wilson(c["correct"], c["needles"])] for lab, c in row.items()}
            for L, row in cells.items()
        },
        "cells": cells,
        "seconds": seconds,
        "examples": [a for cell in answered.values() for a in sorted(cell, key=lambda a: a["correct"])[:3]],
    }
