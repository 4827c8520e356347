"""``ctxext demo``: the main job on the shipped reference model, end to end, in minutes on a CPU.

The recipe (default ``configs/recipes/demo.yaml``) says what runs:

1. evaluate the reference model (trained at 256 tokens) at 256 .. 256 x factor: perplexity, passkey, code outside
   the training domain (and RULER-style tasks if the recipe names them);
2. patch it x factor (the recipe's method, YaRN by default; ``--method pi`` for position interpolation) and
   evaluate again without fine-tuning;
3. progressive LoRA fine-tune (512 -> 1024 -> 2048 for x8) on stdlib code mixed with retrieval documents whose
   answers weigh more in the loss;
4. evaluate the fine-tuned model; write a report folder (report.md, plots, JSON, the exact commands) and print
   the headline numbers.

Every step is a library call that a CLI command also makes; ``commands.sh`` in the report lists those commands."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from pathlib import Path

import yaml

from ctxext.io.atomic import atomic_write_text
from ctxext.io.lock import locks_output
from ctxext.options import Options, opt, takes

log = logging.getLogger(__name__)


def build_stand_in(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama (context 256) with a BPE tokenizer trained on 60 stdlib files: the demo's default
    while no trained reference model ships. It shows the mechanics; its numbers mean nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxext.data.corpus import read_texts, stdlib_files
    from ctxext.data.tokenizer import train_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = train_tokenizer(read_texts(stdlib_files("train")[:60]), vocab_size=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class DemoOptions(Options):
    """``ctxext demo``: the recipe's defaults unless given."""

    output_dir: str = opt("ctxext-demo", "where the report and checkpoints go")
    recipe: str | None = opt(
        None,
        "recipe YAML (default configs/recipes/demo.yaml: its method, factor, data, fine-tuning and evaluation budget)",
    )
    factor: float | None = opt(None, "extension factor (default: the recipe's, 8: 256 -> 2048)", gt=1)
    method: str | None = opt(None, "method or chain (default: the recipe's), e.g. yarn, prope+pi")
    model: str = opt("reference", "base model (default: the shipped reference model)")
    quick: bool = opt(False, "a few steps and trials: checks the pipeline in a minute")


@takes(DemoOptions)
@locks_output("ctxext demo", "output_dir")
def run_demo(output_dir, recipe, factor, method, model, quick) -> dict:
    """Run the recipe (default ``configs/recipes/demo.yaml``) on ``model``; returns the summary (table, headline,
    report path) that ``ctxext demo`` prints. ``factor`` and ``method`` replace the recipe's. The output folder is
    locked while the demo runs; the recipe, the model, its tokenizer and the method are checked before it is
    created."""
    from ctxext.evals.retrieval import wilson
    from ctxext.evals.run import worst_depth_table, worst_depths
    from ctxext.experiments.recipe import load_recipe, stage_lengths
    from ctxext.io.sources import check_source, has_reference_model
    from ctxext.io.validate import check_checkpoint, load_tokenizer
    from ctxext.patch.checkpoint import patch_checkpoint
    from ctxext.patch.model import plan_patch
    from ctxext.train.loop import finetune

    started = time.perf_counter()
    rec = load_recipe(recipe, quick=quick)
    plan = rec.plan()
    factor = factor or rec.factor
    spec = method or rec.method
    out = Path(output_dir)

    def say(msg: str) -> None:
        log.info("[%6.0fs] %s", time.perf_counter() - started, msg)

    if model == "reference" and not has_reference_model():
        out.mkdir(parents=True, exist_ok=True)
        base = str(build_stand_in(out / "stand-in-model"))
        log.warning(
            "note: this installation ships no trained reference model; the demo runs on a tiny random Llama "
            "(context 256) built from a config, so it shows the pipeline, not the quality of the methods."
        )
        model = "tiny random stand-in"
    else:
        base = check_source(model)
    config = check_checkpoint(base, finite=True).config
    tokenizer = load_tokenizer(base, config.vocab_size)
    context = config.max_position_embeddings
    target = int(context * factor)
    plan_patch(config, spec, target_length=target)  # a bad method or factor fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({context, 2 * context, 4 * context, target})
    stages = stage_lengths(context, target)
    commands = []

    # 1-2: patch
    patched = out / "patched"
    say(f"patching {model} ({context} tokens) x{factor:g} with {spec}")
    patch_checkpoint(base, patched, spec, force=True, target_length=target)
    commands.append(f"ctxext patch {shlex.quote(str(base))} {patched} --method {spec} --target-length {target} --force")

    # 3: progressive fine-tune
    data, retrieval_data = rec.build_data(tokenizer, out / "data", stages, target)
    cfg = rec.finetune_config(str(base), spec, target, stages, data, retrieval_data=retrieval_data)
    config_path = out / "finetune.yaml"
    config_path.write_text(
        f"# written by ctxext demo; rerun: ctxext finetune {config_path} --output-dir {out / 'finetune'}\n"
        + yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    )
    commands.append(f"ctxext finetune {config_path} --output-dir {out / 'finetune'}")
    say(f"fine-tuning at {' -> '.join(map(str, stages))} tokens ({sum(plan['steps'])} steps)")
    shutil.rmtree(out / "finetune", ignore_errors=True)
    tuned = finetune(cfg, output_dir=str(out / "finetune"))["merged"]

    # 1, 2, 4: evaluate all three
    models = [str(base), str(patched), tuned]
    names = {str(base): "original", str(patched): f"{spec} x{factor:g}", tuned: f"{spec} x{factor:g} + LoRA"}
    ev = rec.evaluation
    pk_lengths = sorted({context, 4 * context, target})
    ruler_lengths, ruler_depths = sorted({context, target}), plan["retrieval_depths"]
    say(
        f"perplexity at {lengths} ({plan['ppl_docs']} held-out documents per length), passkey at {pk_lengths} x "
        f"depths {plan['depths']} ({plan['passkey_trials']} keys per cell)"
        + (f", code outside the training domain ({ev.ood_data}) at {context}" if ev.ood_data else "")
        + (f", RULER-style tasks {ev.retrieval_tasks} at {ruler_lengths}" if ev.retrieval_tasks else "")
    )
    results = ev.run(
        models,
        [names[m] for m in models],
        out,
        lengths=lengths,
        passkey_lengths=pk_lengths,
        context=context,
        ood_models=[str(base), tuned],  # what the extension costs outside the training domain
        retrieval_lengths=ruler_lengths,  # the trained and the target length only (the leaderboard has every length)
        retrieval_models=[str(base), tuned],
    )
    ppl, pk = results["ppl"], results["passkey"]
    commands += results["commands"]
    extra: list[str] = []
    ood_change = None
    if results["ood"]:
        o, t = (r["per_length"][str(context)]["perplexity"] for r in results["ood"]["models"].values())
        ood_change = t / o - 1
        extra += [
            (
                f"Code outside the training domain (`{ev.ood_data}`, {plan['ppl_docs']} files), perplexity at "
                f"{context}: original {o:.2f}, {names[tuned]} {t:.2f} ({ood_change:+.1%}) (`ood/ppl.json`)."
            ),
            "",
        ]
    if results["retrieval"]:
        extra += [
            (
                f"RULER-style tasks in code, worst of {len(ruler_depths)} depths "
                f"({ev.retrieval_trials} prompts per cell, "
                "`retrieval.json`, `retrieval_*.png`; every length: the leaderboard):"
            ),
            "",
            *worst_depth_table(
                "model",
                {label: worst_depths(r["tasks"]) for label, r in results["retrieval"]["models"].items()},
                ev.retrieval_tasks,
                ruler_lengths,
            ),
            "",
        ]

    # report
    rows = []
    for label, path in zip(ppl["models"], models):
        per = ppl["models"][label]["per_length"]
        acc = pk["models"][label]["accuracy"]
        rows.append(
            (names[path], [per[str(L)]["perplexity"] for L in lengths], [min(acc[str(L)].values()) for L in pk_lengths])
        )
    header = (
        "| model | "
        + " | ".join(f"ppl@{L}" for L in lengths)
        + " | "
        + " | ".join(f"passkey@{L} (worst depth)" for L in pk_lengths)
        + " |"
    )
    table = [header, "|---|" + "---|" * (len(lengths) + len(pk_lengths))]
    for name, pp, acc in rows:
        table.append(
            f"| {name} | " + " | ".join(f"{v:.2f}" for v in pp) + " | " + " | ".join(f"{a:.0%}" for a in acc) + " |"
        )
    (_, p_orig, k_orig), (tuned_name, p_tuned, k_tuned) = rows[0], rows[-1]
    worst_tuned = min(k_tuned)
    low, high = wilson(round(worst_tuned * plan["passkey_trials"]), plan["passkey_trials"])
    headline = (
        f"original -> {tuned_name}: at {target} tokens perplexity {p_orig[-1]:.2f} -> {p_tuned[-1]:.2f}, "
        f"passkey (worst depth) {k_orig[-1]:.0%} -> {k_tuned[-1]:.0%}; at {context} tokens perplexity "
        f"{p_orig[0]:.2f} -> {p_tuned[0]:.2f}, passkey {k_orig[0]:.0%} -> {k_tuned[0]:.0%}; worst passkey cell "
        f"{worst_tuned:.0%} [95% CI {low:.0%}-{high:.0%}]"
        + (
            f"; cost on code outside the training domain at {context}: {ood_change:+.1%} perplexity"
            if ood_change is not None
            else ""
        )
    )
    minutes = (time.perf_counter() - started) / 60
    report = [
        f"# ctxext demo: {model} x{factor:g} with {spec}",
        "",
        (
            f"Reference model trained at {context} tokens; extended to {target}; fine-tuned "
            f"{' -> '.join(map(str, stages))} for {sum(plan['steps'])} steps "
            f"({sum(plan['steps']) * plan['tokens_per_step']:,} tokens). Total time {minutes:.1f} minutes."
        ),
        "",
        *table,
        "",
        f"**{headline}**",
        "",
        *extra,
        (
            f"Perplexity: the first {target} tokens of {plan['ppl_docs']} held-out stdlib files at least that long, "
            "scored in non-overlapping windows of each length, so every column scores the same text (long files: "
            "lower perplexity than the model card's all-files numbers) (`ppl.json`, `ppl.png`). Passkey: exact match, "
            f"{plan['passkey_trials']} keys per (length, depth) cell (`passkey.json`, `passkey_*.png`). Fine-tuning "
            "curve: `finetune/metrics.jsonl`. Every method on the same budget: `docs/results/RESULTS.md` in the "
            "repository (`python scripts/leaderboard.py`)."
        ),
        "",
        "![perplexity](ppl.png)",
        "",
        "Commands (`commands.sh`):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    summary = {
        "rows": rows,
        "lengths": lengths,
        "passkey_lengths": pk_lengths,
        "headline": headline,
        "minutes": minutes,
        "table": table,
        "report": str(out / "report.md"),
    }
    atomic_write_text(out / "report.md", "\n".join(report))
    atomic_write_text(out / "commands.sh", "#!/usr/bin/env bash\nset -e\n" + "\n".join(commands) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
