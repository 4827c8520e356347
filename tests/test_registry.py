"""The method registry is the one place a method lives: a method defined in this file, and no other file edited,
gets its CLI flag, its YAML key, its chain rules and a saved checkpoint that stock transformers loads."""

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import CONTEXT, tiny_model
from transformers import AutoModelForCausalLM

from ctxext import patch_model
from ctxext.cli.main import build_parser, main
from ctxext.errors import MethodError
from ctxext.rope import MethodConfig, RopeState, param, parse_chain, register_method
from ctxext.rope.registry import METHODS, unregister_method
from ctxext.train.config import ConfigError, load_config

IDS = torch.randint(1, 97, (1, 3 * CONTEXT), generator=torch.Generator().manual_seed(3))


@dataclass(frozen=True)
class HalfPIConfig(MethodConfig):
    """A toy rescaler: divides only the low-frequency share ``split`` of the pairs by ``factor``."""

    factor: float = param(help="toy extension factor", gt=0)
    split: float = param(0.5, help="toy: share of the lowest-frequency pairs that are divided", gt=0, le=1)
    name: ClassVar[str] = "halfpi"
    role: ClassVar[str] = "rescale"
    takes_factor: ClassVar[bool] = True
    paper: ClassVar[str] = "tests/test_registry.py"

    def transform(self, state, ctx):
        first = ctx.num_pairs - round(self.split * ctx.num_pairs)
        inv_freq = state.inv_freq.clone()
        inv_freq[first:] /= self.factor
        return RopeState(inv_freq, state.attention_factor)


@pytest.fixture
def halfpi():
    register_method(HalfPIConfig)
    yield HalfPIConfig
    unregister_method("halfpi")


def stock_logits(path) -> torch.Tensor:
    """Logits of a fresh process that never imports ctxext (stock transformers only)."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    print(json.dumps(model(ids).logits[0].tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_a_method_defined_in_a_test_patches_saves_and_loads_through_the_cli(halfpi, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("llama").save_pretrained(src)
    assert (
        main(
            ["patch", str(src), str(out), "--method", "halfpi", "--split", "0.25", "--target-length", str(4 * CONTEXT)]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 4 * CONTEXT
    assert config["rope_parameters"]["rope_type"] == "longrope"  # no own native form: the universal one
    assert config["ctxext"]["steps"][0]["chain"] == [{"method": "halfpi", "factor": 4.0, "split": 0.25}]

    expected = AutoModelForCausalLM.from_pretrained(src).eval()
    patch_model(expected, "halfpi", factor=4, split=0.25)
    inv_freq = expected.model.rotary_emb.inv_freq  # 8 pairs; split 0.25: the last 2 divided by 4
    original = AutoModelForCausalLM.from_pretrained(src).model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, torch.cat([original[:6], original[6:] / 4]), rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(stock_logits(out), expected(IDS).logits[0], rtol=1e-5, atol=1e-5)


def test_a_registered_method_gets_its_flag_help_yaml_key_and_chain_rules(halfpi, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["patch"].format_help()
    assert "--split SPLIT" in help_text and "halfpi: toy: share of the lowest-frequency pairs" in help_text
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert "halfpi  [rescale, takes a factor]  tests/test_registry.py" in listed and "0 < split <= 1" in listed
    cfg = load_config(
        raw={"patch": {"method": "halfpi", "factor": 2, "split": 0.5}, "stages": [{"seq_len": 8, "steps": 1}]}
    )
    assert cfg.patch.given() == {"factor": 2.0, "split": 0.5}
    with pytest.raises(ConfigError, match="unknown method parameter 'splat'"):
        load_config(raw={"patch": {"method": "halfpi", "splat": 0.5}, "stages": [{"seq_len": 8, "steps": 1}]})
    with pytest.raises(MethodError, match="halfpi: split=1.5 is invalid; valid range: 0 < split <= 1"):
        parse_chain("halfpi", factor=2, split=1.5)
    with pytest.raises(MethodError, match="pi and halfpi both rescale every frequency.*any one of pi, .*halfpi"):
        parse_chain("pi+halfpi", factor=2)
    assert [m.name for m in parse_chain("prope+halfpi", keep=0.5, factor=2)] == ["prope", "halfpi"]


def test_registration_refuses_bad_declarations():
    @dataclass(frozen=True)
    class NoHelp(MethodConfig):
        factor: float = 2.0
        name: ClassVar[str] = "nohelp"
        role: ClassVar[str] = "rescale"
        paper: ClassVar[str] = "-"

    @dataclass(frozen=True)
    class BadRole(MethodConfig):
        name: ClassVar[str] = "badrole"
        role: ClassVar[str] = "resize"
        paper: ClassVar[str] = "-"

    @dataclass(frozen=True)
    class Duplicate(MethodConfig):
        name: ClassVar[str] = "pi"
        role: ClassVar[str] = "rescale"
        paper: ClassVar[str] = "-"

    @dataclass(frozen=True)
    class NoAttention(MethodConfig):
        name: ClassVar[str] = "noattn"
        role: ClassVar[str] = "attention"
        paper: ClassVar[str] = "-"

    for cls, message in [
        (NoHelp, "must be declared with param"),
        (BadRole, "valid roles: rescale, filter, attention"),
        (Duplicate, "already registered"),
        (NoAttention, "defines no attention"),
    ]:
        with pytest.raises(MethodError, match=message):
            register_method(cls)
    assert {"nohelp", "badrole", "noattn"}.isdisjoint(METHODS)


def test_integer_parameters_are_checked_as_integers():
    @dataclass(frozen=True)
    class Grouped(MethodConfig):
        group: int = param(4, help="toy group size", ge=1)
        name: ClassVar[str] = "grouped"
        role: ClassVar[str] = "filter"
        paper: ClassVar[str] = "-"

    register_method(Grouped)
    try:
        assert parse_chain("grouped", group=8)[0].group == 8
        with pytest.raises(MethodError, match="group=2.5 is invalid; valid range: an integer >= 1"):
            parse_chain("grouped", group=2.5)
        with pytest.raises(MethodError, match="group=0 is invalid"):
            parse_chain("grouped", group=0)
    finally:
        unregister_method("grouped")


@pytest.mark.slow
def test_rope_package_needs_only_torch():
    code = """
import sys
sys.modules["transformers"] = None  # any import of transformers now fails
import ctxext.rope as rope
from ctxext.rope import RopeContext, RopeState, apply_chain, parse_chain
ctx = RopeContext(head_dim=16, rope_theta=10000.0, context_length=64)
state = apply_chain(parse_chain("prope+yarn", keep=0.5, factor=4), RopeState(ctx.default_inv_freq()), ctx)
print(len(rope.METHODS), int((state.inv_freq == 0).sum()), round(state.attention_factor, 6))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_methods, removed, attention_factor = proc.stdout.split()
    assert int(n_methods) >= 7 and int(removed) == 4 and float(attention_factor) == round(0.1 * 1.3862944 + 1, 6)
