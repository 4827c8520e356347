"""RULER-style retrieval tasks written as Python inside code filler (Hsieh et al. 2024, NVIDIA/RULER), our wording.

Every task inserts a few code lines ("needles") into filler code at line breaks and ends with a question line whose
greedy completion must reproduce the answer exactly (the first ``len(answer)`` digit runs of the completion):

* ``multikey``: ``KEY_QXBR = 48213`` plus three distractor keys with other values; asks for one key's value;
* ``multivalue``: four ``VALUES_QXBR.append(48213)`` lines for one name (plus a distractor name); asks for all
  four values in order;
* ``vartrack``: a chain ``VAR_A = 48213``, ``VAR_B = VAR_A``, ... (four hops); asks for the last variable's value.

The requested depth is where the target needle (multikey), the first value (multivalue) or the chain's first line
(vartrack) goes; the other needles go at uniform random depths (after the chain's first line for vartrack).
Prompt plus answer fit the tested length, so generation never runs past it. Prompts are seeded: the same for every
model. Training documents come from the same generators with other seeds and the training filler, never the
evaluation prompts.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ctxext.data.needles import nearest_line_start as _nearest_line_start
from ctxext.data.needles import random_key
from ctxext.data.needles import random_name as _name
from ctxext.errors import DataError, EvalError


@dataclass(frozen=True)
class Needles:
    """What one trial inserts: ``(depth, line)`` pairs, the question line and the expected answer values."""

    lines: list[tuple[float, str]]
    question: str
    answer: list[str]

    @property
    def answer_text(self) -> str:
        return " " + ", ".join(self.answer)


def multikey(rng: random.Random, depth: float, distractors: int = 3) -> Needles:
    taken: set[str] = set()
    target, value = _name(rng, taken), random_key(rng)
    lines = [(depth, f"KEY_{target} = {value}\n")]
    lines += [(rng.random(), f"KEY_{_name(rng, taken)} = {random_key(rng)}\n") for _ in range(distractors)]
    return Needles(lines, f"\n# What is the value of KEY_{target}? KEY_{target} =", [value])


def multivalue(rng: random.Random, depth: float, values: int = 4) -> Needles:
    taken: set[str] = set()
    target, other = _name(rng, taken), _name(rng, taken)
    answer = [random_key(rng) for _ in range(values)]
    depths = sorted([depth, *(depth + (1 - depth) * rng.random() for _ in range(values - 1))])
    lines = [(d, f"VALUES_{target}.append({v})\n") for d, v in zip(depths, answer)]
    lines += [(rng.random(), f"VALUES_{other}.append({random_key(rng)})\n") for _ in range(2)]
    return Needles(lines, f"\n# The values appended to VALUES_{target}, in order:", answer)


def vartrack(rng: random.Random, depth: float, hops: int = 4) -> Needles:
    taken: set[str] = set()
    names = [_name(rng, taken) for _ in range(hops + 1)]
    value = random_key(rng)
    depths = sorted([depth, *(depth + (1 - depth) * rng.random() for _ in range(hops))])
    lines = [(depths[0], f"VAR_{names[0]} = {value}\n")]
    lines += [(d, f"VAR_{b} = VAR_{a}\n") for d, a, b in zip(depths[1:], names, names[1:])]
    return Needles(lines, f"\n# What is the value of VAR_{names[-1]}? VAR_{names[-1]} =", [value])


TASKS: dict[str, Callable[[random.Random, float], Needles]] = {
    "multikey": multikey,
    "multivalue": multivalue,
    "vartrack": vartrack,
}


def check_tasks(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise EvalError(f"task(s) {', '.join(unknown) or '(none)'} unknown; valid tasks: {', '.join(TASKS)}")
    return names


def build_prompt(tokenizer, filler_ids: list[int], length: int, needles: Needles) -> list[int]:
    """Filler with the needle lines at their depths (at line breaks), then the question: ``length`` tokens minus
    the answer's, so prompt + answer fit ``length``."""
    encoded = [(d, tokenizer.encode(line, add_special_tokens=False)) for d, line in needles.lines]
    question = tokenizer.encode(needles.question, add_special_tokens=False)
    answer = tokenizer.encode(needles.answer_text, add_special_tokens=False)
    n_filler = length - sum(len(ids) for _, ids in encoded) - len(question) - len(answer)
    if n_filler < 0:
        raise EvalError(
            f"length={length} is too short for this task's needles, question and answer ({length - n_filler} tokens)"
        )
    if len(filler_ids) < n_filler:
        raise DataError(f"not enough filler: {len(filler_ids)} tokens for a prompt of {length}")
    filler = filler_ids[:n_filler]
    cuts = sorted(
        ((_nearest_line_start(tokenizer, filler, round(d * n_filler)), i) for i, (d, _) in enumerate(encoded))
    )
    ids, previous = [], 0
    for cut, i in cuts:
        ids += filler[previous:cut] + encoded[i][1]
        previous = cut
    return ids + filler[previous:] + question


def score(completion: str, answer: list[str]) -> bool:
    """Exact match: the completion's first ``len(answer)`` digit runs equal the answer values, in order."""
    found = re.findall(r"\d+", completion)
    return found[: len(answer)] == answer and bool(re.match(r"\s*\d", completion))


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def count_with_interval(correct: int, n: int) -> str:
    """``38/40 [0.83, 0.99]``: a count with its Wilson 95% interval, as the docs tables print it."""
    lo, hi = wilson(correct, n)
    return f"{correct}/{n} [{lo:.2f}, {hi:.2f}]"


def training_parts(
    tokenizer, filler_ids: list[int], rng: random.Random, task: str, length: int
) -> tuple[list[int], list[int]]:
    """A document of ``task`` for fine-tuning, as (prompt ids, answer ids) (use a training rng and the training
    filler)."""
    needles = TASKS[task](rng, rng.random())
    prompt = build_prompt(tokenizer, filler_ids, length, needles)
    return prompt, tokenizer.encode(needles.answer_text + "\n", add_special_tokens=False)


def training_document(tokenizer, filler_ids: list[int], rng: random.Random, task: str, length: int) -> list[int]:
    """``training_parts`` joined: the prompt followed by its answer."""
    prompt, answer = training_parts(tokenizer, filler_ids, rng, task, length)
    return prompt + answer


@torch.no_grad()
def task_accuracy(
    model,
    tokenizer,
    filler_ids: list[int],
    task: str,
    lengths: list[int],
    depths: list[float],
    trials: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Exact-match accuracy grid ``accuracy[length][depth]`` of greedy answers with Wilson 95% intervals."""
    check_tasks([task])
    rng = random.Random(f"{task}-{seed}")
    device = next(model.parameters()).device
    accuracy: dict[str, dict[str, float]] = {}
    interval: dict[str, dict[str, list[float]]] = {}
    examples = []
    for length in lengths:
        for depth in tqdm(depths, desc=f"{task} @ {length}", disable=not progress, leave=False):
            trials_ = []
            for _ in range(trials):
                needles = TASKS[task](rng, depth)
                offset = rng.randrange(0, max(1, len(filler_ids) - 2 * length))
                trials_.append((needles, build_prompt(tokenizer, filler_ids[offset:], length, needles)))
            correct, answers = 0, []
            by_len: dict[int, list] = {}
            for t in trials_:  # prompts differ in length by a few tokens: batch equal lengths
                by_len.setdefault(len(t[1]), []).append(t)
            for group in by_len.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    ids = torch.tensor([p for _, p in chunk], device=device)
                    new = max(len(tokenizer.encode(n.answer_text, add_special_tokens=False)) for n, _ in chunk)
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or 0,
                    )
                    for (needles, _), row in zip(chunk, out[:, ids.shape[1] :]):
                        text = tokenizer.decode(row, skip_special_tokens=True)
                        ok = score(text, needles.answer)
                        correct += ok
                        answers.append(
                            {
                                "length": length,
                                "depth": depth,
                                "answer": needles.answer,
                                "completion": text,
                                "correct": ok,
                            }
                        )
            accuracy.setdefault(str(length), {})[str(depth)] = correct / trials
            interval.setdefault(str(length), {})[str(depth)] = [round(x, 4) for x in wilson(correct, trials)]
            examples += sorted(answers, key=lambda a: a["correct"])[:2]
    return {
        "task": task,
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "accuracy": accuracy,
        "wilson95": interval,
        "examples": examples,
    }
