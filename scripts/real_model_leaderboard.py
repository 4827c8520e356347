"""Training-free leaderboard on a real model: every method without fine-tuning, x2 and x4 -> docs/results/REAL_MODEL.md.

    python scripts/real_model_leaderboard.py                               # every cell of configs/sweeps/smollm2.yaml
    python scripts/real_model_leaderboard.py --device cuda                 # the same cells on a GPU
    python scripts/real_model_leaderboard.py --factors 2 --measure ppl     # x2 perplexity only
    python scripts/real_model_leaderboard.py --context 1024 --lengths 1024,2048 --methods baseline,yarn \\
        --trials 2 --cells /tmp/rm/cells --output /tmp/rm                  # the pipeline in minutes (pretend context)
    python scripts/real_model_leaderboard.py --report-only                 # rewrite the page from the cells present

The checkpoint is loaded once; each row of the sweep (a method chain and its parameters) is patched in memory at
each factor (target = factor x trained context) and removed again (``ctxext.patch.patch_model``), so nothing is
written but results. A row may instead name saved checkpoints, one per factor (``{checkpoint: {2: DIR, 4: DIR}}``:
a ``ctxext search`` result, say), measured as saved. Measurements, each a cell (``ctxext.evals.cells``: one JSON
file, written atomically when the cell is done, reused by later runs while its spec is unchanged, so a run can stop
anywhere and go on elsewhere):

* ``ppl-<text>@L``: one forward over the first L = factor x context tokens of the longest documents of each text;
  the next-token NLL of every position (LM head in chunks: no [L, vocab] logits), summed per position bucket; the
  report gives perplexity inside the trained context and beyond it, the plot every bucket;
* ``<task>@L``: passkey (``ctxext.evals.passkey``) or a RULER-style task (``ctxext.evals.retrieval``) at each
  prompt length up to the row's extended context, N prompts per depth, exact match, Wilson 95% interval pooled
  over depths;
* ``ppl-<text>@L`` for each L of ``perplexity.inside`` (at most the trained context): perplexity of the first L
  tokens, what a patch costs where the model was trained (for a long-context model whose factor x context a CPU
  cannot afford, set ``perplexity.at_target: false`` and measure only these);
* ``needles@L``: named-key retrieval answered from one prefill per prompt (``ctxext.evals.shared_prefill``), the
  retrieval a CPU affords at 8k-16k tokens; one cell file per prompt as well, so a stopped run loses one prompt.

The unextended row (``method: null``) is the same model at every factor: its cells are shared. The page lists
every planned cell of the whole config (``--methods``/``--factors``/``--measure`` only choose what this run
measures) and marks the absent ones "not measured". Each section of the config names its dtype (SmolLM2's:
perplexity in float32 on every device, so CPU and GPU cells agree to kernel rounding; retrieval, which only a GPU
runs at these lengths, in bfloat16, the model's training dtype); ``--dtype`` sets both. A cell's dtype is part of
its name and spec, so cells of different dtypes are never mixed. Hand-written text below the line
``<!-- notes -->`` of an existing page is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/sweeps/smollm2.yaml"
NOT_MEASURED = "not measured"


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"a training-free sweep (default {DEFAULT_CONFIG})")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--context", type=int, help="pretend trained context (<= the checkpoint's), for quick runs")
    p.add_argument("--methods", type=csv(str), help="measure only these rows (comma-separated)")
    p.add_argument("--factors", type=csv(float), help="measure only these factors")
    p.add_argument("--measure", type=csv(str), help="measure only these: ppl, needles, task names")
    p.add_argument("--lengths", type=csv(int), help="retrieval and needles prompt lengths (replace the config's)")
    p.add_argument("--prompts", type=int, help="needles prompts per length for every row (replaces the config's)")
    p.add_argument("--trials", type=int, help="prompts per depth for every task (replaces the config's)")
    p.add_argument("--depths", type=csv(float), help="retrieval depths (replaces the config's)")
    p.add_argument("--documents", type=int, help="documents per perplexity text (replaces the config's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype for every cell (default: each config section's)",
    )
    p.add_argument("--batch-size", type=int, help="retrieval prompts per generate call (default 8 on GPU, 1 on CPU)")
    p.add_argument(
        "--cells",
        default="docs/results/real_model",
        help="cell folder (files <dtype>/context<N>/<model>/<measure>@<length>.json)",
    )
    p.add_argument("--output", default="docs/results", help="folder of REAL_MODEL.md and real_model.png")
    p.add_argument(
        "--stop-after", type=float, metavar="SECONDS", help="start no new cell after this many seconds of the run"
    )
    p.add_argument("--report-only", action="store_true", help="measure nothing; rewrite the page from the cells")
    return p, p.parse_args(argv)


# ---------------------------------------------------------------- the plan: every cell of the config


def select_documents(tokenizer, source: str, count: int, length: int) -> list[dict]:
    """The ``count`` longest documents of ``source`` (by characters) with at least ``length`` tokens, cut to
    ``length`` tokens; only as many as needed are tokenized."""
    from ctxext.data.text import load_texts
    from ctxext.errors import DataError

    chosen = []
    for text in sorted(load_texts(source), key=len, reverse=True):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= length:
            chosen.append({"name": document_name(source, text), "tokens": len(ids), "ids": ids[:length]})
        if len(chosen) == count or len(text) < length:  # a token holds at least one character
            break
    if len(chosen) < count:
        raise DataError(
            f"{source}: {len(chosen)} documents have {length} tokens, {count} needed; lower "
            "perplexity.documents or give a text with longer documents"
        )
    return chosen


def document_name(source: str, text: str) -> str:
    """The file a document came from (relative to its stdlib, package or folder root); else its first line."""
    from ctxext.data import corpus

    kind, _, part = source.partition(":")
    if kind == "stdlib":
        root, files = corpus.stdlib_root(), corpus.stdlib_files(part)
    elif kind == "package":
        files = corpus.package_files(part)
        root = files[0].parent
    elif Path(source).is_dir():
        root, files = Path(source), sorted(p for p in Path(source).rglob("*") if p.is_file())
    else:
        root, files = Path(source).parent, [Path(source)]
    size = len(text.encode())
    for path in files:
        if path.stat().st_size == size and path.read_text(encoding="utf-8", errors="replace") == text:
            return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return text.splitlines()[0][:60] if text else "(empty)"


def digest(ids) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def make_plan(sweep, args, context: int, checkpoint_context: int, tokenizer) -> tuple[list[dict], dict, dict]:
    """Every cell of the config (``name``, ``row``, ``factors``, ``measure``, ``length``, ``spec``), the perplexity
    texts and the retrieval filler streams. A spec holds the sha256 of the tokens it scores or cuts prompts from,
    so a cell measured on other text (another Python's standard library, say) is never taken for this one."""
    from ctxext.evals.run import filler_stream

    retrieval, needles, plan = sweep.retrieval, sweep.needles, sweep.perplexity
    lengths = (args.lengths or retrieval.lengths) if retrieval else []
    depths = (args.depths or retrieval.depths) if retrieval else []
    trials = {task: args.trials or n for task, n in retrieval.trials.items()} if retrieval else {}
    longest = round(max(sweep.factors) * context) if plan.at_target else max(plan.inside, default=0)
    texts = {}
    for name, source in plan.texts.items():
        docs = select_documents(tokenizer, source, args.documents or plan.documents, longest)
        texts[name] = {"source": source, "documents": docs, "sha256": digest([d["ids"] for d in docs])}
    streams: dict[tuple, list[int]] = {}
    for section in (retrieval, needles):
        if section is not None and (section.filler, section.seed) not in streams:
            streams[(section.filler, section.seed)] = filler_stream(tokenizer, section.filler, seed=section.seed)
    common = {"model": args.model or sweep.model, "checkpoint_context": checkpoint_context, "context": context}
    cells = {}
    for row in sweep.methods:
        for factor in filter(lambda f: sweep.has_factor(row, f), sweep.factors):
            chain, params, checkpoint = sweep.row(row, factor)
            target = round(factor * context)
            extended = chain is not None or checkpoint is not None
            model_key = f"{row}-x{factor:g}" if extended else row
            model_spec = {**common, "chain": chain, "params": params, "target": target if extended else None}
            if checkpoint is not None:  # the rope it was saved with: a re-searched checkpoint is measured again
                model_spec |= {"checkpoint": checkpoint, "checkpoint_rope": saved_rope(checkpoint)}
            ppl_lengths = [target] * plan.at_target + [L for L in plan.inside if L < target]
            measures = [
                (
                    f"ppl-{name}",
                    "ppl",
                    L,
                    {
                        "dtype": args.dtype or plan.dtype,
                        "text": t["source"],
                        "text_sha256": t["sha256"],
                        "documents": [d["name"] for d in t["documents"]],
                    },
                )
                for name, t in texts.items()
                for L in ppl_lengths
            ]
            if retrieval is not None:
                filler = {
                    "dtype": args.dtype or retrieval.dtype,
                    "filler": retrieval.filler,
                    "filler_sha256": digest(streams[(retrieval.filler, retrieval.seed)]),
                    "seed": retrieval.seed,
                }
                measures += [
                    (task, task, L, {**filler, "depths": depths, "trials": n})
                    for task, n in trials.items()
                    for L in lengths
                    if L <= target
                ]
            # a cached prefix is exact only for frequencies that do not follow the forward's length
            if needles is not None and "dynamic" not in (chain or "").split("+"):
                spec = {
                    "dtype": args.dtype or needles.dtype,
                    "filler": needles.filler,
                    "filler_sha256": digest(streams[(needles.filler, needles.seed)]),
                    "seed": needles.seed,
                    "bands": [list(b) for b in needles.bands],
                    "per_band": needles.per_band,
                    "prompts": args.prompts or needles.prompts_by_row.get(row, needles.prompts),
                }
                reach = target if extended else context  # the unextended model: its own context (the control)
                measures += [("needles", "needles", L, spec) for L in args.lengths or needles.lengths if L <= reach]
            for measure, kind, length, extra in measures:
                name = f"{extra['dtype']}/context{context}/{model_key}/{measure}@{length}"
                cell = cells.setdefault(
                    name,
                    {
                        "name": name,
                        "row": row,
                        "chain": chain,
                        "params": params,
                        "checkpoint": checkpoint,
                        "target": model_spec["target"],
                        "measure": measure,
                        "kind": kind,
                        "length": length,
                        "inside": kind == "ppl" and length <= context,
                        "dtype": extra["dtype"],
                        "factors": [],
                        "spec": {**model_spec, "measure": measure, "length": length, **extra},
                    },
                )
                cell["factors"].append(factor)
    return list(cells.values()), texts, streams


def stored_record(root: Path, cell: dict) -> dict | None:
    """The cell's stored record for the page. A checkpoint row whose folder is gone (a fine-tune's run folder on
    another machine) cannot have its saved rope checked: its cells are reported with the rope they were measured
    with (in their spec); a run that measures still needs the folder."""
    from ctxext.evals.cells import cell_path, load_cell

    record = load_cell(root, cell["name"], cell["spec"])
    if record is not None or cell["checkpoint"] is None or cell["spec"]["checkpoint_rope"] is not None:
        return record
    try:
        measured_with = json.loads(cell_path(root, cell["name"]).read_text())["spec"]["checkpoint_rope"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return load_cell(root, cell["name"], {**cell["spec"], "checkpoint_rope": measured_with})


def saved_rope(checkpoint: str) -> dict | None:
    """The rope parameters in a checkpoint row's config.json (None while the folder is missing)."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("rope_parameters") or config.get("rope_scaling")


# ---------------------------------------------------------------- measuring one cell


def measure_perplexity(model, documents: list[dict], length: int, context: int, bucket: int) -> dict:
    """Perplexity by target position over the first ``length`` tokens of each document (one forward each)."""
    import torch

    from ctxext.evals.perplexity import position_nll

    device = next(model.parameters()).device
    nll = sum(
        position_nll(model, torch.tensor([d["ids"][:length]], device=device))[0].double().cpu() for d in documents
    )  # [length - 1]: entry t scores the token at position t + 1
    positions = torch.arange(1, length)

    def span(lo: int, hi: int) -> dict:
        mask = (positions >= lo) & (positions < hi)
        total, count = float(nll[mask].sum()), int(mask.sum()) * len(documents)
        return {
            "start": lo,
            "end": hi,
            "nll_sum": total,
            "tokens": count,
            "perplexity": float(torch.tensor(total / count).exp()) if count else None,
        }

    return {
        "inside": span(0, context),
        "beyond": span(context, length),
        "all": span(0, length),
        "buckets": [span(lo, min(lo + bucket, length)) for lo in range(0, length, bucket)],
        "documents": [{"name": d["name"], "tokens": d["tokens"]} for d in documents],
    }


def measure_retrieval(
    model,
    tokenizer,
    stream: list[int],
    task: str,
    length: int,
    depths: list[float],
    trials: int,
    seed: int,
    batch_size: int,
) -> dict:
    """Accuracy per depth and pooled, with the Wilson 95% interval of the pooled count."""
    from ctxext.evals.passkey import passkey_accuracy
    from ctxext.evals.retrieval import task_accuracy, wilson

    if task == "passkey":
        grid = passkey_accuracy(model, tokenizer, stream, [length], depths, trials, seed=seed, batch_size=batch_size)
    else:
        grid = task_accuracy(model, tokenizer, stream, task, [length], depths, trials, seed=seed, batch_size=batch_size)
    correct = {d: round(a * trials) for d, a in grid["accuracy"][str(length)].items()}
    total, n = sum(correct.values()), trials * len(depths)
    return {
        "correct_per_depth": correct,
        "trials_per_depth": trials,
        "correct": total,
        "n": n,
        "accuracy": total / n,
        "wilson95": [round(x, 4) for x in wilson(total, n)],
        "examples": grid["examples"][:6],
    }


def measure_needles(model, tokenizer, stream: list[int], cell: dict, root: Path, where: str) -> dict:
    """Named-key retrieval (``ctxext.evals.shared_prefill``), one prefill per prompt; each prompt is its own cell
    file (``<cell>.prompts/p<i>``), so a stopped run loses at most the prompt in progress. Prompt ``i`` is drawn
    from seed ``<seed>-<i>``: the same prompts for every model, whatever was measured before, and its file does not
    depend on how many prompts the cell asks for (raising ``prompts`` measures only the new ones)."""
    from ctxext.evals.cells import load_cell, save_cell
    from ctxext.evals.retrieval import wilson
    from ctxext.evals.shared_prefill import band_label, shared_prefill_accuracy

    spec, length = cell["spec"], cell["length"]
    bands = [tuple(b) for b in spec["bands"]]
    labels = [band_label(b) for b in bands]
    totals = {lab: {"correct": 0, "needles": 0, "swapped": 0, "prefill_s": 0.0, "answer_s": 0.0} for lab in labels}
    examples = []
    for i in range(spec["prompts"]):
        name = f"{cell['name']}.prompts/p{i}"
        prompt_spec = {**{k: v for k, v in spec.items() if k != "prompts"}, "prompt": i}  # more prompts reuse these
        record = load_cell(root, name, prompt_spec)
        if record is None:
            t0, cpu0 = time.perf_counter(), time.process_time()
            grid = shared_prefill_accuracy(
                model, tokenizer, stream, [length], bands, 1, per_band=spec["per_band"], seed=f"{spec['seed']}-{i}"
            )
            result = {"cells": grid["cells"][str(length)], "examples": grid["examples"]}
            record = save_cell(
                root,
                name,
                prompt_spec,
                result,
                seconds=time.perf_counter() - t0,
                device=where,
                cpu_seconds=time.process_time() - cpu0,
            )
            done = sum(c["correct"] for c in result["cells"].values())
            print(f"  {name}: {done}/{sum(c['needles'] for c in result['cells'].values())}", flush=True)
        for lab, c in record["result"]["cells"].items():
            for key in totals[lab]:
                totals[lab][key] += c[key]
        examples += [e for e in record["result"]["examples"] if not e["correct"]]
    correct, n = sum(t["correct"] for t in totals.values()), sum(t["needles"] for t in totals.values())
    for t in totals.values():
        t["accuracy"] = t["correct"] / t["needles"]
        t["wilson95"] = [round(x, 4) for x in wilson(t["correct"], t["needles"])]
        t["prefill_s"], t["answer_s"] = round(t["prefill_s"], 3), round(t["answer_s"], 3)
    return {
        "bands": totals,
        "correct": correct,
        "n": n,
        "accuracy": correct / n,
        "wilson95": [round(x, 4) for x in wilson(correct, n)],
        "needles_per_prompt": spec["per_band"] * len(bands),
        "examples": examples[:6],
    }


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def check_rows(source: str, context: int, groups: dict[tuple, list[dict]]) -> None:
    """Plan every patch from the config alone and find every checkpoint row's folder, so a bad row fails before
    the model loads."""
    from transformers import AutoConfig

    from ctxext.errors import CheckpointError, MethodError
    from ctxext.io.sources import check_source
    from ctxext.patch.model import plan_patch

    config = AutoConfig.from_pretrained(source)
    config.max_position_embeddings = context
    for (_, row, target, checkpoint), group in groups.items():
        if checkpoint is not None:
            record = getattr(AutoConfig.from_pretrained(check_source(checkpoint)), "ctxext", None) or {}
            if record.get("original_context", context) != context:
                raise CheckpointError(
                    f"row {row}: {checkpoint} was extended from context {record['original_context']}, not {context}"
                )
        elif group[0]["chain"]:
            try:
                plan_patch(config, group[0]["chain"], target_length=target, **group[0]["params"])
            except MethodError as err:
                raise MethodError(f"row {row} at target {target}: {err}") from None


def run_cells(
    cells: list[dict],
    *,
    source: str,
    sweep,
    args,
    context: int,
    tokenizer,
    texts: dict,
    streams: dict,
    root: Path,
    deadline: float | None,
) -> None:
    """Measure every cell of ``cells`` that has no stored record with its spec, one model patch per (row, factor)."""
    import torch

    from ctxext.evals.cells import load_cell, save_cell
    from ctxext.evals.run import pick_device
    from ctxext.io.checkpoint import load_model
    from ctxext.io.sources import check_source
    from ctxext.patch.model import patch_model

    todo = [c for c in cells if load_cell(root, c["name"], c["spec"]) is None]
    print(
        f"{len(cells) - len(todo)} of {len(cells)} selected cells already measured; {len(todo)} to measure", flush=True
    )
    if not todo:
        return
    groups: dict[tuple, list[dict]] = {}
    # float32 first (the checkpoint's own dtype), and within a dtype the rows patched in memory before the saved ones
    for c in sorted(todo, key=lambda c: (c["dtype"] != "float32", c["checkpoint"] is not None)):
        groups.setdefault((c["dtype"], c["row"], c["target"], c["checkpoint"]), []).append(c)
    check_rows(source, context, groups)
    device = pick_device(args.device)
    batch_size = args.batch_size or (8 if device.type == "cuda" else 1)
    where = describe_device(device)
    bucket = max(1, context // sweep.perplexity.buckets_per_context)
    model, loaded = None, None
    for (dtype, _row, target, checkpoint), group in groups.items():
        if loaded != (dtype, checkpoint):
            del model  # one model in memory: a fresh load per dtype (a cast would round the rotary buffers too)
            model = load_model(check_source(checkpoint or source), dtype=dtype).to(device)
            if checkpoint is None:
                model.config.max_position_embeddings = context  # the checkpoint's, unless --context pretends
            loaded = (dtype, checkpoint)
        chain, params = group[0]["chain"], group[0]["params"]
        patched = patch_model(model, chain, target_length=target, **params) if chain else contextlib.nullcontext()
        with patched:
            for c in group:
                if deadline is not None and time.perf_counter() > deadline:
                    print(f"--stop-after {args.stop_after:g} s reached; the remaining cells wait for the next run")
                    return
                spec = c["spec"]
                if load_cell(root, c["name"], spec) is not None:  # another run, started meanwhile, measured it
                    print(f"{c['name']}: measured meanwhile by another run; kept")
                    continue
                t0, cpu0 = time.perf_counter(), time.process_time()
                if c["kind"] == "ppl":
                    text = texts[c["measure"].removeprefix("ppl-")]
                    result = measure_perplexity(model, text["documents"], c["length"], context, bucket)
                elif c["kind"] == "needles":
                    stream = streams[(spec["filler"], spec["seed"])]
                    result = measure_needles(model, tokenizer, stream, c, root, where)
                else:
                    result = measure_retrieval(
                        model,
                        tokenizer,
                        streams[(spec["filler"], spec["seed"])],
                        c["kind"],
                        c["length"],
                        spec["depths"],
                        spec["trials"],
                        spec["seed"],
                        batch_size,
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                record = save_cell(
                    root,
                    c["name"],
                    spec,
                    result,
                    seconds=time.perf_counter() - t0,
                    device=where,
                    cpu_seconds=time.process_time() - cpu0,
                )
                summary = (
                    {k: round(result[k]["perplexity"], 3) for k in ("inside", "beyond") if result[k]["tokens"]}
                    if c["kind"] == "ppl"
                    else f"{result['correct']}/{result['n']}"
                )
                print(
                    f"{c['name']}: {summary} ({record['seconds']} s, CPU time {record['cpu_seconds']} s, {where})",
                    flush=True,
                )


# ---------------------------------------------------------------- the page


def fmt_ppl(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def cell_text(cell: dict, record: dict | None) -> tuple[str, str]:
    """(result, seconds) as the tables show them."""
    if record is None:
        return NOT_MEASURED, "-"
    r = record["result"]
    if cell["inside"]:  # perplexity of the first L tokens, L inside the trained context
        text = fmt_ppl(r["all"]["perplexity"])
    elif cell["kind"] == "ppl":
        text = f"{fmt_ppl(r['inside']['perplexity'])} / {fmt_ppl(r['beyond']['perplexity'])}"
    else:
        lo, hi = r["wilson95"]
        text = f"{r['correct']}/{r['n']} [{lo:.2f}, {hi:.2f}]"
    cpu = record.get("cpu_seconds") if record["device"].startswith("cpu") else None
    return text, f"{record['seconds']:.0f}" + (f" (CPU {cpu:.0f})" if cpu is not None else "")


def needles_by_band(cells: list[dict], records: dict, rows: list[str], bands: list[str]) -> list[str]:
    """The named-key table: correct / needles [Wilson 95%] per depth band, a row per (method, factor, length)."""
    lines = [
        "## Named-key retrieval by depth band",
        "",
        "| method | length | " + " | ".join(f"depth {b}" for b in bands) + " | seconds |",
        "|---|---|" + "---|" * (len(bands) + 1),
    ]
    for row in rows:
        for c in sorted((c for c in cells if c["row"] == row and c["kind"] == "needles"), key=lambda c: c["length"]):
            record = records.get(c["name"])
            label = row if c["target"] is None else f"{row} x{c['target'] / c['spec']['context']:g}"
            if record is None:
                lines.append(f"| {label} | {c['length']:,} | " + " | ".join([NOT_MEASURED] * len(bands)) + " | - |")
                continue
            per = record["result"]["bands"]
            text = [
                f"{per[b]['correct']}/{per[b]['needles']} [{per[b]['wilson95'][0]:.2f}, {per[b]['wilson95'][1]:.2f}]"
                for b in bands
            ]
            lines.append(f"| {label} | {c['length']:,} | " + " | ".join(text) + f" | {record['seconds']:.0f} |")
    return [*lines, ""]


def write_page(
    cells: list[dict],
    records: dict[str, dict],
    texts: dict,
    sweep,
    args,
    context: int,
    checkpoint_context: int,
    out: Path,
) -> Path:
    from ctxext.evals.plots import plot_by_position_and_length
    from ctxext.evals.run import write_markdown_keeping_notes

    rows = list(dict.fromkeys(c["row"] for c in cells))
    dtypes = {
        kind: "/".join(sorted({c["dtype"] for c in cells if (c["kind"] == "ppl") == (kind == "perplexity")}))
        for kind in ("perplexity", "retrieval")
    }
    pretend = "" if context == checkpoint_context else f" (pretended: the checkpoint's is {checkpoint_context:,})"
    done = [c for c in cells if c["name"] in records]
    intro = (
        f"Config: `{args.config}`. Model `{args.model or sweep.model}`, trained context {context:,}{pretend}; "
        f"each method patched in memory at factors {', '.join(f'x{f:g}' for f in sweep.factors)} (target = factor x "
        "context) without fine-tuning; rows of saved checkpoints (a search result, a fine-tuned model) are measured "
        "as saved; model dtype "
        f"{dtypes['perplexity']} for perplexity, {dtypes['retrieval'] or 'none'} for retrieval. "
        f"{len(done)} of {len(cells)} cells measured (page written {time.strftime('%Y-%m-%d')}); "
        f'"{NOT_MEASURED}" marks the others; `python scripts/real_model_leaderboard.py --config {args.config}` '
        "measures them (add `--device cuda` on a GPU) and rewrites this page."
    )
    lines = [f"# {args.model or sweep.model} extended by every method", "", intro, ""]
    plan = sweep.perplexity
    for name, t in texts.items():
        docs = ", ".join(f"`{d['name']}` ({d['tokens']:,} tokens in all)" for d in t["documents"])
        what = []
        if plan.at_target:
            what.append(
                "the first factor x context tokens, one forward each; cells: perplexity of the tokens at positions "
                "below the trained context / at and beyond it"
            )
        if plan.inside:
            what.append(
                f"the first {', '.join(f'{L:,}' for L in plan.inside)} tokens (`@L` columns), inside the trained "
                "context: what a patch costs where the model was trained"
            )
        lines.append(
            f"- Perplexity text `{name}`: `{t['source']}`, {docs} (token sha256 {t['sha256']}): {'; '.join(what)}."
        )
    retrieval, needles = sweep.retrieval, sweep.needles
    trials = {task: args.trials or n for task, n in retrieval.trials.items()} if retrieval else {}
    if retrieval:
        lines.append(
            f"- Retrieval: {', '.join(f'{t} ({n} prompts per depth)' for t, n in trials.items())} at depths "
            f"{', '.join(f'{d:g}' for d in args.depths or retrieval.depths)}, filler `{retrieval.filler}`, seed "
            f"{retrieval.seed}, the same prompts for every model; prompt lengths up to each row's target. Cells: "
            "correct / prompts over all depths [Wilson 95% interval]; per depth in the cell files."
        )
    if needles:
        from ctxext.evals.shared_prefill import band_label

        bands = [band_label(b) for b in needles.bands]
        by_row = "".join(f", {n} for {r}" for r, n in needles.prompts_by_row.items())
        lines.append(
            f"- `needles`: named-key retrieval ({needles.per_band} needle{'s' * (needles.per_band > 1)} in each band "
            f"{', '.join(bands)}, so {needles.per_band * len(bands)} named keys per prompt, each asked for in turn "
            f"from one prefill of the prompt; `ctxext.evals.shared_prefill`), {needles.prompts} prompts per length"
            f"{by_row}, filler `{needles.filler}`, seed {needles.seed}, dtype {needles.dtype}; the same prompts for "
            "every model. The keys of one prompt are each other's distractors, so this is harder than one-needle "
            "passkey. Cells: correct / needles over all bands [Wilson 95%]; per band below. Rows with `dynamic` "
            "frequencies are not measured this way (a cached prefix is not exact for them)."
        )
    lines.append("")
    tasks = [*trials, *(["needles"] if needles else [])]
    for factor in sweep.factors:
        target = round(factor * context)
        lengths = sorted({c["length"] for c in cells if c["kind"] != "ppl" and c["length"] <= target})
        cols = [
            (f"ppl-{name}", L)
            for name in texts
            for L in [target] * plan.at_target + [L for L in plan.inside if L < target]
        ]
        cols += [(task, L) for task in tasks for L in lengths]
        header = [
            f"{m} (inside / beyond {context:,})" if m.startswith("ppl-") and L == target else f"{m}@{L:,}"
            for m, L in cols
        ]
        by_key = {(c["row"], c["measure"], c["length"]): c for c in cells if factor in c["factors"]}
        lines += [
            f"## x{factor:g} (to {target:,} tokens)",
            "",
            "| method | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(cols),
        ]
        seconds = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(cols)]
        for row in rows:
            texts_, secs = zip(
                *(
                    cell_text(by_key[(row, m, L)], records.get(by_key[(row, m, L)]["name"]))
                    if (row, m, L) in by_key
                    else ("-", "-")
                    for m, L in cols
                )
            )
            lines.append(f"| {row} | " + " | ".join(texts_) + " |")
            seconds.append(f"| {row} | " + " | ".join(secs) + " |")
        lines += [
            "",
            (
                f"Seconds per cell (x{factor:g}; wall clock, and on CPU the process's CPU time, which other "
                "jobs on a shared machine do not inflate):"
            ),
            "",
            *seconds,
            "",
        ]
    if needles:
        lines += needles_by_band(cells, records, rows, bands)
    devices = sorted({r["device"] for r in records.values()})
    commands = sorted({(r["command"], r["date"]) for r in records.values()}, key=lambda x: x[1])
    lines += [f"Measured on: {', '.join(devices) or 'nothing yet'}. Commands that measured these cells:", ""]
    lines += [f"- `{cmd}` ({date})" for cmd, date in commands] or ["- none yet"]
    plot = out / "real_model.png"
    if done:
        first_text, first_task = next(iter(texts)), next(iter(tasks), None)
        ppl = {f"x{f:g}": {} for f in sweep.factors}  # every factor gets its column, measured or not
        acc = {f"x{f:g}": {} for f in sweep.factors}
        for c in done:
            r = records[c["name"]]["result"]
            for factor in c["factors"]:
                group = f"x{factor:g}"
                if c["measure"] == f"ppl-{first_text}" and not c["inside"]:
                    ppl.setdefault(group, {})[c["row"]] = {b["end"]: b["perplexity"] for b in r["buckets"]}
                elif c["measure"] == first_task:
                    acc.setdefault(group, {}).setdefault(c["row"], {})[c["length"]] = (r["accuracy"], *r["wilson95"])
        plot_by_position_and_length(
            ppl,
            acc,
            plot,
            trained_context=context,
            accuracy_label=first_task,
            title=f"{args.model or sweep.model} without fine-tuning (trained at {context:,})",
        )
        lines += ["", f"![perplexity by position ({first_text}) and {first_task} accuracy by length]({plot.name})"]
    page = out / "REAL_MODEL.md"
    write_markdown_keeping_notes(page, "\n".join(lines) + "\n")
    return page


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p, args = parse_args(argv)
    deadline = None if args.stop_after is None else time.perf_counter() + args.stop_after
    from transformers import AutoConfig, AutoTokenizer

    from ctxext.errors import CtxextError
    from ctxext.experiments.recipe import load_sweep
    from ctxext.io.sources import check_source

    try:
        sweep = load_sweep(Path(args.config) if Path(args.config).is_absolute() else REPO / args.config)
        if sweep.kind != "training-free":
            p.error(f"{args.config} is a {sweep.kind} sweep: run it with scripts/leaderboard.py")
        unknown = [m for m in args.methods or [] if m not in sweep.methods]
        unknown += [f"x{f:g}" for f in args.factors or [] if f not in sweep.factors]
        known_measures = ["ppl", *(sweep.retrieval.trials if sweep.retrieval else [])]
        known_measures += ["needles"] * (sweep.needles is not None)
        unknown += [m for m in args.measure or [] if m not in known_measures]
        if unknown:
            p.error(
                f"{', '.join(unknown)} not in {args.config} (rows: {', '.join(sweep.methods)}; factors: "
                f"{', '.join(f'{f:g}' for f in sweep.factors)}; measures: {', '.join(known_measures)})"
            )
        source = check_source(args.model or sweep.model)
        checkpoint_context = AutoConfig.from_pretrained(source).max_position_embeddings
        context = args.context or sweep.context or checkpoint_context
        if context > checkpoint_context:
            p.error(f"--context {context} is beyond the checkpoint's trained context {checkpoint_context}")
        if any(L > context for L in sweep.perplexity.inside):
            p.error(f"perplexity.inside {sweep.perplexity.inside}: every length must be <= the context {context}")
        tokenizer = AutoTokenizer.from_pretrained(source)
        cells, texts, streams = make_plan(sweep, args, context, checkpoint_context, tokenizer)
        root = Path(args.cells)
        if not args.report_only:
            chosen = [
                c
                for c in cells
                if (not args.methods or c["row"] in args.methods)
                and (not args.factors or set(c["factors"]) & set(args.factors))
                and (not args.measure or c["kind"] in args.measure)
            ]
            run_cells(
                chosen,
                source=source,
                sweep=sweep,
                args=args,
                context=context,
                tokenizer=tokenizer,
                texts=texts,
                streams=streams,
                root=root,
                deadline=deadline,
            )
        records = {c["name"]: r for c in cells if (r := stored_record(root, c)) is not None}
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        page = write_page(cells, records, texts, sweep, args, context, checkpoint_context, out)
    except CtxextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{page}: {len(records)} of {len(cells)} cells measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
