"""One function per evaluation command: load models, evaluate, write JSON + PNG, return plain results.

    evaluate_perplexity(["reference", "out/yarn8"], lengths=[256, 512, 1024], output="eval")
    evaluate_passkey(["out/yarn8"], lengths=[512, 1024], depths=[0, 0.5, 1], trials=10, output="eval")
    analyze_frequencies("reference", compare="out/prope", output="eval")

Every model is checked (``ctxext.io.validate``) before the first one is evaluated, the output folder is locked for
the whole evaluation (``ctxext.io.lock``), and results are written only at the end, so a refused or failed evaluation
writes nothing.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from ctxext import __version__
from ctxext.data.text import DEFAULT_EVAL_SOURCE, join_documents, load_texts, tokenize_documents
from ctxext.errors import DataError, EvalError
from ctxext.evals.passkey import passkey_accuracy
from ctxext.evals.perplexity import perplexity
from ctxext.io.atomic import atomic_write_text
from ctxext.io.lock import locks_output
from ctxext.options import DType, FloatList, IntList, Options, StrList, opt, takes


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_eval(name: str, *, device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer, path)`` for a model folder or ``reference``."""
    from ctxext.io.checkpoint import load_model
    from ctxext.io.sources import check_source
    from ctxext.io.validate import load_tokenizer

    path = check_source(name)
    model = load_model(path, dtype=dtype).to(pick_device(device))
    return model, load_tokenizer(path, model.config.vocab_size), path


def check_models(names: list[str]) -> None:
    """Every model's checkpoint and tokenizer, checked before the first evaluation starts (headers only)."""
    from ctxext.io.sources import check_source
    from ctxext.io.validate import check_checkpoint, load_tokenizer

    for name in names:
        path = check_source(name)
        load_tokenizer(path, check_checkpoint(path).config.vocab_size)


def writes_results(command: str, options: type[Options]):
    """Decorate an evaluation: it takes ``options``' fields (``ctxext.options.takes``); its models are checked
    first and its ``output`` folder is locked while it runs."""

    def wrap(evaluate):
        locked = locks_output(command, "output")(evaluate)

        @takes(options)
        @functools.wraps(evaluate)
        def checked(**fields):
            check_models(fields.get("models") or [fields["model"], *filter(None, [fields.get("compare")])])
            return locked(**fields)

        return checked

    return wrap


DATA_HELP = "text source: stdlib:held_out, a file/folder (.txt/.py/.md/.jsonl/.parquet) or a hub dataset"
MODELS_HELP = "checkpoint folders, 'reference' (the shipped model) or GGUF source names (smollm2)"


class EvalOptions(Options):
    """What every evaluation command takes."""

    output: str = opt("ctxext-eval", "folder for JSON results and PNG plots")
    text_field: str = opt("text", "field of .jsonl/.parquet rows holding the text")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: DType = opt("auto", "weights dtype for evaluation; auto keeps the stored one")


class PerplexityOptions(EvalOptions):
    models: list[str] = opt(..., MODELS_HELP, positional=True, min_length=1)
    lengths: IntList = opt(..., "comma-separated context lengths, e.g. 256,512,1024", min_length=1)
    data: str = opt(DEFAULT_EVAL_SOURCE, DATA_HELP)
    stride: int | None = opt(None, "window stride (default: the length, i.e. non-overlapping windows)", gt=0)
    max_documents: int | None = opt(None, "score at most this many documents per length", gt=0)
    all_documents: bool = opt(
        False,
        "score every document long enough for each length, whole (default: the first "
        "max(lengths) tokens of documents at least that long, at every length, so lengths "
        "compare the same text)",
    )
    batch_size: int = opt(1, "windows per forward", gt=0)
    labels: StrList | None = opt(None, "comma-separated names of the models in the results (default: their paths)")


class GridOptions(EvalOptions):
    """A length x depth grid of generated prompts."""

    models: list[str] = opt(..., MODELS_HELP, positional=True, min_length=1)
    lengths: IntList = opt(..., "comma-separated prompt lengths in tokens", min_length=1)
    depths: FloatList = opt([0.0, 0.25, 0.5, 0.75, 1.0], "needle depths in [0, 1]", min_length=1)
    seed: int = opt(0, "seed of the keys and of the filler's order")
    filler: str = opt(DEFAULT_EVAL_SOURCE, "filler text source (" + DATA_HELP + ")")
    batch_size: int = opt(8, "prompts per forward", gt=0)
    labels: StrList | None = opt(None, "comma-separated names of the models in the results (default: their paths)")


class PasskeyOptions(GridOptions):
    trials: int = opt(10, "keys per (length, depth) cell", gt=0)


class RetrievalOptions(GridOptions):
    tasks: StrList = opt(["multikey", "multivalue", "vartrack"], "comma-separated tasks")
    trials: int = opt(40, "prompts per (length, depth) cell (40: +-15 points at 50%)", gt=0)


class FrequencyOptions(EvalOptions):
    model: str = opt(..., "checkpoint folder, 'reference' or a GGUF source name", positional=True)
    data: str = opt(DEFAULT_EVAL_SOURCE, DATA_HELP)
    compare: str | None = opt(None, "a second (e.g. patched) checkpoint shown side by side")
    seq_len: int | None = opt(None, "tokens per forward (default: the model's trained context)", gt=1)
    max_tokens: int = opt(16384, "tokens of data to measure on", gt=0)


def _label(name: str, used: set[str]) -> str:
    label = Path(name).name or name
    while label in used:
        label += "'"
    used.add(label)
    return label


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))


NOTES_MARKER = "<!-- notes -->"


def worst_depths(grids: dict) -> dict[str, dict[str, float]]:
    """``{task: {length: accuracy at the worst depth}}`` of one model's RULER-style grids (``evaluate_retrieval``'s
    ``["models"][label]["tasks"]``)."""
    return {task: {L: min(cells.values()) for L, cells in g["accuracy"].items()} for task, g in grids.items()}


def worst_depth_table(
    first: str, worst: dict[str, dict[str, dict[str, float]]], tasks: list[str], lengths: list[int]
) -> list[str]:
    """Markdown table lines: a row per model (``worst``: label -> ``worst_depths``), a column per task and length;
    n/a where a model was not measured on a task."""
    lines = [
        f"| {first} | " + " | ".join(f"{t}@{L}" for t in tasks for L in lengths) + " |",
        "|---|" + "---|" * (len(tasks) * len(lengths)),
    ]
    for label, w in worst.items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{w[t][str(L)]:.0%}" if t in w else "n/a" for t in tasks for L in lengths)
            + " |"
        )
    return lines


def source_commit(repo: Path) -> str | None:
    """The commit of the git checkout at ``repo`` (``+changes`` when tracked files differ from it), for a published
    page to say which version produced it: recipes and scripts live in the repository and change. None outside a
    git checkout."""
    import subprocess

    try:
        git = ["git", "-C", str(repo)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_markdown_keeping_notes(path: Path, text: str) -> None:
    """Write a generated results page; hand-written text below NOTES_MARKER in the old page survives a rerun."""
    old = path.read_text() if path.is_file() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    path.write_text(text.rstrip("\n") + "\n\n" + NOTES_MARKER + notes)


@writes_results("ctxext eval ppl", PerplexityOptions)
def evaluate_perplexity(
    models, lengths, data, stride, output, text_field, max_documents, batch_size, device, dtype, all_documents, labels
) -> dict:
    """Perplexity of each model at each length; writes ``ppl.json`` and ``ppl.png`` under ``output``.

    By default every length scores the same text, the first ``max(lengths)`` tokens of each document at least that
    long (shorter documents are counted as skipped), so the curve compares like with like; with ``all_documents``
    each length scores every document long enough for it, whole.
    """
    if not lengths or any(L < 2 for L in lengths):
        raise EvalError(f"lengths={lengths!r} is invalid; give context lengths >= 2, e.g. 256,512,1024")
    out = Path(output)
    texts = load_texts(data, text_field=text_field)
    results, curves, used = {}, {}, set()
    trained = None
    for i, name in enumerate(models):
        model, tokenizer, path = load_for_eval(name, device=device, dtype=dtype)
        record = getattr(model.config, "ctxext", None) or {}
        trained = trained or record.get("original_context", model.config.max_position_embeddings)
        docs = tokenize_documents(tokenizer, texts)
        if not all_documents:  # every length scores the same text: the first `longest` tokens of long documents
            longest = max(lengths)
            docs = [d[:longest] for d in docs if len(d) >= longest] + [d[:1] for d in docs if len(d) < longest]
        label = _label(labels[i] if labels else name, used)
        per_length = {}
        for L in lengths:
            try:
                r = perplexity(model, docs, L, stride=stride or L, batch_size=batch_size, max_documents=max_documents)
            except DataError as err:
                raise DataError(f"data {data}: {err}") from None
            per_length[str(L)] = r.to_dict()
        results[label] = {
            "path": path,
            "per_length": per_length,
            "context": record.get("context", model.config.max_position_embeddings),
        }
        curves[label] = {int(L): v["perplexity"] for L, v in per_length.items()}
        del model
    payload = {
        "protocol": {
            "data": data,
            "text_field": text_field,
            "documents": len(texts),
            "lengths": lengths,
            "stride": stride or "length (non-overlapping windows)",
            "max_documents": max_documents,
            "same_documents_at_every_length": not all_documents,
            "score": "exp(mean NLL) over every scored token; documents shorter than the length skipped",
            "ctxext": __version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "models": results,
    }
    _write_json(out / "ppl.json", payload)
    from ctxext.evals.plots import plot_perplexity

    plot_perplexity(curves, out / "ppl.png", title=f"perplexity vs context ({data})", trained_context=trained)
    return payload


def _filler_texts(filler: str, text_field: str, seed: int, trials: int) -> list[str]:
    """The filler documents in the seeded order every model sees (after checking the trial count)."""
    if trials < 1:
        raise EvalError(f"trials={trials!r} is invalid; give at least 1")
    texts = load_texts(filler, text_field=text_field)
    random.Random(seed).shuffle(texts)
    return texts


def filler_stream(
    tokenizer, filler: str = DEFAULT_EVAL_SOURCE, *, seed: int = 0, text_field: str = "text"
) -> list[int]:
    """The token stream that ``evaluate_passkey`` / ``evaluate_retrieval`` cut their prompts from (same seed, same
    prompts), for callers that hold a loaded model (``passkey_accuracy``, ``task_accuracy``)."""
    return join_documents(tokenizer, _filler_texts(filler, text_field, seed, 1)).tolist()


def _each_model(models: list[str], labels: list[str] | None, texts: list[str], device: str, dtype: str):
    """``(label, model, tokenizer, path, filler ids)`` per model, loaded one at a time."""
    used: set[str] = set()
    for i, name in enumerate(models):
        model, tokenizer, path = load_for_eval(name, device=device, dtype=dtype)
        yield (
            _label(labels[i] if labels else name, used),
            model,
            tokenizer,
            path,
            join_documents(tokenizer, texts).tolist(),
        )
        del model  # the caller drops its reference too, so one model is in memory at a time


@writes_results("ctxext eval passkey", PasskeyOptions)
def evaluate_passkey(
    models, lengths, depths, trials, seed, filler, output, text_field, batch_size, device, dtype, labels
) -> dict:
    """Passkey accuracy grid per model; writes ``passkey.json`` and ``passkey_<model>.png`` under ``output``."""
    texts = _filler_texts(filler, text_field, seed, trials)
    out = Path(output)
    results = {}
    from ctxext.evals.plots import plot_passkey

    for label, model, tokenizer, path, stream in _each_model(models, labels, texts, device, dtype):
        grid = passkey_accuracy(model, tokenizer, stream, lengths, depths, trials, seed=seed, batch_size=batch_size)
        grid["path"] = path
        results[label] = grid
        del model  # before the next one loads
    out.mkdir(parents=True, exist_ok=True)
    for label, grid in results.items():
        grid["plot"] = str(
            plot_passkey(
                grid["accuracy"],
                out / f"passkey_{_slug(label)}.png",
                title=f"passkey retrieval: {label} ({trials} keys per cell)",
            )
        )
    payload = {
        "protocol": {
            "filler": filler,
            "trials": trials,
            "seed": seed,
            "lengths": lengths,
            "depths": depths,
            "score": "exact match of the greedy answer's first digit run with the key",
            "ctxext": __version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "models": results,
    }
    _write_json(out / "passkey.json", payload)
    return payload


@writes_results("ctxext eval retrieval", RetrievalOptions)
def evaluate_retrieval(
    models, tasks, lengths, depths, trials, seed, filler, output, text_field, batch_size, device, dtype, labels
) -> dict:
    """RULER-style task grids (``ctxext.evals.retrieval``) per model and task, with Wilson 95% intervals; writes
    ``retrieval.json`` and ``retrieval_<task>_<model>.png`` under ``output``."""
    from ctxext.evals.plots import plot_passkey
    from ctxext.evals.retrieval import check_tasks, task_accuracy

    check_tasks(tasks)
    texts = _filler_texts(filler, text_field, seed, trials)
    out = Path(output)
    results = {}
    for label, model, tokenizer, path, stream in _each_model(models, labels, texts, device, dtype):
        results[label] = {"path": path, "tasks": {}}
        for task in tasks:
            results[label]["tasks"][task] = task_accuracy(
                model, tokenizer, stream, task, lengths, depths, trials, seed=seed, batch_size=batch_size
            )
        del model  # before the next one loads
    out.mkdir(parents=True, exist_ok=True)
    for label, r in results.items():
        for task, grid in r["tasks"].items():
            grid["plot"] = str(
                plot_passkey(
                    grid["accuracy"],
                    out / f"retrieval_{task}_{_slug(label)}.png",
                    title=f"{task}: {label} ({trials} trials per cell)",
                )
            )
    payload = {
        "protocol": {
            "filler": filler,
            "tasks": tasks,
            "trials": trials,
            "seed": seed,
            "lengths": lengths,
            "depths": depths,
            "score": "exact match of the greedy completion's digit runs with the answer values; Wilson 95% intervals",
            "ctxext": __version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "models": results,
    }
    _write_json(out / "retrieval.json", payload)
    return payload


@writes_results("ctxext analyze freq", FrequencyOptions)
def analyze_frequencies(model, data, compare, output, seq_len, max_tokens, text_field, device, dtype) -> dict:
    """Frequency usage of a model (and optionally a patched one); writes ``freq.json`` and ``freq.png``."""
    from ctxext.evals.frequency import frequency_usage, suggest_keep
    from ctxext.evals.plots import plot_frequency_usage

    out = Path(output)
    texts = load_texts(data, text_field=text_field)
    runs, panels = {}, {}
    keep, reasoning, wavelengths, context = None, [], None, None
    for role, name in [("model", model)] + ([("compare", compare)] if compare else []):
        model, tokenizer, path = load_for_eval(name, device=device, dtype=dtype)
        record = getattr(model.config, "ctxext", None) or {}
        context = context or record.get("original_context", model.config.max_position_embeddings)
        try:
            usage = frequency_usage(
                model, tokenize_documents(tokenizer, texts), seq_len=seq_len or context, max_tokens=max_tokens
            )
        except DataError as err:  # too little text for one window: name the data
            raise DataError(
                f"data {data}: {err} (fewer than one block of {seq_len or context} tokens); give more text with --data"
            ) from None
        label = Path(name).name or name
        runs[role] = {"name": name, "path": path, **usage.to_dict()}
        energy = usage.qk_energy()
        panels[f"{label}: q norm"] = usage.q.mean(axis=1)
        panels[f"{label}: k norm"] = usage.k.mean(axis=1)
        if role == "model":
            panels[f"{label}: v norm (control)"] = usage.v.mean(axis=1)
            keep, reasoning = suggest_keep(usage, context)
            inv = usage.inv_freq.mean(axis=0)
            with np.errstate(divide="ignore"):
                wavelengths = np.where(inv > 0, 2 * np.pi / inv, np.inf)
            runs[role]["top_pairs_per_layer"] = [np.argsort(-row)[:5].tolist() for row in energy]
        del model
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_frequency_usage(
        panels, wavelengths, out / "freq.png", title="mean pair norm per layer", context_length=context
    )
    payload = {
        "protocol": {
            "data": data,
            "max_tokens": max_tokens,
            "window": seq_len or context,
            "measure": "mean L2 norm of each half-split 2-D chunk of q, k (after q/k norm) and v",
            "ctxext": __version__,
        },
        "runs": runs,
        "suggested_keep": keep,
        "reasoning": reasoning,
        "plot": str(plot),
    }
    _write_json(out / "freq.json", payload)
    return payload
