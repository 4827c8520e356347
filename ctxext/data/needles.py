"""Named-key documents: the text format of ``ctxext.evals.shared_prefill`` and the training documents in it.

A document is code filler holding named key lines (``# The QXBR pass key is 48213. Remember it.``) at chosen
depths, then a question for one of them (``# What is the QXBR pass key? The QXBR pass key is``) and its answer.
Evaluation builds prompts from held-out filler and asks every key of a prompt in turn from one prefill; fine-tuning
(``data.needles`` of a fine-tuning config) trains on documents of train filler that ask one key each, among the
others as distractors, with the answer's character span marked so that ``data.answer_weight`` can weigh it.

Token-level helpers shared with the other retrieval formats (``ctxext.evals.passkey``, ``ctxext.evals.retrieval``)
live here too: random keys and names, and the line break nearest a depth.
"""

from __future__ import annotations

import random
import string

from ctxext.errors import DataError

KEY_LINE = "# The {name} pass key is {key}. Remember it.\n"
QUESTION = "\n# What is the {name} pass key? The {name} pass key is"
ANSWER = " {key}"
# The name goes before "pass key is", not after ("the pass key of QXBR is"): the reference model, trained on
# passkey lines only, answers one named needle 90% right this way and 25% the other (20 needles at 256).


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def random_name(rng: random.Random, taken: set[str]) -> str:
    """Four capital letters not in ``taken`` (added to it)."""
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
        if name not in taken:
            taken.add(name)
            return name


def nearest_line_start(tokenizer, ids: list[int], target: int) -> int:
    """Index nearest ``target`` that follows a token containing a newline (BPE may merge a newline with the next
    line's indentation); 0 and len(ids) always qualify; ``target`` itself if no line break is within 64 tokens."""
    if target <= 0 or target >= len(ids):
        return max(0, min(target, len(ids)))
    best = None
    for radius in range(len(ids)):
        for i in (target - radius, target + radius):
            if 0 < i < len(ids) and "\n" in tokenizer.decode([ids[i - 1]]):
                best = i
                break
        if best is not None or radius > 64:
            break
    return best if best is not None else target


def draw_needles(rng: random.Random, bands: list[tuple[float, float]], per_band: int) -> list[dict]:
    """``per_band`` needles per band: ``{"band", "depth", "name", "key"}``, names and keys distinct in the prompt."""
    names: set[str] = set()
    keys: set[str] = set()
    needles = []
    for b, (lo, hi) in enumerate(bands):
        for _ in range(per_band):
            key = random_key(rng)
            while key in keys:
                key = random_key(rng)
            keys.add(key)
            needles.append(
                {"band": b, "depth": lo + (hi - lo) * rng.random(), "name": random_name(rng, names), "key": key}
            )
    return needles


def build_prompt(tokenizer, filler_ids: list[int], length: int, needles: list[dict]) -> tuple[list[int], list]:
    """``(prefix ids, question ids per needle)``: filler with every needle's key line at its depth (at a line break),
    cut so that prefix + any question + its answer (+1 token) fit ``length``. Each needle gets ``"position"``, the
    token index where its key line starts in the prefix. ``length`` too short: ValueError."""
    lines = [tokenizer.encode(KEY_LINE.format(**n), add_special_tokens=False) for n in needles]
    questions = [tokenizer.encode(QUESTION.format(**n), add_special_tokens=False) for n in needles]
    answer = max(len(tokenizer.encode(ANSWER.format(**n), add_special_tokens=False)) for n in needles) + 1
    n_filler = length - sum(map(len, lines)) - max(map(len, questions)) - answer
    if n_filler < 0:
        raise ValueError(
            f"length={length} is too short for {len(needles)} needles, a question and an answer "
            f"({length - n_filler} tokens); use a longer length or fewer needles"
        )
    if len(filler_ids) < n_filler:
        raise DataError(f"not enough filler: {len(filler_ids)} tokens for a prompt of {length}")
    filler = filler_ids[:n_filler]
    cuts = sorted(
        (nearest_line_start(tokenizer, filler, round(n["depth"] * n_filler)), i) for i, n in enumerate(needles)
    )
    prefix, previous = [], 0
    for cut, i in cuts:
        prefix += filler[previous:cut]
        needles[i]["position"] = len(prefix)
        prefix += lines[i]
        previous = cut
    return prefix + filler[previous:], questions


def training_rows(
    tokenizer,
    filler_ids: list[int],
    lengths: list[int],
    documents: int,
    *,
    keys: int = 4,
    edge_depth_share: float = 0.2,
    full_length_share: float = 0.5,
    seed: int = 0,
) -> list[dict]:
    """``documents`` named-key training documents as JSONL rows (``text``, ``answers``: the answer's character span).

    Each document is a length of ``lengths`` (a fine-tuning block: a stage's ``seq_len`` or PoSE window) long, or
    ``full_length_share`` of them all of it (less a few tokens), otherwise 1/4 to all of it; it holds ``keys`` named
    keys at uniform depths and asks for one of them, chosen uniformly, whose depth is exactly 0 or 1 with
    probability ``edge_depth_share`` (the start and the end, where a uniform depth almost never falls). Filler is cut
    at random offsets of ``filler_ids``: give train text, never the filler evaluation uses."""
    rng = random.Random(f"needles-training-{seed}")  # never the evaluation's seeds ("shared-prefill-...")
    rows = []
    for _ in range(documents):
        block = rng.choice(lengths)
        drawn = block - 8 if rng.random() < full_length_share else rng.randint(block // 4, block - 8)
        needles = draw_needles(rng, [(0.0, 1.0)], keys)
        asked = rng.randrange(keys)
        if edge_depth_share and rng.random() < edge_depth_share:
            needles[asked]["depth"] = float(rng.random() < 0.5)
        if len(filler_ids) < 2 * block:
            raise DataError(f"not enough filler for named-key documents: {len(filler_ids)} tokens, {2 * block} needed")
        start = rng.randrange(0, len(filler_ids) - 2 * block + 1)
        for size in (drawn, block - 8):  # a short draw that cannot hold the keys takes the whole block
            try:
                prefix, questions = build_prompt(tokenizer, filler_ids[start : start + 2 * block], size, needles)
                break
            except ValueError as err:
                reason = err
        else:
            raise DataError(
                f"{keys} named keys, a question and an answer do not fit a block of {block} tokens ({reason}); "
                "give fewer keys (data.needles.keys) or longer stages"
            )
        head = tokenizer.decode(prefix + questions[asked])
        answer = ANSWER.format(**needles[asked])
        rows.append({"text": head + answer + ".\n", "answers": [[len(head), len(head) + len(answer)]]})
    return rows
