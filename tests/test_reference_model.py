"""The shipped reference model: loads offline with stock transformers, generates, and keeps its model card's
promises (re-measured here on a subset: retrieval within 256 tokens, context helps inside the window)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxext.data import corpus
from ctxext.evals import passkey
from ctxext.evals.perplexity import perplexity
from ctxext.io.sources import REFERENCE_DIR

pytestmark = pytest.mark.skipif(not (REFERENCE_DIR / "config.json").is_file(), reason="reference model not built")


@pytest.fixture(scope="module")
def ref():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    return model, tokenizer


def test_loads_offline_with_stock_transformers_and_generates(ref):
    model, tokenizer = ref
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 256
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert sum(f.stat().st_size for f in REFERENCE_DIR.iterdir()) < 25 * 2**20
    ids = tokenizer("def main():\n    ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 12
    assert tokenizer.encode("48213", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(c) for c in "48213"]


def test_model_card_states_the_measured_numbers():
    card = (REFERENCE_DIR / "README.md").read_text()
    summary = json.loads((REFERENCE_DIR / "training_summary.json").read_text())
    assert f"{summary['parameters']:,}" in card and "scripts/train_reference.py" in card
    assert all(summary["gates"].values()), summary["gates"]


@pytest.mark.slow  # evaluates the model over many prompts
def test_retrieves_passkeys_within_its_window(ref):
    model, tokenizer = ref
    filler = [
        t for d in corpus.read_texts(corpus.stdlib_files("held_out")[:40]) for t in tokenizer.encode(d, verbose=False)
    ]
    grid = passkey.passkey_accuracy(model, tokenizer, filler, [256], [0.0, 0.5, 1.0], 10, seed=7, progress=False)
    assert min(grid["accuracy"]["256"].values()) >= 0.8, grid["accuracy"]


@pytest.mark.slow  # evaluates the model over many prompts
def test_context_helps_inside_the_window(ref):
    model, tokenizer = ref
    docs = [tokenizer.encode(t, verbose=False) for t in corpus.read_texts(corpus.stdlib_files("held_out")[:60])]
    p64 = perplexity(model, docs, 64, max_documents=20, batch_size=8, progress=False).perplexity
    p256 = perplexity(model, docs, 256, max_documents=20, batch_size=8, progress=False).perplexity
    assert p256 < p64
