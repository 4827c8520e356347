"""The distributed section: bad combinations refused before any work, the context-parallel loss pieces on CPU.

The multi-process runs (FSDP2 on 2 gloo processes, and on GPUs FSDP2 + context parallel through accelerate) are in
test_finetune.py next to the single-process reference run.
"""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from ctxext.cli.main import main
from ctxext.errors import ConfigError, TrainingError
from ctxext.train.config import load_config
from ctxext.train.loss import ChunkedLMLoss, linear_cross_entropy
from ctxext.train.sharding import check_launch, shifted_labels

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FSDP = ["distributed.sharding=fsdp"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distributed.cp_size=2"], "cp_size=2 needs sharding: fsdp"),
        ([*FSDP, "distributed.cp_size=3"], "stages.0.seq_len=64 is not divisible by 2 x distributed.cp_size = 6"),
        ([*FSDP, "distributed.cp_size=2", "stages.1.window=62"], "stages.1.window=62 is not divisible by 2 x"),
        ([*FSDP, "distributed.cp_size=2", "model.attn_implementation=eager"], "needs model.attn_implementation: sdpa"),
        (
            [*FSDP, "distributed.cp_size=4", "distributed.num_processes=6"],
            ("num_processes=6 is not a multiple of cp_size=4"),
        ),
        (["distributed.sharding=zero3"], "distributed.sharding: Input should be 'none' or 'fsdp'"),
        (["distributed.cp_size=0"], "distributed.cp_size: Input should be greater than or equal to 1"),
    ],
)
def test_bad_distributed_sections_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_a_launch_that_does_not_match_is_refused():
    cfg = load_config(TINY, [*FSDP, "distributed.num_processes=4"])
    with pytest.raises(ConfigError, match="num_processes=4 but 2 process"):
        check_launch(cfg, world_size=2, cuda=True)
    check_launch(cfg, world_size=4, cuda=False)
    cp = load_config(TINY, [*FSDP, "distributed.cp_size=2"])
    with pytest.raises(ConfigError, match="cp_size=2 does not divide the 3 launched"):
        check_launch(cp, world_size=3, cuda=True)
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        check_launch(cp, world_size=2, cuda=False)
    check_launch(cp, world_size=4, cuda=True)


def test_the_cli_refuses_before_any_work_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "run"
    for override, message in (
        ("distributed.num_processes=2", "num_processes=2 but 1 process"),
        ("distributed.cp_size=2", "needs sharding: fsdp"),
    ):
        assert main(["finetune", str(TINY), override, "--output-dir", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing loaded, nothing written


def head_tail_split(length: int, groups: int) -> list[torch.Tensor]:
    """Positions each context-parallel rank holds: 2 x groups chunks, rank r gets chunk r and chunk 2g-1-r."""
    chunks = torch.arange(length).view(2 * groups, -1)
    return [torch.cat([chunks[r], chunks[2 * groups - 1 - r]]) for r in range(groups)]


@pytest.mark.parametrize("groups", [2, 4])
def test_shifted_labels_split_along_the_sequence_add_up_to_the_whole_loss(groups):
    """What context parallel relies on: with targets shifted before the split, every rank's chunked loss on its
    slice of the hidden states sums (over ranks) to the loss of the whole block, and so do the gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 64, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 97, (1, 64))
    whole = linear_cross_entropy(hidden[0, :-1], weight, ids[0, 1:], chunk=8)
    whole_grads = torch.autograd.grad(whole, (hidden, weight))
    labels = shifted_labels(ids)
    assert labels[0, -1] == -100 and torch.equal(labels[0, :-1], ids[0, 1:])
    parts = [
        linear_cross_entropy(hidden[0, idx], weight, labels[0, idx], chunk=8) for idx in head_tail_split(64, groups)
    ]
    split_grads = torch.autograd.grad(sum(parts), (hidden, weight))
    torch.testing.assert_close(sum(parts), whole)
    for a, b in zip(split_grads, whole_grads):  # the head's gradient accumulates in float32 (ctxext.train.loss)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_model_loss_with_shifted_labels_equals_the_default():
    model = tiny_model(
        "llama", scale_qk=False, vocab_size=101, hidden_size=32, intermediate_size=64, tie_word_embeddings=True
    ).train()
    ids = torch.randint(0, 101, (2, 40))
    positions = torch.arange(40).expand(2, -1)
    loss = ChunkedLMLoss(model, chunk=16)
    torch.testing.assert_close(loss(ids, positions, labels=shifted_labels(ids)), loss(ids), rtol=1e-6, atol=1e-5)
    assert loss._no_split_modules == ["LlamaDecoderLayer"]  # what accelerate's FSDP2 wraps one by one


def test_sharding_needs_several_processes_and_only_the_cpu_route_shards_itself():
    from types import SimpleNamespace

    from ctxext.train.sharding import shards_itself

    cfg = load_config(TINY, FSDP)
    assert shards_itself(cfg, SimpleNamespace(num_processes=2, is_fsdp2=False))  # CPU: ctxext calls fully_shard
    assert not shards_itself(cfg, SimpleNamespace(num_processes=2, is_fsdp2=True))  # GPU: accelerate shards
    assert not shards_itself(cfg, SimpleNamespace(num_processes=1, is_fsdp2=False))  # one process: nothing to shard
    assert not shards_itself(load_config(TINY), SimpleNamespace(num_processes=2, is_fsdp2=False))


def test_context_parallel_refuses_sliding_windows_and_attention_methods(tmp_path):
    from conftest import tiny_model

    from ctxext.train.loop import check_config
    from ctxext.train.sharding import check_full_attention

    check_full_attention(tiny_model("llama"))
    for family in ("gemma2", "mistral"):  # alternating sliding layers; a window on every layer
        with pytest.raises(ConfigError, match="context parallel cannot run"):
            check_full_attention(tiny_model(family))
    cfg = load_config(
        TINY, [*FSDP, "distributed.cp_size=2", "patch.method=xpos", "patch.factor=null", "stages.1.patch=null"]
    )
    with pytest.raises(TrainingError, match="xpos: the method replaces the attention function"):
        check_config(cfg)
