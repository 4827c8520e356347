"""Peak memory of long-input evaluation: ctxext's chunked scoring against ``model(x, labels=x)``.

    python benchmarks/eval_memory.py              # SmolLM2-135M shape, 8k/16k/32k -> docs/results/benchmarks/
    python benchmarks/eval_memory.py --lengths 512,1024 --layers 2 --output /tmp/bench      # seconds, a check

Model: a SmolLM2-135M-shaped Llama with random weights (vocab 49,152, hidden 576, 9 heads, 3 kv heads, tied
embeddings, 30 layers unless --layers), float32, SDPA, ``torch.no_grad()``, batch 1. Baseline = transformers'
own loss, ``model(input_ids=x, labels=x).loss`` (full ``[L, vocab]`` fp32 logits). ctxext =
``ctxext.evals.perplexity.window_nll`` (what ``ctxext eval ppl`` runs: decoder body once, LM head and
cross-entropy 1,024 positions at a time). Each (implementation, length) runs in its own process. Peak memory on
CPU: the peak resident set (VmHWM) of the scoring call alone: the peak is reset (``/proc/self/clear_refs``) after
the model is built and the RSS at that point subtracted; glibc's mmap threshold is fixed so that freed tensors
leave the resident set (as in finetune_step.py). On GPU: CUDA max allocated minus allocated before the call.
The two losses are printed so that equal numbers can be checked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
}
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(impl: str, seq_len: int, layers: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxext.evals.perplexity import window_nll

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=seq_len, **{**SHAPE, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LlamaForCausalLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    def score():
        with torch.no_grad():
            if impl == "baseline":
                return model(input_ids=ids, labels=ids).loss.item()
            return (window_nll(model, ids, ids[:, 1:]) / (seq_len - 1)).item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    loss = score()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _status_mb("VmHWM")) - before
    return {
        "impl": impl,
        "seq_len": seq_len,
        "layers": layers,
        "device": device.type,
        "peak_mb": round(peak, 1),
        "seconds": round(seconds, 1),
        "loss": loss,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,16384,32768")
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="docs/results/benchmarks")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.layers, args.threads)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for seq_len in lengths:
        for impl in ("ctxext", "baseline"):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--layers",
                    str(args.layers),
                    "--threads",
                    str(args.threads),
                    "--worker",
                    impl,
                    str(seq_len),
                ],
                check=False,
                capture_output=True,
                text=True,
                env=WORKER_ENV,
            )
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                rows.append({"impl": impl, "seq_len": seq_len, "error": tail})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"eval_memory_smollm2-135m{'' if args.layers == SHAPE['num_hidden_layers'] else f'-{args.layers}layers'}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    lines = [
        "# Long-input evaluation memory: ctxext eval ppl scoring vs model(x, labels=x)",
        "",
        (
            f"Command: `python benchmarks/eval_memory.py --lengths {args.lengths} --layers {args.layers}` "
            f"({time.strftime('%Y-%m-%d')}, {rows[0].get('device', '?')}, {args.threads} threads; SmolLM2-135M shape "
            f"with {args.layers} layers, vocab 49,152, float32, no_grad, batch 1; each run in its own process; "
            "peak = peak RSS of the scoring call minus RSS before it)."
        ),
        "",
        "| seq_len | model(x, labels=x) peak MB | ctxext peak MB | memory ratio | baseline s | ctxext s "
        "| loss (baseline / ctxext) |",
        "|---|---|---|---|---|---|---|",
    ]
    for L in lengths:
        b, c = by.get(("baseline", L), {}), by.get(("ctxext", L), {})
        if "peak_mb" in b and "peak_mb" in c:
            lines.append(
                f"| {L} | {b['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['peak_mb'] / b['peak_mb']:.2f}x | "
                f"{b['seconds']:.0f} | {c['seconds']:.0f} | {b['loss']:.5f} / {c['loss']:.5f} |"
            )
        else:
            lines.append(f"| {L} | {b.get('peak_mb', b.get('error'))} | {c.get('peak_mb', c.get('error'))} | | | | |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
