"""Each method's frequencies against independent float64 references and against transformers' built-ins."""

import math

import pytest
import reference as ref
import torch
from conftest import CONTEXT, HEAD_DIM, tiny_model
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ctxext import patch_model
from ctxext.models.base import find_rotary
from ctxext.rope import RopeContext, RopeState, apply_chain, parse_chain

L = CONTEXT


def source_theta(model) -> float:
    params = model.config.rope_parameters
    return params["full_attention"]["rope_theta"] if "full_attention" in params else params["rope_theta"]


def model_cos_sin(model, positions, layer_type=None):
    rotary = find_rotary(model)[2]
    x = torch.zeros(1, len(positions), 4)
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    cos, sin = rotary(x, positions[None], **kwargs)
    return cos[0].double(), sin[0].double()


# spec, params, reference(d, theta, L) -> (inv_freq, attention_factor)
STATIC_CASES = [
    ("pi", {"factor": 4}, lambda d, t, L: (ref.pi(ref.rope_inv_freq(d, t), 4), 1.0)),
    ("ntk", {"factor": 4}, lambda d, t, L: (ref.ntk(d, t, 4), 1.0)),
    ("yarn", {"factor": 4}, lambda d, t, L: ref.yarn(d, t, L, 4)),
    ("yarn", {"factor": 8, "beta_fast": 16, "beta_slow": 2}, lambda d, t, L: ref.yarn(d, t, L, 8, 16, 2)),
    ("llama3", {"factor": 4}, lambda d, t, L: (ref.llama3(ref.rope_inv_freq(d, t), L, 4), 1.0)),
    ("prope", {"keep": 0.5}, lambda d, t, L: (ref.prope(ref.rope_inv_freq(d, t), d // 4), 1.0)),
    ("prope+pi", {"keep": 0.75, "factor": 3}, lambda d, t, L: (ref.pi(ref.prope(ref.rope_inv_freq(d, t), 6), 3), 1.0)),
    ("ntk+prope", {"keep": 0.5, "factor": 2}, lambda d, t, L: (ref.prope(ref.ntk(d, t, 2), d // 4), 1.0)),
    (
        "prope+yarn",
        {"keep": 0.75, "factor": 4},
        lambda d, t, L: (ref.prope(ref.yarn(d, t, L, 4)[0], 6), ref.yarn(d, t, L, 4)[1]),
    ),
    ("xpos", {}, lambda d, t, L: (ref.rope_inv_freq(d, t), 1.0)),
    ("pi+xpos", {"factor": 4}, lambda d, t, L: (ref.pi(ref.rope_inv_freq(d, t), 4), 1.0)),
    ("yarn+xpos", {"factor": 4}, lambda d, t, L: ref.yarn(d, t, L, 4)),
]


@pytest.mark.parametrize("spec,params,expected", STATIC_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(STATIC_CASES)])
def test_patched_cos_sin_match_reference(family, spec, params, expected):
    model = tiny_model(family)
    theta = source_theta(model)
    patch_model(model, spec, **params)
    positions = torch.arange(0, 6 * L)
    layer_type = "full_attention" if family == "gemma3_text" else None
    cos, sin = model_cos_sin(model, positions, layer_type)
    inv_freq, attention_factor = expected(HEAD_DIM, theta, L)
    ref_cos, ref_sin = ref.cos_sin(inv_freq, positions, attention_factor)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-4)


def test_dynamic_cos_sin_match_reference_per_length(family):
    model = tiny_model(family)
    theta = source_theta(model)
    patch_model(model, "dynamic", factor=1.0)
    layer_type = "full_attention" if family == "gemma3_text" else None
    for n in (L // 2, 3 * L, 5 * L):
        positions = torch.arange(n)
        cos, sin = model_cos_sin(model, positions, layer_type)
        ref_cos, ref_sin = ref.cos_sin(ref.dynamic(HEAD_DIM, theta, L, n), positions)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-4)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-4)


def test_pi_applies_on_top_of_a_llama3_checkpoint():
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = tiny_model("llama", rope_parameters=llama3)
    handle = patch_model(model, "pi", factor=2)
    assert model.config.rope_parameters["rope_type"] == "longrope"  # no specific native form for this
    positions = torch.arange(0, 4 * L)
    cos, sin = model_cos_sin(model, positions)
    expected = ref.pi(ref.llama3(ref.rope_inv_freq(HEAD_DIM, 10000.0), 16, 8.0), 2)
    ref_cos, ref_sin = ref.cos_sin(expected, positions)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-4)
    handle.remove()


# ---------------------------------------------------------------- parity with transformers' own rope types


def hf_inv_freq(head_dim, theta, context, params, seq_len=None):
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=context,
        rope_parameters={"rope_theta": theta, **params},
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=seq_len)


def ctxext_inv_freq(head_dim, theta, context, spec, **params):
    ctx = RopeContext(head_dim=head_dim, rope_theta=theta, context_length=context)
    state = apply_chain(parse_chain(spec, **params), RopeState(ctx.default_inv_freq()), ctx)
    return state.inv_freq, state.attention_factor


@pytest.mark.parametrize("head_dim,theta,context", [(64, 10000.0, 2048), (128, 500000.0, 8192), (256, 1e6, 4096)])
@pytest.mark.parametrize(
    "spec,params,hf_params",
    [
        ("pi", {"factor": 4}, {"rope_type": "linear", "factor": 4.0}),
        ("yarn", {"factor": 8}, {"rope_type": "yarn", "factor": 8.0}),
        (
            "yarn",
            {"factor": 16, "beta_fast": 24, "beta_slow": 2},
            {"rope_type": "yarn", "factor": 16.0, "beta_fast": 24.0, "beta_slow": 2.0},
        ),
        (
            "llama3",
            {"factor": 8},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        ),
        ("prope", {"keep": 0.25}, {"rope_type": "proportional", "partial_rotary_factor": 0.25}),
    ],
)
def test_parity_with_transformers_builtins(head_dim, theta, context, spec, params, hf_params):
    if "factor" in hf_params and hf_params["rope_type"] in ("yarn", "llama3"):
        hf_params = {**hf_params, "original_max_position_embeddings": context}
    hf_freq, hf_af = hf_inv_freq(head_dim, theta, context * 16, hf_params)
    ours, our_af = ctxext_inv_freq(head_dim, theta, context, spec, **params)
    torch.testing.assert_close(ours, hf_freq.double(), rtol=2e-6, atol=0)
    assert our_af == pytest.approx(hf_af, rel=1e-6)


@pytest.mark.parametrize("factor", [None, 2.0])
def test_compute_inv_freq_of_phi3_longrope_is_transformers_own(factor):
    """Phi-3 states no longrope ``factor``: transformers takes it as max_position_embeddings / original, which sets
    the attention factor sqrt(1 + ln(131072 / 4096) / ln 4096); ``compute_inv_freq`` gives transformers' values."""
    from transformers import Phi3Config

    from ctxext.models.base import compute_inv_freq, get_rope_parameters, head_dim_of

    scaling = {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(48)]}
    scaling["long_factor"] = [1.0 + 0.5 * i for i in range(48)]
    if factor is not None:
        scaling["factor"] = factor
    config = Phi3Config(  # Phi-3-mini-128k's shape
        hidden_size=3072,
        num_attention_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling=scaling,
    )
    params = get_rope_parameters(config, None)
    assert "factor" not in params or factor is not None
    want_af = math.sqrt(1 + math.log(factor or 32) / math.log(4096))
    for seq_len in (None, 4096, 4097, 131072):  # short factors within the original context, long ones beyond
        want, af = ROPE_INIT_FUNCTIONS["longrope"](config, None, **({"seq_len": seq_len} if seq_len else {}))
        got, got_af = compute_inv_freq(params, head_dim_of(config), config.max_position_embeddings, seq_len=seq_len)
        assert torch.equal(got, want.float()) and got_af == af == pytest.approx(want_af, rel=1e-12)


@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0])
def test_dynamic_parity_with_transformers_builtin(factor):
    head_dim, theta, context = 64, 10000.0, 1024
    ctx = RopeContext(head_dim=head_dim, rope_theta=theta, context_length=context)
    method = parse_chain("dynamic", factor=factor)[0]
    for seq_len in (512, 1024, 3000, 8192):
        hf, _ = hf_inv_freq(head_dim, theta, context, {"rope_type": "dynamic", "factor": factor}, seq_len=seq_len)
        torch.testing.assert_close(method.inv_freq_at(seq_len, ctx), hf.double(), rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "head_dim",
    [
        64,
        80,
        pytest.param(96, marks=pytest.mark.slow),
        pytest.param(128, marks=pytest.mark.slow),
        pytest.param(256, marks=pytest.mark.slow),
    ],
)
def test_prope_removes_exactly_the_requested_pairs(head_dim):
    """transformers computes int(p * d // 2) in floating point; 2k/d can round to k-1 (the DESIGN.md trap)."""
    pairs = head_dim // 2
    for kept in range(1, pairs + 1):
        keep = kept / pairs
        model = tiny_model(
            "llama", head_dim=head_dim, hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1
        )
        if kept not in (1, pairs // 3, pairs // 2, pairs - 1, pairs):
            # the planner alone is enough for the other values (fast); it checks through transformers' own code
            from ctxext import plan_patch

            plan = plan_patch(model.config, "prope", keep=keep)
            inv_freq = plan.states[None].inv_freq
            assert int((inv_freq > 0).sum()) == kept
            continue
        patch_model(model, "prope", keep=keep)
        inv_freq = find_rotary(model)[2].inv_freq
        assert int((inv_freq > 0).sum()) == kept, (head_dim, kept)
        assert torch.all(inv_freq[kept:] == 0)
        torch.testing.assert_close(
            inv_freq[:kept].double(), ref.rope_inv_freq(head_dim, 10000.0)[:kept], rtol=1e-6, atol=0
        )


def test_yarn_attention_factor_is_the_papers_temperature():
    for s in (2, 8, 32):
        _, af = ctxext_inv_freq(64, 10000.0, 2048, "yarn", factor=s)
        assert af == pytest.approx(0.1 * math.log(s) + 1)
