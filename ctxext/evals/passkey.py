"""Passkey retrieval (Mohtashami & Jaggi 2023), our own wording, as Python comments inside code filler.

A document is: filler code with the line ``# The pass key is 48213. Remember it.`` inserted at a chosen depth,
then the question ``# What is the pass key? The pass key is`` whose answer is `` 48213``. The same builder makes
the reference model's training documents and the evaluation prompts, so the format is in-distribution.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ctxext.data.needles import nearest_line_start as _nearest_line_start
from ctxext.data.needles import random_key
from ctxext.errors import DataError, EvalError

KEY_LINE = "# The pass key is {key}. Remember it.\n"
QUESTION = "\n# What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]
    key: str
    depth: float  # requested relative position of the key line in the filler
    key_token_index: int  # token index where the key line starts


def build_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens: filler, the key line at ``depth`` (0 = start, 1 = end), question.

    ``filler_ids`` is a long token stream of filler text; it is cut to fit. The key line is placed at a line break
    of the filler nearest the requested depth, so the key sits within one filler line of it.
    """
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"depth={depth!r} is invalid; valid range: 0 <= depth <= 1")
    key_ids = tokenizer.encode(KEY_LINE.format(key=key), add_special_tokens=False, verbose=False)
    question_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    n_filler = length - len(key_ids) - len(question_ids)
    if n_filler < 0:
        raise EvalError(f"length={length} is too short for the key and question ({length - n_filler} tokens)")
    if len(filler_ids) < n_filler:
        raise DataError(f"not enough filler: {len(filler_ids)} tokens for a prompt of {length}")
    filler = filler_ids[:n_filler]
    cut = _nearest_line_start(tokenizer, filler, round(depth * n_filler))
    ids = filler[:cut] + key_ids + filler[cut:] + question_ids
    return PasskeyPrompt(input_ids=ids, key=key, depth=depth, key_token_index=cut)


def score(generated_text: str, key: str) -> bool:
    """Exact match: the first run of digits in the generated answer must equal the key."""
    match = re.match(r"\s*(\d+)", generated_text)
    return match is not None and match.group(1) == key


def training_parts(
    tokenizer, filler_ids: list[int], rng: random.Random, length: int, edge_depth_share: float = 0.0
) -> tuple[list[int], list[int]]:
    """A passkey document for training, as (prompt ids, answer ids): ``length`` prompt tokens, then the answer and a
    newline.

    The depth is uniform in [0, 1]; with probability ``edge_depth_share`` it is exactly 0 or 1 instead (a uniform
    depth almost never puts the key line at position 0, which evaluation's depth 0 does).
    """
    key = random_key(rng)
    depth = rng.random()
    if edge_depth_share and rng.random() < edge_depth_share:
        depth = float(rng.random() < 0.5)
    prompt = build_prompt(tokenizer, filler_ids, length, depth, key)
    return prompt.input_ids, tokenizer.encode(ANSWER.format(key=key) + ".\n", add_special_tokens=False)


def training_document(
    tokenizer, filler_ids: list[int], rng: random.Random, length: int, edge_depth_share: float = 0.0
) -> list[int]:
    """``training_parts`` joined: the prompt followed by its answer."""
    prompt, answer = training_parts(tokenizer, filler_ids, rng, length, edge_depth_share)
    return prompt + answer


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    filler_ids: list[int],
    lengths: list[int],
    depths: list[float],
    trials: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Exact-match accuracy grid ``accuracy[length][depth]`` of greedy answers, ``trials`` keys per cell.

    Each trial draws a key and a filler offset from ``random.Random(seed)`` (same prompts for every model).
    A cell of ``length`` builds prompts of ``length`` minus the answer's tokens, so prompt plus generated answer
    fit the length being tested. Prompts of one cell have the same length, so they are batched without padding.
    ``examples`` keeps up to three answers per cell, wrong ones first.
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    answer_tokens = len(tokenizer.encode(ANSWER.format(key="12345"), add_special_tokens=False)) + 1
    grid, examples = [], []
    cells = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(cells, desc="passkey", disable=not progress, leave=False):
        prompts = []
        for _ in range(trials):
            offset = rng.randrange(0, max(1, len(filler_ids) - 2 * length))
            prompts.append(build_prompt(tokenizer, filler_ids[offset:], length - answer_tokens, depth, random_key(rng)))
        correct, answers = 0, []
        for start in range(0, trials, batch_size):
            chunk = prompts[start : start + batch_size]
            ids = torch.tensor([p.input_ids for p in chunk], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=answer_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
            for p, row in zip(chunk, out[:, ids.shape[1] :]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                ok = score(text, p.key)
                correct += ok
                answers.append({"length": length, "depth": depth, "key": p.key, "answer": text, "correct": ok})
        examples += sorted(answers, key=lambda a: a["correct"])[:3]  # per cell, wrong answers first
        grid.append((length, depth, correct / trials))
    accuracy = {str(length): {str(depth): acc for l2, depth, acc in grid if l2 == length} for length in lengths}
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "accuracy": accuracy,
        "examples": examples,
    }
