"""Every method on the reference model, with and without the same fine-tuning budget: the leaderboard.

    python scripts/leaderboard.py              # full sweep (configs/sweeps/leaderboard.yaml) -> docs/results/RESULTS.md
    python scripts/leaderboard.py --quick --output /tmp/lb    # a minute or two (CI)
    python scripts/leaderboard.py --methods pi,yarn       # a subset of the config's rows

For each row of the sweep config (baseline = no extension): patch the model x factor (256 -> 2048), evaluate
without fine-tuning, fine-tune with the sweep's recipe (default configs/recipes/demo.yaml, the demo's: LoRA r16 +
embeddings/norms, progressive 512 -> 1024 -> 2048, identical steps and data for every method) and evaluate again.
Columns: held-out
perplexity at 256/512/1024/2048, passkey (worst depth) at every length, change at 256 against the original model,
fine-tuning seconds and tokens; then the success targets, checked for the best fine-tuned method. Text below
the line "<!-- notes -->" in an existing RESULTS.md is kept when the table is rewritten.

Resumable: each finished row is a cell (``ctxext.evals.cells``) in WORK_DIR/rows/ whose spec is everything that
determines it (model, factor, the row's method, --quick, and the recipe: all of it for a fine-tuned row, its
evaluation section for the others). A rerun with the same work dir reuses the rows whose spec matches and computes
the rest, so an interrupted sweep
loses at most the row in progress, and a sweep can be split over processes (--methods, one work dir each; copy the
rows/ files into one work dir and run the whole sweep there to write the page).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from ctxext.evals.cells import load_cell, save_cell
from ctxext.evals.plots import plot_sweep
from ctxext.evals.retrieval import wilson
from ctxext.evals.run import (
    source_commit,
    worst_depth_table,
    worst_depths,
    write_markdown_keeping_notes,
)
from ctxext.experiments.recipe import load_recipe, load_sweep, stage_lengths
from ctxext.io.atomic import atomic_write_text
from ctxext.io.sources import resolve_model
from ctxext.patch.checkpoint import patch_checkpoint
from ctxext.train.loop import finetune

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/sweeps/leaderboard.yaml"


def with_interval(accuracy: float, trials: int | None) -> str:
    """``95% [83-99]``: an accuracy of ``trials`` keys with its Wilson 95% interval (just the accuracy without n)."""
    if not trials:
        return f"{accuracy:.0%}"
    lo, hi = wilson(round(accuracy * trials), trials)
    return f"{accuracy:.0%} [{lo * 100:.0f}-{hi * 100:.0f}]"


def check_targets(rows: dict, context: int, target: int, trials: int | None = None) -> list[tuple[str, bool, str]]:
    """The success targets, for the best fine-tuned row (lowest perplexity at the target length);
    ``trials``: keys per passkey cell, for the interval of the worst one."""
    tuned = {k: r for k, r in rows.items() if k.endswith("+ LoRA")}
    if "baseline" not in rows or not tuned:
        return []
    original = rows["baseline"]["ppl"][str(context)]
    best = min(tuned, key=lambda k: tuned[k]["ppl"][str(target)])
    r = tuned[best]
    at_target, at_context = r["ppl"][str(target)], r["ppl"][str(context)]
    worst = min(r["passkey_worst_depth"].values())
    change = at_context / original - 1
    base = rows["baseline"]["ppl"]
    return [
        (
            f"{best}: ppl@{target} below its own ppl@{context}",
            at_target < at_context,
            f"{at_target:.2f} vs {at_context:.2f}",
        ),
        (
            f"{best}: ppl@{target} no higher than the original's ppl@{context}",
            at_target <= original,
            f"{at_target:.2f} vs {original:.2f}",
        ),
        (
            f"{best}: passkey >= 95% at every depth up to {target}",
            worst >= 0.95,
            f"worst cell {with_interval(worst, trials)} (lengths {', '.join(r['passkey_worst_depth'])})",
        ),
        (
            f"{best}: ppl@{context} within 3% of the original (lower is better, so only a rise counts)",
            change <= 0.03,
            f"{change:+.1%}",
        ),
        (
            f"baseline fails beyond {context} (ppl@{target} > 1.5x its ppl@{context})",
            base[str(target)] > 1.5 * base[str(context)],
            f"{base[str(target)]:.1f} vs {base[str(context)]:.2f}",
        ),
    ]


def write_report(rows: dict, meta: dict, plan: dict, out: Path) -> None:
    """RESULTS.md (table, targets) and results.png from the measured rows (also: ``--report-from results.json``)."""
    context, target, lengths = meta["context"], meta["target"], meta["lengths"]
    curves = {k: {int(L): v for L, v in r["ppl"].items()} for k, r in rows.items()}
    plot_sweep(
        {k: c for k, c in curves.items() if k != "baseline" and not k.endswith("+ LoRA")},
        {k.removesuffix(" + LoRA"): c for k, c in curves.items() if k.endswith("+ LoRA")},
        out / "results.png",
        baseline=curves.get("baseline"),
        trained_context=context,
        title=f"held-out perplexity, {meta['model']} x{meta['factor']:g} (trained at {context})",
    )
    original = rows["baseline"]["ppl"][str(context)] if "baseline" in rows else None
    lines = [
        "# Leaderboard: every method on the reference model",
        "",
        (
            f"Command: `{meta['command']}` ({meta['date']}"
            + (f", commit {meta['commit']}" if meta.get("commit") else "")
            + f", CPU; sweep: `{meta['config']}`). "
            f"Model: {meta['model']} (trained at {context}), extended x{meta['factor']:g} to {target}. Fine-tuning: "
            f"identical for every method ({' -> '.join(map(str, meta['stage_lengths']))}, {sum(plan['steps'])} "
            f"steps x {plan['tokens_per_step']:,} tokens, {plan.get('tuning', 'LoRA r16 + embeddings/norms')}, "
            "stdlib code + "
            f"{plan['passkey_docs']:,} passkey documents). "
            f"Perplexity: the first {target} tokens of {plan['ppl_docs']} held-out stdlib files at least that "
            "long, non-overlapping windows of each length. "
            f"Passkey: worst of {len(plan['depths'])} depths, {plan['passkey_trials']} keys per cell "
            "[Wilson 95% interval, %]. "
            "Raw numbers, per-depth passkey included: `results.json`."
        ),
        "",
        "| method | "
        + " | ".join(f"ppl@{L}" for L in lengths)
        + " | "
        + " | ".join(f"passkey@{L}" for L in lengths)
        + f" | change @{context} | fine-tune s | fine-tune tokens |",
        "|---|" + "---|" * (2 * len(lengths) + 3),
    ]
    for label, r in rows.items():
        change = f"{r['ppl'][str(context)] / original - 1:+.1%}" if original else "n/a"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{r['ppl'][str(L)]:.2f}" for L in lengths)
            + " | "
            + " | ".join(with_interval(r["passkey_worst_depth"][str(L)], plan["passkey_trials"]) for L in lengths)
            + f" | {change} | {r['finetune_seconds']:.0f} | {r['finetune_tokens']:,} |"
        )
    ood = {k: r["ood_ppl"] for k, r in rows.items() if "ood_ppl" in r}
    if ood:
        first = ood.get("baseline")
        lines += [
            "",
            f"Code outside the training domain (`{meta.get('ood_data')}`), perplexity at {context}:",
            "",
            "| method | ppl | change |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v:.2f} | {f'{v / first - 1:+.1%}' if first else 'n/a'} |" for k, v in ood.items()]
    tasks = sorted({t for r in rows.values() for t in r.get("retrieval_worst_depth", {})})
    if tasks:
        trials = meta.get("retrieval_trials")
        depths = plan.get("retrieval_depths", plan["depths"])  # results.json of older runs: the passkey depths
        lines += [
            "",
            (
                f"RULER-style tasks in code (worst of {len(depths)} depths, {trials} prompts per cell; "
                "per-depth grids in `results.json`):"
            ),
            "",
            *worst_depth_table(
                "method", {k: r.get("retrieval_worst_depth", {}) for k, r in rows.items()}, tasks, lengths
            ),
        ]
    lines += ["", "![perplexity vs length, without and with fine-tuning](results.png)", ""]
    targets = check_targets(rows, context, target, plan["passkey_trials"])
    if targets:
        lines += ["## Targets", "", "| target | met | measured |", "|---|---|---|"]
        lines += [f"| {t} | {'yes' if ok else '**no**'} | {m} |" for t, ok, m in targets]
        lines.append("")
    write_markdown_keeping_notes(out / "RESULTS.md", "\n".join(lines))
    print("\n".join(lines))


def check_checkpoint_row(name: str, checkpoint: str, target: int) -> Path:
    """The folder of a checkpoint row, refused unless it is a checkpoint extended to the sweep's target."""
    from transformers import AutoConfig

    path = Path(checkpoint) if Path(checkpoint).is_absolute() else REPO / checkpoint
    if not (path / "config.json").is_file():
        sys.exit(f"row {name}: checkpoint {path} does not exist; make it first (the command is in the sweep config)")
    context = AutoConfig.from_pretrained(path).max_position_embeddings
    if context != target:
        sys.exit(f"row {name}: checkpoint {path} is extended to {context} tokens, the sweep to {target}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the sweep (default {DEFAULT_CONFIG})")
    p.add_argument("--output", default="docs/results")
    p.add_argument("--work-dir", default="runs/leaderboard")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--factor", type=float, help="override the config's factor")
    p.add_argument("--methods", help="comma-separated subset of the config's rows")
    p.add_argument("--quick", action="store_true", help="tiny budget and evaluation (CI)")
    p.add_argument(
        "--tuned-only",
        action="store_true",
        help="evaluate only the fine-tuned rows (and the baseline): for comparing recipes",
    )
    p.add_argument(
        "--report-from", metavar="JSON", help="rewrite RESULTS.md and the plot from a saved results.json (no training)"
    )
    args = p.parse_args(argv)
    if args.report_from:
        saved = json.loads(Path(args.report_from).read_text())
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_report(saved["rows"], saved["meta"], saved["plan"], Path(args.output))
        return 0
    config_path = Path(args.config) if Path(args.config).is_absolute() else REPO / args.config
    sweep = load_sweep(config_path)
    if sweep.kind != "finetune":
        p.error(f"{args.config} is a {sweep.kind} sweep: run it with scripts/real_model_leaderboard.py")
    config_name = config_path.relative_to(REPO).as_posix() if config_path.is_relative_to(REPO) else str(config_path)
    names = args.methods.split(",") if args.methods else list(sweep.methods)
    unknown = [n for n in names if n not in sweep.methods]
    if unknown:
        p.error(f"--methods: {unknown} not in {args.config} (rows: {', '.join(sweep.methods)})")
    model_name, factor = args.model or sweep.model, args.factor or sweep.factor
    recipe = load_recipe(REPO / sweep.recipe, quick=args.quick, overrides=sweep.overrides)
    plan = recipe.plan()
    work, out = Path(args.work_dir), Path(args.output)
    base = resolve_model(model_name)
    commit = source_commit(REPO)  # before the long run: the version that starts is the one that runs
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(base).max_position_embeddings
    target = int(context * factor)
    lengths = sorted({context, 2 * context, 4 * context, target})
    stages = stage_lengths(context, target)
    checkpoints = {
        n: check_checkpoint_row(n, sweep.methods[n].checkpoint, target) for n in names if sweep.methods[n].checkpoint
    }  # before any work: a missing one stops nothing halfway and leaves no folder behind
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tuned_rows = [n for n in names if sweep.methods[n].method is not None and sweep.methods[n].finetune]
    data, retrieval_data = (  # the fine-tuning documents, only where a row fine-tunes
        recipe.build_data(AutoTokenizer.from_pretrained(base), work, stages, target) if tuned_rows else (None, None)
    )
    rows = {}
    evaluation = recipe.evaluation
    for name in names:
        row = sweep.methods[name]
        chain, params = row.method, dict(row.model_extra or {})
        for tuned in (False, True):
            if tuned and (chain is None or not row.finetune):
                continue
            if args.tuned_only and not tuned and (chain is not None or row.checkpoint):
                continue
            label = f"{name} + LoRA" if tuned else name
            tag = label.replace(" ", "")
            depends = recipe if tuned else recipe.evaluation  # a row without fine-tuning: only how it is evaluated
            spec = {
                "model": str(base),
                "factor": factor,
                "recipe": depends.model_dump(mode="json"),
                # without defaults: fields added since (finetune, checkpoint) leave saved rows' specs as they were
                "quick": args.quick,
                "method": row.model_dump(mode="json", exclude_defaults=True) | {"method": chain},
                "tuned": tuned,
            }
            saved = load_cell(work, f"rows/{tag}", spec)
            if saved:
                rows[label] = saved["result"]
                print(label, f"(saved row reused: {work / 'rows' / tag}.json)", flush=True)
                continue
            started, ft_seconds = time.perf_counter(), 0.0
            if row.checkpoint:
                model_dir = str(checkpoints[name])
            elif chain is None:
                model_dir = str(base)
            elif not tuned:
                model_dir = str(patch_checkpoint(base, work / name, chain, force=True, target_length=target, **params))
            else:
                run = work / f"{name}-ft"
                shutil.rmtree(run, ignore_errors=True)
                cfg = recipe.finetune_config(str(base), chain, target, stages, data, params, retrieval_data)
                model_dir = finetune(cfg, output_dir=str(run), progress=False)["merged"]
                ft_seconds = time.perf_counter() - started
                ft_tokens = sum(cfg.stage_steps(i) for i in range(len(cfg.stages))) * cfg.optimization.tokens_per_step
            res = evaluation.run([model_dir], [label], work / "eval" / tag, lengths=lengths, context=context)
            per = next(iter(res["ppl"]["models"].values()))["per_length"]
            acc = next(iter(res["passkey"]["models"].values()))["accuracy"]
            rows[label] = {
                "ppl": {str(L): per[str(L)]["perplexity"] for L in lengths},
                "passkey_worst_depth": {str(L): min(acc[str(L)].values()) for L in lengths},
                "passkey": acc,
                "finetune_seconds": round(ft_seconds, 1),
                "finetune_tokens": ft_tokens if tuned else 0,
                "seconds": round(time.perf_counter() - started, 1),
            }
            if res["ood"]:
                ood = next(iter(res["ood"]["models"].values()))["per_length"]
                rows[label]["ood_ppl"] = ood[str(context)]["perplexity"]
            if res["retrieval"]:
                grids = next(iter(res["retrieval"]["models"].values()))["tasks"]
                rows[label]["retrieval_worst_depth"] = worst_depths(grids)
                rows[label]["retrieval"] = {task: g["accuracy"] for task, g in grids.items()}
            save_cell(
                work,
                f"rows/{tag}",
                spec,
                rows[label],
                seconds=rows[label]["seconds"],
                device="cuda" if torch.cuda.is_available() else f"cpu (torch threads: {torch.get_num_threads()})",
            )
            print(label, json.dumps({k: v for k, v in rows[label].items() if k != "passkey"}), flush=True)

    meta = {
        "model": model_name,
        "factor": factor,
        "context": context,
        "target": target,
        "lengths": lengths,
        "stage_lengths": stages,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "ood_data": evaluation.ood_data,
        "retrieval_trials": evaluation.retrieval_trials,
        "config": config_name,
        "command": "python scripts/leaderboard.py"
        + (" --quick" if args.quick else "")
        + (f" --config {config_name}" if config_name != DEFAULT_CONFIG else "")
        + (f" --methods {args.methods}" if args.methods else ""),
    }
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {"args": vars(args), "sweep": sweep.model_dump(), "plan": plan, "meta": meta, "rows": rows}, indent=2
        ),
    )
    write_report(rows, meta, plan, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
