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
