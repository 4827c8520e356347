"""`ctxext eval ppl` scores through the decoder body and a chunked LM head: same numbers as full logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

from ctxext.evals.perplexity import perplexity, window_nll

torch.set_num_threads(1)


def full_logits_nll(model, ids, targets):
    """The implementation window_nll replaced: full [L, vocab] fp32 logits."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_window_nll_equals_full_logits_for_every_family(family):
    model = tiny_model(family)
    if family == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capped head is covered
    ids = torch.randint(1, 97, (2, 90), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, :30] = -100  # an already-scored prefix, as in sliding windows
    with torch.no_grad():
        want = full_logits_nll(model, ids, targets)
        for chunk in (7, 64, 1024):  # chunk boundaries inside, at and beyond the window
            got = window_nll(model, ids, targets, chunk=chunk)
            assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_perplexity_unchanged_with_stride_and_batches():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (200, 130, 40)]
    got = perplexity(model, docs, 64, stride=32, batch_size=3, progress=False)
    # independent token-by-token count with full logits
    nll, count = 0.0, 0
    from ctxext.evals.perplexity import windows

    with torch.no_grad():
        for doc in docs:
            for b, e, first in windows(len(doc), 64, 32):
                ids = torch.tensor([doc[b:e]])
                targets = ids[:, 1:].clone()
                targets[0, : first - b - 1] = -100
                nll += full_logits_nll(model, ids, targets).item()
                count += int((targets != -100).sum())
    assert got.tokens_scored == count and got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
