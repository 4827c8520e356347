"""Peak memory (and time) of one forward with Self-Extend attention against plain SDPA, as a ratio per length.

    python benchmarks/selfextend_memory.py          # 4k/8k/16k, writes docs/results/benchmarks/selfextend.md
    python benchmarks/selfextend_memory.py --lengths 1024 --output /tmp/bench   # seconds, for a check

Model: a Llama with SmolLM-135M's attention shape (hidden 576, 9 heads, 3 kv heads, head_dim 64) but 2 layers and
a 1,000-token vocabulary, random weights, fp32, no grad, no KV cache, ``logits_to_keep=1`` (so attention, not the
LM head, sets the peak). Plain = transformers' ``sdpa`` (causal, no mask); Self-Extend = ``ctxext.patch_model(model,
"selfextend", group_size=8, window=1024)`` (its default kernel: on CPU the split one, merged by log-sum-exp), the
same with the joint kernel forced (concatenated features, what other devices run), and the default kernel with
``group_bias=-1.5``. Every (implementation, length) runs in its own process. Peak memory on
CPU: peak resident set size (ru_maxrss) minus the resident size after the model is built, with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``, as benchmarks/finetune_step.py) so the resident set follows live
tensors. On a GPU (CUDA visible) the same script reports max allocated memory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = {
    "vocab_size": 1000,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
GROUP_SIZE, WINDOW, GROUP_BIAS = 8, 1024, -1.5
IMPLS = ("sdpa", "selfextend", "selfextend-joint", "selfextend-bias")
LABELS = {"selfextend": "Self-Extend", "selfextend-joint": "joint kernel", "selfextend-bias": "with group_bias"}
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(impl: str, seq_len: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ctxext

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, **SHAPE)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval().to(device)
    if impl == "selfextend-joint":
        import functools

        from ctxext.rope import selfextend as se

        se.selfextend_attention = functools.partial(se.selfextend_attention, kernel="joint")
    if impl.startswith("selfextend"):
        bias = GROUP_BIAS if impl == "selfextend-bias" else 0.0
        ctxext.patch_model(model, "selfextend", group_size=GROUP_SIZE, window=WINDOW, group_bias=bias)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq_len), device=device)
    base = rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {
        "impl": impl,
        "seq_len": seq_len,
        "peak_mb": round(peak, 1),
        "seconds": round(seconds, 2),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def main() -> int:
    from ctxext.evals.run import write_markdown_keeping_notes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs/results/benchmarks"))
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return 0
    rows = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for impl in IMPLS:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", impl, str(seq_len)],
                check=False,
                capture_output=True,
                text=True,
                env=WORKER_ENV,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selfextend.json").write_text(json.dumps(rows, indent=2) + "\n")
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    lines = [
        "# Self-Extend attention: peak memory against plain SDPA",
        "",
        "Command: `python benchmarks/selfextend_memory.py` (see its docstring for the model and the protocol).",
        (
            f"One forward, no grad, {SHAPE['num_hidden_layers']} layers of SmolLM-135M's attention shape "
            "(9 heads, 3 kv "
            f"heads, head_dim 64), fp32, Self-Extend G={GROUP_SIZE}, W={WINDOW}; device {rows[0]['device']}, torch "
            f"{rows[0]['torch']}. Peak = peak RSS minus RSS after the model is built (MALLOC_MMAP_THRESHOLD_=65536)."
        ),
        "",
        "| tokens | SDPA peak MB | "
        + " | ".join(f"{LABELS[i]} peak MB (ratio)" for i in IMPLS[1:])
        + " | SDPA s | "
        + " | ".join(f"{LABELS[i]} s (ratio)" for i in IMPLS[1:])
        + " |",
        "|---:|" + "---:|" * (2 * len(IMPLS)),
    ]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        plain, *others = (by[(impl, seq_len)] for impl in IMPLS)
        lines.append(
            f"| {seq_len} | {plain['peak_mb']:.0f} | "
            + " | ".join(f"{r['peak_mb']:.0f} ({r['peak_mb'] / plain['peak_mb']:.2f})" for r in others)
            + f" | {plain['seconds']:.1f} | "
            + " | ".join(f"{r['seconds']:.1f} ({r['seconds'] / plain['seconds']:.1f})" for r in others)
            + " |"
        )
    write_markdown_keeping_notes(out / "selfextend.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
