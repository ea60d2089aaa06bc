"""Parsing pass strings and options into pipelines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from onnxopt.errors import OptionError
from onnxopt.passbase import Pass, PassOptions, PassResult
from onnxopt.pipeline import FixpointGroup, build_pipeline, parse_spec


def test_parse_names_and_options():
    specs = parse_spec("a, b:k=1,k2=x:y ,c")
    assert [(s.name, s.options) for s in specs] == [("a", {}), ("b", {"k": "1", "k2": "x:y"}), ("c", {})]


def test_only_first_colon_separates_options():
    (spec,) = parse_spec("prune:pattern=2:4")
    assert spec.options == {"pattern": "2:4"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no passes"),
        ("k=1", "before any pass"),
        ("a:", "no options"),
        ("a:k", "not key=value"),
        ("a:k=1,k=2", "given twice"),
    ],
)
def test_bad_specs(text, message):
    with pytest.raises(OptionError, match=message):
        parse_spec(text)


def test_presets_expand_to_fixpoint_groups():
    steps = build_pipeline("cleanup")
    assert isinstance(steps[0], FixpointGroup)
    assert "eliminate_dead_code" in [p.name for p in steps[0].passes]


def test_unknown_pass_suggests_a_name():
    with pytest.raises(OptionError, match="did you mean 'eliminate_dead_code'"):
        build_pipeline("eliminate_dead_cod")


@dataclass
class Opts(PassOptions):
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"

    def validate(self) -> None:
        if not 0 <= self.ratio <= 1:
            raise OptionError("option 'ratio' must be in [0, 1]")


class Demo(Pass):
    name = "demo"
    Options = Opts

    def run_graph(self, scope, ctx):
        return PassResult()


def test_option_conversion_and_errors():
    opts = Opts.from_strings("demo", {"count": "3", "ratio": "0.25", "flag": "yes", "mode": "b"})
    assert (opts.count, opts.ratio, opts.flag, opts.mode) == (3, 0.25, True, "b")
    for values, message in [
        ({"count": "x"}, "integer"),
        ({"ratio": "2"}, r"\[0, 1\]"),
        ({"flag": "maybe"}, "true or false"),
        ({"mode": "c"}, "one of a, b"),
        ({"nope": "1"}, "no option 'nope'"),
    ]:
        with pytest.raises(OptionError, match=message):
            Opts.from_strings("demo", values)
    assert Demo(count=2).options.count == 2
    with pytest.raises(OptionError, match="no option 'bad'"):
        Demo(bad=1)
