"""Reference position encodings against their papers' formulas; the comparison script's quick mode."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxext.data import corpus
from ctxext.experiments.encodings import ENCODINGS, TinyLM, alibi_slopes, rope_rotate, sinusoidal_table

REPO = Path(__file__).resolve().parents[1]


def test_alibi_slopes_for_8_and_12_heads():
    # Press et al. 2022: 8 heads -> 1/2, 1/4, ..., 1/256
    assert alibi_slopes(8).tolist() == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    # 12 heads: the 8-head slopes, then every other slope of the 16-head set: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    assert alibi_slopes(12).tolist() == pytest.approx(expected)


def test_sinusoidal_values_at_known_positions():
    table = sinusoidal_table(100, 8)
    assert table[0].tolist() == pytest.approx([0, 1, 0, 1, 0, 1, 0, 1])
    assert table[1, 0].item() == pytest.approx(math.sin(1.0))
    assert table[1, 1].item() == pytest.approx(math.cos(1.0))
    assert table[37, 2].item() == pytest.approx(math.sin(37 / 10000 ** (2 / 8)), abs=1e-6)
    assert table[99, 7].item() == pytest.approx(math.cos(99 / 10000 ** (6 / 8)), abs=1e-6)


def test_rope_is_a_complex_rotation_of_each_half_split_pair():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    pos = torch.arange(5)
    out = rope_rotate(x, pos)
    z = torch.complex(x[:, :4].double(), x[:, 4:].double())
    theta = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    rotated = z * torch.exp(1j * pos[:, None].double() * theta[None, :])
    torch.testing.assert_close(out.double(), torch.cat([rotated.real, rotated.imag], -1), rtol=1e-5, atol=1e-5)
    # relative: q.k depends only on the distance
    q, k = torch.randn(8), torch.randn(8)
    dots = [
        (rope_rotate(q[None], torch.tensor([n])) @ rope_rotate(k[None], torch.tensor([n - 3])).T).item()
        for n in (3, 10, 50)
    ]
    assert dots == pytest.approx([dots[0]] * 3, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_learns_and_stays_causal_beyond_its_length(encoding):
    torch.manual_seed(0)
    model = TinyLM(50, 32, 1, 4, encoding, max_len=16, scale_base=8.0)
    ids = torch.randint(0, 50, (4, 17))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):  # memorize one small batch: every encoding must pass gradients to what it learns
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # at 4x the training length the first 16 positions still see exactly what they saw alone (causal, and the
    # encoding of a position does not depend on the sequence length); every logit is finite
    long = torch.randint(0, 50, (1, 64))
    with torch.no_grad():
        full, prefix = model(long), model(long[:, :16])
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[:, :16], prefix, rtol=1e-4, atol=1e-4)


def test_alibi_bias_is_minus_slope_times_distance():
    torch.manual_seed(0)
    model = TinyLM(50, 16, 1, 2, "alibi", max_len=8)
    block = model.blocks[0]
    x = torch.randn(1, 6, 16)
    # with q = k = 0 the logits are only the bias: attention weights = softmax(-slope * distance)
    with torch.no_grad():
        block.qkv.weight[:32] = 0
        v = block.qkv(x)[..., 32:].view(1, 6, 2, 8).transpose(1, 2)
        out = block.attention(x).view(1, 6, 2, 8).transpose(1, 2)
    for h, slope in enumerate(alibi_slopes(2).tolist()):
        for i in range(6):
            w = torch.softmax(torch.tensor([-slope * (i - j) for j in range(i + 1)]), 0)
            torch.testing.assert_close(out[0, h, i], (w[:, None] * v[0, h, : i + 1]).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compare_encodings_quick_mode_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "compare_encodings.py"),
            "--quick",
            "--output",
            str(tmp_path),
            "--threads",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "ENCODINGS.md").read_text()
    for e in ENCODINGS:
        assert f"| {e} |" in table
    assert (tmp_path / "encodings.png").read_bytes()[:4] == b"\x89PNG"
    # the report re-renders from the saved numbers alone, identically
    again = tmp_path / "again"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "compare_encodings.py"),
            "--report-from",
            str(tmp_path / "encodings.json"),
            "--output",
            str(again),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (again / "ENCODINGS.md").read_text() == table


def test_stdlib_split_is_deterministic_and_disjoint():
    train, held = corpus.stdlib_files("train"), corpus.stdlib_files("held_out")
    assert train == corpus.stdlib_files("train") and held == corpus.stdlib_files("held_out")
    assert not set(train) & set(held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    root = corpus.stdlib_root()
    # the split is a function of the relative path alone (same on every machine)
    assert all(corpus.split_of(p.relative_to(root).as_posix()) == "held_out" for p in held)
