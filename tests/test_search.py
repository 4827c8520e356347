"""LongRoPE factor search (ctxext/longrope/evolution.py, ctxext/longrope/checkpoint.py, `ctxext search`).

Pinned behaviour: every candidate the evolution evaluates obeys LongRoPE's constraints; the seeds are the PI / NTK /
YaRN shapes of the independent references; a seed fixes the search and a resumed search ends where an uninterrupted
one does; the search beats its initial population on a toy problem; the saved checkpoint is native ``longrope`` that
stock transformers loads (fresh process, no ctxext) to the same logits and calibration perplexity as the searched
model; bad input exits 2 with nothing written.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from conftest import CONTEXT, HEAD_DIM
from test_cli import save_tiny
from transformers import AutoModelForCausalLM

from ctxext.cli.main import main
from ctxext.errors import DataError, SearchError
from ctxext.longrope import checkpoint as longrope
from ctxext.longrope.checkpoint import (
    CalibrationObjective,
    calibration_ids,
    proxy_position_ids,
    search_checkpoint,
    state_path,
    use_rope_parameters,
)
from ctxext.longrope.evolution import (
    Candidate,
    EvolutionConfig,
    RefineConfig,
    SearchSpace,
    SearchState,
    evolve,
    isotonic,
    random_candidate,
    refine,
    seed_candidates,
    yarn_attention_factor,
)
from ctxext.rope.registry import RopeContext

CTX = RopeContext(head_dim=HEAD_DIM, rope_theta=10000.0, context_length=CONTEXT)
SCALE = 4.0
SPACE = SearchSpace.for_extension(HEAD_DIM // 2, SCALE, (1.0, 1.5))
SEEDS = seed_candidates(CTX, SCALE, SPACE)
TOY_TARGET = np.array([1.0, 1.0, 1.5, 2.5, 3.5, 4.5, 4.8, 5.0])  # none of PI / NTK / YaRN


def toy_fitness(c: Candidate) -> float:
    """A smooth toy objective with its minimum at TOY_TARGET and attention factor 1.3."""
    return float(np.mean((np.array(c.factors) - TOY_TARGET) ** 2) + (c.attention_factor - 1.3) ** 2)


def breaks(c: Candidate, max_factor: float, low: float, high: float) -> list[str]:
    """LongRoPE's constraints, checked independently of SearchSpace."""
    f = c.factors
    problems = []
    if f[0] < 1.0:
        problems.append("first pair below 1")
    problems += [f"pair {i} < pair {i - 1}" for i in range(1, len(f)) if f[i] < f[i - 1]]
    if max(f) > max_factor + 1e-9:
        problems.append("above 1.25 s")
    if not low <= c.attention_factor <= high:
        problems.append("attention factor out of range")
    return problems


def test_every_evaluated_candidate_obeys_the_constraints():
    seen = []

    def fitness(c):
        seen.append(c)
        assert not breaks(c, 1.25 * SCALE, 1.0, 1.5), (c, breaks(c, 1.25 * SCALE, 1.0, 1.5))
        return toy_fitness(c)

    state = evolve(fitness, SPACE, EvolutionConfig(budget=120, seed=3), SEEDS, progress=False)
    assert len(seen) == state.evaluations == 120
    origins = {c.origin for c in seen}
    assert {"mutation", "segment", "crossover"} <= origins  # every operator was exercised
    assert len({c.key() for c in seen}) == len(seen)  # never evaluated twice


def test_space_refuses_what_breaks_the_constraints():
    assert SPACE.violations(Candidate((0.9,) + (1.0,) * 7, 1.0))
    assert SPACE.violations(Candidate((1.0, 2.0, 1.5) + (2.0,) * 5, 1.0))
    assert SPACE.violations(Candidate((1.0,) * 7 + (5.1,), 1.0))
    assert SPACE.violations(Candidate((1.0,) * 8, 1.6))
    assert not SPACE.violations(Candidate((1.0,) * 7 + (5.0,), 1.5))


def test_seeds_are_the_pi_ntk_and_yarn_shapes_of_the_independent_references():
    default = ref.rope_inv_freq(HEAD_DIM, 10000.0)
    yarn_freq, yarn_af = ref.yarn(HEAD_DIM, 10000.0, CONTEXT, SCALE)
    expected = {
        "pi": default / ref.pi(default, SCALE),
        "ntk": default / ref.ntk(HEAD_DIM, 10000.0, SCALE),
        "yarn": default / yarn_freq,
    }
    by_method = {}
    for c in SEEDS:
        by_method.setdefault(c.origin.split()[0], []).append(c)
    assert sorted(by_method) == ["ntk", "pi", "yarn"]
    for name, cands in by_method.items():
        for c in cands:
            torch.testing.assert_close(torch.tensor(c.factors, dtype=torch.float64), expected[name], rtol=1e-12, atol=0)
        attention = sorted(c.attention_factor for c in cands)
        assert attention[0] == 1.0 and any(abs(a - round(yarn_af, 2)) < 1e-12 for a in attention)
    assert abs(yarn_attention_factor(SCALE) - yarn_af) < 1e-12


def test_a_seed_fixes_the_search_and_another_seed_changes_it():
    def run(seed):
        state = evolve(toy_fitness, SPACE, EvolutionConfig(budget=48, seed=seed), SEEDS, progress=False)
        return [(e.candidate.key(), e.fitness) for e in state.history]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_resume_after_an_interruption_ends_where_an_uninterrupted_search_ends(tmp_path):
    config = EvolutionConfig(budget=70, seed=5)  # 16 + 13 generations of 4 + 4, the last one cut to 6
    whole = evolve(toy_fitness, SPACE, config, SEEDS, progress=False)

    saved = tmp_path / "state.json"
    calls = {"n": 0}

    def interrupted(c):
        calls["n"] += 1
        if calls["n"] == 37:  # inside generation 3 (evaluations 33..40)
            raise KeyboardInterrupt
        return toy_fitness(c)

    def save(state):
        saved.write_text(json.dumps(state.to_json()))

    with pytest.raises(KeyboardInterrupt):
        evolve(interrupted, SPACE, config, SEEDS, on_generation=save, progress=False)
    state = SearchState.from_json(json.loads(saved.read_text()))
    assert state.evaluations == 32 and state.generation == 3
    resumed = evolve(toy_fitness, SPACE, config, SEEDS, state=state, on_generation=save, progress=False)
    assert [(e.candidate.key(), e.fitness, e.generation) for e in resumed.history] == [
        (e.candidate.key(), e.fitness, e.generation) for e in whole.history
    ]
    assert resumed.population == whole.population and resumed.evaluations == 70


def test_search_improves_on_its_initial_population_and_beats_random_candidates():
    config = EvolutionConfig(budget=200, seed=0)
    state = evolve(toy_fitness, SPACE, config, SEEDS, progress=False)
    initial = min(e.fitness for e in state.history if e.generation == 0)
    assert initial <= min(toy_fitness(c) for c in SEEDS)
    assert state.best.fitness < 0.1 * initial  # measured: 0.06x
    assert state.best.candidate.origin in ("mutation", "segment", "crossover")
    assert state.best_so_far() == sorted(state.best_so_far(), reverse=True)
    # the same budget of random valid candidates after the same first generation does far worse (measured: 0.17x
    # of the initial best, against the search's 0.06x): the selection, mutation and crossover do the work
    rng = np.random.default_rng(0)
    random_best = min(toy_fitness(random_candidate(SPACE, rng)) for _ in range(config.budget - config.population))
    assert state.best.fitness < 0.5 * min(random_best, initial)


def toy_value_and_grad(c: Candidate):
    f = np.array(c.factors)
    return toy_fitness(c), 2 * (f - TOY_TARGET) / len(f), 2 * (c.attention_factor - 1.3)


def test_isotonic_projection_is_the_closest_non_decreasing_sequence():
    np.testing.assert_allclose(isotonic([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(isotonic([5, 4, 3]), [4, 4, 4])
    np.testing.assert_allclose(isotonic([1, 2, 2, 3]), [1, 2, 2, 3])
    rng = np.random.default_rng(0)  # against a brute-force check: no non-decreasing perturbation is closer
    x = rng.normal(size=7)
    y = isotonic(x)
    assert np.all(np.diff(y) >= 0)
    for _ in range(2000):
        z = np.sort(y + rng.normal(scale=0.1, size=7))
        assert np.sum((z - x) ** 2) >= np.sum((y - x) ** 2) - 1e-12


def test_refinement_descends_stays_in_the_space_and_resumes_exactly(tmp_path):
    evolved = evolve(toy_fitness, SPACE, EvolutionConfig(budget=24, seed=0), SEEDS, progress=False)
    start, n = evolved.best.fitness, evolved.evaluations
    config = RefineConfig(steps=60, lr=0.05)
    whole = refine(
        toy_value_and_grad, toy_fitness, SPACE, config, SearchState.from_json(evolved.to_json()), progress=False
    )
    refined = whole.history[n:]
    assert len(refined) == 61 and [e.candidate.origin for e in refined[:2]] == ["refine 0", "refine 1"]
    assert refined[0].candidate == evolved.best.candidate  # it starts from the evolution's best
    assert all(not breaks(e.candidate, 1.25 * SCALE, 1.0, 1.5) for e in refined)
    assert whole.best.fitness < 0.2 * start and whole.best.candidate.origin.startswith("refine")  # measured: 7e-5x

    saved = tmp_path / "state.json"
    calls = {"n": 0}

    def interrupted(c):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return toy_value_and_grad(c)

    def save(state):
        saved.write_text(json.dumps(state.to_json()))

    with pytest.raises(KeyboardInterrupt):
        refine(
            interrupted,
            toy_fitness,
            SPACE,
            config,
            SearchState.from_json(evolved.to_json()),
            on_step=save,
            progress=False,
        )
    state = SearchState.from_json(json.loads(saved.read_text()))
    assert state.refine.step == 24
    resumed = refine(toy_value_and_grad, toy_fitness, SPACE, config, state, on_step=save, progress=False)
    assert [(e.candidate.key(), e.fitness) for e in resumed.history] == [
        (e.candidate.key(), e.fitness) for e in whole.history
    ]
    # the attention factor stays put where the space fixes it
    fixed = SearchSpace.for_extension(HEAD_DIM // 2, SCALE, 1.2)
    state = SearchState([e for e in evolved.history[:1]], [0])
    state.history[0] = type(state.history[0])(Candidate(state.history[0].candidate.factors, 1.2), 1.0, 0)
    out = refine(toy_value_and_grad, toy_fitness, fixed, RefineConfig(steps=5, lr=0.05), state, progress=False)
    assert {e.candidate.attention_factor for e in out.history} == {1.2}
    with pytest.raises(SearchError, match="refine steps=-1 is invalid"):
        RefineConfig(steps=-1)


def test_budget_smaller_than_one_generation_is_refused():
    for budget in (0, 15):
        with pytest.raises(SearchError, match="budget"):
            EvolutionConfig.sized(budget, 16)
    assert EvolutionConfig.sized(16, 16).children == 8


def test_calibration_windows_and_proxy_positions():
    docs = {"short": [1] * 5, "a": [2] * 12, "b": [3] * 30, "c": [4] * 11}
    calls = []

    def tokenize(texts):
        calls.append(list(texts))
        return [docs[t] for t in texts]

    texts = ["short", "a" * 12, "b" * 30, "c" * 11]
    docs = {t: docs[t[0]] if t != "short" else docs["short"] for t in texts}
    ids = calibration_ids(texts, tokenize, 10, 2)
    assert ids.shape == (2, 10) and not any("short" in batch for batch in calls)  # too few bytes: never tokenized
    assert sorted(ids[:, 0].tolist()) == [2, 4]  # evenly spaced over the long documents: first and last
    with pytest.raises(DataError, match="no calibration document has 40 tokens"):
        calibration_ids(texts, tokenize, 40, 2)

    assert proxy_position_ids(256, 256, 3) is None
    pos = proxy_position_ids(64, 256, 3)
    assert pos.shape == (3, 64) and bool((pos.diff(dim=1) >= 1).all())
    assert pos[:, :32].equal(torch.arange(32).expand(3, 32))
    assert pos[-1, -1].item() == 255 and pos[0, 32].item() > 32


# ---------------------------------------------------------------- the checkpoint search (tiny llama)

TARGET = 4 * CONTEXT


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    src = save_tiny(root / "tiny", "llama", with_tokenizer=True)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        (data / f"doc{i}.txt").write_text(" ".join(f"w{w}" for w in rng.integers(1, 97, 300)))
    return src, data


def run_search(src, data, out, **kw):
    kw = {
        "target_length": TARGET,
        "data": str(data),
        "budget": 20,
        "population": 8,
        "windows": 2,
        "progress": False,
        **kw,
    }
    return search_checkpoint(str(src), out, **kw)


def test_resumed_checkpoint_search_equals_an_uninterrupted_one(tiny_source, tmp_path, monkeypatch):
    src, data = tiny_source
    whole = run_search(src, data, tmp_path / "whole")

    original = CalibrationObjective.__call__
    calls = {"n": 0}

    def interrupted(self, c):
        calls["n"] += 1
        if calls["n"] == 14:  # second generation (evaluations 9..12 done, 13..16 in flight)
            raise KeyboardInterrupt
        return original(self, c)

    monkeypatch.setattr(CalibrationObjective, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(src, data, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and state_path(tmp_path / "resumed").is_file()
    monkeypatch.setattr(CalibrationObjective, "__call__", original)
    resumed = run_search(src, data, tmp_path / "resumed", resume=True)
    assert resumed["evaluations"] == whole["evaluations"] and resumed["best"] == whole["best"]
    assert (
        json.loads((tmp_path / "resumed" / "config.json").read_text())["rope_parameters"]
        == json.loads((tmp_path / "whole" / "config.json").read_text())["rope_parameters"]
    )

    with pytest.raises(SearchError, match="belongs to another search"):  # another seed: not this state's search
        run_search(src, data, tmp_path / "resumed", resume=True, force=True, seed=9)


def test_saved_checkpoint_is_native_longrope_with_the_searched_factors(tiny_source, tmp_path):
    src, data = tiny_source
    out = tmp_path / "out"
    result = run_search(src, data, out)
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "longrope" and config["max_position_embeddings"] == TARGET
    assert rope["short_factor"] == [1.0] * (HEAD_DIM // 2) and rope["original_max_position_embeddings"] == CONTEXT
    torch.testing.assert_close(torch.tensor(rope["long_factor"]), torch.tensor(result["best"]["factors"]))
    assert rope["attention_factor"] == result["best"]["attention_factor"]
    assert (out / "search.png").stat().st_size > 0 and json.loads((out / "search.json").read_text())["best"]

    # reloaded (stock transformers) on the calibration windows: the search's own best perplexity
    from transformers import AutoTokenizer

    from ctxext.data.text import load_texts, tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(load_texts(str(data)), lambda b: tokenize_documents(tokenizer, b), TARGET, 2)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert abs(_nll(reloaded, ids) - result["best"]["fitness"]) < 1e-5


def test_max_factor_ratio_bounds_every_candidate_and_is_part_of_the_resumed_state(tiny_source, tmp_path):
    """``max_factor_ratio`` moves LongRoPE's upper bound (1.25 s): the default search visits factors above the
    extension, one bounded at 1.0 never does (refinement included), and its state is not resumed under another."""
    src, data = tiny_source
    scale = TARGET / CONTEXT

    def largest(out):
        return max(max(e["factors"]) for e in json.loads((out / "search.json").read_text())["evaluations"])

    run_search(src, data, tmp_path / "default")
    assert largest(tmp_path / "default") > scale + 0.01
    result = run_search(src, data, tmp_path / "tight", max_factor=1.0, refine=2)
    assert largest(tmp_path / "tight") <= scale + 1e-9 and max(result["best"]["factors"]) <= scale + 1e-9
    with pytest.raises(SearchError, match="belongs to another search"):
        run_search(src, data, tmp_path / "tight", resume=True, force=True, refine=2)


def test_calibration_gradient_matches_finite_differences_of_the_fitness(tiny_source):
    """``value_and_grad`` (plain RoPE with the factors as inputs) against ``__call__`` (transformers' own longrope
    type, rebuilt per candidate): the same value, and a gradient that central differences reproduce."""
    from transformers import AutoTokenizer

    from ctxext.data.text import load_texts, tokenize_documents

    src, data = tiny_source
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(load_texts(str(data)), lambda b: tokenize_documents(tokenizer, b), TARGET, 2)
    problem = longrope_problem(src, data)
    objective = CalibrationObjective(model, problem, ids, None)
    c = next(s for s in seed_candidates(problem.ctx, problem.scale, problem.space()) if s.origin.startswith("yarn"))
    c = Candidate(tuple(f * (1.1 + 0.01 * i) for i, f in enumerate(c.factors)), 1.4)  # off the bounds and optimum
    value, grad_factors, grad_attention = objective.value_and_grad(c)
    assert abs(value - objective(c)) < 1e-6  # transformers rounds the longrope frequencies to float32 its own way
    assert all(p.requires_grad for p in model.parameters()) and model.config.rope_parameters["rope_type"] == "longrope"

    def central(i, h):  # i = None: the attention factor
        def at(d):
            if i is None:
                return objective(Candidate(c.factors, c.attention_factor + d))
            return objective(Candidate(tuple(f + d * (j == i) for j, f in enumerate(c.factors)), c.attention_factor))

        return (at(h) - at(-h)) / (2 * h)

    def numeric(i):  # transformers computes the angles in float32, so the fitness is rough at small steps: the
        return np.mean([central(i, h) for h in (5e-4, 2.5e-4, 1.25e-4)])  # mean of three (measured: within 2.3%)

    large = [i for i in range(len(grad_factors)) if abs(grad_factors[i]) > 0.01]
    assert len(large) >= 2 and abs(grad_attention) > 0.01  # the check is not vacuous (measured: pairs 0 and 1)
    for i in large:
        assert abs(numeric(i) - grad_factors[i]) <= 0.05 * abs(grad_factors[i]), (i, numeric(i), grad_factors[i])
    assert abs(numeric(None) - grad_attention) <= 0.05 * abs(grad_attention), (numeric(None), grad_attention)


def test_refined_checkpoint_search_resumes_and_improves_on_the_evolution(tiny_source, tmp_path, monkeypatch):
    src, data = tiny_source
    evolved = run_search(src, data, tmp_path / "evolved")
    whole = run_search(src, data, tmp_path / "whole", refine=4, refine_lr=0.02)
    assert whole["refine_steps"] == 4 and len(whole["evaluations"]) == 20 + 5
    # the gradient steps find a better point than the whole evolution (not just the evolution's own best again)
    assert min(e["fitness"] for e in whole["evaluations"][20:]) < evolved["best"]["fitness"]
    assert whole["evaluations"][:20] == evolved["evaluations"]

    original = CalibrationObjective.value_and_grad
    calls = {"n": 0}

    def interrupted(self, c):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, c)

    monkeypatch.setattr(CalibrationObjective, "value_and_grad", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(src, data, tmp_path / "resumed", refine=4, refine_lr=0.02)
    monkeypatch.setattr(CalibrationObjective, "value_and_grad", original)
    with pytest.raises(SearchError, match="has started its gradient refinement"):
        run_search(src, data, tmp_path / "resumed", refine=4, refine_lr=0.02, resume=True, budget=28)
    resumed = run_search(src, data, tmp_path / "resumed", refine=4, refine_lr=0.02, resume=True)
    assert resumed["evaluations"] == whole["evaluations"] and resumed["best"] == whole["best"]
    rope = json.loads((tmp_path / "resumed" / "config.json").read_text())["rope_parameters"]
    torch.testing.assert_close(torch.tensor(rope["long_factor"]), torch.tensor(whole["best"]["factors"]))

    # a finished search takes more steps into its own OUT (no --force), which it replaces, and ends where a search
    # with that many steps from the start ends
    longer = run_search(src, data, tmp_path / "whole", refine=6, refine_lr=0.02, resume=True)
    assert longer["evaluations"] == run_search(src, data, tmp_path / "six", refine=6, refine_lr=0.02)["evaluations"]
    rope = json.loads((tmp_path / "whole" / "config.json").read_text())["rope_parameters"]
    torch.testing.assert_close(torch.tensor(rope["long_factor"]), torch.tensor(longer["best"]["factors"]))


def longrope_problem(src, data):
    return longrope.SearchProblem(str(src), CONTEXT, TARGET, HEAD_DIM, 10000.0, TARGET, 2, str(data))


def _nll(model, ids):
    from ctxext.evals.perplexity import window_nll

    return sum(window_nll(model, ids[k : k + 1], ids[k : k + 1, 1:]).item() for k in range(len(ids))) / (
        ids.shape[0] * (ids.shape[1] - 1)
    )


STOCK_LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    long = model(torch.load(sys.argv[2])).logits
    short = model(torch.load(sys.argv[2])[:, :40]).logits
assert "ctxext" not in sys.modules
print(json.dumps({"long": bool(torch.equal(long, torch.load(sys.argv[3]))),
                  "short": bool(torch.equal(short, torch.load(sys.argv[4])))}))
"""


@pytest.mark.slow
def test_stock_transformers_loads_the_search_result_to_the_same_logits(tiny_source, tmp_path):
    src, data = tiny_source
    out = tmp_path / "out"
    result = run_search(src, data, out)
    searched = AutoModelForCausalLM.from_pretrained(src).eval()  # the searched model, in memory
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    problem = longrope_problem(src, data)
    use_rope_parameters(searched, problem.rope_parameters(Candidate.from_dict(result["best"])), TARGET)
    ids = torch.randint(1, 97, (1, 200), generator=torch.Generator().manual_seed(1))
    rotary = searched.model.rotary_emb
    with torch.no_grad():
        torch.save(searched(ids).logits, tmp_path / "long.pt")  # beyond the trained context: the searched factors
        long_factors = torch.tensor(result["best"]["factors"], dtype=torch.float64)
        torch.testing.assert_close(rotary.inv_freq.double(), original.model.rotary_emb.inv_freq.double() / long_factors)
        torch.save(searched(ids[:, :40]).logits, tmp_path / "short.pt")  # within it: the original frequencies
        torch.testing.assert_close(rotary.inv_freq, original.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_LOGITS,
            str(out),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "long.pt"),
            str(tmp_path / "short.pt"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"long": True, "short": True}


@pytest.mark.slow
def test_cli_search_runs_end_to_end_in_a_subprocess(tiny_source, tmp_path):
    src, data = tiny_source
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctxext.cli",
            "search",
            str(src),
            str(out),
            "--target-length",
            str(TARGET),
            "--data",
            str(data),
            "--budget",
            "12",
            "--population",
            "8",
            "--windows",
            "1",
            "--window",
            "128",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr
    assert "searched (" in proc.stdout and "PoSE proxy" in proc.stdout
    saved = json.loads((out / "search.json").read_text())
    assert saved["calibration"]["proxy_skips"] == [TARGET - 128]
    assert len({e["index"] for e in saved["evaluations"]}) == 12
    # proxy mode: the attention factor is fixed at LongRoPE's default, never searched
    expected = math.sqrt(1 + math.log(TARGET / CONTEXT) / math.log(CONTEXT))
    assert {round(e["attention_factor"], 9) for e in saved["evaluations"]} == {round(expected, 9)}
    assert abs(saved["best"]["attention_factor"] - expected) < 1e-9


# ---------------------------------------------------------------- bad input: exit 2, nothing written


def test_init_starts_from_an_earlier_search_and_is_part_of_the_resumed_state(tiny_source, tmp_path):
    """``init`` (an earlier search's OUT or its search.json) is the first candidate evaluated, at the earlier
    search's own best fitness on the same windows, so the new search ends no worse; another init is another search."""
    src, data = tiny_source
    first = run_search(src, data, tmp_path / "first", refine=2)
    for init in (tmp_path / "first", tmp_path / "first" / "search.json"):
        out = tmp_path / f"from-{init.name}"
        result = run_search(src, data, out, budget=8, init=init)
        start = result["evaluations"][0]
        assert start["origin"] == "init"
        assert result["seeds"]["init"] == pytest.approx(first["best"]["fitness"], rel=1e-5)
        torch.testing.assert_close(torch.tensor(start["factors"]), torch.tensor(first["best"]["factors"]))
        assert start["attention_factor"] == pytest.approx(first["best"]["attention_factor"])
        assert result["best"]["fitness"] <= start["fitness"] and result["init"] == str(init)
        record = json.loads((out / "config.json").read_text())["ctxext"]["steps"][-1]["chain"][0]
        assert record["init"] == str(init)
    without = run_search(src, data, tmp_path / "without", budget=8)
    assert all(e["origin"] != "init" for e in without["evaluations"])
    with pytest.raises(SearchError, match="belongs to another search"):  # resumed without the init it started from
        run_search(src, data, tmp_path / "from-first", budget=8, resume=True)


def test_init_from_a_longrope_checkpoint_without_attention_factor_takes_transformers_own(tmp_path):
    """A Phi-3-style init (longrope without ``factor`` or ``attention_factor``) starts from the attention factor
    transformers runs it with: from max_position_embeddings / original_max_position_embeddings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = [1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.5, 5.0]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": factors}
    config = LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=4 * CONTEXT,
        rope_parameters={**rope, "original_max_position_embeddings": CONTEXT},
    )
    config.save_pretrained(tmp_path / "phi3-style")
    problem = longrope.SearchProblem("src", CONTEXT, 4 * CONTEXT, HEAD_DIM, 10000.0, 4 * CONTEXT, 1, "data")
    got = longrope.init_candidate(tmp_path / "phi3-style", problem, SPACE)
    _, want = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    assert got.factors == tuple(factors) and got.attention_factor == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(math.sqrt(1 + math.log(4) / math.log(CONTEXT)))


@pytest.fixture(scope="module")
def yarn_source(tiny_source, tmp_path_factory):
    from ctxext.patch.checkpoint import patch_checkpoint

    return patch_checkpoint(tiny_source[0], tmp_path_factory.mktemp("yarn") / "yarn", "yarn", factor=2)


@pytest.mark.parametrize(
    "case",
    [
        "target below",
        "target equal",
        "budget 0",
        "budget small",
        "missing data",
        "short data",
        "not plain rope",
        "nothing to resume",
        "window too long",
        "refine negative",
        "refine lr 0",
        "max factor below 1",
        "init not longrope",
        "init missing",
        "init corrupt",
    ],
)
def test_bad_input_exits_2_and_writes_nothing(case, tiny_source, yarn_source, tmp_path, capsys):
    src, data = tiny_source
    out = tmp_path / "out"
    args = {
        "target below": ["--target-length", "32"],
        "target equal": ["--target-length", str(CONTEXT)],
        "budget 0": ["--budget", "0"],
        "budget small": ["--budget", "15"],
        "missing data": ["--data", str(tmp_path / "nope")],
        "short data": ["--windows", "1", "--window", "400", "--target-length", "400"],
        "not plain rope": [],
        "nothing to resume": ["--resume"],
        "window too long": ["--window", "512"],
        "refine negative": ["--refine", "-1"],
        "refine lr 0": ["--refine", "2", "--refine-lr", "0"],
        "max factor below 1": ["--max-factor", "0.9"],
        "init not longrope": ["--init", str(yarn_source)],
        "init missing": ["--init", str(tmp_path / "nope.json")],
        "init corrupt": ["--init", str(tmp_path / "corrupt.json")],
    }[case]
    (tmp_path / "corrupt.json").write_text('{"best": {"factors": [1.0, 1.0], "attention_factor": null}}')
    source = yarn_source if case == "not plain rope" else src
    defaults = {"--target-length": str(TARGET), "--data": str(data), "--budget": "20", "--population": "16"}
    for flag, value in defaults.items():
        if flag not in args:
            args = [*args, flag, value]
    before = sorted(tmp_path.iterdir())
    assert main(["search", str(source), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before and not state_path(out).exists()
