"""Peak memory and tokens/s of one LoRA training step: ctxext's loop against a plain baseline, side by side.

    python benchmarks/finetune_step.py           # SmolLM-135M shape, 1k/2k/4k/8k, writes docs/results/benchmarks/
    python benchmarks/finetune_step.py --shape smollm-135m-4layers --repeats 3   # the speed page (see below)
    python benchmarks/finetune_step.py --lengths 256,512 --shape tiny --output /tmp/bench   # seconds, for a check

Model: a SmolLM-135M-shaped Llama with random weights (vocab 49,152, 30 layers, hidden 576, 9 heads, 3 kv heads),
LoRA r=16 on q/k/v/o, SDPA, gradient checkpointing on in both. Baseline = what a user writes: transformers model
+ peft + the model's own loss (``labels=input_ids``). ctxext = ``ctxext.train.loss.ChunkedLMLoss`` (LM head and
cross-entropy 1,024 tokens at a time, gradients computed in the forward pass: ``ctxext.train.loss``).

Memory: every (implementation, length) runs one step in its own process. Peak memory: CUDA max allocated on GPU; on
CPU the peak resident set size (ru_maxrss) minus the resident size after the model is built, i.e. what the step
itself needs, with glibc's mmap threshold fixed (``ctxext.train.memory.MALLOC_ENV``) so that the resident set
follows live tensors.

Speed: one process per length builds the model once and runs both implementations' steps in turn, ``--repeats``
pairs in ABBA order (baseline first in even pairs, ctxext first in odd ones) after one warm-up step of each, so both
see the same machine state and drift cancels. Reported: the median step time of each, the ratio of the medians and
the range of the per-pair ratios. One timed step per process (the old method) gave 0.72-0.92x on one day and
0.92-1.11x on another, with a job beside it both times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ctxext.evals.run import source_commit
from ctxext.train.memory import MALLOC_ENV, peak_rss_bytes, rss_bytes

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("baseline", "ctxext")
SHAPES = {
    "smollm-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "body-only": {
        "vocab_size": 1000,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "smollm-135m-4layers": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "vocab-only": {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 4096,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def rss_mb() -> float:
    return rss_bytes() / 2**20


def build(seq_len: int, shape: str, checkpointing: bool = True):
    """The model (LoRA, SDPA, optional checkpointing), a token block and ``step(impl) -> loss`` for both
    implementations on that same model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxext.train.loss import ChunkedLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(seq_len, 2048), **SHAPES[shape])
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_module = ChunkedLMLoss(model, 1024)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    def step(impl: str, block: torch.Tensor = ids) -> float:
        if impl == "baseline":
            loss = model(input_ids=block, labels=block).loss
        else:
            loss = loss_module(block) / (block.shape[1] - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value

    return device, ids, step


def worker(impl: str, seq_len: int, shape: str, checkpointing: bool = True) -> dict:
    """One step of ``impl`` in a fresh process: its peak memory (and a single-step time, for reference)."""
    import torch

    device, _, step = build(seq_len, shape, checkpointing)
    if device.type == "cuda":  # warm-up (kernels, allocator); on CPU a first step would raise the peak RSS
        step(impl)
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()
    t0 = time.perf_counter()
    loss = step(impl)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_bytes() / 2**20 - base_rss
    return {
        "impl": impl,
        "seq_len": seq_len,
        "device": device.type,
        "peak_mb": round(peak, 1),
        "tokens_per_s": round(seq_len / seconds, 1),
        "step_seconds": round(seconds, 2),
        "loss": loss,
    }


def speed_worker(seq_len: int, shape: str, repeats: int, checkpointing: bool = True) -> dict:
    """Both implementations' steps on one model, interleaved ABBA after a warm-up step of each."""
    device, ids, step = build(seq_len, shape, checkpointing)
    for impl in IMPLS:  # thread pools, allocator, kernels: at a short length, the same code paths
        step(impl, ids[:, : min(seq_len, 512)])
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(repeats):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            t0 = time.perf_counter()
            step(impl)
            seconds[impl].append(time.perf_counter() - t0)
    b, c = statistics.median(seconds["baseline"]), statistics.median(seconds["ctxext"])
    pair_ratios = [bs / cs for bs, cs in zip(seconds["baseline"], seconds["ctxext"])]
    return {
        "seq_len": seq_len,
        "device": device.type,
        "repeats": repeats,
        "seconds": {k: [round(x, 6) for x in v] for k, v in seconds.items()},  # a tiny step is ~10 ms
        "baseline_tokens_per_s": round(seq_len / b, 1),
        "ctxext_tokens_per_s": round(seq_len / c, 1),
        "speed_ratio": round(b / c, 3),
        "pair_ratio_min": round(min(pair_ratios), 3),
        "pair_ratio_max": round(max(pair_ratios), 3),
    }


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], check=False, capture_output=True, text=True, env=MALLOC_ENV
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--shape", default="smollm-135m", choices=list(SHAPES))
    p.add_argument(
        "--repeats", type=int, default=3, help="ABBA step pairs per length for the speed columns (0: memory only)"
    )
    p.add_argument("--output", default="docs/results/benchmarks")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ_LEN"), help=argparse.SUPPRESS)
    p.add_argument("--speed-worker", metavar="SEQ_LEN", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off (diagnosis)")
    args = p.parse_args()
    checkpointing = not args.no_checkpointing
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.shape, checkpointing)))
        return 0
    if args.speed_worker:
        print(json.dumps(speed_worker(args.speed_worker, args.shape, args.repeats, checkpointing)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    common = ["--shape", args.shape, "--repeats", str(args.repeats)] + (
        ["--no-checkpointing"] if not checkpointing else []
    )
    memory, speed = {}, {}
    for seq_len in lengths:
        for impl in IMPLS:
            memory[impl, seq_len] = {
                "impl": impl,
                "seq_len": seq_len,
                **run_worker([*common, "--worker", impl, str(seq_len)]),
            }
            print(json.dumps(memory[impl, seq_len]), flush=True)
        if args.repeats:
            speed[seq_len] = {"seq_len": seq_len, **run_worker([*common, "--speed-worker", str(seq_len)])}
            print(json.dumps(speed[seq_len]), flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"finetune_step_{args.shape}" + ("_no-checkpointing" if not checkpointing else "")
    (out / f"{name}.json").write_text(
        json.dumps({"memory": list(memory.values()), "speed": list(speed.values())}, indent=2)
    )
    device = next(iter(memory.values())).get("device", "?")
    command = " ".join(["python benchmarks/finetune_step.py", *common, "--lengths", args.lengths])
    lines = [
        f"# One LoRA training step: ctxext vs baseline ({args.shape})",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {device}, commit {source_commit(REPO)}).",
        "",
        (
            "Memory: one step per implementation in its own process (CPU: peak RSS minus RSS after model build, "
            "MALLOC_MMAP_THRESHOLD_=65536 for both). Speed: one process per length, both implementations on the "
            f"same model, {args.repeats} step pairs in ABBA order after a warm-up step of each; median step time; "
            "pair ratios = baseline seconds / ctxext seconds of each pair."
        ),
        "",
        (
            "| seq_len | baseline peak MB | ctxext peak MB | memory ratio | baseline tok/s | ctxext tok/s "
            "| speed ratio "
            "| pair ratios |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for seq_len in lengths:
        b, c, v = memory["baseline", seq_len], memory["ctxext", seq_len], speed.get(seq_len, {})
        mem = (
            f"{b['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['peak_mb'] / b['peak_mb']:.2f}x"
            if "peak_mb" in b and "peak_mb" in c
            else f"{b.get('error', '')} | {c.get('error', '')} | "
        )
        spd = (
            f"{v['baseline_tokens_per_s']:.0f} | {v['ctxext_tokens_per_s']:.0f} | {v['speed_ratio']:.2f}x | "
            f"{v['pair_ratio_min']:.2f}-{v['pair_ratio_max']:.2f}"
            if "speed_ratio" in v
            else f"{v.get('error', '')} | | |"
        )
        lines.append(f"| {seq_len} | {mem} | {spd} |")
    if len(lengths) > 1 and all("peak_mb" in memory["ctxext", L] for L in lengths):
        growth = (
            (memory["ctxext", lengths[-1]]["peak_mb"] - memory["ctxext", lengths[0]]["peak_mb"])
            / ((lengths[-1] - lengths[0]) / 1000)
            / 1024
        )
        lines += ["", f"ctxext memory growth: {growth:.3f} GB per 1k tokens."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
