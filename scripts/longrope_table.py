"""Searched LongRoPE factors against PI, NTK and YaRN at the same extension, no fine-tuning: docs/results/LONGROPE.md.

    ctxext search reference runs/longrope/longrope8 --target-length 2048 --budget 160     # the search (stdlib:train)
    python scripts/longrope_table.py runs/longrope/longrope8                              # this table

For the searched checkpoint SEARCHED (written by ``ctxext search``), patch its source x the same factor with pi,
ntk and yarn, then evaluate every model (the source as ``baseline`` too) on text the search did not see:
perplexity on ``--data`` (default stdlib:held_out: the first max(lengths) tokens of every held-out file at least
that long, non-overlapping windows of each length, as docs/results/RESULTS.md) and, with ``--ood``, on code outside the
training domain; passkey retrieval with Wilson 95% intervals. Writes ``longrope.json`` (every number), the
perplexity plot and the search curve into ``--output`` and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ctxext.evals.retrieval import count_with_interval
from ctxext.evals.run import evaluate_passkey, evaluate_perplexity
from ctxext.io.atomic import atomic_write_text
from ctxext.patch.checkpoint import patch_checkpoint

BASELINES = ("pi", "ntk", "yarn")


def ppl_table(ppl: dict, lengths: list[int], reference: str = "yarn") -> list[str]:
    target = str(max(lengths))
    ref = ppl["models"][reference]["per_length"][target]["perplexity"]
    lines = [
        "| model | " + " | ".join(f"ppl@{L}" for L in lengths) + f" | vs {reference} @{target} |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for label, r in ppl["models"].items():
        at = r["per_length"]
        change = at[target]["perplexity"] / ref - 1
        lines.append(
            f"| {label} | " + " | ".join(f"{at[str(L)]['perplexity']:.2f}" for L in lengths) + f" | {change:+.1%} |"
        )
    return lines


def passkey_table(pk: dict) -> list[str]:
    trials, depths = pk["protocol"]["trials"], pk["protocol"]["depths"]
    lines = [
        f"| model | length | {' | '.join(f'depth {d:g}' for d in depths)} | all depths |",
        "|---|---:|" + "---:|" * (len(depths) + 1),
    ]
    for label, grid in pk["models"].items():
        for length, row in grid["accuracy"].items():
            correct = [round(row[str(d)] * trials) for d in depths]
            lines.append(
                f"| {label} | {length} | "
                + " | ".join(f"{c}/{trials}" for c in correct)
                + f" | {count_with_interval(sum(correct), trials * len(depths))} |"
            )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("searched", help="checkpoint written by `ctxext search`")
    p.add_argument("--work-dir", default="runs/longrope", help="where the pi / ntk / yarn checkpoints go")
    p.add_argument("--output", default="docs/results", help="where longrope.json and the plots go")
    p.add_argument("--data", default="stdlib:held_out", help="held-out perplexity text (default stdlib:held_out)")
    p.add_argument("--ood", help="a second perplexity text, e.g. package:numpy")
    p.add_argument("--lengths", default=None, help="comma-separated lengths (default: L, 2L, 4L, target)")
    p.add_argument("--max-documents", type=int, default=24, help="documents per length (docs/results/RESULTS.md: 24)")
    p.add_argument("--passkey-lengths", help="comma-separated passkey lengths (default: L and the target)")
    p.add_argument("--trials", type=int, default=10, help="passkey keys per cell")
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another checkpoint in the perplexity tables (e.g. a proxy search), repeatable",
    )
    args = p.parse_args(argv)

    searched = Path(args.searched)
    config = json.loads((searched / "config.json").read_text())
    search = json.loads((searched / "search.json").read_text())
    source, context, target = search["source"], search["context_length"], search["target_length"]
    factor = target / context
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else sorted({context, 2 * context, 4 * context, target})
    )
    work, out = Path(args.work_dir), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    models = {"baseline": source}
    for method in BASELINES:
        models[f"{method}"] = str(
            patch_checkpoint(source, work / f"{method}{factor:g}", method, factor=factor, force=True)
        )
    models["searched"] = str(searched)
    for item in args.extra:
        label, _, path = item.partition("=")
        models[label] = path
    started = time.time()
    result = {
        "command": "python scripts/longrope_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "searched": str(searched),
        "source": source,
        "factor": factor,
        "search": {
            k: search.get(k)
            for k in (
                "calibration",
                "budget",
                "seed",
                "evolution",
                "refine",
                "space",
                "best",
                "seeds",
                "generations",
                "refine_steps",
            )
        },
        "rope_parameters": config["rope_parameters"],
    }
    texts = {"held_out": args.data, **({"ood": args.ood} if args.ood else {})}
    for name, data in texts.items():
        ppl = evaluate_perplexity(
            list(models.values()),
            labels=list(models),
            lengths=lengths,
            data=data,
            output=work / f"ppl-{name}",
            max_documents=args.max_documents,
            batch_size=4,
        )
        result[f"ppl_{name}"] = ppl
        shutil.copy(work / f"ppl-{name}" / "ppl.png", out / f"longrope_ppl_{name}.png")
        print(f"\nperplexity on {data}:\n" + "\n".join(ppl_table(ppl, lengths)))
    if not args.no_passkey:
        pk_lengths = (
            [int(x) for x in args.passkey_lengths.split(",")] if args.passkey_lengths else sorted({context, target})
        )
        pk = evaluate_passkey(
            [models[m] for m in ("yarn", "ntk", "searched")],
            lengths=pk_lengths,
            depths=[0.0, 0.25, 0.5, 0.75, 1.0],
            trials=args.trials,
            output=work / "passkey",
            labels=["yarn", "ntk", "searched"],
        )
        result["passkey"] = pk
        print("\npasskey:\n" + "\n".join(passkey_table(pk)))
    result["seconds"] = round(time.time() - started, 1)
    shutil.copy(searched / "search.png", out / "longrope_search.png")
    atomic_write_text(out / "longrope.json", json.dumps(result, indent=2))
    print(f"\nwrote {out / 'longrope.json'} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
