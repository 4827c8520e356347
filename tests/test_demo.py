"""The main job end to end (shortened) and the leaderboard's quick mode, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_with_tokenizer, tiny_config

from ctxext.data import corpus
from ctxext.data.tokenizer import train_tokenizer
from ctxext.errors import ConfigError
from ctxext.io.sources import REFERENCE_DIR

REPO = Path(__file__).resolve().parents[1]
ENV_THREADS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The shipped reference model when present, else a tiny random one with a real tokenizer."""
    if (REFERENCE_DIR / "config.json").is_file():
        return "reference"
    path = tmp_path_factory.mktemp("small")
    tok = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:40]), vocab_size=400)
    return str(save_tiny_with_tokenizer(path, tok, max_position_embeddings=256, tie_word_embeddings=True))


def run(args, **kw):
    import os

    proc = subprocess.run(
        [sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV_THREADS},
        **kw,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_shortened_demo_writes_the_report(small_model, tmp_path):
    out = tmp_path / "demo"
    stdout = run(
        ["-m", "ctxext.cli", "demo", "--quick", "--model", small_model, "--output-dir", str(out), "--factor", "4"]
    )
    assert f"report: {out / 'report.md'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline"].startswith("original -> yarn x4 + LoRA: at 1024 tokens perplexity ")
    assert summary["headline"] in stdout
    report = (out / "report.md").read_text()
    assert "| original |" in report and "| yarn x4 + LoRA |" in report and "ppl@1024" in report
    assert "Code outside the training domain (`package:numpy`" in report
    assert "RULER" not in report and not (out / "retrieval.json").exists()  # the recipe does not train them
    assert (
        "worst passkey cell" in summary["headline"]
        and "cost on code outside the training domain" in summary["headline"]
    )
    assert (out / "ood" / "ppl.json").is_file()
    for name in ("ppl.png", "ppl.json", "passkey.json", "commands.sh", "finetune.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("passkey_*.png")) and (out / "finetune" / "merged" / "config.json").is_file()
    assert summary["lengths"] == [256, 512, 1024]
    assert "ctxext finetune" in (out / "commands.sh").read_text()


@pytest.mark.slow
def test_leaderboard_quick_mode_runs(small_model, tmp_path):
    """One quick sweep (the leaderboard's config, its rows replaced) with every kind of row: the unextended model, a
    method without and with fine-tuning, a training-free row (``finetune: false``: measured once) and a saved
    checkpoint row; the page re-rendered from its numbers alone; a rerun that reuses every saved row."""
    import yaml

    from ctxext.io.sources import resolve_model
    from ctxext.patch.checkpoint import patch_checkpoint

    ckpt = patch_checkpoint(resolve_model(small_model), tmp_path / "yarn4", "yarn", force=True, factor=4)
    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "leaderboard.yaml").read_text())
    sweep.update(model=small_model, factor=4)
    sweep["methods"] = {
        "baseline": {"method": None},
        "pi": {"method": "pi"},
        "se": {"method": "selfextend", "group_size": 8, "window": 64, "finetune": False},
        "searched": {"checkpoint": str(ckpt)},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "RESULTS.md").write_text("old table\n<!-- notes -->\nWhy PI missed: ...\n")

    def sweep_to(output):
        return run(
            ["scripts/leaderboard.py", "--quick", "--config", str(tmp_path / "sweep.yaml")]
            + ["--output", str(output), "--work-dir", str(tmp_path / "work")]
        )

    sweep_to(tmp_path / "docs")
    table = (tmp_path / "docs" / "RESULTS.md").read_text()
    for row in ("| baseline |", "| pi |", "| pi + LoRA |", "| se |", "| searched |"):
        assert row in table
    assert "| se + LoRA |" not in table and "| searched + LoRA |" not in table
    assert (tmp_path / "docs" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Targets" in table and "| baseline fails beyond 256" in table
    # the sweep's overrides add the RULER-style tasks, worst of the quick recipe's depths (0 and 1)
    assert "RULER-style tasks in code (worst of 2 depths" in table and "multikey@1024" in table
    assert "old table" not in table and table.endswith("<!-- notes -->\nWhy PI missed: ...\n")
    first = json.loads((tmp_path / "docs" / "results.json").read_text())["rows"]
    assert list(first) == ["baseline", "pi", "pi + LoRA", "se", "searched"]
    assert first["searched"]["ppl"] != first["baseline"]["ppl"] != first["se"]["ppl"]
    run(
        ["scripts/leaderboard.py", "--report-from", str(tmp_path / "docs" / "results.json")]
        + ["--output", str(tmp_path / "again")]
    )
    # re-rendered from the saved numbers alone: the same page (notes aside)
    assert (tmp_path / "again" / "RESULTS.md").read_text() == table.split("<!-- notes -->")[0] + "<!-- notes -->\n"
    # resumed: the same sweep in the same work dir reuses every saved row (nothing trained or evaluated again)
    rerun = sweep_to(tmp_path / "resumed")
    assert rerun.count("saved row reused") == 5, rerun
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["rows"] == first


def test_leaderboard_refuses_a_missing_or_mismatched_checkpoint_row_and_a_checkpoint_row_with_a_method(tmp_path):
    from ctxext.experiments.recipe import load_sweep
    from scripts import leaderboard as lb

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"# test\nmodel: reference\nfactor: 4\nmethods:\n  x: {{checkpoint: {tmp_path / 'no'}}}\n")
    with pytest.raises(SystemExit, match="does not exist; make it first"):  # before anything is measured
        lb.main(["--quick", "--config", str(sweep), "--output", str(tmp_path / "d"), "--work-dir", str(tmp_path / "w")])
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()
    tiny_config("llama", max_position_embeddings=512).save_pretrained(tmp_path / "tiny")
    with pytest.raises(SystemExit, match="extended to 512 tokens, the sweep to 1024"):
        lb.check_checkpoint_row("x", str(tmp_path / "tiny"), 1024)
    sweep.write_text(f"# test\nmethods:\n  x: {{checkpoint: {tmp_path / 'tiny'}, method: yarn}}\n")
    with pytest.raises(ConfigError, match="a checkpoint row takes no method"):
        load_sweep(sweep)


def test_leaderboard_targets_pick_the_best_tuned_row_and_can_fail():
    from scripts import leaderboard as lb

    def row(p256, p2048, pk):
        return {"ppl": {"256": p256, "2048": p2048}, "passkey_worst_depth": {"256": 1.0, "2048": pk}}

    rows = {"baseline": row(12.0, 400.0, 0.0), "pi + LoRA": row(14.0, 13.0, 0.5), "yarn + LoRA": row(12.2, 11.5, 1.0)}
    met = lb.check_targets(rows, 256, 2048)
    assert all(ok for _, ok, _ in met) and all(t.startswith(("yarn + LoRA", "baseline")) for t, _, _ in met)
    rows["yarn + LoRA"] = row(12.5, 12.1, 0.9)  # 4.2% worse at 256, ppl@2048 above the original's, passkey 90%
    missed = [t for t, ok, _ in lb.check_targets(rows, 256, 2048) if not ok]
    assert len(missed) == 3 and all("yarn + LoRA" in t for t in missed)
    rows["yarn + LoRA"] = row(11.0, 10.5, 1.0)  # 8% better than the original at 256: not a miss
    assert all(ok for _, ok, _ in lb.check_targets(rows, 256, 2048))
