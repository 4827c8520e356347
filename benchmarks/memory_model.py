"""The memory model (``ctxext.train.memory``) against measured peaks: small Llama shapes on this CPU, LoRA and full.

    python benchmarks/memory_model.py            # every case below, writes docs/results/benchmarks/memory_model.*
    python benchmarks/memory_model.py --cases s1-lora-1024   # one case, for a check
    python benchmarks/memory_model.py --predictions   # 1B/8B/70B table: docs/results/benchmarks/memory_predictions.md

Each case runs in its own process: a random Llama of the case's shape, set up as ``ctxext.train`` sets it up
(``add_lora`` from a config, activation checkpointing, ``ChunkedLMLoss``, AdamW), three optimizer steps at the
case's length. Measured peak = the process's peak resident set (``ru_maxrss``) minus its resident set before the
model is built (after a warm-up run of the same code on a minute model), so it counts weights, gradients, optimizer
states, activations and the loss, as the model does. glibc's mmap threshold is fixed
(``ctxext.train.memory.MALLOC_ENV``) so that freed tensors leave the resident set, as they leave CUDA's allocated bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ctxext.train.memory import MALLOC_ENV, ModelShape, estimate, peak_rss_bytes, rss_bytes, setups_from_config

SHAPES = {  # small enough for seconds per step on one core, each stressing another term
    "s1": ModelShape(8192, 256, 688, 4, 4, 2, 64, True),  # balanced
    "s2": ModelShape(32000, 512, 1376, 2, 8, 4, 64, False),  # vocabulary-heavy, untied head
    "s3": ModelShape(4096, 128, 344, 12, 4, 2, 32, True),  # deep and narrow
}
FSDP2 = ["distributed.sharding=fsdp", "distributed.num_processes=2"]
# name -> (shape, seq_len, config overrides)
CASES = {
    "s1-lora-1024": ("s1", 1024, []),
    "s1-lora-4096": ("s1", 4096, []),
    "s1-lora+emb-4096": ("s1", 4096, ["lora.train_embeddings=true"]),
    "s1-full-1024": ("s1", 1024, ["tuning=full"]),
    "s1-full-4096": ("s1", 4096, ["tuning=full"]),
    "s1-lora-nockpt-2048": ("s1", 2048, ["optimization.activation_checkpointing=false"]),
    "s1-lora-bf16-1024": ("s1", 1024, ["model.dtype=bfloat16"]),
    "s2-lora-1024": ("s2", 1024, []),
    "s2-full-2048": ("s2", 2048, ["tuning=full"]),
    "s3-lora-2048": ("s3", 2048, []),
    "s3-lora-8192": ("s3", 8192, []),
    "s3-full-4096": ("s3", 4096, ["tuning=full"]),
    # FSDP2 over 2 gloo processes (fully_shard as ctxext.train.sharding applies it): the peak of the larger rank
    "s2-full-2048-fsdp2": ("s2", 2048, ["tuning=full", *FSDP2]),
    "s1-lora-4096-fsdp2": ("s1", 4096, FSDP2),
}
STEPS = 3


def case_config(seq_len: int, overrides: list[str]):
    from ctxext.train.config import load_config

    raw = {
        "patch": {"method": "pi", "factor": 1},
        "stages": [{"seq_len": seq_len, "steps": STEPS}],
        "lora": {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "optimization": {"tokens_per_step": seq_len, "micro_batch_size": 1, "loss_chunk_tokens": 1024},
    }
    return load_config(raw=raw, overrides=overrides)


def build(shape: ModelShape, cfg, seq_len: int):
    """The model, loss module and optimizer as ``ctxext.train`` sets them up, for a random Llama of ``shape``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxext.models import enable_activation_checkpointing
    from ctxext.train.loop import add_lora
    from ctxext.train.loss import ChunkedLMLoss
    from ctxext.train.sharding import fully_shard_model

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=seq_len,
        attn_implementation="sdpa",
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    model = LlamaForCausalLM(config).to(dtype)
    tuned = model.requires_grad_(True) if cfg.tuning == "full" else add_lora(model, cfg)
    if cfg.optimization.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    loss_module = ChunkedLMLoss(tuned, cfg.optimization.loss_chunk_tokens).train()
    if cfg.distributed.sharding == "fsdp":
        fully_shard_model(loss_module, "cpu", cfg.distributed.num_processes)
    opt = torch.optim.AdamW([p for p in loss_module.parameters() if p.requires_grad], lr=1e-4)
    return loss_module, opt


def train_steps(loss_module, opt, vocab_size: int, seq_len: int, steps: int) -> None:
    import torch

    ids = torch.randint(0, vocab_size, (1, seq_len))
    for _ in range(steps):
        (loss_module(ids) / (seq_len - 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def worker(name: str) -> dict:
    import gc
    import time

    import torch

    shape_name, seq_len, overrides = CASES[name]
    shape = SHAPES[shape_name]
    cfg = case_config(seq_len, overrides)
    torch.manual_seed(0)
    if cfg.distributed.sharding == "fsdp":  # started by torchrun: one process per rank
        torch.distributed.init_process_group("gloo")
    # warm-up: the same code path on a minute model, so that lazy imports, kernels and thread pools are resident
    # before the baseline is read
    tiny = ModelShape(256, 32, 64, 1, 2, 1, 16, shape.tie_word_embeddings)
    train_steps(*build(tiny, case_config(64, overrides), 64), tiny.vocab_size, 64, 2)
    gc.collect()
    base = rss_bytes()
    loss_module, opt = build(shape, cfg, seq_len)
    t0 = time.perf_counter()
    train_steps(loss_module, opt, shape.vocab_size, seq_len, STEPS)
    seconds = (time.perf_counter() - t0) / STEPS
    measured = peak_rss_bytes() - base
    predicted = estimate(shape, setups_from_config(cfg, device_type="cpu")[0])
    return {
        "case": name,
        "rank": int(os.environ.get("RANK", "0")),
        "shape": shape_name,
        "seq_len": seq_len,
        "tuning": cfg.tuning,
        "dtype": cfg.model.dtype,
        "checkpointing": cfg.optimization.activation_checkpointing,
        "overrides": overrides,
        "measured_mb": round(measured / 2**20, 1),
        "predicted_mb": round(predicted.peak / 2**20, 1),
        "ratio": round(predicted.peak / measured, 3),
        "phase": predicted.phase,
        "parts_mb": {k: round(v / 2**20, 1) for k, v in predicted.parts.items()},
        "step_seconds": round(seconds, 2),
    }


# the prediction table: (label, devices, sharding, cp_size)
LAYOUTS = [
    ("1 GPU", 1, "none", 1),
    ("8 GPUs, FSDP2", 8, "fsdp", 1),
    ("8 GPUs, FSDP2 + CP 4", 8, "fsdp", 4),
    ("64 GPUs, FSDP2 + CP 8", 64, "fsdp", 8),
]


def predictions(output: Path) -> list[str]:
    """Predicted peak GiB per GPU for the Llama-3-like shapes (bf16, checkpointing, LoRA r=16 on q/k/v/o or full,
    loss chunk 1024, one sequence per micro-batch); * = over 80 GiB with the 10% headroom."""
    from ctxext.train.memory import SHAPES, GiB, Setup

    lines = [
        "# Predicted peak memory per GPU (ctxext.train.memory)",
        "",
        (
            f"Command: `python benchmarks/memory_model.py --predictions` ({time.strftime('%Y-%m-%d')}). bf16 "
            "weights, activation checkpointing, one sequence per micro-batch, loss chunk 1,024 tokens, AdamW; LoRA = "
            "r 16 on q/k/v/o (adapters and their states fp32), full = every weight with bf16 gradients and states. "
            "GiB per GPU; **bold** = does not fit an 80 GiB GPU with 10% kept free."
        ),
        "",
        "| model | seq_len | tuning | " + " | ".join(label for label, *_ in LAYOUTS) + " |",
        "|---|---|---|" + "---|" * len(LAYOUTS),
    ]
    rows = []
    for name, shape in SHAPES.items():
        for seq_len in (32768, 131072):
            for tuning in ("lora", "full"):
                cells = []
                for label, devices, sharding, cp in LAYOUTS:
                    e = estimate(
                        shape, Setup(seq_len=seq_len, tuning=tuning, devices=devices, sharding=sharding, cp_size=cp)
                    )
                    gib = e.peak / GiB
                    cells.append(f"{gib:.1f}" if e.fits(80 * GiB) else f"**{gib:.1f}**")
                    rows.append(
                        {
                            "model": name,
                            "seq_len": seq_len,
                            "tuning": tuning,
                            "layout": label,
                            "peak_gib": round(gib, 2),
                            "phase": e.phase,
                            "parts_gib": {k: round(v / GiB, 2) for k, v in e.parts.items()},
                        }
                    )
                lines.append(f"| {name} | {seq_len // 1024}k | {tuning} | " + " | ".join(cells) + " |")
    output.mkdir(parents=True, exist_ok=True)
    (output / "memory_predictions.json").write_text(json.dumps(rows, indent=2))
    (output / "memory_predictions.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--output", default="docs/results/benchmarks")
    p.add_argument("--predictions", action="store_true", help="write the 1B/8B/70B prediction table instead")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.predictions:
        print("\n".join(predictions(Path(args.output))))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    rows = []
    for name in args.cases.split(","):
        processes = case_config(CASES[name][1], CASES[name][2]).distributed.num_processes or 1
        launcher = (
            [sys.executable]
            if processes == 1
            else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        )
        proc = subprocess.run(
            [*launcher, __file__, "--worker", name], check=False, capture_output=True, text=True, env=MALLOC_ENV
        )
        if proc.returncode != 0:
            rows.append({"case": name, "error": proc.stderr.strip().splitlines()[-1]})
        else:  # one line per process: the largest peak counts
            ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            rows.append(max(ranks, key=lambda r: r["measured_mb"]))
        print(json.dumps(rows[-1]), flush=True)
    done = [r for r in rows if "ratio" in r]
    lines = [
        "# Memory model against measured peaks (CPU, float32 unless noted)",
        "",
        (
            f"Command: `python benchmarks/memory_model.py --cases {args.cases}` ({time.strftime('%Y-%m-%d')}, "
            f"torch {__import__('torch').__version__}, one process per case, {STEPS} steps; measured = peak RSS "
            "minus RSS before the model is built, with MALLOC_MMAP_THRESHOLD_=65536)."
        ),
        "",
        "| case | shape | seq_len | tuning | predicted MB | measured MB | predicted / measured | peak phase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ratio" not in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | | |")
            continue
        tuning = (
            r["tuning"]
            + ("" if r["dtype"] == "float32" else f", {r['dtype']}")
            + (", FSDP2 x2" if "distributed.sharding=fsdp" in r["overrides"] else "")
            + ("" if r["checkpointing"] else ", no checkpointing")
            + (", embeddings" if "lora.train_embeddings=true" in r["overrides"] else "")
        )
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['seq_len']} | {tuning} | {r['predicted_mb']:.0f} | "
            f"{r['measured_mb']:.0f} | {r['ratio']:.2f} | {r['phase']} |"
        )
    if done:
        ratios = [r["ratio"] for r in done]
        lines += ["", f"Ratio range {min(ratios):.2f} - {max(ratios):.2f} over {len(done)} cases."]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_model.json").write_text(json.dumps(rows, indent=2))
    (out / "memory_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
