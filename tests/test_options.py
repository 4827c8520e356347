"""Options declared once (ctxext.options): the flags, the library signature and the checks all come from the model."""

import argparse
from typing import Literal

import pytest

from ctxext.options import FloatList, IntList, Options, OptionsError, add_arguments, from_namespace, opt, takes


class Demo(Options):
    src: str = opt(..., "a source", positional=True)
    lengths: IntList = opt(..., "lengths", min_length=1)
    depths: FloatList = opt([0.0, 1.0], "depths")
    budget: int = opt(160, "evaluations", gt=0)
    kind: Literal["a", "b"] = opt("a", "a kind")
    fast: bool = opt(False, "go fast")
    as_json: bool = opt(False, "print JSON", flag="--json")
    params: dict = opt({}, "the rest")


@takes(Demo, extra_into="params")
def run(src, lengths, depths, budget, kind, fast, as_json, params):
    return {"src": src, "lengths": lengths, "depths": depths, "budget": budget, "kind": kind, "params": params}


def parser():
    p = argparse.ArgumentParser()
    add_arguments(p, Demo, skip=("params",))
    return p


def test_flags_come_from_the_fields_with_their_defaults_ranges_and_choices():
    text = parser().format_help()
    assert "--lengths LENGTHS" in text and "--json" in text and "{a,b}" in text and "--params" not in text
    assert "evaluations (default 160) [> 0]" in text and "depths (default 0.0,1.0)" in text


def test_the_command_line_and_the_library_build_the_same_options():
    ns = parser().parse_args(["s", "--lengths", "256,512", "--budget", "3", "--json"])
    cli = from_namespace(Demo, ns)
    assert cli == Demo(src="s", lengths=[256, 512], budget=3, as_json=True)
    assert run("s", lengths=[256, 512], budget=3) == run(cli) | {"params": {}}
    assert run("s", [1])["depths"] == [0.0, 1.0]  # positional arguments: the positional fields, then the others
    assert run("s", lengths=[1], factor=8)["params"] == {"factor": 8}  # other keywords: method parameters


@pytest.mark.parametrize(
    "argv,message",
    [
        (["s", "--lengths", "256,x"], "--lengths 256,x: '256,x' is not a comma-separated list"),
        (["s", "--lengths", "1", "--budget", "0"], "--budget 0: Input should be greater than 0"),
        (["s", "--lengths", ""], "--lengths []: List should have at least 1 item"),
    ],
)
def test_a_bad_value_names_its_flag(argv, message):
    with pytest.raises(OptionsError) as err:
        from_namespace(Demo, parser().parse_args(argv))
    assert message in str(err.value)


def test_the_library_refuses_unknown_names_and_bad_values_with_the_same_checks():
    with pytest.raises(OptionsError, match="budget=-1: Input should be greater than 0"):
        run("s", lengths=[1], budget=-1)
    with pytest.raises(OptionsError, match="kind='c'"):
        run("s", lengths=[1], kind="c")


def test_a_signature_that_drifts_from_its_model_fails_at_import():
    with pytest.raises(TypeError, match="declares"):

        @takes(Demo)
        def drifted(src, lengths):
            return src


def test_evaluation_lists_come_comma_separated_from_the_command_line():
    from ctxext.cli.main import build_parser
    from ctxext.evals.run import RetrievalOptions

    ns = build_parser().parse_args(
        ["eval", "retrieval", "a", "b", "--lengths", "64,128", "--tasks", "multikey", "--labels", "x,y"]
    )
    options = from_namespace(RetrievalOptions, ns)
    assert (options.models, options.lengths, options.tasks, options.labels) == (
        ["a", "b"],
        [64, 128],
        ["multikey"],
        ["x", "y"],
    )
