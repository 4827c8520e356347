"""Train ctxext's reference model: a small Llama (context 256) on the Python standard library's source.

    python scripts/train_reference.py --output ctxext/assets/reference --minutes 100 --threads 1
    python scripts/train_reference.py --output /tmp/ref --quick            # a tiny run for tests (seconds)

Resumable: a training checkpoint (model, optimizer, step, RNG-free data: every batch is a function of the seed and
the step) is written to ``--work-dir`` every ``--save-every`` steps and at the time limit; ``--resume`` continues.
At the end the model and tokenizer are saved as a standard HF checkpoint, evaluated (copy test, passkey grid
within 256 tokens, held-out perplexity at 64/128/256) and described in a model card (README.md).

Curriculum (why: a model trained on code alone never learns to copy, so passkey retrieval stays at 0):
  * copy blocks: random token sequences of 8-48 tokens, each repeated (loss on the repeats only);
  * passkey documents (ctxext.evals.passkey): code filler, a key line at a random depth, question, answer;
  * code blocks: held-in stdlib files, packed with EOS.
Copy blocks start at 40% of the batch and fall to 10%; passkey documents stay at 30%.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctxext.data import corpus
from ctxext.data.text import join_documents
from ctxext.data.tokenizer import SPECIALS, train_tokenizer
from ctxext.evals import passkey
from ctxext.evals.perplexity import perplexity
from ctxext.io.atomic import atomic_folder, atomic_write
from ctxext.train.schedule import lr_multiplier

SEQ_LEN = 256


def tokenize_stream(tokenizer, texts: list[str]) -> np.ndarray:
    return join_documents(tokenizer, texts).astype(np.int32)


def tokenize_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- batches: a pure function of (seed, step)


def copy_block(rng: random.Random, vocab: int, first_id: int, eos: int) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    while len(ids) < SEQ_LEN + 1:
        seq = [rng.randrange(first_id, vocab) for _ in range(rng.randint(8, 48))]
        repeats = rng.choice([2, 2, 3])
        ids += [eos] + seq * repeats
        mask += [0] * (1 + len(seq)) + [1] * (len(seq) * (repeats - 1))
    return ids[: SEQ_LEN + 1], mask[: SEQ_LEN + 1]


def code_block(rng: random.Random, stream: np.ndarray) -> tuple[list[int], list[int]]:
    start = rng.randrange(0, len(stream) - SEQ_LEN - 1)
    return stream[start : start + SEQ_LEN + 1].tolist(), [1] * (SEQ_LEN + 1)


def passkey_block(rng: random.Random, stream: np.ndarray, tokenizer, edge_depth_share: float = 0.0):
    length = rng.randint(48, SEQ_LEN - 12)
    offset = rng.randrange(0, len(stream) - 2 * SEQ_LEN)
    doc = passkey.training_document(
        tokenizer, stream[offset : offset + 2 * SEQ_LEN].tolist(), rng, length, edge_depth_share
    )
    doc = doc[: SEQ_LEN + 1]
    rest, _ = code_block(rng, stream)
    ids = (doc + [tokenizer.eos_token_id] + rest)[: SEQ_LEN + 1]
    return ids, [1] * (SEQ_LEN + 1)


def make_batch(
    seed: int,
    step: int,
    total_steps: int,
    batch_size: int,
    stream: np.ndarray,
    tokenizer,
    copy_share: float = 0.4,
    passkey_share: float = 0.3,
    edge_depth_share: float = 0.0,
):
    rng = random.Random(seed * 1_000_003 + step)
    progress = step / max(1, total_steps)
    p_copy = copy_share * (1 - 0.75 * min(1.0, progress / 0.5))  # falls to a quarter by mid-run
    p_passkey = passkey_share
    ids, masks = [], []
    for _ in range(batch_size):
        u = rng.random()
        if u < p_copy:
            block = copy_block(rng, len(tokenizer), len(SPECIALS), tokenizer.eos_token_id)
        elif u < p_copy + p_passkey:
            block = passkey_block(rng, stream, tokenizer, edge_depth_share)
        else:
            block = code_block(rng, stream)
        ids.append(block[0])
        masks.append(block[1])
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[torch.tensor(masks) == 0] = -100
    return ids[:, :-1], labels[:, 1:]


# ---------------------------------------------------------------- checks used as shipping gates


@torch.no_grad()
def copy_test(model, vocab: int, first_id: int, n: int = 32, trials: int = 16, seed: int = 0) -> dict:
    """Mean loss on the first and on the second copy of random ``n``-token sequences."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(first_id, vocab, (trials, n), generator=g)
    ids = torch.cat([seq, seq], dim=1)
    logits = model(ids).logits[:, :-1].float()
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return {"first_copy_loss": loss[:, : n - 1].mean().item(), "second_copy_loss": loss[:, n:].mean().item()}


def evaluate(model, tokenizer, held_out_docs, filler: list[int], trials: int, quick: bool) -> dict:
    model.eval()
    result = {"copy": copy_test(model, len(tokenizer), len(SPECIALS))}
    lengths = [64, 128, 256]
    result["perplexity"] = {
        str(L): perplexity(model, held_out_docs, L, max_documents=8 if quick else None, batch_size=8).to_dict()
        for L in lengths
    }
    result["passkey"] = passkey.passkey_accuracy(
        model, tokenizer, filler, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], trials, seed=1234
    )
    model.train()
    return result


def gates(result: dict) -> dict[str, bool]:
    ppl = result["perplexity"]
    acc = result["passkey"]["accuracy"]
    copy = result["copy"]
    return {
        "copy: second copy loss < 0.5 x first": copy["second_copy_loss"] < 0.5 * copy["first_copy_loss"],
        "passkey >= 95% at every depth within 256": all(a >= 0.95 for row in acc.values() for a in row.values()),
        "held-out ppl@256 < ppl@64": ppl["256"]["perplexity"] < ppl["64"]["perplexity"],
    }


# ---------------------------------------------------------------- main


def build_model(tokenizer, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 32,
        }
        if quick
        else {
            "hidden_size": 256,
            "intermediate_size": 640,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 64,
        }
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=SEQ_LEN,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    return peak * lr_multiplier(step, total, warmup=warmup, schedule="cosine", min_ratio=0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="where the final HF checkpoint + model card go")
    p.add_argument("--work-dir", default="runs/reference", help="training checkpoint and logs (for --resume)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use the cores actually free)")
    p.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this much training time")
    p.add_argument("--until-step", type=int, default=None, help="stop (resumably) at this step")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--trials", type=int, default=40, help="passkey trials per (length, depth) cell at the end")
    p.add_argument("--copy-share", type=float, default=0.4, help="share of copy blocks at the start (falls to 1/4)")
    p.add_argument("--passkey-share", type=float, default=0.3, help="share of passkey documents")
    p.add_argument(
        "--edge-depth-share",
        type=float,
        default=0.0,
        help="share of passkey documents with the key exactly at the start or the end",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from --work-dir; may change --steps and the shares (a new phase, recorded)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few files and steps (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.vocab_size, args.trials, args.eval_every = min(args.steps, 30), 512, 2, 10**9
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    train_files = corpus.stdlib_files("train")
    held_files = corpus.stdlib_files("held_out")
    if args.quick:
        train_files, held_files = train_files[:60], held_files[:20]
    tok_dir = work / "tokenizer"
    if args.resume and tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(corpus.read_texts(train_files), args.vocab_size)
        tokenizer.save_pretrained(tok_dir)
    stream = tokenize_stream(tokenizer, corpus.read_texts(train_files))
    held_docs = tokenize_docs(tokenizer, corpus.read_texts(held_files))
    held_filler = tokenize_stream(tokenizer, corpus.read_texts(held_files)).tolist()
    print(f"train: {len(train_files)} files, {len(stream):,} tokens; held-out: {len(held_files)} files", flush=True)

    model = build_model(tokenizer, args.quick)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, trained_seconds = 0, 0.0
    ckpt = work / "train_state.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, trained_seconds = int(state["step"]), float(state["trained_seconds"])
        print(f"resumed at step {step}", flush=True)

    def save_state():
        atomic_write(
            ckpt,
            lambda tmp: torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "trained_seconds": trained_seconds,
                },
                tmp,
            ),
        )

    phases_path = work / "phases.json"
    phases = json.loads(phases_path.read_text()) if args.resume and phases_path.is_file() else []
    phases.append({"from_step": step, "argv": sys.argv[1:] if argv is None else list(argv)})
    phases_path.write_text(json.dumps(phases, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log = (work / "metrics.jsonl").open("a")
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    session_start = time.perf_counter()
    while step < args.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        ids, labels = make_batch(
            args.seed,
            step,
            args.steps,
            args.batch_size,
            stream,
            tokenizer,
            args.copy_share,
            args.passkey_share,
            args.edge_depth_share,
        )
        logits = model(ids).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        trained_seconds += dt
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{ids.numel() / dt:,.0f}")
        record = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "tokens_per_s": ids.numel() / dt}
        if step % args.eval_every == 0:
            model.eval()
            record["copy"] = copy_test(model, len(tokenizer), len(SPECIALS))
            record["passkey@256"] = passkey.passkey_accuracy(
                model, tokenizer, held_filler, [256], [0.0, 0.5, 1.0], 8, seed=99, progress=False
            )["accuracy"]["256"]
            model.train()
            tqdm.write(json.dumps(record))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % args.save_every == 0:
            save_state()
        if args.until_step is not None and step >= args.until_step:
            save_state()
            print(f"stopped at step {step} (--until-step); continue with --resume", flush=True)
            return 3
        if args.minutes is not None and time.perf_counter() - session_start > 60 * args.minutes:
            save_state()
            print(f"time limit reached at step {step}; continue with --resume", flush=True)
            return 3
    bar.close()
    save_state()

    model.eval()
    result = evaluate(model, tokenizer, held_docs, held_filler, args.trials, args.quick)
    passed = gates(result)
    # ship only what passes: a failing model goes to the work folder as a candidate (resume to improve it)
    out = Path(args.output) if all(passed.values()) else work / "candidate"
    tokenizer.model_max_length = 1_000_000  # documents are tokenized whole; the context is in config.json
    with atomic_folder(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    summary = {
        "parameters": n_params,
        "steps": step,
        "tokens_seen": step * args.batch_size * SEQ_LEN,
        "training_minutes": round(trained_seconds / 60, 1),
        "hardware": f"CPU, {args.threads} torch thread(s), {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "train_files": len(train_files),
        "held_out_files": len(held_files),
        "train_tokens": len(stream),
        "args": {k: v for k, v in vars(args).items()},
        "phases": phases,
        "evaluation": result,
        "gates": passed,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(out, summary)
    print(
        json.dumps(
            {
                "gates": passed,
                "perplexity": {k: round(v["perplexity"], 2) for k, v in result["perplexity"].items()},
                "passkey": result["passkey"]["accuracy"],
                "copy": result["copy"],
            },
            indent=2,
        )
    )
    if not all(passed.values()):
        print(f"gates failed: the model was written to {out}, not to {args.output}; continue with --resume", flush=True)
    return 0 if all(passed.values()) else 1


def write_model_card(out: Path, s: dict) -> None:
    ev = s["evaluation"]
    ppl = ev["perplexity"]
    acc = ev["passkey"]["accuracy"]
    depths = ev["passkey"]["depths"]
    phase_lines = "\n".join(
        f"python scripts/train_reference.py {' '.join(ph['argv'])}  # from step {ph['from_step']}" for ph in s["phases"]
    )
    rows = "\n".join(f"| {L} | " + " | ".join(f"{acc[L][str(d)]:.0%}" for d in depths) + " |" for L in acc)
    data_row = (
        f"| data | Python {s['python']} standard library source, split by file (SHA-256 of the path): "
        f"{s['train_files']} train files ({s['train_tokens']:,} tokens), {s['held_out_files']} held-out files; "
        "plus synthetic copy blocks and passkey documents (see `scripts/train_reference.py`) |"
    )
    card = f"""# ctxext reference model

A small Llama-architecture causal LM trained by ctxext so that context-extension experiments have a real model
to stand on, offline. Trained context: **{SEQ_LEN} tokens**. Loads with stock transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path); tokenizer = AutoTokenizer.from_pretrained(path)
```

| | |
|---|---|
| parameters | {s["parameters"]:,} (4 layers, hidden 256, 4 heads x 64, tied embeddings, RoPE theta 10,000) |
| tokenizer | byte-level BPE, {s["args"]["vocab_size"]} tokens, digits as single tokens, trained on the train split |
{data_row}
| steps | {s["steps"]:,} x {s["args"]["batch_size"]} x {SEQ_LEN} = {s["tokens_seen"]:,} tokens |
| training time | {s["training_minutes"]} minutes, {s["hardware"]} |

Reproduce (each line one phase; later phases continue with `--resume`):

```
{phase_lines}
```

`--minutes N` stops a phase resumably; the batch of every step is a function of the seed and the step.

## Evaluation (held-out files only)

Held-out perplexity, non-overlapping windows (`ctxext.evals.perplexity`, stride = length):

| context | 64 | 128 | 256 |
|---|---|---|---|
| perplexity | {ppl["64"]["perplexity"]:.2f} | {ppl["128"]["perplexity"]:.2f} | {ppl["256"]["perplexity"]:.2f} |

Passkey retrieval within the window ({ev["passkey"]["trials"]} keys per cell, filler from held-out files, seed
{ev["passkey"]["seed"]}), exact match of the 5 digits:

| length \\ depth | {" | ".join(str(d) for d in depths)} |
|---|{"---|" * len(depths)}
{rows}

Copy test (random 32-token sequence shown twice): loss {ev["copy"]["first_copy_loss"]:.2f} on the first copy,
{ev["copy"]["second_copy_loss"]:.3f} on the second.

Gates: {", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in s["gates"].items())}.

All numbers above were produced by the training command at the end of training; they are re-measured by
`pytest tests/test_reference_model.py`.
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
