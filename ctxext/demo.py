"""``ctxext demo``: the main job on the embedded default model.

Until the shipped reference model exists (see the issues), the embedded default is a tiny Llama built from a
config with random weights, so this demo shows the mechanics, not quality: every method patches the model x
``factor``, writes a checkpoint, reloads it with ``from_pretrained`` and checks the logits are identical, and a
report (``report.md``) lists what each checkpoint needs to load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

DEMO_CHAINS = [
    ("pi", {}),
    ("ntk", {}),
    ("dynamic", {}),
    ("yarn", {}),
    ("llama3", {}),
    ("prope+pi", {"keep": 0.75}),
    ("xpos", {}),
    ("pi+xpos", {}),
]


def default_model():
    """The embedded default: a tiny random Llama (trained context 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def run_demo(output_dir: str = "ctxext-demo", factor: float = 8.0) -> int:
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    from .hub import describe_checkpoint, patch_checkpoint, save_checkpoint

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = save_checkpoint(default_model(), out / "base", force=True)
    tokens = torch.randint(0, 512, (1, int(256 * factor)), generator=torch.Generator().manual_seed(0))
    rows = []
    for spec, extra in tqdm(DEMO_CHAINS, desc="patch -> save -> reload", unit="method"):
        params = dict(extra)
        start = time.perf_counter()
        target_length = int(256 * factor)
        target = patch_checkpoint(base_dir, out / spec.replace("+", "_"), spec, force=True,
                                  target_length=target_length, **params)
        reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
        from .patch import patch_model

        in_memory = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        patch_model(in_memory, spec, target_length=target_length, **params)
        with torch.no_grad():
            diff = (reloaded(tokens).logits - in_memory(tokens).logits).abs().max().item()
        info = describe_checkpoint(target)
        rows.append({"chain": spec, "params": params, "rope_types": info["rope_types"],
                     "context": f"{info['original_context']} -> {info['extended_context']}",
                     "max_abs_logit_diff_reload": diff, "stock_load": info["stock_transformers_loads"],
                     "seconds": round(time.perf_counter() - start, 2), "path": str(target)})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["# ctxext demo", "", "Embedded default: tiny random Llama (context 256); mechanics only.", "",
             "| chain | rope_type in config.json | context | reload max abs logit diff | loads with |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chain']} | {', '.join(r['rope_types'].values())} | {r['context']} | "
                     f"{r['max_abs_logit_diff_reload']:.1e} | {r['stock_load'].split(':')[0]} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {out / 'report.md'}  (checkpoints in {out}/)")
    return 0 if all(r["max_abs_logit_diff_reload"] == 0.0 for r in rows) else 1
