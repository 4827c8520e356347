"""Shared-prefill retrieval (ctxext.evals.shared_prefill) against the one-needle passkey protocol, reference model.

    .venv/bin/python scripts/validate_shared_prefill.py --output docs/results/shared_prefill/ --trials 40 --threads 1

Per setting (the reference model as shipped at 256 tokens; patched in memory with Self-Extend G16 W64 bias -1.5,
which retrieves one key at 95%+ up to 2048; with YaRN x8, which mostly does not), at the same lengths and depths,
``--trials`` needles per cell, CPU float32:

* ``one-needle``: ``passkey_accuracy`` (an unnamed key, one prompt per needle, prompts batched by 8);
* ``named, 1/prompt``: ``shared_prefill_accuracy`` with one pinned depth per run: one named key per prompt (no
  distractor, no saving): the change of wording alone;
* ``named, k/prompt``: ``shared_prefill_accuracy`` with one needle per depth in every prompt (k = the number of
  depths), one prefill per k needles: the affordable protocol.

"agree" = the Wilson 95% intervals of one-needle and named k/prompt overlap. Writes ``validation.json`` (every
grid, with seconds) and ``validation.md`` under ``--output`` (hand-written notes below its ``<!-- notes -->`` line
survive a rerun). Another model, unpatched, at chosen lengths and depths (e.g. on a GPU):

    python scripts/validate_shared_prefill.py --model HuggingFaceTB/SmolLM2-135M --lengths 8192 --depths 0,0.5,1 \\
        --device auto --output runs/shared_prefill_smollm2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ctxext.evals.passkey import passkey_accuracy
from ctxext.evals.retrieval import count_with_interval, wilson
from ctxext.evals.run import filler_stream, load_for_eval, write_markdown_keeping_notes
from ctxext.evals.shared_prefill import band_label, shared_prefill_accuracy
from ctxext.io.atomic import atomic_write_text
from ctxext.patch import patch_model

SETTINGS = [  # (label, chain, params, lengths, depths)
    ("reference", None, {}, [256], [0.0, 0.5, 1.0]),
    (
        "selfextend G16 W64 bias -1.5",
        "selfextend",
        {"group_size": 16, "window": 64, "group_bias": -1.5},
        [1024, 2048],
        [0.0, 0.25, 0.5, 0.75, 1.0],
    ),
    ("yarn x8", "yarn", {"factor": 8}, [512], [0.0, 0.5, 1.0]),
]


def run_setting(model, tokenizer, filler, lengths, depths, trials, seed) -> dict:
    one, named1, namedk = {}, {}, {}
    for L in lengths:
        start = time.perf_counter()
        one[str(L)] = passkey_accuracy(model, tokenizer, filler, [L], depths, trials, seed=seed, batch_size=8)
        one[str(L)]["seconds"] = round(time.perf_counter() - start, 3)
        named1[str(L)] = {
            band_label((d, d)): shared_prefill_accuracy(model, tokenizer, filler, [L], [(d, d)], trials, seed=seed)
            for d in depths
        }
        bands = [(d, d) for d in depths]
        namedk[str(L)] = shared_prefill_accuracy(model, tokenizer, filler, [L], bands, trials, seed=seed)
    return {"one_needle": one, "named_1_per_prompt": named1, "named_k_per_prompt": namedk}


def rows(label: str, r: dict, lengths, depths, trials) -> tuple[list[str], list[str]]:
    acc, cost = [], []
    for L in map(str, lengths):
        k = r["named_k_per_prompt"][L]
        for d in depths:
            band = band_label((d, d))
            c1 = round(r["one_needle"][L]["accuracy"][L][str(d)] * trials)
            n1 = r["named_1_per_prompt"][L][band]["cells"][L][band]
            nk = k["cells"][L][band]
            a, b = wilson(c1, trials), wilson(nk["correct"], nk["needles"])
            agree = "yes" if a[0] <= b[1] and b[0] <= a[1] else "**no**"
            acc.append(
                f"| {label} | {L} | {d:g} | {count_with_interval(c1, trials)} | "
                f"{count_with_interval(n1['correct'], n1['needles'])} | "
                f"{count_with_interval(nk['correct'], nk['needles'])} | {nk['swapped']} | {agree} |"
            )
        one_s = r["one_needle"][L]["seconds"]
        named1_s = sum(
            g["seconds"][L]["prefill"] + g["seconds"][L]["answer"] for g in r["named_1_per_prompt"][L].values()
        )
        pre, ans = k["seconds"][L]["prefill"], k["seconds"][L]["answer"]
        cost.append(
            f"| {label} | {L} | {len(depths)} | {one_s:.1f} | {named1_s:.1f} | {pre:.1f} | {ans:.1f} | "
            f"{one_s / (pre + ans):.1f}x |"
        )
    return acc, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="docs/results/shared_prefill/")
    ap.add_argument("--trials", type=int, default=40, help="needles per cell (each protocol)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="reference", help="another model runs unpatched at --lengths and --depths")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 8192,16384")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], help="e.g. 0,0.5,1")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    settings = SETTINGS
    if args.model != "reference":
        if not (args.lengths and args.depths):
            ap.error("--model needs --lengths and --depths")
        settings = [(args.model, None, {}, args.lengths, args.depths)]
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_for_eval(args.model, device=args.device, dtype="float32")
    filler = filler_stream(tokenizer)
    started, results, acc, cost = time.perf_counter(), {}, [], []
    for label, chain, params, lengths, depths in settings:
        handle = patch_model(model, chain, **params) if chain else None
        results[label] = run_setting(model, tokenizer, filler, lengths, depths, args.trials, args.seed)
        results[label].update(chain=chain, params=params, lengths=lengths, depths=depths)
        if handle:
            handle.remove()
        a, c = rows(label, results[label], lengths, depths, args.trials)
        acc, cost = acc + a, cost + c
        print(f"{label}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/validate_shared_prefill.py", *sys.argv[1:]])
    payload = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{model.device} ({args.threads} CPU thread(s)), float32",
        "seconds": round(time.perf_counter() - started, 1),
        "trials": args.trials,
        "seed": args.seed,
        "settings": results,
    }
    atomic_write_text(out / "validation.json", json.dumps(payload, indent=1))
    md = [
        f"# Shared-prefill retrieval against one-needle passkey ({args.model} model)",
        "",
        f"Command: `{command}` ({payload['date']}, {payload['device']}, {payload['seconds']:.0f} s in all). "
        f"{args.trials} needles per cell in every protocol; correct/needles [Wilson 95%]. one-needle: "
        "`passkey_accuracy`; named, 1/prompt: `shared_prefill_accuracy` with one named key per prompt; named, "
        "k/prompt: one named key per depth in every prompt, one prefill per prompt. swapped: k/prompt answers that "
        "gave another needle's key. agree: the one-needle and k/prompt intervals overlap.",
        "",
        "| setting | length | depth | one-needle | named, 1/prompt | named, k/prompt | swapped | agree |",
        "|---|---|---|---|---|---|---|---|",
        *acc,
        "",
        "Seconds per length (all depths, wall clock): one-needle, named 1/prompt, and named k/prompt split into "
        "prefill and answering; speed-up = one-needle / k-per-prompt.",
        "",
        "| setting | length | k | one-needle s | named 1/prompt s | k/prompt: prefill s | answer s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
        *cost,
        "",
    ]
    write_markdown_keeping_notes(out / "validation.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
