"""LongRoPE-style evolutionary search of per-pair RoPE rescale factors (Ding et al. 2024, arXiv:2402.13753).

Pure: numbers in, numbers out. The fitness is any callable ``Candidate -> float`` (lower is better; ctxext's is
the calibration perplexity of a checkpoint, ``ctxext/longrope/checkpoint.py``), so the search is tested on toy problems.

A ``Candidate`` is what transformers' native ``longrope`` rope type stores:
  * ``factors``: one rescale factor ``lambda_i`` per rotation pair (``long_factor``; pair ``i``'s frequency is
    divided by it; pair 0 is the highest frequency);
  * ``attention_factor``: the cos/sin multiplier.

Constraints (LongRoPE's search space, ``SearchSpace.violations``): ``1 <= lambda_0 <= lambda_1 <= ... <= lambda_{n-1}
<= max_factor``, i.e. non-decreasing from high to low frequency and no pair (the first ones included) rotating
faster than trained; the paper's upper bound is ``1.25 s`` for an extension by ``s``. The attention factor stays
in ``[attention_low, attention_high]`` (fixed when the two are equal). Mutations land on a grid of ``step``.

The evolution follows the authors' released ``evolution/algorithms`` (dim_mono):
  * generation 0: the initial population. Its seeds are the PI, NTK and YaRN factor shapes for the extension
    (computed by ctxext's own methods, ``seed_candidates``), each with the attention factors 1, YaRN's and
    LongRoPE's default; mutations of the seeds fill it up to ``population``;
  * every later generation: the ``parents`` best candidates so far; ``mutations`` children, each a mutated random
    parent; ``crossovers`` children, each one parent with a random contiguous block of pairs (and maybe the
    attention factor) taken from another, kept only if it satisfies the constraints (else, after
    ``CROSSOVER_TRIES``, a mutation of the first parent, as LongRoPE). A mutation is, half the time, LongRoPE's
    (every factor, with probability ``mutation_rate``, redrawn uniformly between its neighbours, so the order
    holds) and otherwise ctxext's segment mutation (a block of pairs scaled together, the order repaired by moving
    the pairs it overtakes with it), which can move the flat interpolated tail that PI and YaRN seed and that
    redrawing between equal neighbours never moves; the attention factor moves by a small normal step.

After the evolution, ``refine`` (optional; not in the paper) takes gradient steps from the best candidate: Adam on
the log factors and the log attention factor, each step projected back onto the space (the closest non-decreasing
sequence, then clipped to the bounds), every visited point recorded in the history like an evaluation.

The budget counts fitness evaluations: generation 0 costs ``population``, each later one ``mutations +
crossovers`` (the last one is cut to what is left). No candidate is evaluated twice: a child equal to an evaluated
candidate is redrawn. Generation ``g`` draws from ``numpy.random.default_rng([seed, g])``, so a search resumed from
the state saved after any generation (``SearchState.to_json``) ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ctxext.errors import SearchError
from ctxext.rope.registry import RopeContext, RopeState, make_method

log = logging.getLogger(__name__)

SEED_METHODS = ("pi", "ntk", "yarn")
MAX_FACTOR_RATIO = 1.25  # LongRoPE's search space: lambda_i <= 1.25 s
MUTATION_TRIES = 100  # redraws before a mutation gives up on finding an unseen candidate
CROSSOVER_TRIES = 20  # LongRoPE's max_crossover_try
ATTENTION_SIGMA = 0.05  # standard deviation of an attention-factor mutation
SEGMENT_SIGMA = 0.1  # standard deviation of a segment mutation's log scale
KEY_DIGITS = 9  # candidates equal to this many decimals are the same candidate


def yarn_attention_factor(scale: float) -> float:
    """YaRN's ``0.1 ln s + 1`` (Peng et al. 2023)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def longrope_attention_factor(scale: float, context_length: int) -> float:
    """LongRoPE's (and transformers' ``longrope`` default) ``sqrt(1 + ln s / ln L)``."""
    return math.sqrt(1.0 + math.log(scale) / math.log(context_length)) if scale > 1 else 1.0


@dataclass(frozen=True)
class Candidate:
    """Per-pair rescale factors (``long_factor``, pair 0 = highest frequency) and the cos/sin multiplier.

    ``origin`` says where it came from (``yarn``, ``mutation``, ...); it is not part of its identity."""

    factors: tuple[float, ...]
    attention_factor: float
    origin: str = field(default="", compare=False)

    def key(self) -> tuple:
        return tuple(round(f, KEY_DIGITS) for f in self.factors), round(self.attention_factor, KEY_DIGITS)

    def to_dict(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "attention_factor": self.attention_factor, "origin": self.origin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(tuple(float(f) for f in d["factors"]), float(d["attention_factor"]), d.get("origin", ""))


@dataclass(frozen=True)
class SearchSpace:
    """Where candidates may lie (see the module docstring).

    Attributes:
        num_pairs: rotation pairs (``head_dim // 2``).
        max_factor: the largest factor (LongRoPE: 1.25 x the extension).
        attention_low / attention_high: the attention factor's range; equal: not searched.
        step: grid of mutated factors and attention factors.
    """

    num_pairs: int
    max_factor: float
    attention_low: float
    attention_high: float
    step: float = 0.01

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or not self.max_factor >= 1 or not 0 < self.attention_low <= self.attention_high:
            raise SearchError(
                f"invalid search space {self}: need num_pairs >= 1, max_factor >= 1 and "
                "0 < attention_low <= attention_high"
            )
        if not self.step > 0:
            raise SearchError(f"step={self.step!r} is invalid; valid range: > 0")

    @classmethod
    def for_extension(
        cls,
        num_pairs: int,
        scale: float,
        attention: float | tuple[float, float],
        max_factor_ratio: float = MAX_FACTOR_RATIO,
    ) -> SearchSpace:
        """LongRoPE's space for an extension by ``scale``; ``attention``: a fixed factor or a ``(low, high)`` range;
        ``max_factor_ratio``: the upper bound as a multiple of ``scale`` (LongRoPE's 1.25 unless given)."""
        low, high = (attention, attention) if isinstance(attention, (int, float)) else attention
        return cls(num_pairs, max_factor_ratio * scale, float(low), float(high))

    @property
    def searches_attention(self) -> bool:
        return self.attention_high > self.attention_low

    def violations(self, c: Candidate) -> list[str]:
        """Every constraint ``c`` breaks (empty: it is valid)."""
        f = c.factors
        out = []
        if len(f) != self.num_pairs:
            out.append(f"{len(f)} factors, expected {self.num_pairs}")
            return out
        if not all(math.isfinite(x) for x in f) or not math.isfinite(c.attention_factor):
            out.append("non-finite value")
        if f[0] < 1.0:
            out.append(f"first factor {f[0]} < 1")
        if any(b < a for a, b in itertools.pairwise(f)):
            out.append("factors decrease from high to low frequency")
        if f[-1] > self.max_factor + 1e-12:
            out.append(f"last factor {f[-1]} > max_factor {self.max_factor}")
        if not self.attention_low - 1e-12 <= c.attention_factor <= self.attention_high + 1e-12:
            out.append(f"attention factor {c.attention_factor} outside [{self.attention_low}, {self.attention_high}]")
        return out

    def snap(self, value: float, low: float, high: float) -> float:
        """``value`` on the grid, clipped to ``[low, high]`` (bounds that are off the grid stay exact)."""
        return float(min(max(round(round(value / self.step) * self.step, 10), low), high))

    def clip_attention(self, value: float) -> float:
        return self.snap(value, self.attention_low, self.attention_high)


@dataclass(frozen=True)
class EvolutionConfig:
    """The evolution's sizes; LongRoPE's defaults are 64 / 32 / 16 / 16 with 0.3, this CPU-sized default is a
    quarter of that. The budget counts fitness evaluations (see the module docstring)."""

    budget: int
    population: int = 16
    parents: int = 8
    mutations: int = 4
    crossovers: int = 4
    mutation_rate: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "population", "parents", "mutations", "crossovers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SearchError(f"{name}={value!r} is invalid; valid range: an integer")
        if self.parents < 2:
            raise SearchError(f"parents={self.parents} is invalid; valid range: >= 2 (crossover needs two)")
        if self.population < self.parents:
            raise SearchError(f"population={self.population} is invalid; valid range: >= parents ({self.parents})")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers < 1:
            raise SearchError(
                f"mutations={self.mutations}, crossovers={self.crossovers} are invalid; valid range: "
                ">= 0 each and at least one child per generation"
            )
        if not 0 < self.mutation_rate <= 1:
            raise SearchError(f"mutation_rate={self.mutation_rate!r} is invalid; valid range: 0 < rate <= 1")
        if self.budget < self.population:
            raise SearchError(
                f"budget={self.budget} is too small: the first generation alone evaluates the whole population "
                f"({self.population}); give a budget >= {self.population} (e.g. {self.population + 10 * self.children})"
            )

    @classmethod
    def sized(cls, budget: int, population: int = 16, seed: int = 0) -> EvolutionConfig:
        """LongRoPE's proportions for a population size: half of it parents, a quarter mutations, a quarter
        crossovers."""
        parents = max(2, population // 2)
        mutations = max(1, (population - parents) // 2)
        return cls(budget, population, parents, mutations, max(0, population - parents - mutations), seed=seed)

    @property
    def children(self) -> int:
        return self.mutations + self.crossovers


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    fitness: float
    generation: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "fitness": self.fitness, "generation": self.generation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(Candidate.from_dict(d), float(d["fitness"]), int(d["generation"]))


@dataclass
class SearchState:
    """Everything a search has done, saved after every generation.

    ``history``: every evaluation in order; ``population``: indices into it of the current population, best first;
    ``generation``: generations completed."""

    history: list[Evaluation] = field(default_factory=list)
    population: list[int] = field(default_factory=list)
    generation: int = 0
    refine: RefineState | None = None

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def best(self) -> Evaluation:
        return self.history[self.population[0]]

    def best_so_far(self) -> list[float]:
        """The best fitness after each evaluation (the search curve)."""
        return list(np.minimum.accumulate([e.fitness for e in self.history]))

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "population": list(self.population),
            "history": [e.to_dict() for e in self.history],
            "refine": asdict(self.refine) if self.refine else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchState:
        refine = RefineState(**d["refine"]) if d.get("refine") else None
        return cls(
            [Evaluation.from_dict(e) for e in d["history"]],
            [int(i) for i in d["population"]],
            int(d["generation"]),
            refine,
        )


@dataclass
class RefineState:
    """Where the gradient refinement stands: ``x`` (log factors, then the log attention factor), Adam's moments,
    the steps done, how many evaluations the evolution had made when it started, and whether the point after the
    last step has been evaluated."""

    step: int
    x: list[float]
    m: list[float]
    v: list[float]
    evolution_evaluations: int
    final: bool = False


# ---------------------------------------------------------------- seeds and variation


def seed_candidates(ctx: RopeContext, scale: float, space: SearchSpace) -> list[Candidate]:
    """PI, NTK and YaRN factor shapes for an extension by ``scale`` (exact, from ctxext's methods, clipped to the
    space), each with the attention factors 1, YaRN's and LongRoPE's default (or the fixed one)."""
    default = ctx.default_inv_freq()
    if space.searches_attention:
        attentions = [1.0, yarn_attention_factor(scale), longrope_attention_factor(scale, ctx.context_length)]
        attentions = list(dict.fromkeys(space.clip_attention(a) for a in attentions))
    else:
        attentions = [space.attention_low]
    seeds = []
    for name in SEED_METHODS:
        inv_freq = make_method(name, factor=scale).transform(RopeState(default), ctx).inv_freq
        factors = tuple(float(min(max(x, 1.0), space.max_factor)) for x in (default / inv_freq).tolist())
        for a in attentions:
            seeds.append(Candidate(factors, a, origin=f"{name} (attention {a:.3f})"))
    return list({c.key(): c for c in seeds}.values())


def mutate(parent: Candidate, space: SearchSpace, rate: float, rng: np.random.Generator, seen: set) -> Candidate:
    """Half the time LongRoPE's dim_mono mutation (``redraw``), else a ``segment`` mutation; the attention factor,
    with probability ``rate``, moved by N(0, 0.05). Redrawn until the child is unseen."""
    for _ in range(MUTATION_TRIES):
        segment = rng.random() < 0.5
        f = shift_segment(parent.factors, space, rng) if segment else redraw(parent.factors, space, rate, rng)
        a = parent.attention_factor
        if space.searches_attention and rng.random() < rate:
            a = space.clip_attention(a + rng.normal(0.0, ATTENTION_SIGMA))
        child = Candidate(tuple(f), a, origin="segment" if segment else "mutation")
        if child.key() not in seen:
            return child
    return random_candidate(space, rng)  # the neighbourhood is exhausted (tiny spaces only)


def redraw(factors: Sequence[float], space: SearchSpace, rate: float, rng: np.random.Generator) -> list[float]:
    """LongRoPE's dim_mono mutation: each factor, with probability ``rate``, redrawn uniformly between its (already
    redrawn) lower neighbour and its upper neighbour, so the order holds."""
    f, n = list(factors), len(factors)
    for i in range(n):
        if rng.random() < rate:
            low = f[i - 1] if i else 1.0
            high = f[i + 1] if i + 1 < n else space.max_factor
            f[i] = space.snap(rng.uniform(low, high), low, high)
    return f


def shift_segment(factors: Sequence[float], space: SearchSpace, rng: np.random.Generator) -> list[float]:
    """A random block of consecutive pairs multiplied by ``exp(N(0, SEGMENT_SIGMA))``; the pairs after it that it
    now exceeds rise with it (or, scaled down, the pairs before it that exceed it fall with it), so the order holds.
    Redrawing between equal neighbours cannot move a plateau (PI's and YaRN's flat interpolated tail); this can."""
    begin, end = sorted(int(x) for x in rng.choice(len(factors) + 1, 2, replace=False))
    scale = math.exp(rng.normal(0.0, SEGMENT_SIGMA))
    g = np.array(factors, dtype=np.float64)
    g[begin:end] = [space.snap(x * scale, 1.0, space.max_factor) for x in g[begin:end]]
    g = np.maximum.accumulate(g) if scale >= 1 else np.minimum.accumulate(g[::-1])[::-1]
    return [float(x) for x in g]


def random_candidate(space: SearchSpace, rng: np.random.Generator) -> Candidate:
    """Uniform draws in the space, sorted: a valid candidate far from any parent."""
    f = np.sort([space.snap(x, 1.0, space.max_factor) for x in rng.uniform(1.0, space.max_factor, space.num_pairs)])
    a = space.clip_attention(rng.uniform(space.attention_low, space.attention_high))
    return Candidate(tuple(float(x) for x in f), a, origin="random")


def crossover(
    first: Candidate, second: Candidate, space: SearchSpace, rng: np.random.Generator, seen: set
) -> Candidate | None:
    """``first`` with a random contiguous block of pairs (and, with probability 1/2, the attention factor) of
    ``second``; None when no such child is valid and unseen after ``CROSSOVER_TRIES``."""
    n = space.num_pairs
    for _ in range(CROSSOVER_TRIES):
        begin, end = sorted(int(x) for x in rng.choice(n + 1, 2, replace=False))
        f = first.factors[:begin] + second.factors[begin:end] + first.factors[end:]
        a = second.attention_factor if rng.random() < 0.5 else first.attention_factor
        child = Candidate(f, a, origin="crossover")
        if not space.violations(child) and child.key() not in seen:
            return child
    return None


# ---------------------------------------------------------------- the evolution


def _ranked(indices: Sequence[int], history: Sequence[Evaluation]) -> list[int]:
    """Best first; ties by evaluation order (a NaN fitness is stored as inf)."""
    return sorted(indices, key=lambda i: (history[i].fitness, i))


def first_generation(seeds: Sequence[Candidate], space: SearchSpace, config: EvolutionConfig) -> list[Candidate]:
    """The initial population: the seeds, then mutations of them in turn."""
    if not seeds:
        raise SearchError("the initial population needs at least one seed candidate")
    rng = np.random.default_rng([config.seed, 0])
    unique = list({c.key(): c for c in seeds}.values())
    population = unique[: config.population]
    seen = {c.key() for c in population}
    while len(population) < config.population:
        child = mutate(unique[len(population) % len(unique)], space, config.mutation_rate, rng, seen)
        seen.add(child.key())
        population.append(child)
    return population


def children(state: SearchState, space: SearchSpace, config: EvolutionConfig, count: int) -> list[Candidate]:
    """The first ``count`` children of generation ``state.generation`` (mutations first, then crossovers)."""
    rng = np.random.default_rng([config.seed, state.generation])
    parents = [state.history[i].candidate for i in state.population[: config.parents]]
    seen = {e.candidate.key() for e in state.history}
    out: list[Candidate] = []
    for j in range(config.children):
        if j < config.mutations:
            child = mutate(parents[int(rng.integers(len(parents)))], space, config.mutation_rate, rng, seen)
        else:
            one, two = sorted(int(x) for x in rng.choice(len(parents), 2, replace=False))
            child = crossover(parents[one], parents[two], space, rng, seen)
            if child is None:
                child = mutate(parents[one], space, config.mutation_rate, rng, seen)
        seen.add(child.key())
        out.append(child)
    return out[:count]


def evolve(
    fitness: Callable[[Candidate], float],
    space: SearchSpace,
    config: EvolutionConfig,
    seeds: Sequence[Candidate],
    *,
    state: SearchState | None = None,
    on_generation: Callable[[SearchState], None] | None = None,
    progress: bool = True,
) -> SearchState:
    """Run (or continue, from ``state``) the search until the budget is spent; returns the final state.

    ``on_generation(state)`` runs after every completed generation (ctxext saves the state there)."""
    for c in seeds:
        if space.violations(c):
            raise SearchError(f"seed {c.origin or c} breaks the search space: {'; '.join(space.violations(c))}")
    state = state or SearchState()
    bar = tqdm(
        total=config.budget,
        initial=min(state.evaluations, config.budget),
        desc="factor search",
        unit="eval",
        disable=not progress,
    )

    def evaluate(batch: list[Candidate], generation: int) -> list[int]:
        added = []
        for c in batch:
            problems = space.violations(c)
            if problems:  # a bug in the variation operators, never a user mistake
                raise RuntimeError(f"internal error: candidate {c} breaks the search space: {problems}")
            value = float(fitness(c))
            state.history.append(Evaluation(c, value if not math.isnan(value) else math.inf, generation))
            added.append(len(state.history) - 1)
            bar.update(1)
            bar.set_postfix(best=f"{min(e.fitness for e in state.history):.4g}")
        return added

    try:
        if state.generation == 0:
            added = evaluate(first_generation(seeds, space, config), 0)
            state.population, state.generation = _ranked(added, state.history), 1
            log.info("generation 0: best %.4f (%s)", state.best.fitness, state.best.candidate.origin)
            if on_generation:
                on_generation(state)
        while state.evaluations < config.budget:
            count = min(config.children, config.budget - state.evaluations)
            parents = state.population[: config.parents]
            added = evaluate(children(state, space, config, count), state.generation)
            state.population = _ranked([*parents, *added], state.history)
            state.generation += 1
            log.info(
                "generation %d: best %.4f after %d evaluations",
                state.generation - 1,
                state.best.fitness,
                state.evaluations,
            )
            if on_generation:
                on_generation(state)
    finally:
        bar.close()
    return state


def summary(state: SearchState, seeds: Sequence[Candidate]) -> dict[str, Any]:
    """JSON-ready search curve: every evaluation, the best so far, the best per generation, the seeds' fitness."""
    by_key = {e.candidate.key(): e.fitness for e in state.history}
    per_generation: dict[int, float] = {}
    for e in state.history:
        per_generation[e.generation] = min(per_generation.get(e.generation, math.inf), e.fitness)
    return {
        "evaluations": [{"index": i, **e.to_dict()} for i, e in enumerate(state.history)],
        "best_so_far": state.best_so_far(),
        "best_per_generation": [per_generation[g] for g in sorted(per_generation)],
        "seeds": {c.origin: by_key.get(c.key()) for c in seeds},
        "best": {**state.best.candidate.to_dict(), "fitness": state.best.fitness},
        "generations": state.generation,
        "refine_steps": state.refine.step if state.refine else 0,
    }


# ---------------------------------------------------------------- gradient refinement


@dataclass(frozen=True)
class RefineConfig:
    """Adam on the log factors (and the log attention factor, when the space searches it) for ``steps`` steps,
    learning rate ``lr`` (a step moves each log factor by about ``lr``), after the evolution."""

    steps: int = 0
    lr: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise SearchError(
                f"refine steps={self.steps!r} is invalid; valid range: an integer >= 0 (0: no refinement)"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SearchError(f"refine lr={self.lr!r} is invalid; valid range: > 0 (e.g. 0.005)")


def isotonic(values: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def project(x: np.ndarray, space: SearchSpace) -> np.ndarray:
    """``x`` (log factors, log attention factor) moved onto the space: factors non-decreasing (the closest such
    sequence), then clipped to ``[1, max_factor]``; the attention factor clipped to its range."""
    out = np.empty_like(x)
    out[:-1] = np.clip(isotonic(x[:-1]), 0.0, math.log(space.max_factor))
    out[-1] = np.clip(x[-1], math.log(space.attention_low), math.log(space.attention_high))
    return out


def _candidate(x: np.ndarray, space: SearchSpace, origin: str) -> Candidate:
    factors = tuple(float(min(max(math.exp(v), 1.0), space.max_factor)) for v in x[:-1])
    attention = float(min(max(math.exp(x[-1]), space.attention_low), space.attention_high))
    return Candidate(factors, attention, origin=origin)


def refine(
    value_and_grad: Callable[[Candidate], tuple[float, Sequence[float], float]],
    fitness: Callable[[Candidate], float],
    space: SearchSpace,
    config: RefineConfig,
    state: SearchState,
    *,
    on_step: Callable[[SearchState], None] | None = None,
    progress: bool = True,
) -> SearchState:
    """Refine the best candidate of ``state`` by gradient descent (or continue a refinement ``state`` holds).

    ``value_and_grad(c)``: the fitness at ``c`` and its gradients with respect to the factors and the attention
    factor. Step ``t`` evaluates the current point (recorded in the history as ``refine t``), then takes one Adam
    step in log space and projects back onto the space (``project``); after the last step ``fitness`` evaluates the
    final point. The best candidate stays the best of every evaluation, evolution's included. A finished refinement
    continued to more steps ends where a run with that many steps from the start ends.
    ``on_step(state)`` runs after every step (ctxext saves the state there)."""
    if state.refine is None:
        if config.steps == 0:
            return state
        best = state.best.candidate
        x = np.array([*map(math.log, best.factors), math.log(best.attention_factor)])
        state.refine = RefineState(0, x.tolist(), [0.0] * len(x), [0.0] * len(x), state.evaluations)
    r = state.refine
    if r.final and r.step < config.steps:  # a finished refinement given more steps: its final point is the next
        last = len(state.history) - 1  # step's start, evaluated there with its gradient, as in a longer run
        state.history.pop()
        state.population = [i for i in state.population if i != last]
        r.final = False
    total = config.steps + 1  # the last point is evaluated too
    done = r.step + (1 if r.step >= config.steps and r.final else 0)
    bar = tqdm(total=total, initial=min(done, total), desc="refine", unit="step", disable=not progress)
    b1, b2 = config.betas

    def record(c: Candidate, value: float) -> None:
        state.history.append(Evaluation(c, value if not math.isnan(value) else math.inf, state.generation))
        state.population = _ranked([*state.population, len(state.history) - 1], state.history)
        bar.update(1)
        bar.set_postfix(fitness=f"{value:.4g}", best=f"{state.best.fitness:.4g}")

    try:
        while r.step < config.steps:
            r.final = False
            x = np.array(r.x)
            c = _candidate(x, space, f"refine {r.step}")
            value, grad_factors, grad_attention = value_and_grad(c)
            grad = np.array(
                [
                    *(np.asarray(grad_factors, dtype=float) * np.exp(x[:-1])),
                    float(grad_attention) * math.exp(x[-1]) if space.searches_attention else 0.0,
                ]
            )
            if not np.all(np.isfinite(grad)):
                raise SearchError(
                    f"refine step {r.step}: the gradient is not finite (fitness {value}); lower "
                    "--refine-lr or refine fewer steps"
                )
            m = b1 * np.array(r.m) + (1 - b1) * grad
            v = b2 * np.array(r.v) + (1 - b2) * grad**2
            t = r.step + 1
            update = config.lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + config.eps)
            record(c, float(value))
            r.x, r.m, r.v, r.step = project(x - update, space).tolist(), m.tolist(), v.tolist(), t
            if on_step:
                on_step(state)
        if not r.final:
            c = _candidate(np.array(r.x), space, f"refine {r.step}")
            record(c, float(fitness(c)))
            r.final = True
            if on_step:
                on_step(state)
    finally:
        bar.close()
    return state
