"""The chunked LM-head cross-entropy equals the plain one, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from ctxext.train.loss import ChunkedLMLoss, linear_cross_entropy


def tiny_llama(tie: bool):
    return tiny_model(
        "llama", scale_qk=False, vocab_size=101, hidden_size=32, intermediate_size=64, tie_word_embeddings=tie
    ).train()


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_full_logits_cross_entropy_and_gradients(softcap, chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 97, (50,))
    t[[3, 17]] = -100
    logits = h @ w.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, t, reduction="sum", ignore_index=-100)
    ref_gh, ref_gw = torch.autograd.grad(ref * 0.7, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=chunk, softcap=softcap)
    gh, gw = torch.autograd.grad(got * 0.7, (h, w))
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_wrapped_model_loss_equals_transformers_own_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny_llama(tie=True)
    ids = torch.randint(0, 101, (2, 40))
    own = model(input_ids=ids, labels=ids).loss
    own_grads = torch.autograd.grad(own, list(model.parameters()))
    ours = ChunkedLMLoss(model, chunk=16)(ids) / (2 * 39)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_position_ids_reach_the_model_as_in_its_own_loss():
    """PoSE passes skipped position ids: the chunked loss must see exactly what the model's own forward sees, as one
    causal sequence (transformers reads jumping position ids without a mask or cache as packed documents)."""
    torch.manual_seed(0)
    model = tiny_llama(tie=True)
    ids = torch.randint(0, 101, (2, 40))
    positions = torch.cat([torch.arange(15), torch.arange(15, 40) + 200]).expand(2, -1)
    own = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, labels=ids).loss
    packed = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss  # chunks isolated
    assert abs(own.item() - packed.item()) > 1e-4
    ours = ChunkedLMLoss(model, chunk=16)(ids, positions) / (2 * 39)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_target_weights_scale_each_term_and_its_gradient(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 97, (50,))
    t[[3, 17]] = -100
    weights = torch.rand(50, dtype=torch.float64) * 10
    ref = (F.cross_entropy(h @ w.T, t, reduction="none", ignore_index=-100) * weights).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=chunk, target_weights=weights)
    gh, gw = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)  # fp32 logits, terms up to 10x
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_head", [False, True])
def test_wrapped_model_weights_match_a_weighted_full_logits_loss(lora_head):
    """Both paths of ChunkedLMLoss (plain head: fused; adapted head: checkpointed chunks) weigh each target."""
    torch.manual_seed(0)
    model = tiny_llama(tie=False)
    if lora_head:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    ids = torch.randint(0, 101, (2, 40))
    weights = torch.ones(2, 39)
    weights[0, 5:9] = 20.0
    logits = model(input_ids=ids).logits[:, :-1].float()
    ref = (F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none") * weights.flatten()).sum()
    plain = ChunkedLMLoss(model, chunk=16)(ids)
    ours = ChunkedLMLoss(model, chunk=16)(ids, weights=weights)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert ours > plain * 1.05  # the weights changed the sum
