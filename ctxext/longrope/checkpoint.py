"""``ctxext search``: LongRoPE factor search on a checkpoint, saved as transformers' native ``longrope``.

    search_checkpoint("reference", "out/longrope8", target_length=2048, data="stdlib:train", budget=160)

Fitness of a candidate (``ctxext/search.py``): the mean next-token NLL (log perplexity) of the checkpoint, with the
candidate's frequencies, on ``windows`` calibration windows of ``window`` tokens: the first ``window`` tokens of
documents of ``data`` at least that long, evenly spaced over them. The default data, ``stdlib:train``, is disjoint
from the default evaluation text (``stdlib:held_out``), so an evaluation after the search is on unseen text.

Cheap proxy for long targets. ``window`` defaults to the target length: the fitness is then the perplexity at the
target itself (the reference model x8: a 2048-token forward takes about 0.7 s on one CPU thread). When one forward
at the target costs minutes (SmolLM2-135M at 16k on this CPU), ``window`` < target gives PoSE-style windows (Zhu et
al. 2023): the first half of a window keeps positions ``0 .. window/2 - 1`` and the second half jumps ahead, window
``k`` of ``K`` by ``(target - window) (k + 1) / K``, the last one ending at position ``target - 1``. Every window
thus makes transformers use the long factors (its largest position is beyond the trained context) and
exercises rotation angles of distances up to the target, for the cost of ``window`` tokens. What it cannot
exercise is attention spread over ``target`` tokens, which is what the attention factor compensates for, so in
proxy mode the attention factor is not searched: it is fixed at LongRoPE's ``sqrt(1 + ln s / ln L)`` (or
``attention_factor``). Measured on the reference model x8 (docs/results/LONGROPE.md), the proxy's factors did not beat
YaRN on full-length held-out text while the exact search's did, so proxy-searched factors must be checked at the
target length.

Gradient refinement (``refine_steps``): ``CalibrationObjective.value_and_grad`` runs the same windows through a plain
rotary module whose frequencies ``default / factors`` and cos/sin multiplier are tensors (``models.rope_as_input``),
so one backward per window gives the fitness's gradient with respect to every factor and the attention factor;
``search.refine`` then steps from the evolution's best. The refinement's state is saved after every step.

Output OUT: a safetensors checkpoint whose ``rope_parameters`` are ``longrope`` with ``short_factor`` all ones (a
forward whose positions stay within the trained context keeps the original frequencies; the attention factor
applies at every length, as transformers computes it once), ``long_factor`` the searched factors,
``max_position_embeddings`` the target; plus ``search.json`` (the search curve and settings) and ``search.png``.
The search state is written atomically after every generation to ``OUT.search-state.json`` beside OUT;
``resume=True`` continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctxext import __version__
from ctxext.errors import DataError, SearchError
from ctxext.io.atomic import atomic_write_text
from ctxext.io.lock import locks_output
from ctxext.longrope.evolution import (
    MAX_FACTOR_RATIO,
    Candidate,
    EvolutionConfig,
    RefineConfig,
    SearchSpace,
    SearchState,
    evolve,
    longrope_attention_factor,
    seed_candidates,
    summary,
    yarn_attention_factor,
)
from ctxext.longrope.evolution import (
    refine as refine_factors,
)
from ctxext.models import compute_inv_freq, family_of, head_dim_of, rebuild_rotary
from ctxext.models.base import get_rope_parameters
from ctxext.models.native import RECORD_KEY, extended_record, universal_form
from ctxext.options import DType, Options, opt, takes
from ctxext.rope.registry import RopeContext, RopeState

log = logging.getLogger(__name__)

DEFAULT_DATA = "stdlib:train"  # disjoint from the default evaluation text, stdlib:held_out
DEFAULT_WINDOWS = 4
DEFAULT_BUDGET = 160
ATTENTION_LOW = 1.0
ATTENTION_HIGH = 1.5  # at least; raised above YaRN's own factor for very large extensions
STATE_FORMAT = 1


@dataclass(frozen=True)
class SearchProblem:
    """What the search optimises for one checkpoint (all but the evolution's sizes).

    Attributes:
        source: the checkpoint folder.
        context_length: its trained context ``L``.
        target_length: the context searched for ``N > L``.
        head_dim / rope_theta: its plain RoPE.
        window / windows: calibration window tokens and count; ``window < target_length`` is the PoSE proxy.
        data / text_field: the calibration text source.
        attention_factor: fixed attention factor, or None to search it (direct windows only).
    """

    source: str
    context_length: int
    target_length: int
    head_dim: int
    rope_theta: float
    window: int
    windows: int
    data: str
    text_field: str = "text"
    attention_factor: float | None = None

    @property
    def scale(self) -> float:
        return self.target_length / self.context_length

    @property
    def proxy(self) -> bool:
        return self.window < self.target_length

    @property
    def ctx(self) -> RopeContext:
        return RopeContext(head_dim=self.head_dim, rope_theta=self.rope_theta, context_length=self.context_length)

    def space(self, max_factor_ratio: float = MAX_FACTOR_RATIO) -> SearchSpace:
        """The search space; ``max_factor_ratio`` (LongRoPE's 1.25 by default) is kept out of the problem so that
        the state files of searches in LongRoPE's space still resume (the space, max factor included, is in them)."""
        if self.attention_factor is not None:
            attention: float | tuple[float, float] = self.attention_factor
        elif self.proxy:
            attention = longrope_attention_factor(self.scale, self.context_length)
        else:
            attention = (ATTENTION_LOW, max(ATTENTION_HIGH, yarn_attention_factor(self.scale) + 0.1))
        return SearchSpace.for_extension(self.head_dim // 2, self.scale, attention, max_factor_ratio)

    def rope_parameters(self, candidate: Candidate) -> dict[str, Any]:
        """Native ``longrope`` parameters: original frequencies within the trained context, ``candidate``'s beyond."""
        ctx = self.ctx
        long = RopeState(
            ctx.default_inv_freq() / torch.tensor(candidate.factors, dtype=torch.float64), candidate.attention_factor
        )
        return universal_form(
            {"rope_theta": self.rope_theta}, long, ctx, short=RopeState(ctx.default_inv_freq()), factor=self.scale
        )


# ---------------------------------------------------------------- checks (before anything is loaded or written)


def check_searchable(config, target_length: Any) -> tuple[int, dict[str, Any]]:
    """``(trained context, rope parameters)`` of a config the search applies to; ``SearchError`` otherwise."""
    family = family_of(config)
    if family.per_layer_type:
        raise SearchError(
            f"{family.name} keeps separate rope parameters per layer type; the factor search handles "
            "checkpoints with one plain RoPE shared by all layers (llama, mistral, qwen2, qwen3)"
        )
    params = get_rope_parameters(config, None)
    if params.get("rope_type", "default") != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
        partial = params.get("partial_rotary_factor", 1.0)
        partial = f", partial_rotary_factor {partial}" if partial != 1.0 else ""
        raise SearchError(
            f"the factor search needs a checkpoint with plain RoPE (rope_type 'default' on every "
            f"dimension); this one has rope_type {params.get('rope_type')!r}"
            f"{partial}. "
            "Search on the original checkpoint"
        )
    context = int(config.max_position_embeddings)
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= context:
        raise SearchError(
            f"target_length={target_length!r} is invalid; valid range: an integer > the checkpoint's "
            f"trained context {context}"
        )
    return context, params


def check_window(window: Any, windows: Any, target_length: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= target_length:
        raise SearchError(f"window={window!r} is invalid; valid range: 2 <= window <= target_length ({target_length})")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise SearchError(f"windows={windows!r} is invalid; valid range: an integer >= 1")


def init_candidate(path: str | os.PathLike, problem: SearchProblem, space: SearchSpace) -> Candidate:
    """The factors of an earlier search, to start this one from: its OUT checkpoint (any checkpoint with native
    ``longrope`` parameters) or its ``search.json``. LongRoPE's progressive extension starts each search from the
    previous one's factors the same way. Factors are clipped to ``space``'s ``[1, max_factor]``; the attention factor
    is clipped to its range (or replaced by the fixed one when the space does not search it)."""
    path = Path(path)
    try:
        if path.is_dir():
            from ctxext.io.checkpoint import load_config

            config = load_config(str(path))
            params = get_rope_parameters(config, None)
            if params.get("rope_type") != "longrope":
                raise SearchError(
                    f"--init {path}: rope_type {params.get('rope_type')!r}, not 'longrope'; give the "
                    "output folder of an earlier `ctxext search` (or its search.json)"
                )
            if not math.isclose(float(params["rope_theta"]), problem.rope_theta):
                raise SearchError(
                    f"--init {path}: rope_theta {params['rope_theta']} differs from the checkpoint's "
                    f"{problem.rope_theta}; its factors do not apply here"
                )
            factors = [float(f) for f in params["long_factor"]]
            attention = params.get("attention_factor")
            if attention is None:  # transformers' default for longrope (Phi-3: factor from the two contexts)
                attention = compute_inv_freq(params, head_dim_of(config), config.max_position_embeddings)[1]
        else:
            saved = json.loads(path.read_text())
            if saved.get("context_length") not in (None, problem.context_length):
                raise SearchError(
                    f"--init {path}: a search of a checkpoint trained at {saved['context_length']} "
                    f"tokens; this one is trained at {problem.context_length}"
                )
            factors, attention = [float(f) for f in saved["best"]["factors"]], saved["best"]["attention_factor"]
        attention = float(attention)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(err, SearchError):
            raise
        raise SearchError(
            f"--init {path}: cannot read searched factors ({err}); give the output folder of an "
            "earlier `ctxext search` or its search.json"
        ) from None
    if not all(math.isfinite(f) for f in [*factors, attention]) or attention <= 0:
        raise SearchError(f"--init {path}: its factors or attention factor are not finite positive numbers")
    if len(factors) != space.num_pairs:
        raise SearchError(
            f"--init {path}: {len(factors)} factors, but this checkpoint has {space.num_pairs} rotation "
            "pairs; start from a search of a model with the same head dimension"
        )
    clipped = tuple(min(max(f, 1.0), space.max_factor) for f in factors)
    if any(b < a for a, b in zip(clipped, clipped[1:])):
        raise SearchError(
            f"--init {path}: the factors decrease from high to low frequency, outside LongRoPE's "
            "search space; start from a ctxext search's output"
        )
    attention = min(max(attention, space.attention_low), space.attention_high)  # not snapped to the grid
    return Candidate(clipped, attention, origin="init")


def state_path(out: str | os.PathLike) -> Path:
    """Where the search state of OUT lives: ``OUT.search-state.json`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".search-state.json")


# ---------------------------------------------------------------- calibration windows and the fitness


def calibration_ids(
    texts: list[str], tokenize: Callable[[list[str]], list[list[int]]], window: int, count: int
) -> torch.Tensor:
    """``[K, window]``: the first ``window`` tokens of ``count`` documents at least that long (fewer if fewer are).

    Documents are tried evenly spaced over those with at least ``window`` UTF-8 bytes (a token covers at least one
    byte, so shorter ones cannot qualify), then the rest in order, and tokenized only until ``count`` qualify."""
    sized = [t for t in texts if len(t.encode("utf-8")) + 1 >= window]  # +1: a tokenizer's inserted prefix space
    spread = [int(i) for i in np.linspace(0, len(sized) - 1, min(count, len(sized))).round()] if sized else []
    order = list(dict.fromkeys([*spread, *range(len(sized))]))
    found: list[list[int]] = []
    for begin in range(0, len(order), count):
        batch = tokenize([sized[i] for i in order[begin : begin + count]])
        found += [ids[:window] for ids in batch if len(ids) >= window][: count - len(found)]
        if len(found) == count:
            break
    if not found:
        raise DataError(
            f"no calibration document has {window} tokens ({len(texts)} documents, each fewer than one "
            "block); give longer documents or a shorter --window"
        )
    if len(found) < count:
        log.warning("only %d calibration documents have %d tokens; using %d windows", len(found), window, len(found))
    return torch.tensor(found, dtype=torch.long)


def proxy_skips(window: int, target_length: int, count: int) -> list[int]:
    """How far the second half of each proxy window jumps ahead (the last one ends at ``target_length - 1``)."""
    return [round((target_length - window) * (k + 1) / count) for k in range(count)]


def proxy_position_ids(window: int, target_length: int, count: int) -> torch.Tensor | None:
    """PoSE-style position ids ``[count, window]`` (see the module docstring), or None when ``window`` is the target."""
    if window >= target_length:
        return None
    half = window // 2
    return torch.stack(
        [
            torch.cat([torch.arange(half), torch.arange(half, window) + skip])
            for skip in proxy_skips(window, target_length, count)
        ]
    )


def use_rope_parameters(model, params: dict[str, Any], max_position_embeddings: int) -> None:
    """Give ``model`` these rope parameters, rebuilding its rotary module as ``from_pretrained`` would."""
    model.config.rope_parameters = copy.deepcopy(params)
    model.config.max_position_embeddings = max_position_embeddings
    rebuild_rotary(model)


class CalibrationObjective:
    """Fitness: mean next-token NLL of ``model`` on ``ids`` (one window per forward) with a candidate's rope."""

    def __init__(self, model, problem: SearchProblem, ids: torch.Tensor, position_ids: torch.Tensor | None):
        self.model, self.problem = model, problem
        device = next(model.parameters()).device
        self.ids = ids.to(device)
        self.position_ids = position_ids.to(device) if position_ids is not None else None

    def __call__(self, candidate: Candidate) -> float:
        from ctxext.evals.perplexity import window_nll

        use_rope_parameters(self.model, self.problem.rope_parameters(candidate), self.problem.target_length)
        total = 0.0
        for k in range(self.ids.shape[0]):
            row = self.ids[k : k + 1]
            positions = self.position_ids[k : k + 1] if self.position_ids is not None else None
            total += window_nll(self.model, row, row[:, 1:], position_ids=positions).item()
        return total / (self.ids.shape[0] * (self.ids.shape[1] - 1))

    def value_and_grad(self, candidate: Candidate) -> tuple[float, list[float], float]:
        """The fitness at ``candidate`` and its gradients with respect to the factors and the attention factor
        (one forward and backward per window, the weights frozen; the same numbers as ``__call__``)."""
        from ctxext.evals.perplexity import summed_nll
        from ctxext.models import rope_as_input

        default = self.problem.ctx.default_inv_freq()
        factors = torch.tensor(candidate.factors, dtype=torch.float64, requires_grad=True)
        attention = torch.tensor(candidate.attention_factor, dtype=torch.float64, requires_grad=True)
        total, count = 0.0, self.ids.shape[0] * (self.ids.shape[1] - 1)
        device = next(self.model.parameters()).device
        with rope_as_input(self.model, self.problem.rope_theta, self.problem.target_length) as set_rope:
            for k in range(self.ids.shape[0]):
                set_rope((default / factors).to(device), attention.to(device))  # a fresh graph per window
                row = self.ids[k : k + 1]
                positions = self.position_ids[k : k + 1] if self.position_ids is not None else None
                nll = summed_nll(self.model, row, row[:, 1:], position_ids=positions)
                (nll / count).backward()
                total += nll.item()
        return total / count, factors.grad.tolist(), float(attention.grad)


def tokens_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- state file


def settings_of(
    problem: SearchProblem,
    config: EvolutionConfig,
    space: SearchSpace,
    digest: str,
    refine_config: RefineConfig | None = None,
    init: Candidate | None = None,
) -> dict[str, Any]:
    """Everything a resumed search must share with the one it continues (the budget and refine steps may grow)."""
    evolution = {k: v for k, v in asdict(config).items() if k != "budget"}
    settings = {
        "problem": asdict(problem),
        "evolution": evolution,
        "space": asdict(space),
        "calibration_sha256": digest,
        "refine_lr": (refine_config or RefineConfig()).lr,
    }
    if init is not None:  # (absent otherwise, so the states of searches without one still resume)
        settings["init"] = {"factors": list(init.factors), "attention_factor": init.attention_factor}
    return json.loads(json.dumps(settings))  # as it reads back from the state file


def read_state(path: Path, settings: dict[str, Any], budget: int, refine_steps: int = 0) -> SearchState:
    try:
        saved = json.loads(path.read_text())
        state = SearchState.from_json(saved["state"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SearchError(f"cannot read the search state {path}: {err}; delete it to start over") from err
    if saved.get("format") != STATE_FORMAT or saved.get("settings") != settings:
        old = saved.get("settings") or {}
        differ = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
        raise SearchError(
            f"{path} belongs to another search (different {', '.join(differ) or 'format'}); resume with "
            "the same checkpoint, target, data, window, seed and --init, or pass --force to start over"
        )
    evolved = state.refine.evolution_evaluations if state.refine else state.evaluations
    if budget < evolved:
        raise SearchError(
            f"budget={budget} is smaller than the {evolved} evaluations {path} already holds; "
            f"give a budget >= {evolved}"
        )
    if state.refine and budget > evolved:
        raise SearchError(
            f"{path} has started its gradient refinement after {evolved} evaluations; resume with "
            f"--budget {evolved} (more --refine steps may follow) or pass --force to start over"
        )
    if state.refine and refine_steps < state.refine.step:
        raise SearchError(
            f"refine={refine_steps} is fewer than the {state.refine.step} refine steps {path} already "
            f"holds; give --refine >= {state.refine.step}"
        )
    return state


def write_state(path: Path, settings: dict[str, Any], budget: int, state: SearchState) -> None:
    payload = {"format": STATE_FORMAT, "settings": settings, "budget": budget, "state": state.to_json()}
    atomic_write_text(path, json.dumps(payload))


# ---------------------------------------------------------------- the command


class SearchOptions(Options):
    """``ctxext search SRC OUT --target-length N``."""

    src: str = opt(
        ..., "checkpoint folder with plain RoPE, 'reference', or a GGUF source such as smollm2", positional=True
    )
    out: str = opt(..., "output folder (must not exist unless --force)", positional=True)
    target_length: int = opt(..., "the context to search for (> the trained one)", gt=0)
    data: str = opt(
        DEFAULT_DATA,
        "calibration text: stdlib:train (disjoint from the default evaluation text "
        "stdlib:held_out), package:NAME, a file/folder (.txt/.py/.md/.jsonl/.parquet) or a hub dataset",
    )
    budget: int = opt(
        DEFAULT_BUDGET,
        "perplexity evaluations in all; the first generation takes --population of "
        "them, each later one --population / 2",
        gt=0,
    )
    population: int = opt(16, "population size (LongRoPE: 64)", ge=2)
    seed: int = opt(0, "seed of the evolution")
    window: int | None = opt(
        None, "calibration window tokens (default: the target length; shorter: the PoSE proxy, see above)", gt=1
    )
    windows: int = opt(DEFAULT_WINDOWS, "calibration windows per evaluation", gt=0)
    attention_factor: float | None = opt(None, "fix the attention factor instead of searching it", gt=0)
    max_factor: float = opt(
        MAX_FACTOR_RATIO,
        "the largest factor as a multiple of the extension (1.25: LongRoPE's "
        "search space; larger lets the lowest frequencies be interpolated further than the paper "
        "allows)",
        ge=1,
        metavar="RATIO",
    )
    refine: int = opt(
        0,
        "after the evolution, this many gradient steps on the best factors (see above; 0: none)",
        ge=0,
        metavar="STEPS",
    )
    refine_lr: float = opt(
        RefineConfig.lr,
        "Adam learning rate of --refine, in log factor (0.005: each step moves a factor by about 0.5%)",
        gt=0,
    )
    init: str | None = opt(
        None,
        "start from an earlier search's factors: its OUT folder (or any longrope "
        "checkpoint) or its search.json; they join the first generation as its first seed, as "
        "LongRoPE's progressive search starts from the previous extension's factors (e.g. more "
        "--windows from where a search on fewer ended)",
        metavar="SEARCH",
    )
    resume: bool = opt(False, "continue the search saved in OUT.search-state.json")
    force: bool = opt(False, "replace OUT and start over from scratch")
    text_field: str = opt("text", "field of .jsonl/.parquet rows holding the text")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: DType = opt("auto", "weights dtype of the search; auto keeps the stored one")
    progress: bool = opt(False, "(library) show progress bars; the command line always does")


@takes(SearchOptions)
@locks_output("ctxext search", "out")
def search_checkpoint(
    src,
    out,
    target_length,
    data,
    budget,
    population,
    seed,
    window,
    windows,
    attention_factor,
    max_factor,
    refine,
    refine_lr,
    init,
    resume,
    force,
    text_field,
    device,
    dtype,
    progress,
) -> dict[str, Any]:
    """Search LongRoPE factors for ``src`` at ``target_length`` and write OUT (see the module docstring); OUT (and
    its search state beside it) is locked while the search runs (``ctxext.io.lock``: a second search into OUT is
    refused, naming this one).

    Returns the search summary (also OUT/search.json). Every check runs before a weight is loaded or a file written.
    """
    from ctxext.data.text import load_texts, tokenize_documents
    from ctxext.evals.run import pick_device
    from ctxext.io.checkpoint import check_output, load_config, load_model, save_checkpoint
    from ctxext.io.sources import check_source

    max_factor_ratio, refine_steps = max_factor, refine
    from ctxext.io.validate import load_tokenizer

    src = check_source(src)
    config = load_config(src)
    context, params = check_searchable(config, target_length)
    window = target_length if window is None else window
    check_window(window, windows, target_length)
    evolution = EvolutionConfig.sized(budget, population, seed)
    refinement = RefineConfig(refine_steps, refine_lr)
    problem = SearchProblem(
        src,
        context,
        target_length,
        head_dim_of(config),
        float(params["rope_theta"]),
        window,
        windows,
        data,
        text_field,
        attention_factor,
    )
    space = problem.space(float(max_factor_ratio))
    start = init_candidate(init, problem, space) if init is not None else None
    state_file = state_path(out)
    # a resumed search may replace its own earlier output (a finished search given more --refine steps, say)
    replace = force or (resume and state_file.is_file())
    out = check_output(out, replace)
    if resume and not state_file.is_file():
        raise SearchError(f"nothing to resume: {state_file} does not exist (run without --resume to start)")
    if state_file.is_file() and not resume and not force:
        raise SearchError(
            f"{state_file} holds an earlier search; pass --resume to continue it or --force to start over"
        )

    tokenizer = load_tokenizer(src, config.vocab_size)
    texts = load_texts(data, text_field=text_field)
    try:
        ids = calibration_ids(texts, lambda batch: tokenize_documents(tokenizer, batch), window, windows)
    except DataError as err:  # name the data
        raise DataError(f"data {data}: {err}") from None
    positions = proxy_position_ids(window, target_length, ids.shape[0])
    settings = settings_of(problem, evolution, space, tokens_digest(ids), refinement, start)
    state = read_state(state_file, settings, budget, refine_steps) if resume else None

    model = load_model(src, dtype=dtype).to(pick_device(device))
    objective = CalibrationObjective(model, problem, ids, positions)
    seeds = [*([start] if start else []), *seed_candidates(problem.ctx, problem.scale, space)]
    started = time.time()

    def save(s: SearchState) -> None:
        write_state(state_file, settings, budget, s)

    if state is None or state.refine is None:
        state = evolve(objective, space, evolution, seeds, state=state, progress=progress, on_generation=save)
    state = refine_factors(
        objective.value_and_grad, objective, space, refinement, state, on_step=save, progress=progress
    )
    seconds = time.time() - started

    best = state.best.candidate
    rope = problem.rope_parameters(best)
    check_rope_parameters(rope, problem, best)
    use_rope_parameters(model, rope, target_length)
    step = {
        "chain": [
            {
                "method": "longrope_search",
                "budget": budget,
                "seed": seed,
                "data": data,
                "window": window,
                "windows": int(ids.shape[0]),
                "refine_steps": refine_steps,
                "refine_lr": refine_lr,
                "max_factor": space.max_factor,
                **({"init": str(init)} if init is not None else {}),
            }
        ],
        "spec": f"longrope (searched: {budget} evaluations"
        + (f" + {refine_steps} gradient steps" if refine_steps else "")
        + f", seed {seed})",
        "scope": "all",
        "from_context": context,
        "to_context": target_length,
    }
    setattr(model.config, RECORD_KEY, extended_record(model.config, step, target_length))
    result = {
        "source": src,
        "target_length": target_length,
        "context_length": context,
        "scale": problem.scale,
        "budget": budget,
        "seed": seed,
        "init": str(init) if init is not None else None,
        "calibration": {
            "data": data,
            "text_field": text_field,
            "windows": int(ids.shape[0]),
            "window": window,
            "proxy": "PoSE-style windows: second half jumps ahead" if problem.proxy else None,
            "proxy_skips": proxy_skips(window, target_length, int(ids.shape[0])) if problem.proxy else None,
            "sha256": settings["calibration_sha256"],
        },
        "evolution": asdict(evolution),
        "refine": asdict(refinement),
        "space": asdict(space),
        "fitness": "mean next-token NLL on the calibration windows (perplexity = exp(fitness))",
        "seconds_this_run": seconds,
        "date": time.strftime("%Y-%m-%d"),
        "ctxext": __version__,
        **summary(state, seeds),
    }
    result["best"]["perplexity"] = math.exp(result["best"]["fitness"])

    def write_curve(folder: Path) -> None:
        from ctxext.evals.plots import plot_search

        (folder / "search.json").write_text(json.dumps(result, indent=2))
        plot_search(result, folder / "search.png")

    save_checkpoint(model, out, source=src, force=replace, extra=write_curve)
    log.info("searched factors: calibration perplexity %.3f; wrote %s", result["best"]["perplexity"], out)
    return result


def check_rope_parameters(params: dict[str, Any], problem: SearchProblem, candidate: Candidate) -> None:
    """transformers' own code gives the original frequencies within the trained context and the candidate's beyond."""
    ctx = problem.ctx
    short, _ = compute_inv_freq(params, problem.head_dim, problem.target_length)
    long, attention = compute_inv_freq(params, problem.head_dim, problem.target_length, seq_len=problem.target_length)
    expected = ctx.default_inv_freq() / torch.tensor(candidate.factors, dtype=torch.float64)
    if not (
        torch.allclose(short.double(), ctx.default_inv_freq(), rtol=1e-5, atol=0)
        and torch.allclose(long.double(), expected, rtol=1e-5, atol=0)
        and abs(attention - candidate.attention_factor) < 1e-6
    ):
        raise RuntimeError("internal error: the longrope parameters do not reproduce the searched frequencies")
