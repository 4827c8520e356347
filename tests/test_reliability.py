"""The reliability drill as tests: hostile inputs, kill -9 at random moments, a full disk, two runs into one output, a
diverging run. ``python -m tests.reliability_drill`` runs the same cases at full size (20+ kills per operation) and
prints the table of docs/results/RELIABILITY.md; the fast tests here pin the checks underneath it."""

import errno
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import reliability_drill as drill

from ctxext.data.text import check_data_file
from ctxext.errors import CheckpointError, DataError, OutputError, TrainingError
from ctxext.io.atomic import disk_full, temporary_beside
from ctxext.io.lock import lock_path, output_lock
from ctxext.io.validate import check_checkpoint, load_tokenizer
from ctxext.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

CHECKPOINT_CASES = [h for h in drill.HOSTILE if h.kind == "checkpoint"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("drill")
    return drill.Fixtures(root, drill.tiny_checkpoint(root / "good"), gguf=None)


# ---------------------------------------------------------------- fast: the checks underneath


@pytest.mark.parametrize("hostile", CHECKPOINT_CASES, ids=lambda h: h.name)
def test_each_hostile_checkpoint_is_refused_naming_the_file_and_the_problem(hostile, tiny, tmp_path):
    bad = hostile.build(tmp_path, tiny)
    with pytest.raises(CheckpointError) as err:
        config = check_checkpoint(bad, finite=True).config
        load_tokenizer(bad, config.vocab_size)
    assert str(bad) in str(err.value) and hostile.culprit in str(err.value)
    assert re.search(hostile.says, str(err.value)), str(err.value)


def test_the_good_checkpoint_passes_every_check(tiny):
    checked = check_checkpoint(tiny.src, finite=True)
    assert len(checked.tensors) == 21 and checked.config.vocab_size == 4096
    assert len(load_tokenizer(tiny.src, checked.config.vocab_size)) == 4096


def test_a_missing_folder_or_an_uncached_hub_id_offline_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """Every command that reads a checkpoint: a path that is not there, or an org/name id that is neither in the
    Hugging Face cache nor reachable, is a CheckpointError before transformers spends 30-60 s on retries."""
    import time

    from huggingface_hub import constants

    from ctxext.cli.main import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.time()
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder nor an org/name hub id"):
        check_checkpoint(tmp_path / "no-such-folder")
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache .*\(HF_HUB_OFFLINE is set\)"):
        check_checkpoint("nobody/no-such-model")
    assert main(["info", "nobody/no-such-model"]) == 2
    assert "Download the model when online, or give a local checkpoint folder" in capsys.readouterr().err
    assert (
        main(["patch", str(tmp_path / "no-such-folder"), str(tmp_path / "out"), "--method", "pi", "--factor", "2"]) == 2
    )
    assert not (tmp_path / "out").exists()
    assert time.time() - started < 10


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny):
    with pytest.raises(CheckpointError, match="4,096 tokens but the model's vocab_size is 1,000"):
        load_tokenizer(tiny.src, 1000)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty (0 bytes)"),
        (b" \n\t\n", "holds only whitespace"),
        (bytes(range(256)) * 64, "is binary"),
        (b"print('hi')\n" * 100 + b"\0", "a NUL byte at offset 1,200"),
        ("déjà vu\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 1)"),
        ("x = 'é'\n".encode()[:-3], "ends inside a multi-byte character"),
    ],
)
def test_data_files_empty_binary_or_not_utf8_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        check_data_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_utf8_split_across_read_blocks_and_parquet_files_pass(tmp_path):
    text = tmp_path / "big.txt"
    text.write_bytes(b"a" * ((1 << 20) - 1) + "é".encode() + b"\n")  # the 2-byte character straddles 1 MiB
    check_data_file(text)
    table = tmp_path / "rows.parquet"
    table.write_bytes(b"PAR1\0\0\0PAR1")  # binary by nature: only emptiness is checked before datasets reads it
    check_data_file(table)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["stages.0.steps=1000000000000"], "stages.0.steps: Input should be less than or equal to 10000000"),
        (["stages.0.steps=null", "stages.0.tokens=100000000000000"], "at most 10,000,000 per stage"),
    ],
)
def test_huge_steps_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_deeply_nested_or_binary_yaml_is_refused_naming_the_file(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("stages: " + "[" * 200 + "]" * 200)
    with pytest.raises(ConfigError, match=f"{deep}: the YAML is nested too deeply at line 1 \\(more than 32"):
        load_config(deep)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match=f"{binary} is not valid YAML"):
        load_config(binary)


def _hold(out, ready, release):
    with output_lock(out, "holder"):
        ready.set()
        release.wait(30)


def test_the_lock_refuses_a_second_run_naming_the_holder_and_is_free_after_it_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "out", ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(OutputError) as err, output_lock(tmp_path / "out", "second"):
        pass
    assert f"pid {holder.pid}" in str(err.value) and "(holder, started" in str(err.value)
    assert str(lock_path(tmp_path / "out")) in str(err.value)
    os.kill(holder.pid, signal.SIGKILL)  # the holder dies without cleaning up: its lock file stays, its flock goes
    holder.join()
    assert lock_path(tmp_path / "out").is_file()
    with output_lock(tmp_path / "out", "third"):
        assert json.loads(lock_path(tmp_path / "out").read_text())["pid"] == os.getpid()
        with output_lock(tmp_path / "out", "nested"):  # re-entrant within a process
            pass
        assert lock_path(tmp_path / "out").is_file()
    assert not lock_path(tmp_path / "out").exists()


def _flock_as(path, pid, ready, release):
    import fcntl
    import socket

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": pid, "host": socket.gethostname(), "command": "orphan"}).encode())
    ready.set()
    release.wait(30)


def test_a_lock_flocked_for_a_pid_that_is_not_running_is_taken_over(tmp_path, caplog):
    """A holder killed while a child it forked keeps the file open: the flock lives on, the recorded pid is dead."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    orphan = ctx.Process(target=_flock_as, args=(lock_path(tmp_path / "out"), dead.pid, ready, release))
    orphan.start()
    assert ready.wait(30)
    try:
        with caplog.at_level(logging.WARNING, logger="ctxext.io.lock"), output_lock(tmp_path / "out", "new"):
            assert json.loads(lock_path(tmp_path / "out").read_text())["command"] == "new"
        assert f"taking over the lock of pid {dead.pid}" in caplog.text
    finally:
        release.set()
        orphan.join()


def test_disk_full_is_recognised_in_every_wording_and_nothing_else(tmp_path):
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x") is not None
    rust = type("SafetensorError", (Exception,), {})(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert "no space left on the disk that holds" in str(disk_full(rust, tmp_path / "x"))
    assert disk_full(ValueError("bad value"), tmp_path / "x") is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path / "x") is None


def test_an_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("previous")

    def write(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from ctxext.io.atomic import atomic_write

    with pytest.raises(OutputError, match=f"Nothing was written: {target} is unchanged"):
        atomic_write(target, write)
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_replacement_killed_between_its_two_renames_is_restored(tmp_path):
    """commit_folder moves the old OUT aside, then renames the new one in: a kill between the two leaves OUT
    missing; the next write to OUT puts the old complete one back before anything else."""
    aside = tmp_path / ".out.ctxext-tmp-old-abc" / "previous"
    aside.mkdir(parents=True)
    (aside / "model.safetensors").write_text("old and complete")
    temporary_beside(tmp_path / "out", folder=True)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "old and complete"
    assert not (tmp_path / ".out.ctxext-tmp-old-abc").exists()


def test_metrics_of_a_resumed_run_drop_later_steps_and_a_line_cut_short(tmp_path):
    from ctxext.train.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)) + '{"step": 4, "lo')
    MetricsLog(path, main=True, keep_until=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    MetricsLog(path, main=True, keep_until=0).close()  # resumed without a checkpoint: the curve starts again
    assert path.read_text() == ""


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_a_diverged_step_sets_aside_the_checkpoint_whose_weights_gave_it(tmp_path):
    from ctxext.train.loop import EXIT_DIVERGED, Position, diverged

    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    err = diverged(tmp_path, Position(step=4, stage=1), math.nan, 128, _OneProcess())
    assert isinstance(err, TrainingError) and err.exit_code == EXIT_DIVERGED == 3
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / 'step-000002'}" in str(err)
    assert (tmp_path / "checkpoints" / "diverged-step-000004").is_dir()
    err = diverged(tmp_path, Position(step=3, stage=1), math.inf, 128, _OneProcess())  # no checkpoint at step 3
    assert "step-000002" in str(err) and "set aside" not in str(err)


# ---------------------------------------------------------------- slow: the drill itself, smaller


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """The drill's fixtures. Its in-process runs (the uninterrupted reference, the resumes) use one thread, as its
    subprocesses do (OMP_NUM_THREADS=1): results compared bit for bit need the same order of sums."""
    import torch

    cache, threads = os.environ.get("CTXEXT_CACHE"), torch.get_num_threads()
    torch.set_num_threads(1)
    yield drill.make_fixtures(tmp_path_factory.mktemp("drill-cli"))  # sets CTXEXT_CACHE inside the drill folder
    torch.set_num_threads(threads)
    os.environ.pop("CTXEXT_CACHE") if cache is None else os.environ.update(CTXEXT_CACHE=cache)


@pytest.mark.slow
@pytest.mark.parametrize(
    "hostile,command",
    [(h, c) for h in drill.HOSTILE for c in h.commands],
    ids=lambda x: x.name if isinstance(x, drill.Hostile) else x,
)
def test_every_command_refuses_every_hostile_input(hostile, command, fixtures):
    outcome = drill.run_input_case(hostile, command, fixtures)
    assert outcome.handled, outcome.note


@pytest.fixture(scope="module")
def reference(fixtures):
    return drill.reference_run(fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["patch", "export", "finetune", "merge"])
def test_kill_9_at_random_moments_loses_nothing(operation, fixtures, reference):
    make = {
        "patch": drill.patch_operation,
        "export": drill.export_operation,
        "finetune": drill.finetune_operation,
        "merge": drill.merge_operation,
    }[operation]
    op = make(fixtures) if operation in ("patch", "export") else make(fixtures, reference)
    log = fixtures.root / f"{operation}.log"
    window = drill.calibrate(op, log)
    rng = random.Random(operation)
    outcomes = []
    for trial in range(12):
        if op.stats["landed"] == 2:
            break
        outcome = drill.kill_trial(op, trial, window, rng, log)
        if outcome is not None:
            outcomes.append(outcome)
    assert op.stats["landed"] == 2, op.stats
    assert all(o.handled for o in outcomes), [o.note for o in outcomes]


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_output_and_the_run(fixtures):
    outcomes = drill.part_disk(fixtures, None)
    if outcomes[0].note == "skipped":
        pytest.skip(outcomes[0].case)
    assert len(outcomes) == 4 and all(o.handled for o in outcomes), [(o.case, o.note) for o in outcomes]


@pytest.mark.slow
def test_a_second_run_into_a_locked_output_is_refused(fixtures, reference):
    outcomes = drill.part_lock(fixtures, None)
    assert len(outcomes) == 3 and all(o.handled for o in outcomes), [(o.case, o.note) for o in outcomes]


@pytest.mark.slow
def test_a_diverging_run_exits_3_and_its_last_good_checkpoint_resumes(fixtures):
    [outcome] = drill.part_diverge(fixtures, None)
    assert outcome.handled, outcome.note


def test_the_drill_table_counts_what_it_is_given():
    outcomes = [
        drill.Outcome("inputs", "a", True),
        drill.Outcome("inputs", "b", False),
        drill.Outcome("kill", "c", False, corrupted=True, lost=True),
        drill.Outcome("kill", "summary row", True, note="summary"),
    ]
    lines = drill.table(outcomes)
    assert "| inputs | 2 | 1 | 0 | 0 |" in lines and "| kill | 1 | 0 | 1 | 1 |" in lines
    assert lines[-1] == "| **all** | **3** | **1** | **1** | **1** |"


PLAN_CASES = [h for h in drill.HOSTILE if h.kind == "checkpoint" and "plan" in h.commands]


@pytest.mark.parametrize("hostile", PLAN_CASES, ids=lambda h: h.name)
def test_plan_refuses_each_hostile_config_json_naming_the_file(hostile, tiny, tmp_path):
    """`ctxext plan` reads config.json alone: every hostile one is refused as the other commands refuse it."""
    from ctxext.train.memory import model_shape

    bad = hostile.build(tmp_path, tiny)
    with pytest.raises(CheckpointError) as err:
        model_shape(str(bad))
    assert str(bad / "config.json") in str(err.value) and re.search(hostile.says, str(err.value)), str(err.value)
