"""The main job end to end (shortened) and the leaderboard's quick mode, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctxext import corpus
from ctxext.reference import REFERENCE_DIR, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV_THREADS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The shipped reference model when present, else a tiny random one with a real tokenizer."""
    if (REFERENCE_DIR / "config.json").is_file():
        return "reference"
    path = tmp_path_factory.mktemp("small")
    tok = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:40]), vocab_size=400)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(args, **kw):
    import os

    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **ENV_THREADS}, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_shortened_demo_writes_the_report(small_model, tmp_path):
    out = tmp_path / "demo"
    stdout = run(["-m", "ctxext.cli", "demo", "--quick", "--model", small_model, "--output-dir", str(out),
                  "--factor", "4"])
    assert f"report: {out / 'report.md'}" in stdout
    report = (out / "report.md").read_text()
    assert "| original |" in report and "| pi x4 + LoRA |" in report and "ppl@1024" in report
    for name in ("ppl.png", "ppl.json", "passkey.json", "commands.sh", "finetune.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("passkey_*.png")) and (out / "finetune" / "merged" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lengths"] == [256, 512, 1024]
    assert "ctxext finetune" in (out / "commands.sh").read_text()


@pytest.mark.slow
def test_leaderboard_quick_mode_runs(small_model, tmp_path):
    run(["scripts/leaderboard.py", "--quick", "--model", small_model, "--factor", "4", "--methods",
         "baseline,pi,pi+xpos", "--output", str(tmp_path / "docs"), "--work-dir", str(tmp_path / "work")])
    table = (tmp_path / "docs" / "RESULTS.md").read_text()
    for row in ("| baseline |", "| pi |", "| pi + LoRA |", "| pi+xpos |", "| pi+xpos + LoRA |"):
        assert row in table
    assert (tmp_path / "docs" / "results.png").read_bytes()[:4] == b"\x89PNG"
