"""Patching a live model: identity, exact undo, cached decoding, padding, scopes, errors."""

import math

import pytest
import reference as ref
import torch
from conftest import CONTEXT, assert_left_padding_matches_unpadded, tiny_model
from transformers import AutoConfig

from ctxext import MethodError, patch_model, plan_patch
from ctxext.errors import UnsupportedModelError
from ctxext.models.base import find_rotary
from ctxext.rope.xpos import xpos_attention

L = CONTEXT
STATIC = [
    ("pi", {"factor": 4}),
    ("ntk", {"factor": 4}),
    ("yarn", {"factor": 4}),
    ("llama3", {"factor": 4}),
    ("prope", {"keep": 0.5}),
    ("prope+pi", {"keep": 0.5, "factor": 4}),
    ("xpos", {"scale_base": 32}),
    ("pi+xpos", {"factor": 4, "scale_base": 32}),
]


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (batch, n), generator=g)


@pytest.mark.parametrize(
    "spec,params",
    [
        ("pi", {"factor": 1}),
        ("prope", {"keep": 1.0}),
        ("ntk", {"factor": 1}),
        ("yarn", {"factor": 1}),
        ("llama3", {"factor": 1}),
    ],
)
def test_identity_settings_leave_logits_bit_identical(family, spec, params):
    model = tiny_model(family)
    x = ids(3 * L)
    before = model(x).logits
    patch_model(model, spec, **params)
    assert torch.equal(model(x).logits, before)


@pytest.mark.parametrize("spec,params", STATIC + [("dynamic", {})])
def test_remove_restores_logits_bit_identically(family, spec, params):
    model = tiny_model(family)
    x = ids(3 * L)
    before = model(x).logits
    config_before = model.config.to_dict()
    handle = patch_model(model, spec, **params)
    patched = model(x).logits
    assert not torch.equal(patched, before)  # the patch did something
    handle.remove()
    assert torch.equal(model(x).logits, before)
    assert model.config.to_dict() == config_before


def greedy_without_cache(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("spec,params", STATIC)
def test_kv_cached_decoding_equals_full_forward(family, spec, params):
    model = tiny_model(family)
    patch_model(model, spec, **params)
    prompt = ids(2 * L + 5)
    cached = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    full = model(cached.sequences[:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(cached.logits, 1), full, rtol=1e-4, atol=1e-4)
    steps = cached.sequences.shape[1] - prompt.shape[1]  # generation may stop early at EOS
    assert torch.equal(cached.sequences, greedy_without_cache(model, prompt, steps))


@pytest.mark.parametrize("spec,params", [("xpos", {"scale_base": 32}), ("pi+xpos", {"factor": 4, "scale_base": 32})])
def test_xpos_left_padded_batch_equals_unpadded_rows(family, spec, params):
    model = tiny_model(family)
    patch_model(model, spec, **params)
    assert_left_padding_matches_unpadded(model, ids(2 * L, seed=2)[0], ids(L + 7, seed=3)[0])


def test_xpos_changes_the_model_and_decays_with_distance():
    model = tiny_model("llama")
    x = ids(2 * L)
    before = model(x).logits
    with patch_model(model, "xpos", scale_base=16):
        assert model.config._attn_implementation == "ctxext_xpos"
        assert not torch.allclose(model(x).logits, before)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow  # float64 reference attention over 64k keys
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("q_len", [1, 300])
def test_xpos_attention_finite_and_correct_at_64k_positions(dtype, tol, q_len):
    torch.manual_seed(0)
    heads, k_len, d = 2, 65536, 16
    q = torch.randn(1, heads, q_len, d).to(dtype)
    k = torch.randn(1, heads, k_len, d).to(dtype)
    v = torch.randn(1, heads, k_len, d).to(dtype)
    out = xpos_attention(q, k, v, None, scale_base=512.0, scaling=d**-0.5)
    assert torch.isfinite(out).all()
    positions = torch.arange(k_len)
    expected = ref.xpos_attention(
        q[0].double(), k[0].double(), v[0].double(), positions[-q_len:], positions, 512.0, d**-0.5
    )
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xpos_model_forward_finite_far_beyond_context(dtype):
    model = tiny_model("llama").to(dtype)
    patch_model(model, "pi+xpos", factor=64, scale_base=64)
    assert find_rotary(model)[2].inv_freq.dtype == torch.float32
    logits = model(ids(4096)).logits
    assert torch.isfinite(logits).all()


def test_xpos_attention_matches_reference_with_a_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 600, 8), torch.randn(1, 2, 600, 8), torch.randn(1, 2, 600, 8)
    allowed = torch.rand(600, 600) > 0.3
    allowed |= torch.eye(600, dtype=torch.bool)
    causal = torch.tril(torch.ones(600, 600, dtype=torch.bool))
    out = xpos_attention(q, k, v, (allowed & causal)[None, None], scale_base=100.0, scaling=0.3)
    pos = torch.arange(600)
    expected = ref.xpos_attention(q[0], k[0], v[0], pos, pos, 100.0, 0.3, mask=allowed)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- scopes and families


def test_gemma3_patches_global_layers_by_default_and_sliding_on_request():
    model = tiny_model("gemma3_text")
    sliding_before = dict(model.config.rope_parameters["sliding_attention"])
    patch_model(model, "pi", factor=4)
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert model.config.rope_parameters["sliding_attention"] == sliding_before
    model = tiny_model("gemma3_text")
    patch_model(model, "pi", factor=4, scope="all")
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "linear"
    model = tiny_model("gemma3_text")
    patch_model(model, "pi", factor=4, scope="sliding")
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "default"
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "linear"


def test_gemma2_cannot_separate_sliding_and_global():
    model = tiny_model("gemma2")
    with pytest.raises(MethodError, match="gemma2 shares one rotary embedding.*valid scopes: all"):
        patch_model(model, "pi", factor=2, scope="sliding")


def test_scope_the_model_lacks_is_refused():
    with pytest.raises(MethodError, match="scope 'sliding'.*no sliding_attention layers.*valid scopes: all"):
        patch_model(tiny_model("llama"), "pi", factor=2, scope="sliding")
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "sliding_attention"])
    with pytest.raises(MethodError, match="scope 'global'.*no full_attention layers"):
        patch_model(model, "pi", factor=2)


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "bloom"])
def test_non_rope_models_are_rejected_naming_the_supported_families(model_type):
    config = AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedModelError, match="gemma3_text.*llama.*qwen3"):
        plan_patch(config, "pi", factor=2)


def test_max_position_embeddings_and_record_follow_the_patch():
    model = tiny_model("llama")
    patch_model(model, "yarn", factor=8)
    assert model.config.max_position_embeddings == 8 * L
    record = model.config.ctxext
    assert record["original_context"] == L and record["context"] == 8 * L
    assert record["steps"][0]["chain"] == [
        {"method": "yarn", "factor": 8, "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None}
    ]
    model = tiny_model("llama")
    patch_model(model, "pi", target_length=5 * L)
    assert model.config.max_position_embeddings == 5 * L
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 5.0}


@pytest.mark.parametrize(
    "spec,params",
    [
        ("yarn", {"target_length": 8 * L}),
        ("pi", {"target_length": 4 * L}),
        ("ntk", {"target_length": 4 * L}),
        ("llama3", {"target_length": 8 * L}),
        ("dynamic", {}),
        ("selfextend", {"group_size": 4, "window": 16}),
    ],
)
def test_trained_context_patches_an_overstated_config_like_the_true_one(spec, params):
    """A config stating 4 x the context the model was trained at (Qwen2.5 bases, some Mistral releases), patched
    with ``trained_context``: the same rope parameters, context and logits as the true config patched plainly."""
    true, overstated = tiny_model("llama"), tiny_model("llama", max_position_embeddings=4 * L)
    patch_model(true, spec, **params)
    patch_model(overstated, spec, trained_context=L, **params)
    assert overstated.config.rope_parameters == true.config.rope_parameters
    assert overstated.config.max_position_embeddings == true.config.max_position_embeddings
    assert overstated.config.ctxext["original_context"] == L
    x = ids(6 * L)
    torch.testing.assert_close(overstated(x).logits, true(x).logits, rtol=0, atol=0)
    # and it matters: without it the overstated config extends from 4 L
    plain = tiny_model("llama", max_position_embeddings=4 * L)
    patch_model(plain, spec, **params)
    assert (plain.config.rope_parameters, plain.config.max_position_embeddings) != (
        true.config.rope_parameters,
        true.config.max_position_embeddings,
    )


def test_trained_context_is_refused_on_a_checkpoint_ctxext_patched():
    model = tiny_model("llama")
    patch_model(model, "pi", factor=2)
    with pytest.raises(MethodError, match="already patched by ctxext"):
        patch_model(model, "pi", factor=2, trained_context=L)


def test_patching_twice_composes_on_top_of_the_first_patch():
    model = tiny_model("llama")
    patch_model(model, "pi", factor=2)
    patch_model(model, "pi", factor=3)
    inv_freq = find_rotary(model)[2].inv_freq.double()
    torch.testing.assert_close(inv_freq, ref.rope_inv_freq(16, 10000.0) / 6, rtol=1e-6, atol=0)
    record = model.config.ctxext
    assert model.config.max_position_embeddings == 6 * L
    assert record["original_context"] == L and [s["to_context"] for s in record["steps"]] == [2 * L, 6 * L]
    with pytest.raises(MethodError, match="already uses xpos"):
        patch_model(model, "xpos")
        patch_model(model, "xpos")


def test_bf16_model_keeps_fp32_rotary_buffers():
    model = tiny_model("llama").to(torch.bfloat16)
    patch_model(model, "yarn", factor=4)
    assert find_rotary(model)[2].inv_freq.dtype == torch.float32


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "spec,params,message",
    [
        ("pi", {"factor": 0}, r"pi: factor=0 is invalid; valid range: a finite number > 0"),
        ("pi", {"factor": -2.0}, r"factor=-2.0 is invalid"),
        ("pi", {"factor": math.nan}, r"factor=nan is invalid"),
        ("yarn", {"factor": math.inf}, r"factor=inf is invalid"),
        ("ntk", {"factor": "4"}, r"factor='4' is invalid"),
        ("prope", {"keep": 0.0}, r"keep=0.0 is invalid; valid range: 0 < keep <= 1"),
        ("prope", {"keep": 1.5}, r"keep=1.5 is invalid; valid range: 0 < keep <= 1"),
        ("prope", {"keep": 0.01}, r"keeps 0 of 8 rotation pairs"),
        ("xpos", {"scale_base": 0}, r"scale_base=0 is invalid"),
        ("yarn", {"factor": 4, "beta_fast": 1, "beta_slow": 2}, r"beta_fast=1 must be greater than beta_slow=2"),
        (
            "rope2",
            {"factor": 2},
            r"unknown method 'rope2'; valid methods: dynamic, llama3, ntk, pi, prope, selfextend, xpos, yarn",
        ),
        ("pi", {}, r"pi: missing required parameter\(s\) factor"),
        ("pi", {"keep": 0.5, "factor": 2}, r"keep belongs to prope"),
        ("pi+yarn", {"factor": 2}, r"pi and yarn both rescale every frequency"),
        ("xpos+pi", {"factor": 2}, r"xpos acts inside attention and must come last"),
        ("pi+pi", {"factor": 2}, r"'pi' appears twice"),
        ("dynamic+xpos", {}, r"dynamic recomputes the frequencies at every forward and cannot be chained"),
        ("pi", {"factor": 2, "target_length": 10}, r"target_length=10 is invalid; valid range: an integer >= .* 64"),
        (
            "yarn",
            {"factor": 2, "trained_context": 128},
            r"trained_context=128 is invalid; valid range: an integer "
            r"from 2 to the config's max_position_embeddings \(64\)",
        ),
        ("yarn", {"factor": 2, "trained_context": 1}, r"trained_context=1 is invalid"),
        ("yarn", {"factor": 2, "trained_context": 32.0}, r"trained_context=32.0 is invalid"),
    ],
)
def test_bad_parameters_raise_naming_value_and_range(spec, params, message):
    model = tiny_model("llama")
    with pytest.raises(MethodError, match=message):
        patch_model(model, spec, **params)
    assert model.config.rope_parameters["rope_type"] == "default"  # nothing changed
