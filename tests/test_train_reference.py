"""scripts/train_reference.py quick mode: trains, evaluates its gates, writes a checkpoint and a model card, and
never writes a model that fails its gates to --output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_mode_writes_a_candidate_with_a_model_card(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train_reference.py"),
            "--output",
            str(out),
            "--work-dir",
            str(work),
            "--quick",
            "--threads",
            "1",
            "--edge-depth-share",
            "0.2",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # a 30-step model cannot pass the passkey gate
    assert not out.exists() and "gates failed" in proc.stdout
    candidate = work / "candidate"
    summary = json.loads((candidate / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["gates"]["passkey >= 95% at every depth within 256"] is False
    assert "--edge-depth-share 0.2" in (candidate / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(candidate)
    tokenizer = AutoTokenizer.from_pretrained(candidate)
    assert tokenizer.encode("123", add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(c) for c in "123"]
    assert model.config.max_position_embeddings == 256
