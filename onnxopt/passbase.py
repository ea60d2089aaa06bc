"""The pass contract: options, requirements, results, and the base class.

A pass is a small class with a registered ``name``, a typed :class:`PassOptions`
dataclass, a docstring (its first line is what ``onnxopt passes`` prints), the
requirements the manager must provide, and a ``run`` that returns a :class:`PassResult`
saying whether the model changed and counting what it did.

Most passes work graph by graph: they implement :meth:`Pass.run_graph` and the
framework calls it for every graph in the model, innermost subgraphs first, so no
pass has to recurse into If/Loop/Scan bodies itself.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

from onnx import GraphProto, ModelProto

from onnxopt.errors import OptionError
from onnxopt.graph import GraphScope, GraphView, NameGenerator, iter_scopes


class Requirement(str, enum.Enum):
    """What a pass needs the manager to provide before it runs."""

    SHAPES = "shapes"
    CALIBRATION = "calibration"
    TARGET = "target"
    TEACHER = "teacher"


Target = Literal["portable", "trt", "ort-cpu", "ort-gpu"]
TARGETS: tuple[str, ...] = get_args(Target)


@dataclass
class PassResult:
    """What one run of a pass did: whether it modified the model, counts by kind, and what it has to say.

    ``notes`` inform (a fusion skipped and why, a layer kept float); ``warnings`` flag a result the
    user should not trust as is (random calibration, an upgrade that could not be verified).
    """

    modified: bool = False
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def count(self, what: str, amount: int = 1) -> None:
        """Record ``amount`` changes of kind ``what`` (and mark the result modified)."""
        if amount:
            self.counts[what] += amount
            self.modified = True

    def merge(self, other: PassResult) -> PassResult:
        """Add another result's counts and notes into this one; return self."""
        self.modified = self.modified or other.modified
        self.counts.update(other.counts)
        self.notes.extend(other.notes)
        self.warnings.extend(other.warnings)
        return self

    def summary(self) -> str:
        """Counts as ``what=n`` pairs, or 'no change'."""
        if not self.counts:
            return "no change"
        return ", ".join(f"{key}={value}" for key, value in sorted(self.counts.items()))


@dataclass
class PassContext:
    """What the manager gives a pass: the run's settings and lazily computed facts.

    ``types`` holds inferred value types for every graph; the manager recomputes them after
    a pass that modified the model unless that pass declares ``preserves_types``. ``teacher``
    (for passes that require it) is the model as it was before the run's first lossy pass.
    ``later`` names the passes of the run's later steps (a fusion may leave work to one of them).
    """

    model: ModelProto
    target: str = "portable"
    calibration: Any = None
    teacher: ModelProto | None = None
    later: frozenset[str] = frozenset()
    _types: dict | None = None
    _names: NameGenerator | None = None
    _scopes: list[GraphScope] | None = None
    _views: dict[int, GraphView] = field(default_factory=dict)

    def scopes(self) -> list[GraphScope]:
        """All graphs of the model in pre-order (cached until the model changes)."""
        if self._scopes is None:
            self._scopes = iter_scopes(self.model.graph)
        return self._scopes

    def view(self, graph: GraphProto) -> GraphView:
        """A :class:`GraphView` of ``graph``, shared by passes until the model changes.

        A pass that mutates the graph must not keep using a view after mutating; the
        framework drops cached views after every change.
        """
        key = id(graph)
        view = self._views.get(key)
        if view is None or view.graph is not graph or not _same_nodes(view, graph):
            view = self._views[key] = GraphView.build(graph)
        return view

    @property
    def types(self) -> dict:
        """Inferred types by value name (see :func:`onnxopt.shapes.infer_types`)."""
        if self._types is None:
            from onnxopt.shapes import infer_types

            self._types = infer_types(self.model)
        return self._types

    @property
    def names(self) -> NameGenerator:
        """Generator of fresh value/node names, valid for this model."""
        if self._names is None:
            self._names = NameGenerator(self.model)
        return self._names

    def invalidate(self, *, types: bool = True) -> None:
        """Forget cached facts after the model changed (types only if ``types``)."""
        if types:
            self._types = None
        self._names = None
        self._scopes = None
        self._views.clear()


def _same_nodes(view: GraphView, graph: GraphProto) -> bool:
    """Whether ``view`` still holds ``graph``'s node objects (a rebuild of the node list copies them all)."""
    nodes = graph.node
    if len(view.nodes) != len(nodes):
        return False
    return not nodes or (view.nodes[0] is nodes[0] and view.nodes[-1] is nodes[len(nodes) - 1])


def option(default: Any, help: str) -> Any:
    """A pass option field with a default and a one-line description for ``onnxopt passes``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help})


@dataclass
class PassOptions:
    """Base class of pass options: a dataclass whose fields have types and defaults.

    Subclasses may override :meth:`validate` to check values; it must raise
    :class:`OptionError` with one line naming the option.
    """

    def validate(self) -> None:
        """Check option values; raise :class:`OptionError` for a bad one."""

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, type, default, help) for every option, for help output."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f.name, _type_name(hints[f.name]), repr(default), f.metadata.get("help", "")))
        return rows

    @classmethod
    def from_strings(cls, pass_name: str, values: dict[str, str]) -> PassOptions:
        """Build options from ``key=value`` strings, converting each by its declared type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            attr = key.replace("-", "_")
            if attr not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise OptionError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
            kwargs[attr] = convert_option(pass_name, key, raw, hints[attr])
        return cls.create(pass_name, **kwargs)

    @classmethod
    def create(cls, pass_name: str, **kwargs: Any) -> PassOptions:
        """Build and validate options from Python values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionError(f"pass '{pass_name}' has no option '{unknown[0]}' (options: {', '.join(sorted(names)) or 'none'})")
        options = cls(**kwargs)
        options.validate()
        return options


def check_choices(pass_name: str, option_name: str, values: tuple[str, ...], known: Iterable[str], what: str = "kind") -> None:
    """Raise :class:`OptionError` naming the first of ``values`` that is not one of ``known``."""
    choices = sorted(known) if not isinstance(known, tuple) else list(known)
    unknown = [value for value in values if value not in choices]
    if unknown:
        raise OptionError(f"option '{option_name}' of pass '{pass_name}': unknown {what} '{unknown[0]}' (known: {', '.join(choices)})")


def check_patterns(pass_name: str, option_name: str, patterns: tuple[str, ...]) -> None:
    """Raise :class:`OptionError` for the first of ``patterns`` that is not a valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionError(f"option '{option_name}' of pass '{pass_name}': bad regex '{pattern}' ({exc})") from None


def matches_pattern(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` equals one of ``patterns`` or one of them, as a regular expression, matches all of it."""
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def convert_option(pass_name: str, key: str, raw: str, tp: Any) -> Any:
    """Convert one option string to the declared type ``tp`` or raise :class:`OptionError`."""
    where = f"option '{key}' of pass '{pass_name}'"
    if get_origin(tp) is Literal:
        choices = [str(a) for a in get_args(tp)]
        if raw not in choices:
            raise OptionError(f"{where} must be one of {', '.join(choices)}, not '{raw}'")
        return raw
    if tp is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{where} must be true or false, not '{raw}'")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise OptionError(f"{where} must be a{'n integer' if tp is int else ' number'}, not '{raw}'") from None
    if tp is str:
        return raw
    if get_origin(tp) in (tuple, list):
        return tuple(part for part in raw.replace(";", "|").split("|") if part)
    raise OptionError(f"{where} has an unsupported type {tp!r}")


class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run_graph`` or ``run``.

    Class attributes state the contract:
      * ``Options``: the options dataclass (default: none).
      * ``requires``: :class:`Requirement` values the manager must provide (:meth:`required`
        adds what the pass's options ask for, such as calibration data for GPTQ rounding).
      * ``preserves_types``: post-condition; every value that survives keeps its type and
        shape, so the manager may keep its cached type inference.
      * ``recurse``: whether ``run_graph`` is called for subgraphs too.
      * ``lossy``: the pass changes what the model computes (quantization, pruning,
        factorization); the teacher of later passes is the model before the first one.
      * ``tolerance``: the verification precision its output is judged at (``fp32``, ``fp16``,
        ``int8`` or ``pruned``); verification after a lossy pass uses the loosest so far.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    preserves_types: ClassVar[bool] = True
    recurse: ClassVar[bool] = True
    lossy: ClassVar[bool] = False
    tolerance: ClassVar[str] = "fp32"

    def __init__(self, options: PassOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise OptionError(f"pass '{self.name}': give options or keyword options, not both")
        self.options = options if options is not None else self.Options.create(self.name, **kwargs)

    def required(self) -> frozenset[Requirement]:
        """What this pass, with its options, needs from the manager (``requires`` unless an option adds to it)."""
        return self.requires

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Run on the whole model; by default calls :meth:`run_graph` on every graph, innermost first."""
        result = PassResult()
        scopes = ctx.scopes()
        if not self.recurse:
            scopes = scopes[:1]
        for scope in reversed(scopes):
            graph_result = self.run_graph(scope, ctx)
            if graph_result.modified:
                ctx.invalidate(types=not self.preserves_types)
            result.merge(graph_result)
        return result

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Rewrite one graph in place; override this (or :meth:`run`)."""
        raise NotImplementedError(f"pass '{self.name}' implements neither run nor run_graph")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
