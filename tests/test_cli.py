"""`ctxext patch / info / methods` end to end, as subprocesses, on tiny checkpoints of every family.

The loading checks run in fresh processes that never import ctxext, exactly as a user of stock transformers.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ctxext import patch_model
from ctxext.cli.main import main

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(1, 97, (1, 150), generator=torch.Generator().manual_seed(7))


def run_cli(*args, check_rc=None, **kwargs):
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        **kwargs,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def run_fresh(code: str) -> dict:
    """Run python code in a new process (no ctxext import unless the code does it); return its JSON stdout."""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stock_load_error(path: Path) -> str | None:
    """The KeyError message of a stock from_pretrained(path) in a fresh process without ctxext (None: it loaded)."""
    return run_fresh(f"""
import json
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(path)!r})
    print(json.dumps({{"raised": None}}))
except KeyError as err:
    print(json.dumps({{"raised": str(err)}}))
""")["raised"]


def save_tiny(path: Path, family: str, with_tokenizer=False, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    model.save_pretrained(path)
    if with_tokenizer:
        vocab = {f"w{i}": i for i in range(97)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {f: save_tiny(root / f, f, with_tokenizer=(f == "llama")) for f in FAMILIES}


def expected_logits(src: Path, spec: str, **params) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    patch_model(model, spec, **params)
    with torch.no_grad():
        return model(IDS).logits


STOCK_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
results = {}
for out, expected in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    results[out] = bool(torch.equal(logits, torch.load(expected)))
assert "ctxext" not in sys.modules
print(json.dumps(results))
"""

NATIVE_CASES = (
    [(f, "pi", ["--factor", 4], {"factor": 4}) for f in FAMILIES]
    + [(f, "yarn", ["--target-length", 512], {"target_length": 512}) for f in FAMILIES]
    + [(f, "prope+pi", ["--keep", 0.5, "--factor", 2], {"keep": 0.5, "factor": 2}) for f in FAMILIES]
    + [
        ("llama", "ntk", ["--factor", 3], {"factor": 3}),
        ("llama", "dynamic", [], {}),
        ("llama", "llama3", ["--factor", 8], {"factor": 8}),
        ("llama", "prope", ["--keep", 0.75], {"keep": 0.75}),
        ("llama", "ntk+prope", ["--factor", 2, "--keep", 0.5], {"factor": 2, "keep": 0.5}),
        ("gemma3_text", "yarn", ["--factor", 4, "--scope", "all"], {"factor": 4, "scope": "all"}),
    ]
)


@pytest.mark.slow
def test_native_chains_load_with_stock_transformers_in_a_fresh_process(sources, tmp_path):
    ids_path = tmp_path / "ids.pt"
    torch.save(IDS, ids_path)
    jobs = {}
    for i, (family, spec, flags, params) in enumerate(NATIVE_CASES):
        out = tmp_path / f"out{i}-{family}-{spec}"
        # in-process main() for the matrix (the interpreter start is the only difference from a subprocess;
        # the other tests run the real subprocess)
        assert main(["patch", str(sources[family]), str(out), "--method", spec, *map(str, flags)]) == 0
        torch.save(expected_logits(sources[family], spec, **params), tmp_path / f"expected{i}.pt")
        jobs[str(out)] = str(tmp_path / f"expected{i}.pt")
        config = json.loads((out / "config.json").read_text())
        assert "ctxext" not in json.dumps(config.get("rope_parameters"))  # native types only
        assert config["ctxext"]["steps"][0]["spec"].startswith(spec.split("+")[0])
        assert list(out.glob("*.safetensors")) and (out / "generation_config.json").is_file()
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, json.dumps(jobs), str(ids_path)],
        check=False,
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {out: True for out in jobs}


def test_output_is_complete_with_tokenizer_and_record(sources, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("patch", sources["llama"], out, "--method", "yarn", "--factor", 8, check_rc=0)
    assert "64 -> 512" in proc.stdout and "loads with stock transformers: yes" in proc.stdout
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["ctxext"]["original_context"] == 64 and config["ctxext"]["version"]
    assert config["ctxext"]["steps"][0]["chain"][0]["method"] == "yarn"


@pytest.mark.slow
def test_xpos_needs_ctxext_and_survives_a_plain_save_pretrained(sources, tmp_path):
    out = tmp_path / "xpos"
    run_cli("patch", sources["qwen3"], out, "--method", "pi+xpos", "--factor", 2, "--scale-base", 64, check_rc=0)
    resaved = tmp_path / "resaved"
    torch.save(IDS, tmp_path / "ids.pt")
    torch.save(expected_logits(sources["qwen3"], "pi+xpos", factor=2, scale_base=64), tmp_path / "expected.pt")
    assert stock_load_error(out) == "'ctxext_xpos'"
    with_ctxext = run_fresh(f"""
import json, torch, ctxext
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ids, expected = torch.load({str(tmp_path / "ids.pt")!r}), torch.load({str(tmp_path / "expected.pt")!r})
same = torch.equal(model(ids).logits, expected)
model.save_pretrained({str(resaved)!r})   # plain transformers save: drops attn_implementation
print(json.dumps({{"same": same, "attn": model.config._attn_implementation}}))
""")
    assert with_ctxext == {"same": True, "attn": "ctxext_xpos"}
    assert stock_load_error(resaved) == "'ctxext_xpos'"
    reloaded = run_fresh(f"""
import json, torch, ctxext
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(resaved)!r}).eval()
print(json.dumps({{"same": torch.equal(model(torch.load({str(tmp_path / "ids.pt")!r})).logits,
                                       torch.load({str(tmp_path / "expected.pt")!r}))}}))
""")
    assert reloaded["same"] is True
    info = run_cli("info", out, check_rc=0).stdout
    assert "only after `import ctxext`" in info and "pi:factor=2+xpos:scale_base=64" in info


def test_patching_a_patched_checkpoint_composes_and_records_both_steps(sources, tmp_path):
    first, second = tmp_path / "x2", tmp_path / "x6"
    run_cli("patch", sources["llama"], first, "--method", "pi", "--factor", 2, check_rc=0)
    run_cli("patch", first, second, "--method", "prope+pi", "--keep", 0.5, "--target-length", 384, check_rc=0)
    config = json.loads((second / "config.json").read_text())
    steps = config["ctxext"]["steps"]
    assert [s["spec"] for s in steps] == ["pi:factor=2", "prope:keep=0.5+pi:factor=3"]
    assert config["ctxext"]["original_context"] == 64 and config["max_position_embeddings"] == 384
    got = run_fresh(f"""
import json
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(second)!r})
print(json.dumps(m.model.rotary_emb.inv_freq.double().tolist()))
""")
    expected = [10000.0 ** (-2 * i / 16) / 6 if i < 4 else 0.0 for i in range(8)]
    assert got == pytest.approx(expected, rel=1e-6)
    info = run_cli("info", second, check_rc=0).stdout
    assert "ctxext step 1     pi:factor=2" in info and "ctxext step 2     prope:keep=0.5+pi:factor=3" in info
    assert "original 64, extended 384" in info


def test_trained_context_flag_extends_from_the_given_context(sources, tmp_path):
    """`--trained-context 32` on a checkpoint whose config states 64: YaRN to 256 is x8 from 32, saved so."""
    out = tmp_path / "yarn"
    run_cli(
        "patch", sources["llama"], out, "--method", "yarn", "--target-length", 256, "--trained-context", 32, check_rc=0
    )
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 8.0, 32)
    assert config["max_position_embeddings"] == 256 and config["ctxext"]["original_context"] == 32
    bad = run_cli(
        "patch",
        sources["llama"],
        tmp_path / "bad",
        "--method",
        "yarn",
        "--factor",
        2,
        "--trained-context",
        128,
        check_rc=2,
    )
    assert "trained_context=128 is invalid" in bad.stderr and not (tmp_path / "bad").exists()


def test_methods_lists_every_method_with_parameters_and_papers():
    out = run_cli("methods", check_rc=0).stdout
    for name, param, paper in [
        ("pi", "factor", "2306.15595"),
        ("ntk", "factor", "bloc97"),
        ("dynamic", "factor", "emozilla"),
        ("yarn", "beta_fast", "2309.00071"),
        ("llama3", "high_freq_factor", "2407.21783"),
        ("prope", "keep", "2410.06205"),
        ("xpos", "scale_base", "2212.10554"),
    ]:
        assert f"\n{name}  [" in "\n" + out and param in out and paper in out


# ---------------------------------------------------------------- bad input: exit 2, a clear message, nothing written


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.absolute().parent.glob(f".{out.name}.ctxext-tmp-*"))


@pytest.fixture(scope="module")
def odd_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    (root / "empty").mkdir()
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(root / "gpt2")
    pickled = save_tiny(root / "pickled", "llama")
    torch.save(AutoModelForCausalLM.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return root


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("src missing", ["{root}/nope/ckpt", "--method", "pi", "--factor", "2"], "does not exist"),
        ("not a checkpoint", ["{root}/empty", "--method", "pi", "--factor", "2"], "has no config.json"),
        ("unsupported", ["{root}/gpt2", "--method", "pi", "--factor", "2"], "model_type 'gpt2' is not supported"),
        ("bad factor", ["{src}", "--method", "pi", "--factor", "-1"], "factor=-1.0 is invalid; valid range"),
        ("missing factor", ["{src}", "--method", "yarn"], "missing required parameter(s) factor"),
        (
            "bad keep",
            ["{src}", "--method", "prope", "--keep", "1.5"],
            "keep=1.5 is invalid; valid range: 0 < keep <= 1",
        ),
        ("unknown method", ["{src}", "--method", "rerope"], "unknown method 'rerope'; valid methods"),
        ("bad chain", ["{src}", "--method", "xpos+pi", "--factor", "2"], "must come last"),
        ("bad scope", ["{src}", "--method", "pi", "--factor", "2", "--scope", "sliding"], "valid scopes: all"),
        ("pickle", ["{root}/pickled", "--method", "pi", "--factor", "2"], "only pickled weights"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(case, args, message, sources, odd_sources, tmp_path):
    out = tmp_path / "out"
    args = [a.format(root=odd_sources, src=sources["llama"]) for a in args]
    proc = run_cli("patch", args[0], out, *args[1:])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert _nothing_written(out)


def test_pickled_weights_load_with_explicit_opt_in(odd_sources, tmp_path):
    run_cli(
        "patch",
        odd_sources / "pickled",
        tmp_path / "out",
        "--method",
        "pi",
        "--factor",
        2,
        "--allow-pickle",
        check_rc=0,
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_out_is_kept_without_force_and_replaced_with_it(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("patch", sources["llama"], out, "--method", "pi", "--factor", 2)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    run_cli("patch", sources["llama"], out, "--method", "pi", "--factor", 2, "--force", check_rc=0)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_unwritable_out_exits_2(sources):
    proc = run_cli("patch", sources["llama"], "/sys/ctxext-out", "--method", "pi", "--factor", 2)
    assert proc.returncode == 2 and "is not writable" in proc.stderr
    assert not Path("/sys/ctxext-out").exists()


@pytest.mark.slow
def test_a_patch_killed_while_writing_leaves_no_out(tmp_path):
    # big enough that writing takes a while: ~100 MB of fp32 weights
    src = save_tiny(
        tmp_path / "big",
        "llama",
        vocab_size=32000,
        hidden_size=384,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=96,
        num_hidden_layers=1,
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxext.cli", "patch", str(src), str(out), "--method", "pi", "--factor", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.glob(".out.ctxext-tmp-*") if "probe" not in p.name and any(p.iterdir())]
        if temps:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the patch finished before it could be killed mid-write"
    assert not out.exists()
    # the next run cleans the debris and succeeds
    run_cli("patch", src, out, "--method", "pi", "--factor", 2, check_rc=0)
    assert not list(tmp_path.glob(".out.ctxext-tmp-*"))


def test_output_parents_are_made_and_a_file_in_the_way_is_named(tmp_path):
    from ctxext.errors import CheckpointError
    from ctxext.io.checkpoint import check_output

    assert check_output(tmp_path / "out" / "deep" / "ckpt", force=False) == tmp_path / "out" / "deep" / "ckpt"
    assert (tmp_path / "out" / "deep").is_dir() and not (tmp_path / "out" / "deep" / "ckpt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot make its parent folder"):
        check_output(tmp_path / "file" / "ckpt", force=False)
