"""Self-Extend G x W sweep of passkey retrieval on one checkpoint, without fine-tuning: docs/results/SELFEXTEND.md.

    python scripts/selfextend_sweep.py --windows 16,32,64,96,128,160 --groups 8,12,16,24,32 \
        --lengths 2048 --trials 10 --output runs/selfextend/sweep.json
    python scripts/selfextend_sweep.py --plot runs/selfextend/sweep.json docs/results/selfextend_sweep.png
    python scripts/selfextend_sweep.py --groups 16 --windows 64 --biases=-1,-1.5,-2 --trials 20 --seed 1 \
        --batch-size 16 --output runs/selfextend/bias.json            # the grouped-logit bias (group_bias)

Loads the checkpoint once per setting, patches it in memory (``patch_model(model, "selfextend", group_size=G,
window=W, group_bias=B)``, the same as ``ctxext patch --method selfextend``) and scores the passkey grid with
``passkey_accuracy`` on the same filler stream and seed as ``ctxext eval passkey`` (same prompts for every
setting). A setting whose reach ``(L - W) * G + W`` is below ``max(lengths)`` is skipped (its largest relative
position would leave the trained context). Results are written after every setting; a rerun with the same
``--output`` skips the settings already there (resumable). Prints a markdown table with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ctxext.evals.retrieval import count_with_interval
from ctxext.io.atomic import atomic_write_text

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def key(g: int, w: int, b: float = 0.0) -> str:
    return f"G{g}W{w}" + (f"B{b:g}" if b else "")


def run(args) -> dict:
    import torch

    from ctxext import patch_model
    from ctxext.evals.passkey import passkey_accuracy
    from ctxext.evals.run import filler_stream, load_for_eval

    torch.set_num_threads(args.threads) if args.threads else None
    out = Path(args.output)
    data = json.loads(out.read_text()) if out.exists() else {}
    protocol = {
        "model": args.model,
        "filler": args.filler,
        "lengths": args.lengths,
        "depths": args.depths,
        "trials": args.trials,
        "seed": args.seed,
    }
    if data and data["protocol"] != {**data["protocol"], **protocol}:
        sys.exit(f"{out} holds another protocol ({data['protocol']}); use another --output")
    data.setdefault("protocol", {**protocol, "date": time.strftime("%Y-%m-%d")})
    data.setdefault("settings", {})
    model, tokenizer, _ = load_for_eval(args.model, device=args.device)  # once: each setting is patched and undone
    context = model.config.max_position_embeddings
    stream = filler_stream(tokenizer, args.filler, seed=args.seed)
    for w, g, b in ((w, g, b) for w in args.windows for g in args.groups for b in args.biases):
        name = key(g, w, b)
        if name in data["settings"]:
            continue
        reach = (context - w) * g + w
        if w >= context or reach < max(args.lengths):
            print(f"{name}: reach {reach} < {max(args.lengths)}, skipped", flush=True)
            continue
        t0 = time.time()
        with patch_model(model, "selfextend", group_size=g, window=w, group_bias=b):
            grid = passkey_accuracy(
                model,
                tokenizer,
                stream,
                args.lengths,
                args.depths,
                args.trials,
                seed=args.seed,
                batch_size=args.batch_size,
                progress=False,
            )
        data["settings"][name] = {
            "group_size": g,
            "window": w,
            "group_bias": b,
            "reach": reach,
            "accuracy": grid["accuracy"],
            "examples": [e for e in grid["examples"] if not e["correct"]],
            "seconds": round(time.time() - t0, 1),
        }
        atomic_write_text(out, json.dumps(data, indent=1))
        row = grid["accuracy"][str(max(args.lengths))]
        print(
            f"{name} reach {reach}: "
            + " ".join(f"{row[str(d)]:.0%}" for d in args.depths)
            + f"  ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return data


def table(data: dict) -> str:
    p = data["protocol"]
    trials, depths = p["trials"], p["depths"]
    biased = any(s.get("group_bias") for s in data["settings"].values())
    header = (
        f"| G | W | {'bias | ' if biased else ''}reach | length | {' | '.join(f'depth {d:g}' for d in depths)} | "
        "worst | all depths |"
    )
    lines = [header, "|---:|---:|" + ("---:|" if biased else "") + "---:|---:|" + "---:|" * (len(depths) + 2)]
    rows = []
    for s in data["settings"].values():
        for length, acc in s["accuracy"].items():
            counts = [round(acc[str(d)] * trials) for d in depths]
            rows.append((s["group_size"], s["window"], s.get("group_bias", 0.0), s["reach"], int(length), counts))
    for g, w, b, reach, length, counts in sorted(rows, key=lambda r: (r[4], -min(r[5]), -sum(r[5]))):
        cells = [count_with_interval(c, trials) for c in counts]
        lines.append(
            f"| {g} | {w} | {f'{b:g} | ' if biased else ''}{reach} | {length} | {' | '.join(cells)} | "
            f"{min(counts)}/{trials} | {count_with_interval(sum(counts), trials * len(depths))} |"
        )
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p = data["protocol"]
    length = str(max(p["lengths"]))
    settings = [s for s in data["settings"].values() if not s.get("group_bias")]  # the G x W grid of the paper's method
    gs = sorted({s["group_size"] for s in settings})
    ws = sorted({s["window"] for s in settings})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (label, f) in zip(axes, [("worst depth", min), ("mean over depths", lambda v: sum(v) / len(v))]):
        grid = np.full((len(ws), len(gs)), np.nan)
        for s in settings:
            grid[ws.index(s["window"]), gs.index(s["group_size"])] = f(list(s["accuracy"][length].values()))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i in range(len(ws)):
            for j in range(len(gs)):
                if not np.isnan(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.0%}",
                        ha="center",
                        va="center",
                        color="w" if grid[i, j] <= 0.6 else "k",
                        fontsize=9,
                    )
        ax.set_xticks(range(len(gs)), [str(g) for g in gs])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("group size G")
        ax.set_ylabel("neighbour window W")
        ax.set_title(f"passkey @ {length}, {label}")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"Self-Extend on {p['model']}, no fine-tuning ({p['trials']} keys per depth; blank: not run)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    ap.add_argument("--model", default="reference")
    ap.add_argument("--windows", type=ints, default=[16, 32, 64, 96, 128, 160])
    ap.add_argument("--groups", type=ints, default=[8, 12, 16, 24, 32])
    ap.add_argument(
        "--biases",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0],
        help="group_bias values (default 0: the paper's method)",
    )
    ap.add_argument("--lengths", type=ints, default=[2048])
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=DEPTHS)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filler", default="stdlib:held_out")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default="runs/selfextend/sweep.json")
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only plot an existing sweep")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an existing sweep")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), args.plot[1])
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    data = run(args)
    print(table(data))


if __name__ == "__main__":
    main()
