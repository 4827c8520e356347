"""Does a LoRA fine-tune of a real Gemma 3 merge into a checkpoint that stock transformers runs as trained?

    ctxext finetune configs/gemma3-270m-lora.yaml --output-dir runs/gemma3-270m-lora
    python scripts/gemma3_lora_check.py --run runs/gemma3-270m-lora --output docs/results/gemma3/lora_check.json

Three models, on the same ``--tokens`` held-out tokens (logits kept at every ``--every``-th position, float32, CPU):

* ``merged``: ``RUN/merged`` loaded by stock transformers in a fresh process that never imports ctxext (asserted);
* ``trained``: the base model as the config names it, patched in memory as the config says, with ``RUN/adapter``
  applied by peft: the model the fine-tune trained;
* ``base``: the unpatched, untuned base model: the control (merged must differ from it far more than from trained);
  ``patched``: the base patched, without the adapter (what the fine-tune started from).

Writes a JSON with the largest logit difference and top-1 agreement of merged against trained and against base,
the mean next-token loss (and perplexity) of each, and the rope parameters stock transformers read per layer type.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STOCK = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
ids, keep = torch.load(ids_file)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(ids, logits_to_keep=keep).logits[0]
assert "ctxext" not in sys.modules, "stock transformers imported ctxext"
cfg = AutoConfig.from_pretrained(folder)
rope = getattr(cfg.get_text_config(), "rope_parameters", None)
torch.save({"logits": logits, "rope_parameters": json.loads(json.dumps(rope, default=str))}, out_file)
"""


def logits_of(model, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, logits_to_keep=keep).logits[0].float()


def mean_nll(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> float:
    targets = ids[0, keep + 1]
    return torch.nn.functional.cross_entropy(logits, targets).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/gemma3-270m-lora", help="the fine-tune's output folder")
    ap.add_argument("--config", default="configs/gemma3-270m-lora.yaml")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens in the forward")
    ap.add_argument("--every", type=int, default=4, help="keep the logits of every N-th position")
    ap.add_argument("--output", default="docs/results/gemma3/lora_check.json")
    args = ap.parse_args(argv)

    from peft import PeftModel

    from ctxext.data.text import load_texts
    from ctxext.io.atomic import atomic_write_text
    from ctxext.io.checkpoint import load_model
    from ctxext.io.sources import check_source
    from ctxext.io.validate import load_tokenizer
    from ctxext.patch import patch_model
    from ctxext.train.config import load_config
    from ctxext.train.loop import stage_patch_params

    run = Path(args.run)
    cfg = load_config(args.config)
    merged = run / "merged"
    tokenizer = load_tokenizer(str(merged))
    text = next(t for t in load_texts("stdlib:held_out") if len(t) > 8 * args.tokens)
    ids = torch.tensor([tokenizer(text)["input_ids"][: args.tokens]])
    keep = torch.arange(0, args.tokens - 1, args.every)

    with tempfile.TemporaryDirectory() as tmp:
        torch.save((ids, keep), f"{tmp}/ids.pt")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STOCK, str(merged), f"{tmp}/ids.pt", f"{tmp}/out.pt"], check=True)
        stock = torch.load(f"{tmp}/out.pt")
        seconds_stock = time.perf_counter() - start

    model = load_model(check_source(cfg.model.path), dtype="float32").eval()
    base = logits_of(model, ids, keep)
    patch_model(model, cfg.patch.method, **stage_patch_params(cfg, len(cfg.stages) - 1))  # as the last stage trained
    patched = logits_of(model, ids, keep)
    trained = logits_of(PeftModel.from_pretrained(model, str(run / "adapter")).eval(), ids, keep)

    got = stock["logits"].float()
    report = {
        "run": str(run),
        "config": args.config,
        "positions": len(keep),
        "tokens": args.tokens,
        "merged_vs_trained": {
            "max_abs_logit_diff": (got - trained).abs().max().item(),
            "top1_agreement": (got.argmax(-1) == trained.argmax(-1)).float().mean().item(),
        },
        "merged_vs_base": {
            "max_abs_logit_diff": (got - base).abs().max().item(),
            "top1_agreement": (got.argmax(-1) == base.argmax(-1)).float().mean().item(),
        },
        "mean_nll": {
            name: mean_nll(x, ids, keep)
            for name, x in (("merged", got), ("trained", trained), ("patched", patched), ("base", base))
        },
        "stock_rope_parameters": stock["rope_parameters"],
        "seconds_stock_process": round(seconds_stock, 1),
        "command": " ".join(["python", "scripts/gemma3_lora_check.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
    }
    report["mean_nll"] = {k: round(v, 4) for k, v in report["mean_nll"].items()}
    report["perplexity"] = {k: round(math.exp(v), 3) for k, v in report["mean_nll"].items()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.output), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
