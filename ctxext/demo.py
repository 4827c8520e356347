"""``ctxext demo``: the main job on the shipped reference model, end to end, in about 8 minutes on 2 CPU cores.

1. evaluate the reference model (trained at 256 tokens) at 256 .. 256 x factor: perplexity and passkey;
2. patch it x factor (default PI) and evaluate again without fine-tuning;
3. progressive LoRA fine-tune (512 -> 1024 -> 2048 for x8) on stdlib code mixed with passkey documents;
4. evaluate the fine-tuned model; write a report folder (report.md, plots, JSON, the exact commands) and print
   the headline numbers.

Every step is a library call that a CLI command also makes; ``commands.sh`` in the report lists those commands.
"""

from __future__ import annotations

import json
import random
import shlex
import time
from pathlib import Path

import yaml


def demo_plan(quick: bool) -> dict:
    """The demo's budget (also the leaderboard's): evaluation sizes, fine-tuning steps per stage, data mix."""
    if quick:
        return {"ppl_docs": 3, "passkey_trials": 2, "depths": [0.0, 1.0], "steps": [2, 2, 2],
                "tokens_per_step": 2048, "passkey_docs": 20, "train_docs": 60}
    return {"ppl_docs": 24, "passkey_trials": 10, "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "steps": [30, 30, 60],
            "tokens_per_step": 8192, "passkey_docs": 2000, "train_docs": None}


def build_finetune_data(tokenizer, path: Path, lengths: list[int], n_passkey: int, train_docs: int | None,
                        seed: int = 0, edge_depth_share: float = 0.2) -> Path:
    """stdlib train files plus passkey documents up to the fine-tuning lengths, as JSONL (one document a row).

    Passkey documents are 1/4 to 1 of a stage length long; ``edge_depth_share`` of them put the key exactly at the
    start or the end (the depths 0 and 1 that evaluation asks for and a uniform depth almost never gives)."""
    from .corpus import read_texts, stdlib_files
    from .evals import passkey

    rng = random.Random(seed)
    texts = read_texts(stdlib_files("train"))
    if train_docs:
        texts = texts[:train_docs]
    filler = [t for doc in tokenizer(texts[:400], add_special_tokens=False, verbose=False)["input_ids"] for t in (*doc, tokenizer.eos_token_id)]
    rows = [{"text": t} for t in texts]
    for _ in range(n_passkey):
        length = rng.choice(lengths)
        start = rng.randrange(0, len(filler) - 2 * length)
        doc = passkey.training_document(tokenizer, filler[start : start + 2 * length], rng, rng.randint(length // 4, length - 16),
                                       edge_depth_share)
        rows.append({"text": tokenizer.decode(doc)})
    share = 1 - sum(map(len, texts)) / sum(len(r["text"]) for r in rows)
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"fine-tuning data: {len(texts)} stdlib files + {n_passkey} passkey documents ({share:.1%} of the text) "
          f"-> {path}", flush=True)
    return path


def finetune_config(base: str, spec: str, target: int, stage_lengths: list[int], plan: dict, data: Path,
                    params: dict | None = None) -> dict:
    """The demo's fine-tuning recipe as a raw config dict (LoRA r16 + embeddings and norms)."""
    return {
        "model": {"path": base, "dtype": "float32"},
        "patch": {"method": spec, "target_length": target, **(params or {})},
        "stages": [{"seq_len": L, "steps": s} for L, s in zip(stage_lengths, plan["steps"])],
        "lora": {"r": 16, "alpha": 32, "train_embeddings": True, "train_norms": True},
        "data": {"source": str(data), "held_out": "stdlib:held_out"},
        "optimization": {"lr": 2e-3, "warmup_steps": 3, "tokens_per_step": plan["tokens_per_step"],
                         "micro_batch_size": 2, "loss_chunk_tokens": 1024},
        "logging": {"eval_every": 10, "eval_blocks": 2, "save_every": 20},
        "seed": 0,
    }


def run_demo(output_dir: str = "ctxext-demo", factor: float = 8.0, method: str = "pi", quick: bool = False,
             model: str = "reference") -> int:
    from transformers import AutoTokenizer

    from .config import load_config
    from .evals.report import evaluate_passkey, evaluate_perplexity
    from .hub import patch_checkpoint
    from .reference import build_stand_in, has_reference_model, resolve_model
    from .train import finetune

    started = time.perf_counter()
    plan = demo_plan(quick)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model == "reference" and not has_reference_model():
        base = str(build_stand_in(out / "stand-in-model"))
        print("note: this installation ships no trained reference model yet; the demo runs on a tiny random Llama "
              "(context 256) built from a config, so it shows the pipeline, not the quality of the methods.")
        model = "tiny random stand-in"
    else:
        base = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(base).max_position_embeddings
    target = int(context * factor)
    lengths = sorted({context, 2 * context, 4 * context, target})
    stage_lengths = [L for L in (2 * context, 4 * context, target) if L <= target][-3:]
    commands = []

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", flush=True)

    # 1-2: patch
    patched = out / "patched"
    spec = method
    params = {"target_length": target}
    say(f"patching {model} ({context} tokens) x{factor:g} with {spec}")
    patch_checkpoint(base, patched, spec, force=True, **params)
    commands.append(f"ctxext patch {shlex.quote(str(base))} {patched} --method {spec} --target-length {target} --force")

    # 3: progressive fine-tune
    data = build_finetune_data(tokenizer, out / "data" / "finetune.jsonl", stage_lengths, plan["passkey_docs"],
                               plan["train_docs"])
    raw = finetune_config(str(base), spec, target, stage_lengths, plan, data)
    config_path = out / "finetune.yaml"
    config_path.write_text(f"# written by ctxext demo; rerun: ctxext finetune {config_path} --output-dir {out / 'finetune'}\n"
                           + yaml.safe_dump(raw, sort_keys=False))
    commands.append(f"ctxext finetune {config_path} --output-dir {out / 'finetune'}")
    say(f"fine-tuning at {' -> '.join(map(str, stage_lengths))} tokens ({sum(plan['steps'])} steps)")
    import shutil

    shutil.rmtree(out / "finetune", ignore_errors=True)
    result = finetune(load_config(raw=raw), output_dir=str(out / "finetune"))
    tuned = result["merged"]

    # 1, 2, 4: evaluate all three
    models = [str(base), str(patched), tuned]
    names = {str(base): "original", str(patched): f"{spec} x{factor:g}", tuned: f"{spec} x{factor:g} + LoRA"}
    say(f"perplexity at {lengths} ({plan['ppl_docs']} held-out documents per length)")
    ppl = evaluate_perplexity(models, lengths=lengths, output=out, max_documents=plan["ppl_docs"], batch_size=4,
                              labels=[names[m] for m in models])
    commands.append(f"ctxext eval ppl {' '.join(models)} --lengths {','.join(map(str, lengths))} "
                    f"--max-documents {plan['ppl_docs']} --output {out}")
    pk_lengths = sorted({context, 4 * context, target})
    say(f"passkey at {pk_lengths} x depths {plan['depths']} ({plan['passkey_trials']} keys per cell)")
    pk = evaluate_passkey(models, lengths=pk_lengths, depths=plan["depths"], trials=plan["passkey_trials"], output=out,
                          labels=[names[m] for m in models])
    commands.append(f"ctxext eval passkey {' '.join(models)} --lengths {','.join(map(str, pk_lengths))} "
                    f"--depths {','.join(map(str, plan['depths']))} --trials {plan['passkey_trials']} --output {out}")

    # report
    labels = list(ppl["models"])
    rows = []
    for label, path in zip(labels, models):
        per = ppl["models"][label]["per_length"]
        acc = pk["models"][label]["accuracy"]
        rows.append((names[path], [per[str(L)]["perplexity"] for L in lengths],
                     [min(acc[str(L)].values()) for L in pk_lengths]))
    header = ("| model | " + " | ".join(f"ppl@{L}" for L in lengths) + " | "
              + " | ".join(f"passkey@{L} (worst depth)" for L in pk_lengths) + " |")
    table = [header, "|---|" + "---|" * (len(lengths) + len(pk_lengths))]
    for name, pp, acc in rows:
        table.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in pp) + " | "
                     + " | ".join(f"{a:.0%}" for a in acc) + " |")
    (_, p_orig, k_orig), (tuned_name, p_tuned, k_tuned) = rows[0], rows[-1]
    headline = (f"original -> {tuned_name}: at {target} tokens perplexity {p_orig[-1]:.2f} -> {p_tuned[-1]:.2f}, "
                f"passkey (worst depth) {k_orig[-1]:.0%} -> {k_tuned[-1]:.0%}; at {context} tokens perplexity "
                f"{p_orig[0]:.2f} -> {p_tuned[0]:.2f}, passkey {k_orig[0]:.0%} -> {k_tuned[0]:.0%}")
    minutes = (time.perf_counter() - started) / 60
    report = [
        f"# ctxext demo: {model} x{factor:g} with {spec}", "",
        (f"Reference model trained at {context} tokens; extended to {target}; fine-tuned "
         f"{' -> '.join(map(str, stage_lengths))} for {sum(plan['steps'])} steps "
         f"({sum(plan['steps']) * plan['tokens_per_step']:,} tokens). Total time {minutes:.1f} minutes."), "",
        *table, "", f"**{headline}**", "",
        (f"Perplexity: the first {target} tokens of {plan['ppl_docs']} held-out stdlib files at least that long, "
         "scored in non-overlapping windows of each length, so every column scores the same text (long files: "
         "lower perplexity than the model card's all-files numbers) (`ppl.json`, `ppl.png`). Passkey: exact match, "
         f"{plan['passkey_trials']} keys per (length, depth) cell (`passkey.json`, `passkey_*.png`). Fine-tuning "
         "curve: `finetune/metrics.jsonl`. Every method on the same budget: `docs/RESULTS.md` in the repository "
         "(`python scripts/leaderboard.py`)."), "",
        "![perplexity](ppl.png)", "", "Commands (`commands.sh`):", "", "```", *commands, "```", "",
    ]
    (out / "report.md").write_text("\n".join(report))
    (out / "commands.sh").write_text("#!/usr/bin/env bash\nset -e\n" + "\n".join(commands) + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "lengths": lengths, "passkey_lengths": pk_lengths,
                                                  "headline": headline, "minutes": minutes}, indent=2))
    print("\n".join(table))
    print(f"\n{headline}")
    print(f"report: {out / 'report.md'} ({minutes:.1f} min)")
    return 0
