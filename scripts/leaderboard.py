"""Every method on the reference model, with and without the same fine-tuning budget: the leaderboard.

    python scripts/leaderboard.py                         # full sweep -> docs/RESULTS.md (+ results JSON, plot)
    python scripts/leaderboard.py --quick --output /tmp/lb    # a minute or two (CI)
    python scripts/leaderboard.py --methods pi,yarn       # a subset

For each method (baseline = no extension): patch the reference model x8 (256 -> 2048), evaluate without
fine-tuning, fine-tune with the demo's recipe (ctxext.demo.finetune_config: LoRA r16 + embeddings/norms,
progressive 512 -> 1024 -> 2048, identical steps and data for every method) and evaluate again. Columns:
held-out perplexity at 256/512/1024/2048, passkey at 1024 and 2048 (worst depth), change at 256 against the
original model, fine-tuning seconds and tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ctxext.config import load_config
from ctxext.demo import _quick_or_full, build_finetune_data, finetune_config
from ctxext.evals.report import evaluate_passkey, evaluate_perplexity
from ctxext.hub import patch_checkpoint
from ctxext.plots import plot_perplexity
from ctxext.reference import resolve_model
from ctxext.train import finetune

METHODS = {  # name -> (chain, extra parameters)
    "baseline": (None, {}),
    "pi": ("pi", {}),
    "ntk": ("ntk", {}),
    "dynamic": ("dynamic", {}),
    "yarn": ("yarn", {}),
    "prope+pi": ("prope+pi", {"keep": 0.75}),
    "xpos": ("xpos", {"scale_base": 512.0}),
    "pi+xpos": ("pi+xpos", {"scale_base": 512.0}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="docs")
    p.add_argument("--work-dir", default="runs/leaderboard")
    p.add_argument("--model", default="reference")
    p.add_argument("--factor", type=float, default=8.0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    plan = _quick_or_full(args.quick)
    work, out = Path(args.work_dir), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_model(args.model)
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(base).max_position_embeddings
    target = int(context * args.factor)
    lengths = sorted({context, 2 * context, 4 * context, target})
    pk_lengths = sorted({4 * context, target})
    stage_lengths = sorted({2 * context, 4 * context, target})
    data = build_finetune_data(AutoTokenizer.from_pretrained(base), work / "finetune.jsonl", stage_lengths,
                               plan["passkey_docs"], plan["train_docs"])
    rows = {}
    for name in args.methods.split(","):
        chain, params = METHODS[name]
        for tuned in (False, True):
            label = f"{name} + LoRA" if tuned else name
            started = time.perf_counter()
            if chain is None:
                model_dir, ft_seconds, ft_tokens = str(base), 0.0, 0
                if tuned:  # fine-tune at the original length budget too: the baseline's best effort
                    continue
            elif not tuned:
                model_dir = str(patch_checkpoint(base, work / name, chain, force=True, target_length=target, **params))
                ft_seconds, ft_tokens = 0.0, 0
            else:
                run = work / f"{name}-ft"
                shutil.rmtree(run, ignore_errors=True)
                raw = finetune_config(str(base), chain, target, stage_lengths, plan, data, params)
                t0 = time.perf_counter()
                model_dir = finetune(load_config(raw=raw), output_dir=str(run), progress=False)["merged"]
                ft_seconds, ft_tokens = time.perf_counter() - t0, sum(plan["steps"]) * plan["tokens_per_step"]
            ppl = evaluate_perplexity([model_dir], lengths=lengths, output=work / "eval" / label.replace(" ", ""),
                                      max_documents=plan["ppl_docs"], batch_size=4)
            pk = evaluate_passkey([model_dir], lengths=pk_lengths, depths=plan["depths"], trials=plan["passkey_trials"],
                                  output=work / "eval" / label.replace(" ", ""))
            per = next(iter(ppl["models"].values()))["per_length"]
            acc = next(iter(pk["models"].values()))["accuracy"]
            rows[label] = {"ppl": {str(L): per[str(L)]["perplexity"] for L in lengths},
                           "passkey_worst_depth": {str(L): min(acc[str(L)].values()) for L in pk_lengths},
                           "finetune_seconds": round(ft_seconds, 1), "finetune_tokens": ft_tokens,
                           "seconds": round(time.perf_counter() - started, 1)}
            print(label, json.dumps(rows[label]), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "plan": plan, "rows": rows}, indent=2))
    plot_perplexity({k: {int(L): v for L, v in r["ppl"].items()} for k, r in rows.items()}, out / "results.png",
                    title=f"held-out perplexity, {args.model} x{args.factor:g}", trained_context=context)
    original = rows["baseline"]["ppl"][str(context)] if "baseline" in rows else None
    cmd = "python scripts/leaderboard.py" + (" --quick" if args.quick else "") + (
        f" --methods {args.methods}" if args.methods != ",".join(METHODS) else "")
    lines = ["# Leaderboard: every method on the reference model", "",
             f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, CPU). Model: {args.model} (trained at {context}), "
             f"extended x{args.factor:g} to {target}. Fine-tuning: identical for every method "
             f"({' -> '.join(map(str, stage_lengths))}, {sum(plan['steps'])} steps x {plan['tokens_per_step']:,} "
             f"tokens, LoRA r16 + embeddings/norms, code + passkey documents). Perplexity: held-out stdlib files, "
             f"{plan['ppl_docs']} documents per length, non-overlapping windows. Passkey: worst depth of "
             f"{len(plan['depths'])} depths, {plan['passkey_trials']} keys per cell.", "",
             "| method | " + " | ".join(f"ppl@{L}" for L in lengths) + " | " + " | ".join(
                 f"passkey@{L}" for L in pk_lengths) + f" | change @{context} | fine-tune s | fine-tune tokens |",
             "|---|" + "---|" * (len(lengths) + len(pk_lengths) + 3)]
    for label, r in rows.items():
        change = f"{r['ppl'][str(context)] / original - 1:+.1%}" if original else "n/a"
        lines.append(f"| {label} | " + " | ".join(f"{r['ppl'][str(L)]:.2f}" for L in lengths) + " | "
                     + " | ".join(f"{r['passkey_worst_depth'][str(L)]:.0%}" for L in pk_lengths)
                     + f" | {change} | {r['finetune_seconds']:.0f} | {r['finetune_tokens']:,} |")
    lines += ["", "![perplexity vs length](results.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
