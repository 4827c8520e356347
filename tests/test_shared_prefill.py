"""Shared-prefill retrieval: answers from the cropped shared KV cache equal a fresh forward's (tiny random models,
RoPE rewrites and attention-side methods, the reference model); prompts hold the needles where the bands say."""

import random

import pytest
import torch
from conftest import tiny_model

from ctxext.data import needles as needles_format
from ctxext.errors import EvalError
from ctxext.evals import shared_prefill as sp
from ctxext.io.sources import REFERENCE_DIR
from ctxext.patch import patch_model

NEW = 6


def fresh_answer(model, ids: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """What the one-needle protocol does: greedy ``generate`` over the whole prompt, no cache kept."""
    t = torch.tensor([ids])
    out = model.generate(
        t,
        attention_mask=torch.ones_like(t),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, t.shape[1] :].tolist(), torch.cat(out.logits).float()


def assert_shared_equals_fresh(model, prefix: list[int], questions: list[list[int]], new: int = NEW) -> None:
    """Shared-cache answers = ``generate`` over the whole prompt (tokens, logits) = one cache-free forward over
    prompt + answer (its logits at the answer's positions, whose argmax is the answer)."""
    answers, prefill_s, answer_s = sp.answer_questions(model, prefix, questions, new, logits=True)
    assert prefill_s > 0 and len(answer_s) == len(questions)
    for question, (tokens, logits) in zip(questions, answers):
        expected_tokens, expected_logits = fresh_answer(model, prefix + question, new)
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        prompt = len(prefix) + len(question)
        with torch.no_grad():
            full = model(torch.tensor([prefix + question + tokens]), use_cache=False).logits[0, prompt - 1 : -1]
        torch.testing.assert_close(logits, full.float(), rtol=1e-4, atol=1e-4)
        assert full.argmax(-1).tolist() == tokens


def random_prompt(vocab: int, prefix_len: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, vocab) for _ in range(prefix_len)]
    return prefix, [[rng.randrange(1, vocab) for _ in range(n)] for n in (3, 7, 5)]


@pytest.mark.parametrize(
    "chain, params",
    [
        (None, {}),
        ("yarn", {"factor": 4}),
        ("xpos", {}),
        ("selfextend", {"group_size": 4, "window": 16}),
        ("yarn+selfextend", {"factor": 2, "group_size": 4, "window": 16, "group_bias": -1.0}),
    ],
)
def test_answers_from_the_cropped_shared_cache_equal_a_fresh_forward(chain, params):
    torch.set_num_threads(1)
    model = tiny_model("llama")
    if chain:
        patch_model(model, chain, **params)
    prefix, questions = random_prompt(model.config.vocab_size, 300)  # beyond the context (64) and xPos's block (256)
    assert_shared_equals_fresh(model, prefix, questions)


def test_sliding_window_layers_rewind_too():
    """Gemma 3's sliding layers (window 16) would drop keys in a config-built cache; the shared cache keeps them
    all and the mask does the sliding, so crop can rewind and answers still match."""
    torch.set_num_threads(1)
    model = tiny_model("gemma3_text")
    prefix, questions = random_prompt(model.config.vocab_size, 120, seed=1)
    assert_shared_equals_fresh(model, prefix, questions)


def test_length_dependent_frequencies_are_refused():
    model = tiny_model("llama")
    patch_model(model, "dynamic", factor=2)
    with pytest.raises(EvalError, match="dynamic.*ntk"):
        sp.answer_questions(model, [1, 2, 3], [[4]], 2)


def test_bands_and_counts_are_checked():
    assert sp.check_bands([(0, 0.5), [0.5, 1]]) == [(0.0, 0.5), (0.5, 1.0)]
    assert [sp.band_label(b) for b in [(0, 0.25), (0.5, 0.5), (0.75, 1)]] == ["0-0.25", "0.5", "0.75-1"]
    for bad in ([], [(0.5, 0.2)], [(0, 1.5)], [0.5], [(0, 0.5), (0, 0.5)]):
        with pytest.raises(EvalError, match="bands="):
            sp.check_bands(bad)


@pytest.fixture(scope="module")
def reference():
    if not (REFERENCE_DIR / "config.json").is_file():
        pytest.skip("reference model not built")
    from ctxext.evals.run import filler_stream, load_for_eval

    torch.set_num_threads(1)
    model, tokenizer, _ = load_for_eval("reference", device="cpu", dtype="float32")
    return model.eval(), tokenizer, filler_stream(tokenizer)


def test_prompt_holds_each_needle_in_its_band_and_fits_the_length(reference):
    _, tokenizer, filler = reference
    bands = [(0.0, 0.0), (0.2, 0.4), (1.0, 1.0)]
    needles = sp.draw_needles(random.Random(0), bands, per_band=2)
    assert len({n["name"] for n in needles}) == len({n["key"] for n in needles}) == 6
    prefix, questions = sp.build_prompt(tokenizer, filler, 512, needles)
    answer = len(tokenizer.encode(" 12345", add_special_tokens=False)) + 1
    assert len(prefix) + max(map(len, questions)) + answer == 512
    for n, q in zip(needles, questions):
        line = tokenizer.encode(needles_format.KEY_LINE.format(**n), add_special_tokens=False)
        assert prefix[n["position"] : n["position"] + len(line)] == line
        assert n["name"] in tokenizer.decode(q)
        lo, hi = bands[n["band"]]
        assert lo - 0.1 <= n["position"] / len(prefix) <= hi + 0.1  # within a filler line of the band
    assert needles[0]["position"] == 0 and prefix[-len(line) :] == line  # pinned 0 opens, pinned 1 closes
    with pytest.raises(EvalError, match="length=100 is too short for 6 needles"):
        sp.build_prompt(tokenizer, filler, 100, needles)


@pytest.mark.parametrize(
    "chain, params", [(None, {}), ("yarn", {"factor": 8}), ("selfextend", {"group_size": 4, "window": 64})]
)
def test_reference_model_answers_from_the_shared_cache_like_a_fresh_forward(reference, chain, params):
    model, tokenizer, filler = reference
    handle = patch_model(model, chain, **params) if chain else None
    try:
        needles = sp.draw_needles(random.Random(1), [(0, 0.3), (0.3, 0.7), (0.7, 1)], per_band=1)
        prefix, questions = sp.build_prompt(tokenizer, filler[5000:], 600, needles)
        assert_shared_equals_fresh(model, prefix, questions, new=600 - len(prefix) - max(map(len, questions)))
    finally:
        if handle:
            handle.remove()


def test_grid_is_deterministic_and_counts_every_needle(reference):
    model, tokenizer, filler = reference
    kwargs = dict(lengths=[128, 256], bands=[(0, 0.5), (0.5, 1)], prompts=3, per_band=2, seed=7, progress=False)
    grid = sp.shared_prefill_accuracy(model, tokenizer, filler, **kwargs)
    again = sp.shared_prefill_accuracy(model, tokenizer, filler, **kwargs)
    assert grid["accuracy"] == again["accuracy"] and grid["examples"] == again["examples"]
    assert grid["needles_per_prompt"] == 4 and grid["needles_per_cell"] == 6
    for L in ("128", "256"):
        assert set(grid["cells"][L]) == {"0-0.5", "0.5-1"}
        for band, cell in grid["cells"][L].items():
            assert (cell["needles"], cell["prompts"]) == (6, 3)
            assert grid["accuracy"][L][band] == cell["correct"] / 6
            assert grid["wilson95"][L][band][0] <= grid["accuracy"][L][band] <= grid["wilson95"][L][band][1]
            assert (
                cell["prefill_s"] > 0 and cell["answer_s"] > 0 and cell["swapped"] <= cell["needles"] - cell["correct"]
            )
        assert grid["seconds"][L]["prefill"] == pytest.approx(
            sum(c["prefill_s"] for c in grid["cells"][L].values()), abs=0.01
        )
    with pytest.raises(EvalError, match="prompts=0"):
        sp.shared_prefill_accuracy(model, tokenizer, filler, [256], [(0, 1)], 0)


def test_grid_counts_right_and_swapped_answers_of_an_oracle(reference):
    """An oracle that always answers the prompt's first key (what the reference model does with the last one):
    the band at depth 0 is all right, the band at depth 1 all wrong, each wrong answer another needle's key."""
    import re
    from types import SimpleNamespace

    _, tokenizer, filler = reference

    class Oracle(torch.nn.Module):
        config = SimpleNamespace(rope_parameters={"rope_type": "default"})

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, cache=None, **kwargs):  # a one-layer cache as long as the input
            cache.update(torch.zeros(1, 1, input_ids.shape[1], 1), torch.zeros(1, 1, input_ids.shape[1], 1), 0)

        def generate(self, ids, max_new_tokens, cache=None, **kwargs):
            first = re.search(r"pass key is (\d+)", tokenizer.decode(ids[0])).group(1)
            answer = tokenizer.encode(" " + first, add_special_tokens=False)[:max_new_tokens]
            self.forward(torch.zeros(1, ids.shape[1] - cache.get_seq_length() + len(answer) - 1), cache)
            return SimpleNamespace(sequences=torch.tensor([ids[0].tolist() + answer]))

    grid = sp.shared_prefill_accuracy(Oracle(), tokenizer, filler, [300], [(0, 0), (1, 1)], 4, progress=False)
    assert grid["accuracy"] == {"300": {"0": 1.0, "1": 0.0}}
    assert grid["cells"]["300"]["0"]["swapped"] == 0 and grid["cells"]["300"]["1"]["swapped"] == 4
