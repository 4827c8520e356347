"""Progressive-length fine-tuning end to end (subprocesses), resume after kill -9, 2-process accelerate parity,
config validation."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_with_tokenizer
from transformers import AutoModelForCausalLM

from ctxext.data import corpus
from ctxext.data.tokenizer import train_tokenizer
from ctxext.errors import TrainingError
from ctxext.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["lora.train_embeddings=true", "optimization.lr=1e-2"]
TWO_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
FSDP = ["distributed.sharding=fsdp", "distributed.num_processes=2"]
SHARDED_CURVE = {"rel": 1e-5}  # measured: 2.5e-7 relative (reduce-scatter sums in another order than one process)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:40]), vocab_size=400)
    return save_tiny_with_tokenizer(path, tok, tie_word_embeddings=True)


def finetune_cmd(base, out, *extra, launcher=None):
    script = [str(REPO / "scripts" / "finetune.py"), "--config", str(REPO / "configs" / "tiny.yaml")]
    head = launcher or [sys.executable]
    return [*head, *script, f"model.path={base}", "--output-dir", str(out), *COMMON, *extra]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    proc = subprocess.run(finetune_cmd(base, out), check=False, capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_tiny_run_end_to_end(base, reference_run):
    curve = losses(reference_run)
    assert len(curve) == 12 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3  # learning
    assert [p.name for p in sorted((reference_run / "checkpoints").iterdir())] == [
        "step-000004",
        "step-000008",
        "step-000012",
    ]  # one per save interval
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in records] == [64] * 6 + [128] * 6
    assert any("held_out_loss" in r for r in records)
    assert (reference_run / "config.resolved.yaml").is_file() and (reference_run / "adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(reference_run / "merged").eval()
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    assert merged.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert merged.config.max_position_embeddings == 256 and merged.config.ctxext["original_context"] == 64
    ids = torch.randint(2, 400, (1, 100))
    assert not torch.allclose(merged(ids).logits, original(ids).logits, atol=1e-3)


@pytest.mark.slow
def test_an_attention_side_chain_fine_tunes_and_merges(base, tmp_path):
    """pi+xpos: xPos lives in attention, so the merged checkpoint keeps its ctxext_xpos rope type and loads (with
    ctxext) as the model the loop trained."""
    import ctxext  # noqa: F401  (registers ctxext_xpos with transformers)

    out = tmp_path / "run"
    cmd = finetune_cmd(base, out, "patch.method=pi+xpos", "patch.scale_base=64", "stages.0.steps=2", "stages.1.steps=2")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(out)) == 4 and all(torch.isfinite(torch.tensor(losses(out))))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.config.rope_parameters["rope_type"] == "ctxext_xpos"
    assert [m["method"] for m in merged.config.ctxext["steps"][-1]["chain"]] == ["pi", "xpos"]
    ids = torch.randint(2, 400, (1, 100))
    assert torch.isfinite(merged(ids).logits).all()


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_loss_curve(base, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        finetune_cmd(base, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "step-000004").is_dir():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "merged").exists()
    resumed = subprocess.run(
        finetune_cmd(base, out, "--resume"), check=False, capture_output=True, text=True, cwd=REPO, env=ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_two_cpu_processes_give_the_same_loss_curve(base, reference_run, tmp_path):
    out = tmp_path / "ddp"
    # `accelerate launch --cpu` runs one process without MPI; --multi_gpu on a CPU machine starts 2 gloo processes
    proc = subprocess.run(
        finetune_cmd(base, out, launcher=TWO_PROCESSES), check=False, capture_output=True, text=True, cwd=REPO, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {json.loads(line)["processes"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {2}
    assert losses(out) == pytest.approx(losses(reference_run), rel=2e-4)
    lrs = [
        [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (out, reference_run)
    ]
    assert lrs[0] == pytest.approx(lrs[1])  # the scheduler steps once per optimizer step, not once per process


def shard_chunks(checkpoint: Path, name_part: str) -> list:
    """The (offsets, sizes) of the pieces a DCP checkpoint holds of the first tensor whose name has name_part."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    name = next(k for k in meta if name_part in k)
    return [(tuple(c.offsets), tuple(c.sizes)) for c in meta[name].chunks]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_equals_one_process(base, reference_run, tmp_path):
    """FSDP2 (fully_shard, gloo): the same loss curve, sharded checkpoints, and the same merged model."""
    out = tmp_path / "fsdp"
    proc = subprocess.run(
        finetune_cmd(base, out, *FSDP, launcher=TWO_PROCESSES),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {json.loads(line)["processes"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {2}
    assert losses(out) == pytest.approx(losses(reference_run), **SHARDED_CURVE)
    # each process wrote its half of every trainable tensor: the embeddings [400, 64] in two row blocks
    assert sorted(shard_chunks(out / "checkpoints" / "step-000004", "embed_tokens")) == [
        ((0, 0), (200, 64)),
        ((200, 0), (200, 64)),
    ]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    single = AutoModelForCausalLM.from_pretrained(reference_run / "merged").state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert merged.keys() == single.keys()
    for name, tensor in merged.items():  # measured: at most 2.5e-6 apart, where training moved weights by 0.08
        torch.testing.assert_close(tensor, single[name], rtol=0, atol=2e-5)
    assert max((single[n] - original[n]).abs().max().item() for n in original) > 0.01  # it did train


@pytest.mark.slow
def test_fsdp2_kill_9_then_resume_reproduces_the_loss_curve(base, reference_run, tmp_path):
    out = tmp_path / "fsdp"
    proc = subprocess.Popen(
        finetune_cmd(base, out, *FSDP, launcher=TWO_PROCESSES),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "step-000004").is_dir():
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "merged").exists()
    resumed = subprocess.run(
        finetune_cmd(base, out, *FSDP, "--resume", launcher=TWO_PROCESSES),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(reference_run), **SHARDED_CURVE)


GPUS = torch.cuda.device_count()


@pytest.mark.slow
@pytest.mark.skipif(
    GPUS < 2,
    reason=f"needs 2 CUDA GPUs, found {GPUS}: accelerate 1.15 ignores its FSDP2 plugin on "
    "CPU (MULTI_CPU, wrapped in DDP) and torch has no context-parallel rule for the CPU attention "
    "kernel (aten._scaled_dot_product_flash_attention_for_cpu); the CPU sharding is tested above",
)
@pytest.mark.parametrize("cp_size", [1, 2])
def test_accelerate_fsdp2_and_context_parallel_on_two_gpus_equal_one_gpu(base, reference_run, tmp_path, cp_size):
    """accelerate's route: FSDP2 plugin + ParallelismConfig(dp_shard_size=2 / cp_size, cp_size); with cp_size 2
    both GPUs train on every sequence, each on half of it (pre-shifted labels, maybe_context_parallel)."""
    out = tmp_path / f"cp{cp_size}"
    proc = subprocess.run(
        finetune_cmd(base, out, *FSDP, f"distributed.cp_size={cp_size}", launcher=TWO_PROCESSES),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ring attention and sharded reductions add in another order than one GPU (float32 model)
    assert losses(out) == pytest.approx(losses(reference_run), rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    single = AutoModelForCausalLM.from_pretrained(reference_run / "merged").state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, single[name], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path):
    out = tmp_path / "nan"
    proc = subprocess.run(
        finetune_cmd(base, out, "optimization.lr=1e30", "optimization.grad_clip=null", "logging.save_every=1"),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    # an update wrecked the weights and the next step's loss is not finite: the checkpoint of the step before holds
    # the wrecked weights, so it is set aside (tests/test_reliability.py resumes from a good one)
    found = re.search(r"loss became (?:nan|inf|-inf) at step (\d+)", proc.stderr)
    assert found and "Last good checkpoint: " in proc.stderr, proc.stderr[-2000:]
    bad = f"step-{int(found.group(1)) - 1:06d}"
    assert (out / "checkpoints" / f"diverged-{bad}").is_dir() and not (out / "checkpoints" / bad).exists()
    assert not (out / "merged").exists()


@pytest.mark.slow
def test_bad_data_is_refused_before_training(base, tmp_path):
    proc = subprocess.run(
        finetune_cmd(base, tmp_path / "a", f"data.source={tmp_path}/missing"),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n")
    proc = subprocess.run(
        finetune_cmd(base, tmp_path / "b", f"data.source={small}", "data.held_out=null"),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 2 and "fewer than one block" in proc.stderr


# ---------------------------------------------------------------- config validation


def test_every_yaml_under_configs_validates():
    """Fine-tuning configs, recipes and sweeps (whose recipe and overrides must validate too)."""
    from ctxext.experiments.recipe import load_recipe, load_sweep

    kinds = {}
    for path in sorted((REPO / "configs").rglob("*.y*ml")):
        assert path.read_text().startswith("#"), f"{path}: the header comment names the command that runs it"
        kind = (
            path.relative_to(REPO / "configs").parts[0]
            if len(path.relative_to(REPO / "configs").parts) > 1
            else "finetune"
        )
        if kind == "finetune":
            assert load_config(path).stages
        elif kind == "recipes":
            for quick in (False, True):
                recipe = load_recipe(path, quick=quick)
                recipe.finetune_config("reference", recipe.method, 2048, [512, 1024, 2048], Path("data.jsonl"))
        elif kind == "sweeps":
            sweep = load_sweep(path)
            if sweep.kind == "finetune":  # training-free sweeps: test_real_model_leaderboard plans every row
                load_recipe(REPO / sweep.recipe, overrides=sweep.overrides)
        else:
            raise AssertionError(f"{path}: no validator for configs/{kind}/")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds["finetune"] >= 4 and kinds["recipes"] >= 1 and kinds["sweeps"] >= 2


def test_patch_section_trained_context_reaches_every_stage_patch():
    """`patch: {trained_context: N}` (a config that overstates its context, configs/qwen2.5-1.5b-128k.yaml): each
    stage patches from N, as `ctxext patch --trained-context N` does."""
    from conftest import tiny_model

    from ctxext.patch.model import patch_model
    from ctxext.train.loop import stage_patch_params

    cfg = load_config(REPO / "configs" / "qwen2.5-1.5b-128k.yaml")
    assert cfg.patch.trained_context == 32768
    params = stage_patch_params(cfg, 0)
    assert params["trained_context"] == 32768
    model = tiny_model("llama", max_position_embeddings=128)
    patch_model(model, cfg.patch.method, **{**params, "trained_context": 32})
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32
    assert model.config.max_position_embeddings == 128  # factor 4 from 32, not from the config's 128


def test_retrieval_documents_of_a_pose_stage_fit_its_window(tmp_path):
    """A PoSE stage trains on windows: its passkey documents are sized to the window (none is cut, and the position
    skip makes the distance), a plain stage's to its block."""
    from transformers import AutoTokenizer

    from ctxext.experiments.recipe import load_recipe
    from ctxext.io.sources import REFERENCE_DIR

    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    recipe = load_recipe(
        overrides=[
            "data.passkey_documents=60",
            "data.train_documents=2",
            "data.full_length_share=1",
            "finetune.stage_steps=[1, 1]",
            "finetune.stage_windows=[null, 128]",
        ]
    )
    data, _ = recipe.build_data(tokenizer, tmp_path, [512, 1024], 1024)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in rows if "answers" in r]
    assert len(lengths) == 60
    # full_length_share=1: every document fills its block (the 128-token window or the 512-token block) but a few
    # tokens; nothing is sized to the PoSE stage's 1,024-token span
    in_window, in_block = [112 <= n <= 128 for n in lengths], [496 <= n <= 512 for n in lengths]
    assert all(a or b for a, b in zip(in_window, in_block)) and any(in_window) and any(in_block), lengths


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimization.lrr=1", "unknown key optimization.lrr (did you mean 'lr'?)"),
        ("stages.0.seqlen=64", "unknown key stages.0.seqlen (did you mean 'seq_len'?)"),
        ("lora.r=abc", "lora.r: Input should be a valid integer"),
        ("stages.0.steps=0", "stages.0.steps: Input should be greater than 0"),
        ("stages.0.seq_len=-5", "stages.0.seq_len: Input should be greater than 0"),
        ("stages.0.tokens=1000", "give exactly one of steps or tokens"),
        ("stages.1.seq_len=4096", "stages.1.seq_len=4096 exceeds optimization.tokens_per_step=512"),
        ("modle.path=x", "unknown key modle (did you mean 'model'?)"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert message in str(err.value)


@pytest.mark.slow
def test_cli_reports_config_errors_with_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", "finetune", str(REPO / "configs" / "tiny.yaml"), "optimization.lrr=1"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 2 and "did you mean 'lr'" in proc.stderr


def test_pose_position_ids_cover_the_target_with_one_skip():
    import numpy as np

    from ctxext.data.text import pose_position_ids

    rng = np.random.default_rng(0)
    reach = []
    for _ in range(200):
        ids = pose_position_ids(64, 512, rng)
        steps = ids[1:] - ids[:-1]
        assert len(ids) == 64 and ids[0] == 0 and ids[-1] < 512 and (steps >= 1).all() and (steps > 1).sum() <= 1
        reach.append(int(ids[-1]))
    assert max(reach) > 480 and min(reach) < 100  # the skips spread the distances over the whole target length


def test_pose_windows_are_refused_with_methods_that_cannot_see_skipped_positions(tmp_path):
    from ctxext.train.loop import finetune

    for method in ("xpos", "dynamic"):
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            [f"patch.method={method}", "patch.factor=null", "stages.1.window=64", "stages.1.patch=null"],
        )
        with pytest.raises(TrainingError, match=f"PoSE windows.*{method}"):
            finetune(cfg, output_dir=str(tmp_path / method))
        assert not (tmp_path / method).exists()
    from ctxext.train.loop import check_config

    check_config(
        load_config(
            REPO / "configs" / "tiny.yaml",
            ["patch.method=yarn", "patch.factor=null", "patch.target_length=256", "stages.1.window=64"],
        )
    )
    with pytest.raises(ConfigError, match="window=128 must be shorter than seq_len=128"):
        load_config(REPO / "configs" / "tiny.yaml", ["stages.1.window=128"])


@pytest.mark.slow
def test_full_tuning_with_a_pose_stage_and_a_stage_source(base, tmp_path):
    retrieval = tmp_path / "retrieval.jsonl"
    retrieval.write_text(
        "".join(json.dumps({"text": f"# The pass key is {10000 + i}. Remember it.\n" * 20}) + "\n" for i in range(30))
    )
    out = tmp_path / "full"
    proc = subprocess.run(
        finetune_cmd(base, out, "tuning=full", "stages.1.window=64", f"stages.1.source={retrieval}"),
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [512] * 12 and [r["seq_len"] for r in records][-1] == 128
    assert (out / "tokens" / "stage-1.bin").is_file() and not (out / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    original = AutoModelForCausalLM.from_pretrained(base)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert any("mlp" in n for n in changed)  # every weight trains, not only attention adapters


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
        for i in range(8)
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nstages: *i\n")
    with pytest.raises(ConfigError, match="YAML alias \\*a at line 2: aliases are not allowed"):
        load_config(bomb)


def test_stage_blocks_keep_every_document_that_fits_whole_and_lose_no_token():
    import numpy as np

    from ctxext.data.text import stage_blocks

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=400)  # documents of 3..119 tokens (EOS included), blocks of 64
    lengths[::37] = 300  # and some longer than a block, which must be cut
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = np.repeat(np.arange(len(lengths)), lengths)  # token value = its document's index
    blocks = stage_blocks(tokens, doc_starts, 64)
    windows = [(int(s), int(s) + 64) for s in blocks.starts]
    assert all(e <= len(tokens) for _, e in windows)
    covered = np.zeros(len(tokens), bool)
    for s, e in windows:
        covered[s:e] = True
    assert covered[: windows[-1][1]].all()  # consecutive up to the last block: no token skipped
    whole = {
        int(d) for d, (s, n) in enumerate(zip(doc_starts, lengths)) if any(a <= s and s + n <= b for a, b in windows)
    }
    fits = {d for d, n in enumerate(lengths) if n <= 64 and doc_starts[d] + n <= windows[-1][1]}
    assert fits <= whole  # plain packing (starts 0, 64, 128, ...) cuts about half of these
    plain = {d for d in fits if doc_starts[d] // 64 == (doc_starts[d] + lengths[d] - 1) // 64}
    assert len(plain) < 0.8 * len(fits)
    repeated = len(windows) * 64 / windows[-1][1]
    assert repeated < 1.6  # the price: heads of cut documents read twice


def test_answer_spans_mark_the_answer_tokens_in_the_token_file_and_the_blocks(tmp_path):
    import numpy as np

    from ctxext.data.text import answer_spans, document_starts, open_token_file, stage_blocks, write_token_file

    tokenizer = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:30]), vocab_size=512)
    rows = [{"text": "def f():\n    return 1\n"}]  # a code row: no answers
    for i in range(40):
        head = (
            f"# The pass key is {31000 + 37 * i}. Remember it.\nx = {i}\n" * (1 + i % 3)
            + "# What is the pass key? The pass key is"
        )
        answer = f" {31000 + 37 * i}."
        rows.append({"text": head + answer + "\n", "answers": [[len(head), len(head) + len(answer)]]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_token_file(tokenizer, str(data), tmp_path / "tokens" / "train.bin", progress=False)
    tokens, starts, spans = open_token_file(path), document_starts(path), answer_spans(path)
    assert len(spans) == 40 and (np.diff(spans.ravel()) >= 0).all()
    for i, (a, b) in enumerate(spans):
        assert tokenizer.decode(tokens[a:b].tolist()).strip() == f"{31000 + 37 * i}."
        assert starts[i + 1] <= a < b < (starts[i + 2] if i + 2 < len(starts) else len(tokens))
    blocks = stage_blocks(tokens, starts, 32, spans)
    mask = blocks.answer_mask(blocks.starts).numpy()
    brute = np.zeros_like(mask)
    for row, s in enumerate(blocks.starts):
        for a, b in spans:
            for j in range(a, b):
                if s <= j < s + 32:
                    brute[row, j - s] = True
    assert mask.any() and (mask == brute).all()


@pytest.mark.slow
def test_answer_weight_reaches_the_training_loss(base, tmp_path):
    rows = []
    for i in range(60):
        head = "".join(f"x_{j} = {i * j}\n" for j in range(20)) + f"# The pass key is {40000 + i}. What is it? It is"
        answer = f" {40000 + i}."
        rows.append({"text": head + answer + "\n", "answers": [[len(head), len(head) + len(answer)]]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {}
    for weight in (1, 10):
        out = tmp_path / f"w{weight}"
        proc = subprocess.run(
            finetune_cmd(
                base, out, f"data.source={data}", f"data.answer_weight={weight}", "stages.0.steps=2", "stages.1.steps=1"
            ),
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=ENV,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        first[weight] = losses(out)[0]
    # the same blocks and weights at step 1: the answers' ~4% of the targets count 10x instead of 1x
    assert 1.1 * first[1] < first[10] < 10 * first[1]


@pytest.mark.parametrize("answers", [[[5, 2]], [["a", "b"]], [[0, 999]], [[1, 2, 3]]])
def test_malformed_answer_spans_name_the_file(tmp_path, answers):
    from ctxext.data.text import write_token_file
    from ctxext.errors import DataError

    tokenizer = train_tokenizer(corpus.read_texts(corpus.stdlib_files("train")[:10]), vocab_size=300)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "x = 1\n# The key is 12345.\n", "answers": answers}) + "\n")
    with pytest.raises(DataError, match=f"{data}: an 'answers' entry must be"):
        write_token_file(tokenizer, str(data), tmp_path / "tokens" / "train.bin", progress=False)
    assert not (tmp_path / "tokens" / "train.bin").exists()


def test_recipe_plan_says_what_trains():
    """Reports print the plan's tuning label: it follows the recipe (the full-tuning experiment once said LoRA r16)."""
    from ctxext.experiments.recipe import load_recipe

    assert load_recipe().plan()["tuning"] == "LoRA r16 + embeddings/norms"  # the demo's recipe
    assert load_recipe(overrides=["finetune.tuning=full"]).plan()["tuning"] == "full (every weight)"
    plain = ["finetune.lora.r=4", "finetune.lora.train_embeddings=false", "finetune.lora.train_norms=false"]
    assert load_recipe(overrides=plain).plan()["tuning"] == "LoRA r4"


def test_data_needles_mix_named_key_documents_into_the_token_file(tmp_path):
    """``data.needles``: named-key documents in the evaluation's format, sized to the stages' blocks (PoSE windows),
    on train filler, their answers marked; mixed and shuffled with the source's documents in one token file."""
    from types import SimpleNamespace

    import numpy as np
    from transformers import AutoTokenizer

    from ctxext.data.needles import KEY_LINE, QUESTION
    from ctxext.data.text import answer_spans, document_starts, open_token_file
    from ctxext.io.sources import REFERENCE_DIR
    from ctxext.train.config import load_config
    from ctxext.train.loop import build_data

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "data.max_documents=20",
            "data.needles.documents=12",
            "data.needles.keys=3",
            "data.needles.full_length_share=1",
            "stages.0.seq_len=128",
            "stages.1.seq_len=256",
            "stages.1.window=192",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    build_data(cfg, tokenizer, tmp_path, accelerator)
    path = tmp_path / "tokens" / "train.bin"
    tokens, starts, spans = open_token_file(path), document_starts(path), answer_spans(path)
    assert len(starts) == 20 + 12 and len(spans) == 12
    ends = np.append(starts[1:], len(tokens))
    docs = [(int(a), int(b)) for a, b in zip(starts, ends)]
    named = [d for d in docs if any(d[0] <= s < d[1] for s, _ in spans)]
    assert len(named) == 12 and named != docs[-12:]  # shuffled in, not appended
    sizes = sorted(b - a for a, b in named)  # blocks: 128 (stage 0) and the 192-token window (stage 1), whole
    assert set(sizes) <= set(range(120, 130)) | set(range(184, 194)) and len(set(sizes)) > 1, sizes
    for (a, b), (s, e) in zip(named, spans):
        text = tokenizer.decode(tokens[a:b].tolist())
        asked = text.rsplit("# What is the ", 1)[1].split(" ")[0]
        key = tokenizer.decode(tokens[s:e].tolist()).strip().rstrip(".")
        assert KEY_LINE.format(name=asked, key=key) in text and text.count("pass key is") == 3 + 1
        assert QUESTION.format(name=asked) in text
