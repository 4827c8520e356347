"""Self-Extend: the attention kernel and patched models against the float64 reference written from the paper
(tests/reference.py: explicit score matrix with the piecewise positions), KV-cached decoding, padding, chains,
errors, and the saved checkpoint (needs `import ctxext`, refused by stock transformers)."""

import json

import pytest
import reference as ref
import torch
from conftest import CONTEXT, HEAD_DIM, assert_left_padding_matches_unpadded, tiny_model
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ctxext import MethodError, patch_model
from ctxext.rope.selfextend import selfextend_attention

L = CONTEXT
G, W = 4, 16  # reach (64 - 16) * 4 + 16 = 208
SPECS = [
    ("selfextend", {}),
    ("pi+selfextend", {"factor": 2}),
    ("yarn+selfextend", {"factor": 2}),
    ("selfextend", {"group_bias": -1.5}),
]


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (batch, n), generator=g)


# ---------------------------------------------------------------- the kernel


@pytest.mark.parametrize("kernel", ["split", "joint"])
@pytest.mark.parametrize("block", [256, 7])
@pytest.mark.parametrize(
    "case",
    ["plain", "gqa_offset", "mask", "softcap", "decode", "bias", "bias_mask_softcap", "gqa_mask_bias", "mask_padded"],
)
def test_kernel_matches_float64_reference(kernel, block, case):
    torch.manual_seed(0)
    d, heads, kv_heads, k_len, q_len, g, w = 16, 4, 4, 60, 60, 3, 10
    if case.startswith("gqa"):
        kv_heads, g, w = 2, 5, 7
    if kernel == "split" and "softcap" in case:
        pytest.skip("the split kernel has no soft-capping (the joint one runs for it)")
    if case == "decode":
        q_len = 3
    inv_freq = ref.rope_inv_freq(d, 100.0)
    q_raw, k_raw, v = (
        torch.randn(heads, q_len, d) * 2,
        torch.randn(kv_heads, k_len, d) * 2,
        torch.randn(kv_heads, k_len, d),
    )
    offset = 5 if case == "gqa_offset" else 0  # position = slot - offset (a row with 5 left pads)
    k_pos = torch.arange(k_len) - offset
    q_pos = k_pos[k_len - q_len :]
    q = ref.rotate(q_raw, q_pos, inv_freq).float()
    k = ref.rotate(k_raw, k_pos, inv_freq).float()
    mask = None
    if "mask" in case:
        mask = torch.rand(q_len, k_len) > 0.3
        mask[:, k_len - q_len :] |= torch.eye(q_len, dtype=torch.bool)  # every query sees itself ...
        if case == "mask_padded":  # ... but left pads, which see nothing (transformers' mask): their output is 0
            mask[:20] = False
    causal = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
    softcap = 2.0 if "softcap" in case else None
    bias = -1.3 if "bias" in case else 0.0
    out = selfextend_attention(
        q[None],
        k[None],
        v[None],
        None if mask is None else (mask & causal)[None, None],
        group_size=g,
        window=w,
        inv_freq=inv_freq.float(),
        positions=q_pos[None] if offset else None,
        scaling=0.3,
        softcap=softcap,
        group_bias=bias,
        block=block,
        kernel=kernel,
    )
    rep = heads // kv_heads
    expected = ref.selfextend_attention(
        q_raw,
        k_raw.repeat_interleave(rep, 0),
        v.repeat_interleave(rep, 0),
        q_pos,
        k_pos,
        inv_freq,
        g,
        w,
        0.3,
        mask=mask,
        softcap=softcap,
        group_bias=bias,
    )
    if case == "mask_padded":
        expected[:, :20] = 0.0
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected, rtol=2e-4, atol=2e-4)


def test_kernels_under_autograd():
    """With gradients the joint kernel runs (the CPU kernel's log-sum-exp has none); its gradient matches the float64
    reference's, and forcing the split kernel is refused."""
    torch.manual_seed(0)
    d, heads, n, g, w = 16, 4, 40, 3, 6
    inv_freq = ref.rope_inv_freq(d, 100.0)
    q_raw, k_raw, v = (torch.randn(heads, n, d, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(n)
    q = ref.rotate(q_raw, pos, inv_freq).float().requires_grad_()
    k = ref.rotate(k_raw, pos, inv_freq).float()
    out = selfextend_attention(
        q[None], k[None], v.float()[None], None, group_size=g, window=w, inv_freq=inv_freq.float(), scaling=0.3, block=7
    )
    out.square().sum().backward()
    q64 = ref.rotate(q_raw, pos, inv_freq).requires_grad_()
    expected = ref.selfextend_attention(ref.rotate(q64, -pos, inv_freq), k_raw, v, pos, pos, inv_freq, g, w, 0.3)
    expected.transpose(0, 1).square().sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="no autograd"):
        selfextend_attention(
            q[None], k[None], v.float()[None], None, group_size=g, window=w, inv_freq=inv_freq.float(), kernel="split"
        )


def test_reference_positions_follow_the_paper():
    # inside the window: exact distance; beyond it: grouped, continuing at the window edge
    assert ref.selfextend_positions(10, 3, 4, 8) == 7
    assert ref.selfextend_positions(100, 0, 4, 8) == 100 // 4 + 8 - 2
    assert ref.selfextend_positions(8, 0, 4, 8) == 8  # d = W: floor(8/4) - 0 + 8 - 2
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    inv_freq = ref.rope_inv_freq(16, 100.0).float()
    grouped = selfextend_attention(q, k, v, None, group_size=4, window=8, inv_freq=inv_freq)
    assert not torch.allclose(
        grouped, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2), atol=1e-3
    )  # the grouping does something beyond the window


# ---------------------------------------------------------------- patched models against the reference

_REF = {}


def _reference_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """A transformers attention function computing Self-Extend from the reference: un-rotate q/k with the
    reference frequencies, then the explicit float64 score matrix."""
    layer_types = getattr(module.config, "layer_types", None)
    patched = _REF["layer_type"] is None or layer_types[module.layer_idx] == _REF["layer_type"]
    g, w = (_REF["G"], _REF["W"]) if patched else (2, 10**9)  # an unpatched layer: the window covers everything
    inv_freq = _REF["inv_freq"] if patched else _REF["plain_inv_freq"]
    bsz, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    rep = heads // key.shape[1]
    k_pos = torch.arange(k_len)
    q_pos = k_pos[k_len - q_len :]
    out = torch.empty(bsz, q_len, heads, value.shape[-1])
    for b in range(bsz):
        q_raw = ref.rotate(query[b], -q_pos, inv_freq)  # q was rotated at q_pos: rotate back
        k_raw = ref.rotate(key[b], -k_pos, inv_freq).repeat_interleave(rep, 0)
        mask = None if attention_mask is None else attention_mask[b, 0].bool()
        o = ref.selfextend_attention(
            q_raw,
            k_raw,
            value[b].repeat_interleave(rep, 0),
            q_pos,
            k_pos,
            inv_freq,
            g,
            w,
            scaling,
            mask=mask,
            softcap=softcap,
            group_bias=_REF["bias"] if patched else 0.0,
        )
        out[b] = o.transpose(0, 1).float()
    return out, None


AttentionInterface.register("test_selfextend_ref", _reference_forward)
AttentionMaskInterface.register("test_selfextend_ref", sdpa_mask)


def _reference_inv_freq(spec, params, theta):
    plain = ref.rope_inv_freq(HEAD_DIM, theta)
    if spec.startswith("pi+"):
        return ref.pi(plain, params["factor"])
    if spec.startswith("yarn+"):
        return ref.yarn(HEAD_DIM, theta, L, params["factor"])[0]
    return plain


@pytest.mark.parametrize("spec,params", SPECS)
def test_patched_model_matches_reference(family, spec, params):
    model, expected_model = tiny_model(family), tiny_model(family)
    patch_model(model, spec, group_size=G, window=W, **params)
    freq_spec = spec.split("+")[0]
    if freq_spec != "selfextend":
        patch_model(expected_model, freq_spec, **params)  # the frequency part (checked against its own reference)
    per_layer = family == "gemma3_text"
    rope = expected_model.config.rope_parameters
    theta = (rope["full_attention"] if per_layer else rope)["rope_theta"]
    _REF.update(
        G=G,
        W=W,
        bias=params.get("group_bias", 0.0),
        layer_type="full_attention" if per_layer else None,
        inv_freq=_reference_inv_freq(spec, params, theta),
        plain_inv_freq=ref.rope_inv_freq(HEAD_DIM, rope["sliding_attention"]["rope_theta"]) if per_layer else None,
    )
    expected_model.set_attn_implementation("test_selfextend_ref")
    x = ids(100)
    with torch.no_grad():
        got, expected = model(x).logits, expected_model(x).logits
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_window_covering_the_input_leaves_the_model_unchanged():
    model = tiny_model("llama")
    x = ids(L - 1)
    before = model(x).logits
    patch_model(model, "selfextend", group_size=4, window=L - 1)
    torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "ctxext_selfextend"


# ---------------------------------------------------------------- cache, padding


@pytest.mark.parametrize("spec,params", [SPECS[0], SPECS[1], SPECS[3]])
def test_kv_cached_decoding_equals_full_forward(family, spec, params):
    model = tiny_model(family)
    patch_model(model, spec, group_size=G, window=W, **params)
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


@pytest.mark.parametrize("spec,params", [SPECS[0], SPECS[1], SPECS[3]])
def test_left_padded_batch_equals_unpadded_rows(family, spec, params):
    model = tiny_model(family)
    patch_model(model, spec, group_size=G, window=W, **params)
    # 57 pads: not a multiple of G, so slot-based groups would differ
    assert_left_padding_matches_unpadded(model, ids(2 * L, seed=2)[0], ids(L + 7, seed=3)[0])


# ---------------------------------------------------------------- the saved form, reach, errors


def test_saved_form_reach_and_remove():
    model = tiny_model("llama")
    x = ids(100)
    before = model(x).logits
    handle = patch_model(model, "pi+selfextend", factor=2, group_size=G, window=W)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "ctxext_selfextend" and rope["ctxext_base_rope_type"] == "linear"
    assert rope["selfextend_group_size"] == G and rope["selfextend_window"] == W
    assert model.config.max_position_embeddings == (2 * L - W) * G + W  # (L' - W) * G + W on PI's 2L
    handle.remove()
    assert torch.equal(model(x).logits, before) and model.config._attn_implementation != "ctxext_selfextend"


@pytest.mark.parametrize(
    "spec,params,match",
    [
        ("selfextend", {"group_size": 1, "window": 16}, r"group_size=1 is invalid; valid range: an integer >= 2"),
        ("selfextend", {"group_size": 2.5, "window": 16}, r"group_size=2.5 is invalid; valid range: an integer >= 2"),
        ("selfextend", {"group_size": 4, "window": 64}, r"window=64 must be below the context 64"),
        ("selfextend", {"group_size": 4}, r"missing required parameter\(s\) window"),
        (
            "selfextend",
            {"group_size": 4, "window": 16, "group_bias": 0.5},
            r"group_bias=0.5 is invalid; valid range: a finite number <= 0",
        ),
        (
            "selfextend",
            {"group_size": 4, "window": 16, "target_length": 1000},
            r"target_length=1000 is beyond the 208 tokens .* use group_size >= 21",
        ),
        ("dynamic+selfextend", {"group_size": 4, "window": 16}, r"dynamic recomputes the frequencies"),
        ("selfextend+xpos", {"group_size": 4, "window": 16}, r"selfextend acts inside attention and must come last"),
        ("xpos+selfextend", {"group_size": 4, "window": 16}, r"xpos acts inside attention and must come last"),
    ],
)
def test_bad_input_is_refused_with_the_reason(spec, params, match):
    model = tiny_model("llama")
    with pytest.raises(MethodError, match=match):
        patch_model(model, spec, **params)


def test_refused_on_length_dependent_frequencies_and_twice():
    model = tiny_model("llama")
    patch_model(model, "dynamic", factor=2)
    with pytest.raises(MethodError, match=r"rope_type 'dynamic' does"):
        patch_model(model, "selfextend", group_size=4, window=16)
    model = tiny_model("llama")
    patch_model(model, "selfextend", group_size=4, window=16)
    with pytest.raises(MethodError, match="already uses selfextend"):
        patch_model(model, "selfextend", group_size=4, window=16)


@pytest.mark.slow
def test_cli_checkpoint_needs_ctxext_and_survives_a_plain_save_pretrained(tmp_path):
    from test_cli import run_cli, run_fresh, stock_load_error

    src, out, resaved = tmp_path / "src", tmp_path / "se", tmp_path / "resaved"
    tiny_model("qwen3").save_pretrained(src)
    run_cli(
        "patch", src, out, "--method", "yarn+selfextend", "--factor", 2, "--group-size", G, "--window", W, check_rc=0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "ctxext_selfextend"
    assert config["max_position_embeddings"] == (2 * L - W) * G + W
    x = ids(150)
    model = tiny_model("qwen3")
    patch_model(model, "yarn+selfextend", factor=2, group_size=G, window=W)
    torch.save(x, tmp_path / "ids.pt")
    torch.save(model(x).logits, tmp_path / "expected.pt")
    assert stock_load_error(out) == "'ctxext_selfextend'"
    loaded = run_fresh(f"""
import json, torch, ctxext
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
got = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
close = torch.allclose(got, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-5)
model.save_pretrained({str(resaved)!r})   # plain transformers save
print(json.dumps({{"close": close, "attn": model.config._attn_implementation}}))
""")
    assert loaded == {"close": True, "attn": "ctxext_selfextend"}
    assert stock_load_error(resaved) == "'ctxext_selfextend'"
    bad = run_cli("patch", src, tmp_path / "bad", "--method", "selfextend", "--group-size", 4, "--window", 64)
    assert bad.returncode == 2 and "window=64 must be below the context 64" in bad.stderr + bad.stdout
    assert not (tmp_path / "bad").exists()
