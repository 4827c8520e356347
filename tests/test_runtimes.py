"""`ctxext info`'s runtimes: stock transformers, engines that read rope_parameters (vLLM, SGLang), llama.cpp through
`ctxext export gguf`, on tiny patched checkpoints (in process)."""

import json
import math

import pytest
from gguf_fixtures import CONTEXT, save_tiny_llama

from ctxext.cli.main import main
from ctxext.patch.checkpoint import describe_checkpoint, patch_checkpoint
from ctxext.patch.runtimes import ROPE_PARAMETERS_ENGINES, rope_parameters_engines_runtime

OWN_ATTENTION = "is ctxext's own attention; it runs only in transformers"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def patched(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("patched")
    chains = {
        "yarn": ("yarn", {"factor": 4}),
        "xpos": ("xpos", {}),
        "selfextend": ("selfextend", {"group_size": 4, "window": 16}),
        "dynamic": ("dynamic", {"factor": 4}),
        "prope+pi": ("prope+pi", {"keep": 0.5, "factor": 4}),
    }
    return {name: patch_checkpoint(tiny, root / name, chain, **params) for name, (chain, params) in chains.items()}


def runtimes(path) -> dict[str, str]:
    return describe_checkpoint(path)["runtimes"]


def test_plain_and_yarn_checkpoints_run_everywhere(tiny, patched):
    plain, yarn = runtimes(tiny), runtimes(patched["yarn"])
    assert plain == {
        "transformers": "yes: stock transformers AutoModelForCausalLM.from_pretrained reproduces it",
        "rope_parameters engines": "yes",
        "llama.cpp": plain["llama.cpp"],
    }
    assert plain["llama.cpp"].startswith("yes: `ctxext export gguf` writes it (llama, rope none")
    assert yarn["transformers"].startswith("yes: stock transformers") and yarn["rope_parameters engines"] == "yes"
    assert yarn["llama.cpp"].startswith("yes: `ctxext export gguf` writes it (llama, rope yarn")


@pytest.mark.parametrize(
    "name,rope_type,llamacpp_reason",
    [
        ("xpos", "ctxext_xpos", "no: it uses xPos (rope_type 'ctxext_xpos'): it lives in ctxext's attention function"),
        ("selfextend", "ctxext_selfextend", "no: it uses Self-Extend (rope_type 'ctxext_selfextend')"),
    ],
)
def test_ctxext_attention_runs_only_in_transformers_after_import(patched, name, rope_type, llamacpp_reason):
    got = runtimes(patched[name])
    assert got["transformers"].startswith(f"only after `import ctxext` ({name} attention)")
    assert got["rope_parameters engines"] == f"no: rope_type {rope_type!r} {OWN_ATTENTION}"
    assert got["llama.cpp"].startswith(llamacpp_reason)
    if name == "selfextend":  # the reason names llama.cpp's own Self-Extend flags
        assert "--grp-attn-n G --grp-attn-w W" in got["llama.cpp"]


def test_dynamic_runs_in_engines_with_other_outputs_and_not_in_llamacpp(patched):
    got = runtimes(patched["dynamic"])
    assert got["llama.cpp"].startswith("no: it uses dynamic NTK (rope_type 'dynamic'), whose frequencies change")
    assert got["rope_parameters engines"] == (
        "runs, but not as transformers does: " + ROPE_PARAMETERS_ENGINES["dynamic"][1]
    )
    assert "per sequence length" in got["rope_parameters engines"]


def test_universal_longrope_names_the_attention_factor_engines_replace(patched):
    """prope+pi is written as longrope with attention_factor 1 at 4x the context: vLLM / SGLang scale cos/sin by
    sqrt(1 + ln 4 / ln 64) instead."""
    got = runtimes(patched["prope+pi"])
    theirs = math.sqrt(1 + math.log(4) / math.log(CONTEXT))
    assert got["rope_parameters engines"] == (
        "runs, but not as transformers does: these engines ignore longrope's attention_factor 1 and scale cos/sin "
        f"by {theirs:g} instead"
    )
    assert got["llama.cpp"].startswith("yes: `ctxext export gguf` writes it (llama, rope_freqs per pair")


def test_engines_verdicts_for_unlisted_types_and_switching_longrope():
    assert rope_parameters_engines_runtime({"all": {"rope_type": "mystery"}}) == (
        "unknown: rope type(s) mystery not checked against vLLM / SGLang"
    )
    switching = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}
    assert "switch between short_factor and long_factor" in rope_parameters_engines_runtime({"all": switching})
    layered = {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "ctxext_xpos"}}
    assert rope_parameters_engines_runtime(layered) == f"no: rope_type 'ctxext_xpos' {OWN_ATTENTION}"


def test_llamacpp_reasons_for_a_missing_tokenizer_and_another_family(tiny, tmp_path):
    bare = save_tiny_llama(tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    assert runtimes(bare)["llama.cpp"].startswith("no: it has no tokenizer.json; llama.cpp needs the tokenizer")
    from conftest import tiny_model

    tiny_model("qwen2").save_pretrained(tmp_path / "q")
    assert runtimes(tmp_path / "q")["llama.cpp"].startswith("no: it is a 'qwen2' model; `ctxext export gguf` writes")


def test_info_prints_the_runtimes_and_json_carries_them(patched, capsys):
    assert main(["info", str(patched["xpos"])]) == 0
    out = capsys.readouterr().out
    assert "\nruntimes\n" in out and "stock load" not in out
    assert "  transformers             only after `import ctxext`" in out
    assert f"  vLLM / SGLang            no: rope_type 'ctxext_xpos' {OWN_ATTENTION}" in out
    assert "  llama.cpp (export gguf)  no: it uses xPos" in out
    assert main(["info", str(patched["xpos"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtimes"] == runtimes(patched["xpos"])


@pytest.mark.parametrize("name", ["yarn", "dynamic", "xpos"])
def test_llamacpp_verdict_is_what_export_does(patched, tmp_path, capsys, name):
    pytest.importorskip("gguf")
    verdict = runtimes(patched[name])["llama.cpp"]
    rc = main(["export", "gguf", str(patched[name]), str(tmp_path / "x.gguf")])
    assert rc == (0 if verdict.startswith("yes") else 2)
    if rc:
        assert verdict.removeprefix("no: ") in capsys.readouterr().err
