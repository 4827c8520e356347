"""Train one small model per position encoding under the same budget at length L0; measure extrapolation.

    python scripts/compare_encodings.py      # full run (about 45 minutes on 2 CPU cores) -> docs/results/ENCODINGS.md
    python scripts/compare_encodings.py --quick --output /tmp/enc    # a couple of minutes (CI)

Every model: the same pre-norm Llama-style decoder (ctxext.experiments.encodings.TinyLM), tokenizer, data (Python
stdlib, train split), seed, steps, batch and learning rate; only the position encoding differs. Held-out perplexity
(stdlib held-out split, non-overlapping windows, ctxext.evals.perplexity) at L0, 2 L0, 4 L0 and 8 L0 without any
fine-tuning, plus parameter count and mean training step time, beside what the literature claims. Text below the
line "<!-- notes -->" in an existing ENCODINGS.md is kept when the table is rewritten (also by --report-from).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctxext.data import corpus
from ctxext.data.text import join_documents
from ctxext.data.tokenizer import train_tokenizer
from ctxext.evals.perplexity import perplexity
from ctxext.evals.plots import plot_perplexity
from ctxext.evals.run import write_markdown_keeping_notes
from ctxext.experiments.encodings import ENCODINGS, TinyLM
from ctxext.io.atomic import atomic_write_text
from ctxext.io.sources import REFERENCE_DIR
from ctxext.train.schedule import lr_multiplier


class _HFStyle(torch.nn.Module):
    """Adapter so ctxext.evals.perplexity can score a TinyLM (it calls model(input_ids=...).logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.model(input_ids)})()


# What the literature (and the seed's comparison table) says about each encoding, to read beside the measurements.
CLAIMS = {
    "sinusoidal": ("0", "poor beyond L (Vaswani et al. 2017; Press et al. 2022 measure it failing)", "an add"),
    "learned": ("L x d", "none: positions beyond L have no embedding (here: the last one is reused)", "an add"),
    "rope": (
        "0",
        "limited: degrades beyond L without scaling (Su et al. 2021; Chen et al. 2023)",
        "a rotation per layer",
    ),
    "alibi": ("0", "good: train short, test long (Press et al. 2022)", "a bias in every attention"),
    "xpos": ("0", "better than RoPE beyond L (Sun et al. 2022)", "a rotation + a scale per layer"),
}


def verdict(ratio: float) -> str:
    """Plain words for ppl@8L0 / ppl@L0 (below 1: more context helped; above: it hurt)."""
    if ratio <= 1.05:
        return "holds"
    if ratio <= 1.5:
        return "degrades"
    return "fails"


def write_report(results: dict, args: dict, n_held: int, out: Path) -> None:
    """docs/results/ENCODINGS.md + encodings.png from the measured results (also: ``--report-from encodings.json``)."""
    lengths = sorted(int(k) for k in next(iter(results.values()))["perplexity"])
    base_ms, base_params = results["rope"]["ms_per_step"], results["rope"]["parameters"]
    plot_perplexity(
        {e: {int(k): v for k, v in r["perplexity"].items()} for e, r in results.items()},
        out / "encodings.png",
        title=f"held-out perplexity, trained at {lengths[0]}",
        trained_context=lengths[0],
    )
    cmd = "python scripts/compare_encodings.py" + (" --quick" if args["quick"] else "")
    lines = [
        "# Position encodings: parameters, length extrapolation, compute cost (measured)",
        "",
        (
            f"Command: `{cmd}` ({args['date']}, CPU, {args['threads']} threads). "
            f"Same model (`ctxext.experiments.encodings.TinyLM`: dim {args['dim']}, {args['layers']} layers, "
            f"{args['heads']} heads), data (Python stdlib train split), tokenizer, seed and budget "
            f"({args['steps']} steps x {args['batch_size']} "
            f"x {args['length']} tokens) for every encoding; held-out perplexity (stdlib held-out split, {n_held} "
            "documents, non-overlapping windows) without fine-tuning. Raw numbers: `encodings.json`."
        ),
        "",
        "| encoding | extra parameters | total parameters | ms / step (x rope) | "
        + " | ".join(f"ppl@{L}" for L in lengths)
        + f" | ppl@{lengths[-1]} / ppl@{lengths[0]} | measured "
        "| claimed extrapolation | claimed extra parameters, cost |",
        "|---|---|---|---|" + "---|" * len(lengths) + "---|---|---|---|",
    ]
    for e, r in results.items():
        pp = r["perplexity"]
        ratio = pp[str(lengths[-1])] / pp[str(lengths[0])]
        params, claim, cost = CLAIMS[e]
        lines.append(
            f"| {e} | {r['parameters'] - base_params:,} | {r['parameters']:,} | {r['ms_per_step']:.0f} "
            f"({r['ms_per_step'] / base_ms:.2f}x) | "
            + " | ".join(f"{pp[str(L)]:.1f}" for L in lengths)
            + f" | {ratio:.2f} | {verdict(ratio)} | {claim} | {params}; {cost} |"
        )
    lines += [
        "",
        "`measured`: holds (ratio <= 1.05), degrades (<= 1.5), fails (> 1.5).",
        "",
        "![perplexity vs length](encodings.png)",
        "",
    ]
    write_markdown_keeping_notes(out / "ENCODINGS.md", "\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="docs/results")
    p.add_argument("--length", type=int, default=128, help="training length L0")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--xpos-scale-base", type=float, help="xPos gamma (default L0 / 2, the paper's 512 for 1024)")
    p.add_argument("--eval-documents", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (CI)")
    p.add_argument(
        "--report-from",
        metavar="JSON",
        help="rewrite ENCODINGS.md and the plot from a saved encodings.json (no training)",
    )
    args = p.parse_args(argv)
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_report(saved["results"], saved["args"], saved["held_out_documents"], out)
        return 0
    args.date = time.strftime("%Y-%m-%d")
    if args.quick:
        args.length, args.steps, args.batch_size, args.dim, args.layers, args.eval_documents = 32, 20, 4, 64, 2, 6
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    if (REFERENCE_DIR / "tokenizer.json").is_file() and not args.quick:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    else:
        tokenizer = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:80]), 512)
    train_files = corpus.stdlib_files("train")[: 80 if args.quick else None]
    stream = join_documents(tokenizer, corpus.read_texts(train_files))
    held = tokenizer(corpus.read_texts(corpus.stdlib_files("held_out")), add_special_tokens=False)["input_ids"]
    held = [d for d in held if len(d) >= 8 * args.length][: args.eval_documents]
    lengths = [args.length * m for m in (1, 2, 4, 8)]

    results = {}
    for encoding in ENCODINGS:
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        model = TinyLM(
            len(tokenizer),
            args.dim,
            args.layers,
            args.heads,
            encoding,
            max_len=args.length,
            scale_base=args.xpos_scale_base or args.length / 2,
        )
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        times = []
        for step in tqdm(range(args.steps), desc=encoding, unit="step"):
            lr = args.lr * lr_multiplier(step, args.steps, warmup=50, min_ratio=0.1, decay_from_start=True)
            for g in opt.param_groups:
                g["lr"] = lr
            starts = [rng.randrange(0, len(stream) - args.length - 1) for _ in range(args.batch_size)]
            batch = torch.from_numpy(np.stack([stream[s : s + args.length + 1] for s in starts]))
            t0 = time.perf_counter()
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            times.append(time.perf_counter() - t0)
        model.eval()
        ppl = {L: perplexity(_HFStyle(model), held, L, progress=False).perplexity for L in lengths}
        results[encoding] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "ms_per_step": 1000 * float(np.mean(times[len(times) // 5 :])),
            "final_train_loss": loss.item(),
            "perplexity": {str(k): v for k, v in ppl.items()},
        }
        print(encoding, json.dumps(results[encoding]), flush=True)

    atomic_write_text(
        out / "encodings.json",
        json.dumps({"args": vars(args), "held_out_documents": len(held), "results": results}, indent=2),
    )
    write_report(results, vars(args), len(held), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
