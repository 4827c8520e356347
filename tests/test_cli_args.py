"""The command line's argument handling, fast and in process: key=value overrides anywhere after the config, and
'reference' (the shipped model) as a source for every command that takes a checkpoint."""

from pathlib import Path

import pytest

from ctxext.cli.main import build_parser, main, parse_args
from ctxext.io.sources import REFERENCE_DIR, check_source, has_reference_model


@pytest.mark.parametrize(
    "argv,overrides",
    [
        (["finetune", "c.yaml", "--output-dir", "X", "optimization.lr=1e-4"], ["optimization.lr=1e-4"]),
        (["finetune", "c.yaml", "a=1", "--output-dir", "X", "b=2", "--resume", "a=3"], ["a=1", "b=2", "a=3"]),
        (["plan", "c.yaml", "--devices", "2", "tuning=full"], ["tuning=full"]),
    ],
)
def test_overrides_may_follow_options_in_their_order(argv, overrides):
    args = parse_args(build_parser(), argv)
    assert args.overrides == overrides and args.config == "c.yaml"


@pytest.mark.parametrize(
    "argv",
    [
        ["finetune", "c.yaml", "--output-dir", "X", "a=1", "--no-such-flag"],
        ["finetune", "c.yaml", "--output-dir", "X", "not-an-override"],
        ["patch", "src", "out", "--method", "yarn", "factor=2"],  # patch takes no overrides
    ],
)
def test_anything_else_left_over_is_still_an_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(build_parser(), argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_finetune_reads_an_override_given_after_output_dir(tmp_path, capsys):
    """The override reaches the config: an invalid value after --output-dir is refused by name (exit 2)."""
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["finetune", str(tiny), "--output-dir", str(tmp_path / "run"), "lora.r=abc"]) == 2
    assert "lora.r: Input should be a valid integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


needs_reference = pytest.mark.skipif(not has_reference_model(), reason="the reference model is not installed")


@needs_reference
def test_reference_is_a_source_for_patch_info_and_export():
    assert check_source("reference") == str(REFERENCE_DIR)


@needs_reference
def test_patch_reference_writes_the_patched_shipped_model(tmp_path, capsys):
    assert main(["patch", "reference", str(tmp_path / "out"), "--method", "pi", "--factor", "2"]) == 0
    assert "context 256 -> 512" in capsys.readouterr().out
    assert main(["info", "reference"]) == 0


@needs_reference
@pytest.mark.parametrize("method,factor", [("pi", "1e308"), ("ntk", "1e300"), ("yarn", "1e-300")])
def test_a_factor_that_leaves_float32_is_refused_by_name(method, factor, tmp_path, capsys):
    assert main(["patch", "reference", str(tmp_path / "out"), "--method", method, "--factor", factor]) == 2
    err = capsys.readouterr().err
    assert f"chain {method}:factor=" in err and "outside float32's range" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@needs_reference
@pytest.mark.parametrize("value", [[1, 2], "yarn", 3])
def test_rope_parameters_that_are_no_mapping_are_named(value, tmp_path, capsys):
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(REFERENCE_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_parameters": value}))
    assert main(["info", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"rope_parameters is {value!r}" in err and "it must be a mapping" in err and "TypeError" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "nobody/no-such-model"],
        ["eval", "ppl", "nobody/no-such-model", "--lengths", "64"],
        ["search", "nobody/no-such-model", "OUT", "--target-length", "512"],
        ["export", "gguf", "nobody/no-such-model", "OUT.gguf"],
    ],
)
def test_an_uncached_hub_id_offline_fails_at_once_in_every_command(argv, tmp_path, monkeypatch, capsys):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    started = time.time()
    assert main(argv) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert time.time() - started < 5 and not list(tmp_path.glob("OUT*"))


def test_option_values_are_checked_by_the_options_model(tmp_path, capsys):
    """Ranges and choices come from the command's options model: a bad value names its flag (exit 2)."""
    assert main(["search", "reference", str(tmp_path / "o"), "--target-length", "512", "--max-factor", "0.5"]) == 2
    assert "--max-factor 0.5: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["eval", "ppl", "reference", "--lengths", "64,x"]) == 2
    assert "--lengths 64,x: '64,x' is not a comma-separated list" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
