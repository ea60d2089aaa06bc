"""Turning pass specifications (CLI strings or Python objects) into pipeline steps.

Syntax: ``name`` or ``name:key=value,key2=value`` separated by commas, e.g.
``cleanup,fold_constants:max_bytes=1048576,time_budget=5``. Only the first ':' of a
pass separates its name from its options, so values may contain ':'. A comma-separated
token containing '=' (and no ':' before it) continues the previous pass's options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxopt.errors import OptionError
from onnxopt.passbase import Pass
from onnxopt.registry import PRESETS, get_pass

DEFAULT_MAX_ITERATIONS = 8


@dataclass
class FixpointGroup:
    """Passes run in order, repeatedly, until none of them changes the model (capped)."""

    passes: list[Pass]
    name: str = "fixpoint"
    max_iterations: int = DEFAULT_MAX_ITERATIONS


Step = Pass | FixpointGroup


@dataclass
class PassSpec:
    """One parsed ``name:key=value,...`` item."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


def parse_spec(text: str) -> list[PassSpec]:
    """Split a pass string into :class:`PassSpec` items (syntax in the module docstring)."""
    specs: list[PassSpec] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        colon, equals = token.find(":"), token.find("=")
        if equals != -1 and (colon == -1 or equals < colon):
            if not specs:
                raise OptionError(f"option '{token}' comes before any pass name")
            _add_option(specs[-1], token)
            continue
        name, _, rest = token.partition(":")
        spec = PassSpec(name.strip())
        if not spec.name:
            raise OptionError(f"empty pass name in '{token}'")
        if rest.strip():
            _add_option(spec, rest)
        elif colon != -1:
            raise OptionError(f"pass '{spec.name}' has ':' but no options after it")
        specs.append(spec)
    if not specs:
        raise OptionError("no passes given")
    return specs


def _add_option(spec: PassSpec, token: str) -> None:
    key, sep, value = token.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OptionError(f"option '{token}' of pass '{spec.name}' is not key=value")
    if key in spec.options:
        raise OptionError(f"option '{key}' of pass '{spec.name}' is given twice")
    spec.options[key] = value.strip()


def _expand_preset(name: str) -> list[Step]:
    steps: list[Step] = []
    for item in PRESETS[name]:
        if isinstance(item, list):
            steps.append(FixpointGroup([get_pass(n)() for n in item], name=name))
        else:
            steps.append(get_pass(item)())
    return steps


def build_pipeline(passes: str | Sequence[str | Pass | FixpointGroup]) -> list[Step]:
    """Resolve names, presets and options into pass instances and fixpoint groups."""
    items: list[str | Pass | FixpointGroup]
    items = list(parse_spec(passes)) if isinstance(passes, str) else list(passes)  # type: ignore[arg-type]
    steps: list[Step] = []
    for item in items:
        if isinstance(item, (Pass, FixpointGroup)):
            steps.append(item)
            continue
        spec = item if isinstance(item, PassSpec) else _single(item)
        if spec.name in PRESETS:
            if spec.options:
                raise OptionError(f"preset '{spec.name}' takes no options; give options to its passes instead")
            steps.extend(_expand_preset(spec.name))
            continue
        cls = get_pass(spec.name)
        steps.append(cls(cls.Options.from_strings(spec.name, spec.options)))
    return steps


def _single(text: str) -> PassSpec:
    specs = parse_spec(text)
    if len(specs) != 1:
        raise OptionError(f"'{text}' names several passes; give them as separate list items")
    return specs[0]


def step_passes(step: Step) -> list[Pass]:
    """The passes of one step: a fixpoint group's members, or the pass itself."""
    return list(step.passes) if isinstance(step, FixpointGroup) else [step]


def set_pass_options(steps: Sequence[Step], pass_name: str, **values: Any) -> int:
    """Set (and validate) options on every ``pass_name`` instance in ``steps``; returns how many were set.

    Used by CLI flags that are shorthands for pass options (``--max-error`` sets qdq's ``max_error``).
    """
    count = 0
    for step in steps:
        for p in step_passes(step):
            if p.name == pass_name:
                current = {f.name: getattr(p.options, f.name) for f in dataclasses.fields(p.options)}
                fields = {**current, **values}
                p.options = type(p.options).create(pass_name, **fields)
                count += 1
    return count
