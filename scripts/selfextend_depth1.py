"""Why Self-Extend misses keys that sit inside its exact neighbour window (docs/results/SELFEXTEND.md, depth 1 at 2048).

    python scripts/selfextend_depth1.py --group-size 16 --window 128 --length 2048 --trials 10 --mode plain
    python scripts/selfextend_depth1.py --group-size 16 --window 128 --length 2048 --trials 10 --mode sink0
    python scripts/selfextend_depth1.py --group-size 16 --window 128 --length 2048 --trials 4 --mode mass
    python scripts/selfextend_depth1.py --group-size 16 --window 128 --length 256 --trials 4 --mode mass

Passkey prompts at ``--depth`` (default 1: the key line ends ~30 tokens before the answer) on the reference model
patched in memory with Self-Extend. Modes:

* ``plain``: greedy answers, and for comparison the unpatched model on the prompt's last 250 tokens;
* ``sinkN``: the same, with every grouped key masked except the first N slots (neighbour attention only);
* ``mass``: also print, per layer and head, the attention probability the last prompt token (the one that
  predicts the key's first digit) puts on keys at distance >= W (the grouped set).
"""

from __future__ import annotations

import argparse
import random

import torch

import ctxext.rope.selfextend as se
from ctxext import patch_model
from ctxext.evals.passkey import ANSWER, build_prompt, random_key, score
from ctxext.evals.run import filler_stream, load_for_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depth", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--mode", default="plain", help="plain, sinkN (N = grouped slots kept) or mass")
    args = ap.parse_args()
    mode, masses = args.mode, []
    kernel = se.selfextend_attention

    def wrapped(query, key, value, attention_mask, *, group_size, window, inv_freq, positions=None, **kw):
        K, Q = key.shape[2], query.shape[2]
        if mode.startswith("sink"):
            qs, ks = torch.arange(K - Q, K)[:, None], torch.arange(K)[None, :]
            keep = (ks <= qs) & ((qs - ks < window) | (ks < int(mode[4:])))
            attention_mask = keep[None, None] if attention_mask is None else attention_mask & keep
        if mode == "mass" and Q > 1:  # the prompt's last query, positions = slots (no padding)
            G, W, f = group_size, window, inv_freq.double()
            qp, kp = torch.tensor([K - 1]), torch.arange(K)
            qg = se.rotate(query[:, :, -1:], (qp // G + W - W // G - qp).double()[None, :, None] * f)
            kg = se.rotate(key, (kp // G - kp).double()[None, :, None] * f)
            d = K - 1 - kp
            s = (
                torch.where(
                    d < W, (query[:, :, -1:] @ key.transpose(-1, -2))[..., 0, :], (qg @ kg.transpose(-1, -2))[..., 0, :]
                )
                * query.shape[-1] ** -0.5
            )
            p = s.softmax(-1)[0]
            masses.append([round(float(p[h, d >= W].sum()), 2) for h in range(p.shape[0])])
        return kernel(
            query,
            key,
            value,
            attention_mask,
            group_size=group_size,
            window=window,
            inv_freq=inv_freq,
            positions=positions,
            **kw,
        )

    se.selfextend_attention = wrapped
    model, tok, _ = load_for_eval("reference", device="cpu")
    patch_model(model, "selfextend", group_size=args.group_size, window=args.window)
    base, _, _ = load_for_eval("reference", device="cpu")
    stream, rng = filler_stream(tok), random.Random(0)
    n_answer = len(tok.encode(ANSWER.format(key="12345"), add_special_tokens=False)) + 1
    correct = 0
    for _ in range(args.trials):
        offset = rng.randrange(0, max(1, len(stream) - 2 * args.length))
        p = build_prompt(tok, stream[offset:], args.length - n_answer, args.depth, random_key(rng))
        ids = torch.tensor([p.input_ids])
        masses.clear()
        if mode == "mass":
            with torch.no_grad():
                model(ids, use_cache=False)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_answer, do_sample=False, pad_token_id=0
        )
        text = tok.decode(out[0, ids.shape[1] :])
        correct += score(text, p.key)
        line = f"key {p.key} at token {p.key_token_index}/{len(p.input_ids)}: {text!r}"
        if mode == "plain":
            short = ids[:, -250:]
            b = base.generate(
                short, attention_mask=torch.ones_like(short), max_new_tokens=n_answer, do_sample=False, pad_token_id=0
            )
            line += f"; unpatched model on the last 250 tokens: {tok.decode(b[0, short.shape[1] :])!r}"
        if mode == "mass":
            line += f"; grouped-key mass per layer [heads]: {masses[: len(model.model.layers)]}"
        print(line, flush=True)
    print(f"{mode}: {correct}/{args.trials} correct")


if __name__ == "__main__":
    main()
