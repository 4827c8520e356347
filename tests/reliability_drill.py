"""The reliability drill: hostile inputs, kill -9 at random moments, a full disk, two runs into one
output, a diverging fine-tune. Prints the table that docs/results/RELIABILITY.md reports.

    python -m tests.reliability_drill                        # every part (about an hour on 2 busy cores)
    python -m tests.reliability_drill --parts inputs,lock    # some parts: inputs, kill, disk, lock, diverge
    python -m tests.reliability_drill --kills 20 --seed 0 --json drill.json

Everything runs on tiny checkpoints built here (a 2-layer Llama with the reference model's tokenizer), in a work
folder (``--work``, default a temporary one). Each case is judged from the outside:

* inputs: every command that reads the file (patch, info, eval, analyze, search, finetune, plan, demo, convert,
  export) runs as ``ctxext.cli.main(argv)`` (what ``python -m ctxext.cli`` runs, in this process to save start-up
  time; an exception that escapes is a traceback). Handled: exit 2, a message naming the file and the problem, no
  traceback, nothing written (no output, no temporary or lock file beside it).
* kill: the operation (patch, export, fine-tuning with a checkpoint every step, the merge at the end) runs as a
  real subprocess and gets SIGKILL at a random moment: even trials uniformly over its working window (from taking
  its output's lock, or its first checkpoint, to its end, measured on an uninterrupted run), odd trials uniformly
  over one write of its output (after a random wait, so any checkpoint may be hit). The drill goes on until
  ``--kills`` kills landed per operation. Afterwards the output must be absent or complete, loadable and equal to
  the uninterrupted result (half the patch and export trials replace an existing output with --force); a rerun
  (``--resume`` for fine-tuning) must succeed, reproduce the uninterrupted loss curve and leave no temporary or
  lock file.
* disk: outputs on a tmpfs the drill mounts (skipped, saying why, where mounting is not permitted); the command must
  fail with exit 2 saying the disk is full, the previous output must stay intact, a fine-tune must resume.
* lock: a second run into a locked output is refused with exit 2 naming the holder's pid; a stale lock is taken
  over; two fine-tunes started together never interleave.
* diverge: a fine-tune whose loss becomes NaN exits 3; its last checkpoint loads, holds finite weights and resumes.

Figures: cases tried, handled, outputs corrupted (an output that exists but is incomplete, unloadable or not what
an uninterrupted run writes) and runs lost (a fine-tune that cannot be finished on its uninterrupted loss curve).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "ctxext" / "assets" / "reference"
TINY_YAML = REPO / "configs" / "tiny.yaml"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
LEFTOVER = re.compile(r"\.ctxext-(tmp-|lock)")
PARTS = ("inputs", "kill", "disk", "lock", "diverge")
CASE_TIMEOUT = 120  # seconds a hostile-input case may take: a command that has not answered by then is not handled
RUN_OVERRIDES = ["logging.save_every=1"]  # a checkpoint every step: the kills meet many checkpoint writes


@dataclass
class Outcome:
    part: str
    case: str
    handled: bool
    corrupted: bool = False
    lost: bool = False
    note: str = ""


@dataclass
class Fixtures:
    root: Path
    src: Path  # a good tiny Llama checkpoint with the reference tokenizer
    gguf: Path  # its GGUF export

    def out(self, name: str) -> Path:
        """A fresh output path (its parent exists, it does not)."""
        folder = Path(tempfile.mkdtemp(prefix="case-", dir=self.root))
        return folder / name


# ---------------------------------------------------------------- running the CLI


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def cli(argv: list[str], timeout: int | None = None) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``ctxext.cli.main(argv)`` in this process; an escaping exception is a traceback,
    and a call still running after ``timeout`` seconds is stopped (exit code None)."""
    from ctxext.cli.main import main

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout or 0)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 1
    except CaseTimeout:
        return None, err.getvalue() + f"(no answer after {timeout} s)"
    except Exception as exc:  # noqa: BLE001  (what a user would see as a traceback)
        import traceback

        return 1, err.getvalue() + "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception_only(type(exc), exc)
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return rc, err.getvalue()


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "ctxext.cli", *map(str, argv)],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


def leftovers(output: Path) -> list[Path]:
    """ctxext's temporary and lock files beside ``output`` and inside it."""
    beside = list(output.parent.glob(f".{output.name}.ctxext-*")) if output.parent.is_dir() else []
    inside = [p for p in output.rglob("*") if LEFTOVER.search(p.name)] if output.is_dir() else []
    return sorted(beside + inside)


def nothing_written(out: Path | None) -> bool:
    return out is None or (not out.exists() and not leftovers(out))


# ---------------------------------------------------------------- fixtures


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (context 64, head_dim 16) with the reference model's byte-level BPE tokenizer (4,096 tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    )
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE / name, path / name)
    return path


def make_fixtures(root: Path) -> Fixtures:
    root.mkdir(parents=True, exist_ok=True)
    os.environ["CTXEXT_CACHE"] = ENV["CTXEXT_CACHE"] = str(root / "cache")  # GGUF conversions stay in the drill
    src = tiny_checkpoint(root / "good")
    gguf = root / "good.gguf"
    rc, err = cli(["export", "gguf", src, gguf])
    assert rc == 0, err
    return Fixtures(root, src, gguf)


# ---------------------------------------------------------------- part 1: hostile inputs

CHECKPOINT_COMMANDS = ("patch", "info", "eval", "analyze", "search", "finetune", "demo", "export")
CONFIG_COMMANDS = CHECKPOINT_COMMANDS + ("plan",)  # plan reads config.json alone (no weights, no tokenizer)
TOKENIZER_COMMANDS = ("eval", "analyze", "search", "finetune", "demo", "export")  # patch and info need no tokenizer
YAML_COMMANDS = ("finetune", "plan")  # fine-tuning configs
ANY_YAML_COMMANDS = YAML_COMMANDS + ("demo",)  # a YAML that no parser may accept is refused as a recipe too
DATA_COMMANDS = ("finetune", "eval", "analyze", "search")
GGUF_COMMANDS = ("convert",) + CHECKPOINT_COMMANDS  # every command that takes a checkpoint takes a .gguf file


@dataclass(frozen=True)
class Hostile:
    """A hostile input: ``build(folder, fixtures)`` writes it and returns its path; the message must name the input
    path and ``culprit`` (a file name; empty: the input itself) and match ``says``."""

    name: str
    kind: str  # checkpoint, gguf, yaml, data
    build: Callable[[Path, Fixtures], Path]
    culprit: str
    says: str
    commands: tuple[str, ...]


def command_argv(command: str, kind: str, bad: Path, fx: Fixtures, out: Path) -> tuple[list, Path | None]:
    """The argv that makes ``command`` read the hostile input ``bad``, and the output it must not write."""
    src = bad if kind in ("checkpoint", "gguf") else fx.src
    if command == "patch":
        return ["patch", src, out, "--method", "yarn", "--factor", "2"], out
    if command == "info":
        return ["info", src], None
    if command == "eval":
        data = bad if kind == "data" else "stdlib:held_out"
        return ["eval", "ppl", src, "--lengths", "32", "--data", data, "--max-documents", "2", "--output", out], out
    if command == "analyze":
        data = bad if kind == "data" else "stdlib:held_out"
        return ["analyze", "freq", src, "--data", data, "--max-tokens", "256", "--output", out], out
    if command == "search":
        data = bad if kind == "data" else "stdlib:train"
        return [
            "search",
            src,
            out,
            "--target-length",
            "128",
            "--data",
            data,
            "--budget",
            "4",
            "--population",
            "4",
            "--windows",
            "1",
        ], out
    if command == "finetune":
        config = bad if kind == "yaml" else TINY_YAML
        extra = [f"data.source={bad}", "data.held_out=null"] if kind == "data" else []
        return ["finetune", config, f"model.path={src}", *extra, "--output-dir", out], out
    if command == "demo":
        recipe = ["--recipe", bad] if kind == "yaml" else []
        return ["demo", "--model", src, *recipe, "--quick", "--output-dir", out], out
    if command == "plan":
        return ["plan", bad if kind == "yaml" else TINY_YAML, f"model.path={src}"], None
    if command == "export":
        gguf = out.with_suffix(".gguf")
        return ["export", "gguf", src, gguf], gguf
    if command == "convert":
        return ["convert", src, out], out
    raise ValueError(command)


def _checkpoint(edit_weights=None, edit_bytes=None, edit_config=None, config_text=None, edit_tokenizer=None, remove=()):
    def build(folder: Path, fx: Fixtures) -> Path:
        from safetensors.torch import load_file, save_file

        dest = folder / "ckpt"
        shutil.copytree(fx.src, dest)
        weights = dest / "model.safetensors"
        if edit_weights:
            tensors = load_file(weights)
            edit_weights(tensors)
            save_file(tensors, weights, metadata={"format": "pt"})
        if edit_bytes:
            weights.write_bytes(edit_bytes(weights.read_bytes()))
        if edit_config:
            raw = json.loads((dest / "config.json").read_text())
            edit_config(raw)
            (dest / "config.json").write_text(json.dumps(raw))
        if config_text:
            (dest / "config.json").write_text(config_text((dest / "config.json").read_text()))
        if edit_tokenizer:
            (dest / "tokenizer.json").write_text(edit_tokenizer((dest / "tokenizer.json").read_text()))
        for name in remove:
            (dest / name).unlink()
        return dest

    return build


def _set(tensor_name: str, index, value):
    def edit(tensors):
        tensors[tensor_name][index] = value

    return edit


def _truncated_gguf(folder: Path, fx: Fixtures) -> Path:
    bad = folder / "cut.gguf"
    bad.write_bytes(fx.gguf.read_bytes()[: fx.gguf.stat().st_size // 2])
    return bad


def _yaml(edit: Callable[[dict], object] | None = None, text: str | bytes | None = None):
    def build(folder: Path, fx: Fixtures) -> Path:
        import yaml

        path = folder / "run.yaml"
        if text is not None:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        else:
            raw = yaml.safe_load(TINY_YAML.read_text())
            edit(raw)
            path.write_text(yaml.safe_dump(raw))
        return path

    return build


def _data(content: bytes, suffix: str = ".txt"):
    def build(folder: Path, fx: Fixtures) -> Path:
        path = folder / f"data{suffix}"
        path.write_bytes(content)
        return path

    return build


ALIAS_BOMB = (
    "\n".join(
        ["a: &a [x, x, x, x, x, x, x, x, x]"]
        + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    )
    + "\nstages: *i\n"
)

HOSTILE = [
    Hostile(
        "weights: zero-byte model.safetensors",
        "checkpoint",
        _checkpoint(edit_bytes=lambda b: b""),
        "model.safetensors",
        r"empty \(0 bytes\)",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "weights: garbage model.safetensors",
        "checkpoint",
        _checkpoint(edit_bytes=lambda b: random.Random(0).randbytes(len(b))),
        "model.safetensors",
        r"not a readable safetensors file",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "weights: truncated model.safetensors",
        "checkpoint",
        _checkpoint(edit_bytes=lambda b: b[: len(b) * 3 // 5]),
        "model.safetensors",
        r"truncated or corrupt",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "weights: a tensor's shape disagrees with config.json",
        "checkpoint",
        _checkpoint(
            edit_weights=lambda t: t.__setitem__(
                "model.layers.0.mlp.up_proj.weight", t["model.layers.0.mlp.up_proj.weight"][:90].clone()
            )
        ),
        "model.safetensors",
        r"shape \[90, 64\] but config.json describes \[96, 64\]",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "weights: NaN in a tensor",
        "checkpoint",
        _checkpoint(edit_weights=_set("model.layers.1.mlp.up_proj.weight", (3, 5), float("nan"))),
        "model.safetensors",
        r"1 NaN",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "weights: inf in a tensor",
        "checkpoint",
        _checkpoint(edit_weights=_set("model.norm.weight", 7, float("-inf"))),
        "model.safetensors",
        r"1 infinite",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "config.json: not valid JSON",
        "checkpoint",
        _checkpoint(config_text=lambda text: text[: len(text) // 2]),
        "config.json",
        r"not valid JSON",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: missing fields (hidden_size, num_hidden_layers)",
        "checkpoint",
        _checkpoint(edit_config=lambda c: [c.pop("hidden_size"), c.pop("num_hidden_layers")]),
        "config.json",
        r"does not set hidden_size, num_hidden_layers",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: no model_type",
        "checkpoint",
        _checkpoint(edit_config=lambda c: c.pop("model_type")),
        "config.json",
        r"no model_type",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: head_dim 0",
        "checkpoint",
        _checkpoint(edit_config=lambda c: c.update(head_dim=0)),
        "config.json",
        r"head_dim is 0",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: max_position_embeddings -1",
        "checkpoint",
        _checkpoint(edit_config=lambda c: c.update(max_position_embeddings=-1)),
        "config.json",
        r"max_position_embeddings is -1",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: rope_theta NaN",
        "checkpoint",
        _checkpoint(edit_config=lambda c: c["rope_parameters"].update(rope_theta=float("nan"))),
        "config.json",
        r"rope_theta is nan",
        CONFIG_COMMANDS,
    ),
    Hostile(
        "config.json: vocab_size disagrees with the weights",
        "checkpoint",
        _checkpoint(edit_config=lambda c: c.update(vocab_size=5000)),
        "config.json",
        r"vocab_size is 5000 in config.json but the weights have 4096 rows",
        CHECKPOINT_COMMANDS,
    ),
    Hostile(
        "tokenizer: missing",
        "checkpoint",
        _checkpoint(remove=("tokenizer.json", "tokenizer_config.json")),
        "",
        r"has no tokenizer",
        TOKENIZER_COMMANDS,
    ),
    Hostile(
        "tokenizer: tokenizer.json cut short",
        "checkpoint",
        _checkpoint(edit_tokenizer=lambda text: text[: len(text) // 2]),
        "tokenizer",
        r"tokenizer of .* cannot be loaded",
        TOKENIZER_COMMANDS,
    ),
    Hostile("GGUF: truncated file", "gguf", _truncated_gguf, "", r"truncated|corrupt", GGUF_COMMANDS),
    Hostile("YAML: alias bomb", "yaml", _yaml(text=ALIAS_BOMB), "", r"aliases are not allowed", ANY_YAML_COMMANDS),
    Hostile(
        "YAML: deep nesting",
        "yaml",
        _yaml(text="stages: " + "[" * 20000 + "]" * 20000 + "\n"),
        "",
        r"nested too deeply",
        ANY_YAML_COMMANDS,
    ),
    Hostile("YAML: binary file", "yaml", _yaml(text=bytes(range(256)) * 8), "", r"not valid YAML", ANY_YAML_COMMANDS),
    Hostile(
        "YAML: wrong type (lora.r: abc)",
        "yaml",
        _yaml(lambda c: c["lora"].update(r="abc")),
        "",
        r"lora\.r: Input should be a valid integer",
        YAML_COMMANDS,
    ),
    Hostile(
        "YAML: unknown key (optimization.lrr)",
        "yaml",
        _yaml(lambda c: c["optimization"].update(lrr=1)),
        "",
        r"unknown key optimization\.lrr",
        YAML_COMMANDS,
    ),
    Hostile(
        "YAML: negative steps",
        "yaml",
        _yaml(lambda c: c["stages"][0].update(steps=-5)),
        "",
        r"stages\.0\.steps: Input should be greater than 0",
        YAML_COMMANDS,
    ),
    Hostile(
        "YAML: huge steps (10^12)",
        "yaml",
        _yaml(lambda c: c["stages"][0].update(steps=10**12)),
        "",
        r"stages\.0\.steps: Input should be less than or equal to 10000000",
        YAML_COMMANDS,
    ),
    Hostile("data: empty file", "data", _data(b""), "", r"is empty", DATA_COMMANDS),
    Hostile("data: binary file", "data", _data(bytes(range(256)) * 64), "", r"is binary", DATA_COMMANDS),
    Hostile(
        "data: not UTF-8",
        "data",
        _data("café au lait, déjà vu\n".encode("latin-1") * 200),
        "",
        r"is not UTF-8",
        DATA_COMMANDS,
    ),
    Hostile(
        "data: too short for one block",
        "data",
        _data(b"x = 1\n", ".py"),
        "",
        r"fewer than one block|no document has at least",
        DATA_COMMANDS,
    ),
]


def run_input_case(hostile: Hostile, command: str, fx: Fixtures) -> Outcome:
    folder = Path(tempfile.mkdtemp(prefix="input-", dir=fx.root))
    bad = hostile.build(folder, fx)
    argv, out = command_argv(command, hostile.kind, bad, fx, folder / "out")
    rc, err = cli(argv, timeout=CASE_TIMEOUT)
    named = str(bad) in err and hostile.culprit in err
    said = re.search(hostile.says, err) is not None
    clean = nothing_written(out)
    problems = [
        what
        for what, ok in (
            (f"exit code {rc}", rc == 2),
            ("file not named", named),
            ("problem not said", said),
            ("traceback", "Traceback" not in err),
            ("output written", clean),
        )
        if not ok
    ]
    message = err.strip().splitlines()[-1] if err.strip() else ""
    return Outcome(
        "inputs",
        f"{hostile.name} | {command}",
        not problems,
        note="; ".join(problems) + (f" | {message[:300]}" if message else ""),
    )


def part_inputs(fx: Fixtures, args) -> list[Outcome]:
    outcomes = []
    for hostile in HOSTILE:
        for command in hostile.commands:
            outcomes.append(run_input_case(hostile, command, fx))
            print(f"  {'ok  ' if outcomes[-1].handled else 'FAIL'} {outcomes[-1].case}", flush=True)
    return outcomes


# ---------------------------------------------------------------- verifying outputs


def patched_logits(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def checkpoint_is(path: Path, reference_logits) -> str | None:
    """None when ``path`` is a complete checkpoint that loads and gives ``reference_logits``; else what is wrong."""
    import torch

    from ctxext.errors import CtxextError
    from ctxext.io.validate import check_checkpoint

    try:
        check_checkpoint(path, finite=True)
        logits = patched_logits(path)
    except (CtxextError, OSError, ValueError, RuntimeError) as err:
        return f"{path} does not load: {err}"
    return None if torch.equal(logits, reference_logits) else f"{path} loads but differs from the uninterrupted result"


def training_checkpoints_complete(run: Path) -> str | None:
    """None when every ``checkpoints/step-*`` of ``run`` is whole: position, weights, optimizer, scheduler, RNG."""
    import torch

    from ctxext.io.validate import read_headers

    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        try:
            json.loads((ckpt / "position.json").read_text())
            read_headers([ckpt / "model.safetensors"])
            torch.load(ckpt / "optimizer.bin", weights_only=True)
            torch.load(ckpt / "scheduler.bin", weights_only=True)
            assert (ckpt / "random_states_0.pkl").stat().st_size > 0
        except Exception as err:  # noqa: BLE001  (any failure means the checkpoint is not whole)
            return f"{ckpt} is incomplete: {type(err).__name__}: {err}"
    return None


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_curve(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b))


# ---------------------------------------------------------------- part 2: kill -9 at random moments


@dataclass
class Operation:
    """One operation of the kill drill.

    argv: the command. start(): true once it has begun working on its output (its lock or first checkpoint exists):
    the working window opens; end(): true when the window closes (None: at the process's end); writing(): true
    while a temporary output is being written. prepare(trial): the state before a trial; after_kill(): what is
    wrong with the output after a kill (None: absent, or complete and what an uninterrupted run writes); rerun():
    what is wrong after rerunning to completion; is_run: a fine-tune (a failure there loses a run).
    """

    name: str
    argv: list
    output: Path
    start: Callable[[], bool]
    writing: Callable[[], bool]
    prepare: Callable[[int], None]
    after_kill: Callable[[], str | None]
    rerun: Callable[[], str | None]
    end: Callable[[], bool] | None = None
    is_run: bool = False
    stats: dict = field(default_factory=lambda: {"landed": 0, "mid_write": 0, "finished_first": 0})


@dataclass
class Window:
    working: float  # seconds from start() to end()
    write: float  # the longest stretch of writing() seen
    last_write: float  # seconds from start() to the beginning of the last write


def _wait(proc: subprocess.Popen, until: Callable[[], bool], deadline: float | None = None) -> bool:
    """Poll until ``until()`` (True), the process ends or the deadline passes (False)."""
    limit = min(deadline or math.inf, time.time() + 900)
    while time.time() < limit:
        if until():
            return True
        if proc.poll() is not None:
            return until()
        time.sleep(0.0005)
    return False


def calibrate(op: Operation, log: Path) -> Window:
    """The working window and the length of one write, measured on an uninterrupted run."""
    op.prepare(-1)
    proc = spawn(op.argv, log)
    assert _wait(proc, op.start), f"{op.name}: never began working on its output; see {log}"
    opened, write, began, last = time.time(), 0.0, None, 0.0
    while proc.poll() is None and not (op.end and op.end()):
        now, busy = time.time(), op.writing()
        if busy and began is None:
            began, last = now, now - opened
        elif not busy and began is not None:
            write, began = max(write, now - began), None
        time.sleep(0.0005)
    window = Window(time.time() - opened, write, last)
    proc.wait()
    assert proc.returncode == 0, f"{op.name}: the uninterrupted run failed; see {log}"
    assert window.write > 0, f"{op.name}: no write was seen in the uninterrupted run"
    return window


def kill_trial(op: Operation, trial: int, window: Window, rng: random.Random, log: Path) -> Outcome | None:
    """One SIGKILL at a random moment; None when the operation finished before that moment came.

    Even trials: a moment drawn uniformly over the working window. Odd trials: a random point before the last
    write begins, then the next write after it, killed at a moment drawn uniformly over the length of a write."""
    op.prepare(trial)
    proc = spawn(op.argv, log)
    moment = None
    if _wait(proc, op.start):
        moment = time.time() + rng.uniform(0, window.working)
        if trial % 2 == 1:
            _wait(proc, lambda: False, deadline=time.time() + rng.uniform(0, window.last_write))
            moment = time.time() + rng.uniform(0, window.write) if _wait(proc, op.writing) else None
    if moment is not None:
        _wait(proc, lambda: False, deadline=moment)
    if moment is None or proc.poll() is not None:
        proc.wait()
        op.stats["finished_first"] += 1
        return None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    op.stats["landed"] += 1
    mid_write = bool([p for p in leftovers(op.output) if "tmp" in p.name and "probe" not in p.name])
    op.stats["mid_write"] += mid_write
    broken = op.after_kill()
    failed = op.rerun()
    return Outcome(
        "kill",
        f"{op.name} #{trial} (killed {'mid-write' if mid_write else 'between writes'})",
        handled=broken is None and failed is None,
        corrupted=broken is not None,
        lost=op.is_run and failed is not None,
        note="; ".join(filter(None, [broken, failed])),
    )


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    for p in leftovers(path):
        _remove(p)


def _rerun(argv: list, output: Path, check: Callable[[], str | None]) -> str | None:
    rc, err = cli(argv)
    if rc != 0:
        return f"rerun exited {rc}: {err.strip()[-300:]}"
    left = leftovers(output)
    return check() or (f"left behind after a successful rerun: {[p.name for p in left]}" if left else None)


def patch_operation(fx: Fixtures) -> Operation:
    from ctxext.io.lock import lock_path

    out = fx.root / "kill-patch" / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["patch", fx.src, out, "--method", "yarn", "--factor", "2"]
    reference = fx.root / "kill-patch-reference"
    if not reference.exists():
        assert cli(argv[:2] + [reference] + argv[3:])[0] == 0
    expected = patched_logits(reference)

    def prepare(trial: int) -> None:
        _remove(out)
        if trial // 2 % 2 == 1:  # every other pair of trials replaces an existing OUT (--force)
            shutil.copytree(reference, out)

    return Operation(
        "patch",
        argv + ["--force"],
        out,
        start=lambda: lock_path(out).exists(),
        writing=lambda: any("probe" not in p.name for p in out.parent.glob(f".{out.name}.ctxext-tmp-*")),
        prepare=prepare,
        after_kill=lambda: checkpoint_is(out, expected) if out.exists() else None,
        rerun=lambda: _rerun(argv + ["--force"], out, lambda: checkpoint_is(out, expected)),
    )


def export_operation(fx: Fixtures) -> Operation:
    from ctxext.io.lock import lock_path

    out = fx.root / "kill-export" / "out.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["export", "gguf", fx.src, out, "--force"]
    expected = fx.gguf.read_bytes()

    def same() -> str | None:
        from ctxext.errors import CtxextError
        from ctxext.io.gguf.read import read_gguf

        try:
            read_gguf(out)
        except CtxextError as err:
            return f"{out} does not read back: {err}"
        return None if out.read_bytes() == expected else f"{out} reads back but differs from the uninterrupted export"

    def prepare(trial: int) -> None:
        _remove(out)
        if trial // 2 % 2 == 1:
            shutil.copy(fx.gguf, out)

    return Operation(
        "export",
        argv,
        out,
        start=lambda: lock_path(out).exists(),
        writing=lambda: any(out.parent.glob(f".{out.name}.ctxext-tmp-*")),
        prepare=prepare,
        after_kill=lambda: same() if out.exists() else None,
        rerun=lambda: _rerun(argv, out, same),
    )


@dataclass
class ReferenceRun:
    run: Path
    curve: list[float]
    merged_logits: object


def finetune_argv(fx: Fixtures, run: Path, *extra, resume: bool = False) -> list:
    return [
        "finetune",
        TINY_YAML,
        f"model.path={fx.src}",
        *RUN_OVERRIDES,
        *extra,
        "--output-dir",
        run,
        *(["--resume"] if resume else []),
    ]


def reference_run(fx: Fixtures) -> ReferenceRun:
    run = fx.root / "reference-run"
    if not (run / "merged").is_dir():
        _remove(run)
        rc, err = cli(finetune_argv(fx, run))
        assert rc == 0, err
    return ReferenceRun(run, losses(run), patched_logits(run / "merged"))


def run_is_finished_like(ref: ReferenceRun, run: Path) -> str | None:
    """None when ``run`` holds the uninterrupted loss curve, whole checkpoints and the same merged model."""
    incomplete = training_checkpoints_complete(run)
    if incomplete:
        return incomplete
    if not same_curve(losses(run), ref.curve):
        return f"loss curve differs from the uninterrupted run: {losses(run)} vs {ref.curve}"
    return checkpoint_is(run / "merged", ref.merged_logits)


def _run_after_kill(ref: ReferenceRun, run: Path) -> str | None:
    """After a kill: whole checkpoints, and adapter/merged absent or complete."""
    problem = training_checkpoints_complete(run)
    if problem is None and (run / "merged").exists():
        problem = checkpoint_is(run / "merged", ref.merged_logits)
    if problem is None and (run / "adapter").exists():
        from ctxext.io.validate import read_headers

        try:
            read_headers([run / "adapter" / "adapter_model.safetensors"])
            json.loads((run / "adapter" / "adapter_config.json").read_text())
        except Exception as err:  # noqa: BLE001
            problem = f"{run / 'adapter'} is incomplete: {err}"
    return problem


def finetune_operation(fx: Fixtures, ref: ReferenceRun) -> Operation:
    run = fx.root / "kill-finetune" / "run"
    last = run / "checkpoints" / f"step-{len(ref.curve):06d}"
    return Operation(
        "finetune checkpointing",
        finetune_argv(fx, run),
        run,
        start=lambda: (run / "checkpoints").exists(),
        end=lambda: last.exists(),
        writing=lambda: any((run / "checkpoints").glob(".step-*")),
        prepare=lambda trial: _remove(run),
        after_kill=lambda: _run_after_kill(ref, run),
        rerun=lambda: _rerun(finetune_argv(fx, run, resume=True), run, lambda: run_is_finished_like(ref, run)),
        is_run=True,
    )


def merge_operation(fx: Fixtures, ref: ReferenceRun) -> Operation:
    """The end of a run: every checkpoint written, the adapter and the merged checkpoint not yet. A trial resumes a
    copy of the reference run without its results, which goes straight to the merge."""
    run = fx.root / "kill-merge" / "run"

    def prepare(trial: int) -> None:
        _remove(run)
        shutil.copytree(ref.run, run, ignore=shutil.ignore_patterns("adapter", "merged"))

    return Operation(
        "merge at the end",
        finetune_argv(fx, run, resume=True),
        run,
        start=lambda: (run / "adapter").exists() or any(run.glob(".adapter.ctxext-tmp-*")),
        writing=lambda: any(run.glob(".adapter.ctxext-tmp-*")) or any(run.glob(".merged.ctxext-tmp-*")),
        prepare=prepare,
        after_kill=lambda: _run_after_kill(ref, run),
        rerun=lambda: _rerun(finetune_argv(fx, run, resume=True), run, lambda: run_is_finished_like(ref, run)),
        is_run=True,
    )


def part_kill(fx: Fixtures, args) -> list[Outcome]:
    rng = random.Random(args.seed)
    ref = reference_run(fx)
    outcomes = []
    for make in (patch_operation, export_operation, finetune_operation, merge_operation):
        op = make(fx) if make in (patch_operation, export_operation) else make(fx, ref)
        log = fx.root / f"kill-{op.name.split()[0]}.log"
        window = calibrate(op, log)
        print(f"  {op.name}: working window {window.working:.2f} s, one write {window.write:.3f} s", flush=True)
        trial = 0
        while op.stats["landed"] < args.kills and trial < 4 * args.kills:
            outcome = kill_trial(op, trial, window, rng, log)
            trial += 1
            if outcome is not None:
                outcomes.append(outcome)
                print(f"  {'ok  ' if outcome.handled else 'FAIL'} {outcome.case} {outcome.note[:200]}", flush=True)
        outcomes.append(
            Outcome(
                "kill",
                f"{op.name}: {op.stats['landed']} kills landed ({op.stats['mid_write']} "
                f"mid-write; working window {window.working:.2f} s, one write {window.write:.3f} s), "
                f"{op.stats['finished_first']} runs finished before their moment",
                handled=op.stats["landed"] >= args.kills,
                note="summary",
            )
        )
    return outcomes


# ---------------------------------------------------------------- part 3: a full disk


@contextlib.contextmanager
def small_filesystem(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path``; raises PermissionError (with mount's words) where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    size = max(4096, -(-size // 4096) * 4096)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs here: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until the filesystem is full."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


def tree_bytes(path: Path) -> dict[str, bytes]:
    return (
        {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.is_dir()
        else {"": path.read_bytes()}
    )


def _disk_case(name: str, argv: list, out: Path, before: dict | None) -> Outcome:
    rc, err = cli(argv)
    after = tree_bytes(out) if out.exists() else None
    kept = after == before
    problems = [
        what
        for what, ok in (
            (f"exit code {rc}", rc == 2),
            ("no disk-full message", "no space left" in err),
            ("traceback", "Traceback" not in err),
            ("previous output changed", kept),
            ("temporary files left", not leftovers(out)),
        )
        if not ok
    ]
    return Outcome(
        "disk",
        name,
        not problems,
        corrupted=not kept,
        note="; ".join(problems) + " | " + (err.strip().splitlines() or [""])[-1][:300],
    )


def part_disk(fx: Fixtures, args) -> list[Outcome]:
    reference = fx.root / "kill-patch-reference"
    if not reference.exists():
        assert cli(["patch", fx.src, reference, "--method", "yarn", "--factor", "2"])[0] == 0
    size = sum(len(b) for b in tree_bytes(reference).values())
    mount = fx.root / "full"
    outcomes = []
    try:
        with small_filesystem(mount, int(size * 1.5)):
            out = mount / "out"
            shutil.copytree(reference, out)
            outcomes.append(
                _disk_case(
                    "patch --force over an existing OUT on a full disk",
                    ["patch", fx.src, out, "--method", "yarn", "--factor", "2", "--force"],
                    out,
                    tree_bytes(out),
                )
            )
            fresh = mount / "fresh"
            outcomes.append(
                _disk_case(
                    "patch into a new OUT on a full disk",
                    ["patch", fx.src, fresh, "--method", "yarn", "--factor", "2"],
                    fresh,
                    None,
                )
            )
        with small_filesystem(mount, int(fx.gguf.stat().st_size * 1.5)):
            out = mount / "out.gguf"
            shutil.copy(fx.gguf, out)
            outcomes.append(
                _disk_case(
                    "export --force over an existing GGUF on a full disk",
                    ["export", "gguf", fx.src, out, "--force"],
                    out,
                    tree_bytes(out),
                )
            )
        with small_filesystem(mount, 64 << 20):
            outcomes.append(finetune_on_full_disk(fx, mount))
    except PermissionError as err:
        outcomes.append(Outcome("disk", f"skipped: {err}", handled=False, note="skipped"))
    return outcomes


def finetune_on_full_disk(fx: Fixtures, mount: Path) -> Outcome:
    """The disk fills up after the second checkpoint: the run stops (exit 2), its checkpoints are whole, and once
    there is space again ``--resume`` finishes it on the uninterrupted loss curve."""
    ref = reference_run(fx)
    run = mount / "run"
    log = fx.root / "disk-finetune.log"
    proc = spawn(finetune_argv(fx, run), log)
    _wait(proc, lambda: (run / "checkpoints" / "step-000002").exists())
    filler = fill(mount)
    proc.wait()
    err = log.read_text()
    problems = [
        what
        for what, ok in (
            (f"exit code {proc.returncode}", proc.returncode == 2),
            ("no disk-full message", "no space left" in err),
            ("last checkpoint not named", "last complete checkpoint is" in err),
            ("traceback", "Traceback" not in err),
        )
        if not ok
    ]
    broken = training_checkpoints_complete(run)
    filler.unlink()
    failed = _rerun(finetune_argv(fx, run, resume=True), run, lambda: run_is_finished_like(ref, run))
    problems += [p for p in (broken, failed) if p]
    return Outcome(
        "disk",
        "finetune whose disk fills up after checkpoint 2, then --resume",
        not problems,
        corrupted=broken is not None,
        lost=failed is not None,
        note="; ".join(problems) + " | " + (err.strip().splitlines() or [""])[-1][:300],
    )


# ---------------------------------------------------------------- part 4: two runs into one output


def part_lock(fx: Fixtures, args) -> list[Outcome]:
    from ctxext.io.lock import lock_path, output_lock

    outcomes = []
    out = fx.out("locked")
    with output_lock(out, "the reliability drill"):
        rc, err = cli_subprocess(["patch", fx.src, out, "--method", "yarn", "--factor", "2"])
    ok = rc == 2 and f"pid {os.getpid()}" in err and nothing_written(out)
    outcomes.append(Outcome("lock", "patch into an OUT another process holds", ok, note=err.strip()[-300:]))

    out = fx.out("stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "killed run", "started": "earlier"})
    )
    rc, err = cli(["patch", fx.src, out, "--method", "yarn", "--factor", "2"])
    ok = rc == 0 and out.is_dir() and not leftovers(out)
    outcomes.append(Outcome("lock", "stale lock (its pid is not running) is taken over", ok, note=err.strip()[-300:]))

    outcomes.append(two_finetunes_at_once(fx))
    return outcomes


def cli_subprocess(argv: list) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", *map(str, argv)],
        check=False,
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stderr


def two_finetunes_at_once(fx: Fixtures) -> Outcome:
    """Two identical fine-tunes into one folder, started together: one runs, the other is refused naming it."""
    ref = reference_run(fx)
    run = fx.out("run")
    logs = [fx.root / f"lock-{i}.log" for i in (0, 1)]
    procs = [spawn(finetune_argv(fx, run), log) for log in logs]
    for p in procs:
        p.wait()
    codes = sorted(p.returncode for p in procs)
    winner = next((p for p in procs if p.returncode == 0), None)
    loser_err = next((log.read_text() for p, log in zip(procs, logs) if p.returncode != 0), "")
    problems = []
    if codes != [0, 2]:
        problems.append(f"exit codes {codes}")
    elif f"pid {winner.pid}" not in loser_err and "already holds a run" not in loser_err:
        problems.append("the refusal does not name the running one")
    finished = run_is_finished_like(ref, run)
    problems += [finished] if finished else []
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    if steps != sorted(set(steps)):
        problems.append(f"interleaved metrics: steps {steps}")
    return Outcome(
        "lock",
        "two fine-tunes into one folder started together",
        not problems,
        corrupted=finished is not None,
        lost=finished is not None,
        note="; ".join(problems) + " | " + (loser_err.strip().splitlines() or [""])[-1][:300],
    )


# ---------------------------------------------------------------- part 5: a diverging run


def part_diverge(fx: Fixtures, args) -> list[Outcome]:
    """Stage 2 at learning rate 1e30 (no clipping): its first update wrecks the weights and the next loss is not
    finite. Exit 3; the checkpoint whose weights gave that loss is set aside; the one before it is named as the last
    good one, holds finite weights, and --resume with a sane learning rate continues from it to the end, keeping the
    curve up to it."""
    import torch
    from safetensors.torch import load_file

    from ctxext.train.config import load_config

    total = sum(load_config(TINY_YAML).stage_steps(i) for i in range(len(load_config(TINY_YAML).stages)))
    run = fx.out("diverge")
    rc, err = cli_subprocess(finetune_argv(fx, run, "stages.1.lr=1e30", "optimization.grad_clip=null"))
    found = re.search(r"loss became (?:nan|inf|-inf) at step (\d+)", err)
    step = int(found.group(1)) if found else 0
    good = run / "checkpoints" / f"step-{step - 2:06d}"
    problems = [
        what
        for what, ok in (
            (f"exit code {rc}", rc == 3),
            ("no divergence message", found is not None),
            ("last good checkpoint not named", f"Last good checkpoint: {good}" in err),
            ("wrecked checkpoint not set aside", (run / "checkpoints" / f"diverged-step-{step - 1:06d}").is_dir()),
        )
        if not ok
    ]
    finite = good.is_dir() and all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())
    whole = training_checkpoints_complete(run)  # weights, optimizer, scheduler, RNG and position all load
    finite = finite and whole is None
    problems += (
        [] if finite else [whole or f"the last good checkpoint {good.name} is missing or holds non-finite weights"]
    )
    before = losses(run)[: step - 2] if (run / "metrics.jsonl").exists() else []
    rc2, err2 = cli_subprocess(
        ["-v", *finetune_argv(fx, run, "stages.1.lr=1e-3", "optimization.grad_clip=null", resume=True)]
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if rc2 == 0 else []
    resumed = (
        f"resumed from {good}\n" in err2  # from that checkpoint, not from scratch
        and [r["step"] for r in records] == list(range(1, total + 1))
        and all(math.isfinite(r["loss"]) for r in records)
        and [r["loss"] for r in records[: step - 2]] == before
        and checkpoint_is(run / "merged", patched_logits(run / "merged")) is None
    )
    problems += [] if resumed else [f"resume from {good.name} failed ({rc2}): {err2.strip()[-300:]}"]
    return [
        Outcome(
            "diverge",
            f"loss not finite at step {step}: exit 3, last good checkpoint loads and resumes",
            not problems,
            corrupted=not finite,
            lost=not resumed,
            note="; ".join(problems) + " | " + (err.strip().splitlines() or [""])[-1][:300],
        )
    ]


# ---------------------------------------------------------------- report


def table(outcomes: list[Outcome]) -> list[str]:
    lines = ["| part | cases tried | handled | outputs corrupted | runs lost |", "|---|---|---|---|---|"]
    rows = [o for o in outcomes if o.note != "summary"]
    for part in PARTS:
        mine = [o for o in rows if o.part == part]
        if mine:
            lines.append(
                f"| {part} | {len(mine)} | {sum(o.handled for o in mine)} | {sum(o.corrupted for o in mine)} "
                f"| {sum(o.lost for o in mine)} |"
            )
    lines.append(
        f"| **all** | **{len(rows)}** | **{sum(o.handled for o in rows)}** | "
        f"**{sum(o.corrupted for o in rows)}** | **{sum(o.lost for o in rows)}** |"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--kills", type=int, default=20, help="kills that must land per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="write every case's outcome here")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
    import torch

    torch.set_num_threads(1)
    started = time.time()
    with contextlib.ExitStack() as stack:
        root = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drill-")))
        fx = make_fixtures(root)
        outcomes: list[Outcome] = []
        runners = {
            "inputs": part_inputs,
            "kill": part_kill,
            "disk": part_disk,
            "lock": part_lock,
            "diverge": part_diverge,
        }
        for part in parts:
            print(f"== {part}", flush=True)
            outcomes += runners[part](fx, args)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    print()
    print("\n".join(table(outcomes)))
    for o in outcomes:
        if o.note == "summary" or o.note.startswith("skipped"):
            print(f"- {o.case}")
    failures = [o for o in outcomes if not o.handled]
    for o in failures:
        print(f"NOT HANDLED: [{o.part}] {o.case}: {o.note}")
    print(
        f"\n{len(outcomes)} outcomes in {(time.time() - started) / 60:.1f} min "
        f"(python -m tests.reliability_drill --parts {args.parts} --kills {args.kills} --seed {args.seed})"
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
