"""Perplexity, passkey and frequency analysis against independent computations; plots and CLI outputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from ctxext.data import corpus
from ctxext.data.tokenizer import train_tokenizer
from ctxext.evals import passkey
from ctxext.evals.frequency import frequency_usage, suggest_keep
from ctxext.evals.perplexity import perplexity, windows
from ctxext.evals.plots import plot_frequency_usage, plot_passkey, plot_perplexity

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:40]), vocab_size=400)


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_model(
        "llama",
        0,
        scale_qk=False,
        vocab_size=len(tokenizer),
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@pytest.fixture(scope="module")
def lm_dir(lm, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- perplexity


def nll_of_token(model, doc, context_start, t):
    ids = torch.tensor([doc[context_start : t + 1]])
    logits = model(ids).logits[0, -2].float()
    return F.cross_entropy(logits[None], torch.tensor([doc[t]])).item()


@pytest.mark.parametrize("length,stride", [(32, 32), (32, 8), (32, 20)])
def test_perplexity_is_exp_mean_nll_with_the_stated_stride(lm, length, stride):
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (length + 2 * stride, length, length - 5, 80)]
    result = perplexity(lm, docs, length, stride, progress=False)
    # independent, one forward per token: windows start every `stride` (the last one shifted to end at the
    # document's end); each scores the tokens after its own first one that no earlier window scored
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            n = len(doc)
            if n < length:
                continue
            starts = sorted({min(k * stride, n - length) for k in range(math.ceil((n - length) / stride) + 1)})
            done = 0
            for b in starts:
                for t in range(max(done, b + 1), b + length):
                    total += nll_of_token(lm, doc, b, t)
                    count += 1
                done = b + length
    assert result.tokens_scored == count
    assert result.documents_scored == 3 and result.documents_skipped == 1
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_non_overlapping_perplexity_matches_transformers_own_loss(lm):
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(2, 300, (96,), generator=g).tolist()
    result = perplexity(lm, [doc], 32, progress=False)
    assert windows(96, 32, 32) == [(0, 32, 1), (32, 64, 33), (64, 96, 65)]
    with torch.no_grad():  # transformers' own mean loss per window (31 targets each)
        losses = [
            lm(torch.tensor([doc[i : i + 32]]), labels=torch.tensor([doc[i : i + 32]])).loss.item() for i in (0, 32, 64)
        ]
    assert result.tokens_scored == 3 * 31
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_documents_shorter_than_the_length_are_refused_when_none_is_long_enough(lm):
    with pytest.raises(ValueError, match="no document has at least 64 tokens"):
        perplexity(lm, [[1, 2, 3]], 64, progress=False)


# ---------------------------------------------------------------- passkey


def test_passkey_prompt_has_the_key_at_the_requested_depth_and_length(tokenizer):
    filler = [t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:20]) for t in tokenizer.encode(d)]
    for length in (128, 256, 500):
        for depth in (0.0, 0.3, 0.5, 1.0):
            prompt = passkey.build_prompt(tokenizer, filler, length, depth, "48213")
            assert len(prompt.input_ids) == length
            text = tokenizer.decode(prompt.input_ids)
            assert text.count("The pass key is 48213.") == 1 and text.endswith("What is the pass key? The pass key is")
            key_ids = tokenizer.encode(passkey.KEY_LINE.format(key="48213"))
            n_filler = length - len(key_ids) - len(tokenizer.encode(passkey.QUESTION))
            assert prompt.input_ids[prompt.key_token_index : prompt.key_token_index + len(key_ids)] == key_ids
            # at a line break of the filler within one filler line (<= 64 tokens here) of the requested depth
            assert abs(prompt.key_token_index - depth * n_filler) <= 64
            assert prompt.key_token_index in (0, n_filler) or "\n" in tokenizer.decode(
                [prompt.input_ids[prompt.key_token_index - 1]]
            )


@pytest.mark.parametrize(
    "answer,ok",
    [
        (" 48213.", True),
        ("48213", True),
        (" 48213\n", True),
        (" 4821", False),
        (" 482134", False),
        (" 58213", False),
        ("", False),
        (" the key", False),
    ],
)
def test_passkey_scoring_accepts_exactly_the_right_digits(answer, ok):
    assert passkey.score(answer, "48213") is ok


def test_passkey_grid_counts_correct_answers(lm, tokenizer):
    filler = [t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:10]) for t in tokenizer.encode(d)]

    class Oracle(torch.nn.Module):
        """Answers with the key read back from the prompt when the key line opens it (depth 0), with a wrong last
        digit otherwise (depth 1): the grid must count exactly that."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, ids, **kwargs):
            rows = []
            for row in ids.tolist():
                text = tokenizer.decode(row)
                key = text.split("The pass key is ")[1][:5]
                early = text.startswith("# The pass key is ")  # depth 0: the key line opens the prompt
                answer = key if early else key[:4] + str((int(key[4]) + 1) % 10)
                rows.append(row + tokenizer.encode(" " + answer))
            return torch.tensor(rows)

    grid = passkey.passkey_accuracy(Oracle(), tokenizer, filler, [100, 200], [0.0, 1.0], 3, progress=False)
    assert grid["accuracy"] == {"100": {"0.0": 1.0, "1.0": 0.0}, "200": {"0.0": 1.0, "1.0": 0.0}}


# ---------------------------------------------------------------- frequency analysis


def test_frequency_analysis_finds_the_one_pair_that_carries_all_energy(lm, tokenizer):
    model = AutoModelForCausalLM.from_config(lm.config).eval()
    pair, d, heads, kv = 5, 16, 4, 2
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj, n_heads in ((attn.q_proj, heads), (attn.k_proj, kv)):
                keep = torch.zeros(n_heads * d, dtype=torch.bool)
                for h in range(n_heads):
                    keep[h * d + pair] = keep[h * d + pair + d // 2] = True
                proj.weight[~keep] = 0.0
    docs = [tokenizer.encode(t) for t in corpus.read_texts(corpus.stdlib_files("held_out")[:5])]
    usage = frequency_usage(model, docs, seq_len=64, max_tokens=512, progress=False)
    assert usage.q.shape == (2, 4, 8) and usage.k.shape == (2, 2, 8) and usage.v.shape == (2, 2, 8)
    assert (usage.qk_energy().argmax(axis=1) == pair).all()
    others = [i for i in range(8) if i != pair]
    assert usage.q[:, :, others].max() == 0.0 and usage.q[:, :, pair].min() > 0
    assert usage.v[:, :, others].max() > 0  # the control keeps its energy everywhere
    keep, reasoning = suggest_keep(usage, context_length=128)
    assert 0 < keep <= 1 and any("Suggested: --method prope --keep" in line for line in reasoning)


def test_suggested_keep_matches_the_papers_choice_for_a_gemma_like_shape():
    import numpy as np

    from ctxext.evals.frequency import FrequencyUsage

    d, pairs = 256, 128
    inv = 10000.0 ** (-2 * np.arange(pairs) / d)
    ones = np.ones((1, 1, pairs))
    keep, _ = suggest_keep(FrequencyUsage(ones, ones, ones, inv[None], 8192, 1), 8192)
    assert keep == pytest.approx(0.78, abs=0.01)  # Barbero et al. found 0.75 best for Gemma 7B at 8k


# ---------------------------------------------------------------- plots and the CLI


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


def test_plots_are_valid_pngs(tmp_path):
    import numpy as np

    assert _is_png(
        plot_perplexity(
            {"a": {256: 10.0, 512: 12.0}, "b": {256: 9.0, 512: 30.0}},
            tmp_path / "p.png",
            title="t",
            trained_context=256,
        )
    )
    assert _is_png(plot_passkey({"256": {"0.0": 1.0, "1.0": 0.5}}, tmp_path / "k.png", title="t"))
    grid = np.random.rand(3, 8)
    assert _is_png(
        plot_frequency_usage(
            {"q": grid, "k": grid}, np.arange(8) * 100.0, tmp_path / "f.png", title="t", context_length=300
        )
    )


@pytest.mark.slow
def test_eval_and_analyze_commands_write_json_and_plots(lm_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in corpus.stdlib_files("held_out")[:12]:
        (data / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    out = tmp_path / "eval"

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "ctxext.cli", *map(str, args)], check=False, capture_output=True, text=True, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = run(
        "eval", "ppl", lm_dir, lm_dir, "--lengths", "64,128", "--data", data, "--output", out, "--max-documents", 4
    )
    assert "perplexity" in text and "docs scored" in text
    res = json.loads((out / "ppl.json").read_text())
    assert res["protocol"]["data"] == str(data) and set(res["models"]) == {"lm0", "lm0'"}
    assert res["models"]["lm0"]["per_length"]["128"]["tokens_scored"] > 0 and _is_png(out / "ppl.png")

    text = run(
        "eval",
        "passkey",
        lm_dir,
        "--lengths",
        "96,128",
        "--depths",
        "0,1",
        "--trials",
        2,
        "--filler",
        data,
        "--output",
        out,
    )
    res = json.loads((out / "passkey.json").read_text())
    assert set(res["models"]["lm0"]["accuracy"]) == {"96", "128"} and _is_png(out / "passkey_lm0.png")
    printed = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] in (["96"], ["128"])}
    assert printed == {
        L: [f"{row[d]:.0%}" for d in ("0.0", "1.0")] for L, row in res["models"]["lm0"]["accuracy"].items()
    }

    text = run("analyze", "freq", lm_dir, "--data", data, "--compare", lm_dir, "--output", out, "--max-tokens", 512)
    assert "Suggested: --method prope --keep" in text and _is_png(out / "freq.png")
    res = json.loads((out / "freq.json").read_text())
    assert len(res["runs"]["model"]["q"]) == 2 and res["suggested_keep"] > 0

    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", "eval", "ppl", lm_dir, "--lengths", "64", "--data", tmp_path / "missing"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_training_documents_can_put_the_key_exactly_at_the_start(tokenizer):
    import random

    filler = [t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:10]) for t in tokenizer.encode(d)]
    key_start = tokenizer.encode("# The pass key is")
    rng = random.Random(0)
    docs = [passkey.training_document(tokenizer, filler, rng, 200, edge_depth_share=1.0) for _ in range(40)]
    at_start = sum(d[: len(key_start)] == key_start for d in docs)
    assert 10 <= at_start <= 30  # about half at depth 0, the rest at depth 1
    rng = random.Random(0)
    docs = [passkey.training_document(tokenizer, filler, rng, 200) for _ in range(40)]
    assert sum(d[: len(key_start)] == key_start for d in docs) <= 2  # uniform depths rarely hit position 0


# ---------------------------------------------------------------- RULER-style retrieval tasks


@pytest.mark.parametrize("task", ["multikey", "multivalue", "vartrack"])
def test_retrieval_prompt_plus_answer_fits_the_length_and_holds_the_needles(tokenizer, task):
    import random

    from ctxext.evals import retrieval

    filler = [t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:10]) for t in tokenizer.encode(d)]
    needles = retrieval.TASKS[task](random.Random(5), 0.0)
    ids = retrieval.build_prompt(tokenizer, filler, 300, needles)
    answer = tokenizer.encode(needles.answer_text, add_special_tokens=False)
    assert len(ids) + len(answer) == 300
    text = tokenizer.decode(ids)
    assert text.endswith(needles.question)
    positions = [text.index(line.strip()) for _, line in needles.lines]
    assert min(positions) == positions[0] and positions[0] < 40  # the target needle at depth 0 comes first
    if task == "vartrack":  # the chain is in order, so it can be followed from its value to the asked variable
        assert positions[: len(needles.lines)] == sorted(positions[: len(needles.lines)])


@pytest.mark.parametrize(
    "completion,answer,ok",
    [
        (" 48213", ["48213"], True),
        (" 48213\n", ["48213"], True),
        (" 48214", ["48213"], False),
        (" 482130", ["48213"], False),
        ("\n48213", ["48213"], True),
        (" x 48213", ["48213"], False),
        (" 1, 2, 3", ["1", "2", "3"], True),
        (" 1, 3, 2", ["1", "2", "3"], False),
        (" 1, 2", ["1", "2", "3"], False),
    ],
)
def test_retrieval_scoring_is_exact_match_in_order(completion, answer, ok):
    from ctxext.evals.retrieval import score

    assert score(completion, answer) is ok


def test_wilson_interval_matches_known_values():
    from ctxext.evals.retrieval import count_with_interval, wilson

    lo, hi = wilson(38, 40)  # 95%: the textbook interval for 38/40
    assert (round(lo, 3), round(hi, 3)) == (0.835, 0.986)
    assert wilson(0, 40)[0] == 0.0 and round(wilson(0, 40)[1], 3) == 0.088 and wilson(40, 40)[1] == 1.0
    assert count_with_interval(38, 40) == "38/40 [0.83, 0.99]"


def test_retrieval_grid_counts_what_an_oracle_answers(tokenizer):
    import re as regex

    from ctxext.evals import retrieval

    filler = [t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:10]) for t in tokenizer.encode(d)]

    class Oracle(torch.nn.Module):
        """Solves multi-key by reading the prompt, but only when the asked key sits in the first half."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, ids, max_new_tokens, **kwargs):
            rows = []
            for row in ids.tolist():
                text = tokenizer.decode(row)
                key = regex.search(r"What is the value of (KEY_\w+)\?", text).group(1)
                at = text.index(f"{key} = ")
                value = text[at + len(key) + 3 : at + len(key) + 8]
                answer = value if at < len(text) // 2 else "00000"
                rows.append((row + tokenizer.encode(" " + answer))[: len(row) + max_new_tokens])
            return torch.tensor(rows)

    grid = retrieval.task_accuracy(Oracle(), tokenizer, filler, "multikey", [200], [0.0, 1.0], 5, progress=False)
    assert grid["accuracy"] == {"200": {"0.0": 1.0, "1.0": 0.0}}
    assert grid["wilson95"]["200"]["0.0"][1] == 1.0 and grid["wilson95"]["200"]["1.0"][0] == 0.0


def test_worst_depth_table_takes_each_cells_worst_depth_and_marks_missing_tasks():
    from ctxext.evals.run import worst_depth_table, worst_depths

    grids = {
        "multikey": {"accuracy": {"256": {"0.0": 0.9, "0.5": 0.4, "1.0": 1.0}, "512": {"0.0": 0.25, "1.0": 0.5}}},
        "vartrack": {"accuracy": {"256": {"0.0": 1.0}, "512": {"0.0": 0.0}}},
    }
    worst = worst_depths(grids)
    assert worst == {"multikey": {"256": 0.4, "512": 0.25}, "vartrack": {"256": 1.0, "512": 0.0}}
    assert worst_depth_table(
        "model", {"a": worst, "b": {"vartrack": worst["vartrack"]}}, ["multikey", "vartrack"], [256, 512]
    ) == [
        "| model | multikey@256 | multikey@512 | vartrack@256 | vartrack@512 |",
        "|---|---|---|---|---|",
        "| a | 40% | 25% | 100% | 0% |",
        "| b | n/a | n/a | 100% | 0% |",
    ]


def test_tokenized_texts_are_remembered_per_tokenizer_content_and_texts(tokenizer, monkeypatch):
    """Evaluating several models that share a tokenizer tokenizes each text once; another tokenizer, other texts,
    or a change to the returned lists never get a wrong answer."""
    from ctxext.data import text

    texts = corpus.read_texts(corpus.stdlib_files("held_out")[:3])
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend = tokenizer.backend_tokenizer
    same = type(tokenizer)(tokenizer_object=type(backend).from_str(backend.to_str()))  # same content, another object
    other = train_tokenizer(texts, vocab_size=300)
    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, *a, **kw: calls.append(1) or real_call(self, *a, **kw)
    )
    first = text.tokenize_documents(tokenizer, texts)
    first[0].append(-1)  # the caller's copy
    assert text.tokenize_documents(tokenizer, texts) == want and len(calls) == 1
    assert text.tokenize_documents(same, texts) == want and len(calls) == 1
    assert text.tokenize_documents(other, texts) != want and len(calls) == 2
    assert text.tokenize_documents(tokenizer, texts[:2]) == want[:2] and len(calls) == 3
