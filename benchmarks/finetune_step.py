"""Peak memory and tokens/s of one LoRA training step: ctxext's loop against a plain baseline, side by side.

    python benchmarks/finetune_step.py                      # SmolLM-135M shape, 1k/2k/4k/8k, writes docs/benchmarks/
    python benchmarks/finetune_step.py --lengths 256,512 --shape tiny --output /tmp/bench   # seconds, for a check

Model: a SmolLM-135M-shaped Llama with random weights (vocab 49,152, 30 layers, hidden 576, 9 heads, 3 kv heads),
LoRA r=16 on q/k/v/o, SDPA, gradient checkpointing on in both. Baseline = what a user writes: transformers model
+ peft + the model's own loss (``labels=input_ids``). ctxext = ``ctxext.loss.ChunkedLMLoss`` (LM head and
cross-entropy 1,024 tokens at a time, gradients computed in the forward pass: ``ctxext.loss``). Every (implementation, length) runs in its own process; each process times
one step (after a warm-up step on GPU). Peak memory: CUDA max allocated on GPU; on CPU the peak resident set size
(ru_maxrss) minus the resident size after the model is built, i.e. what the step itself needs, with glibc's mmap
threshold fixed (``ctxext.memory.MALLOC_ENV``) so that the resident set follows live tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ctxext.memory import MALLOC_ENV, peak_rss_bytes, rss_bytes

SHAPES = {
    "smollm-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    "body-only": {"vocab_size": 1000, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                      "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    "vocab-only": {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "tiny": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4,
                 "num_key_value_heads": 2, "tie_word_embeddings": True},
}


def rss_mb() -> float:
    return rss_bytes() / 2**20


def worker(impl: str, seq_len: int, shape: str, checkpointing: bool = True) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxext.loss import ChunkedLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(seq_len, 2048), **SHAPES[shape])
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_module = ChunkedLMLoss(model, 1024)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    def step():
        if impl == "baseline":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = loss_module(ids) / (seq_len - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":  # warm-up (kernels, allocator); on CPU the one timed step is enough
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()
    t0 = time.perf_counter()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_bytes() / 2**20 - base_rss
    return {"impl": impl, "seq_len": seq_len, "device": device.type, "peak_mb": round(peak, 1),
            "tokens_per_s": round(seq_len / seconds, 1), "step_seconds": round(seconds, 2), "loss": loss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--shape", default="smollm-135m", choices=list(SHAPES))
    p.add_argument("--output", default="docs/benchmarks")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ_LEN"), help=argparse.SUPPRESS)
    p.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off (diagnosis)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.shape, not args.no_checkpointing)))
        return 0
    rows = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for impl in ("baseline", "ctxext"):
            proc = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--worker", impl, str(seq_len)],
                                  check=False, capture_output=True, text=True, env=MALLOC_ENV)
            if proc.returncode != 0:
                rows.append({"impl": impl, "seq_len": seq_len, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"finetune_step_{args.shape}.json").write_text(json.dumps(rows, indent=2))
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    lines = [f"# One LoRA training step: ctxext vs baseline ({args.shape})", "",
             (f"Command: `python benchmarks/finetune_step.py --shape {args.shape} --lengths {args.lengths}` "
              f"({time.strftime('%Y-%m-%d')}, {rows[0].get('device', '?')}; each step in its own process; CPU peak = "
              "peak RSS minus RSS after model build, with MALLOC_MMAP_THRESHOLD_=65536 for both)."), "",
             "| seq_len | baseline peak MB | ctxext peak MB | memory ratio | baseline tok/s | ctxext tok/s | speed ratio |",
             "|---|---|---|---|---|---|---|"]
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        b, c = by.get(("baseline", seq_len), {}), by.get(("ctxext", seq_len), {})
        if "peak_mb" in b and "peak_mb" in c:
            lines.append(f"| {seq_len} | {b['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['peak_mb'] / b['peak_mb']:.2f}x | "
                         f"{b['tokens_per_s']:.0f} | {c['tokens_per_s']:.0f} | {c['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
        else:
            lines.append(f"| {seq_len} | {b.get('peak_mb', b.get('error'))} | {c.get('peak_mb', c.get('error'))} | | | | |")
    lengths = [int(x) for x in args.lengths.split(",")]
    if len(lengths) > 1 and all(("ctxext", L) in by and "peak_mb" in by[("ctxext", L)] for L in lengths):
        growth = (by[("ctxext", lengths[-1])]["peak_mb"] - by[("ctxext", lengths[0])]["peak_mb"]) / (
            (lengths[-1] - lengths[0]) / 1000) / 1024
        lines += ["", f"ctxext memory growth: {growth:.3f} GB per 1k tokens."]
    (out / f"finetune_step_{args.shape}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
