"""Read-only views over ONNX graphs, subgraph traversal and safe renaming.

Everything here walks nested graphs (If/Loop/Scan bodies and any other graph
attribute) with explicit stacks, never Python recursion, so a deeply nested or very
long model cannot hit the interpreter's recursion limit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto

STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard(node: NodeProto) -> bool:
    """Whether the node belongs to the default ONNX operator domain."""
    return node.domain in STANDARD_DOMAINS


def node_label(node: NodeProto) -> str:
    """A short human name for a node, for messages: ``'name' (OpType)``."""
    name = node.name or (node.output[0] if node.output else "<unnamed>")
    return f"'{name}' ({node.op_type})"


# Standard ops whose schemas have graph attributes; other standard ops cannot hold graphs
# (the checker rejects attributes outside the schema), so only these and non-standard ops
# need their attributes scanned.
GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: NodeProto) -> list[GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies, ...)."""
    if node.op_type not in GRAPH_OPS and node.domain in STANDARD_DOMAINS:
        return []
    found: list[GraphProto] = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


@dataclass
class GraphScope:
    """A graph plus where it sits: its parent scope and the node that owns it."""

    graph: GraphProto
    parent: GraphScope | None = None
    owner: NodeProto | None = None
    depth: int = 0


def iter_scopes(graph: GraphProto) -> list[GraphScope]:
    """All graphs under ``graph`` (itself first), in pre-order, parents before children."""
    root = GraphScope(graph)
    order: list[GraphScope] = []
    stack = [root]
    while stack:
        scope = stack.pop()
        order.append(scope)
        children = [GraphScope(sub, scope, node, scope.depth + 1) for node in scope.graph.node for sub in subgraphs(node)]
        stack.extend(reversed(children))
    return order


def defined_names(graph: GraphProto) -> set[str]:
    """Names a graph defines itself: inputs, initializers, sparse initializers, node outputs."""
    names = {i.name for i in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def outer_references(graph: GraphProto) -> set[str]:
    """Names used inside ``graph`` (at any depth) that it does not define itself.

    For a subgraph these are the values it captures from enclosing scopes.
    """
    scopes = iter_scopes(graph)
    free: dict[int, set[str]] = {}
    for scope in reversed(scopes):  # children before parents
        own = defined_names(scope.graph)
        used: set[str] = set()
        for node in scope.graph.node:
            used.update(i for i in node.input if i)
            for sub in subgraphs(node):
                used |= free[id(sub)]
        used.update(o.name for o in scope.graph.output)
        free[id(scope.graph)] = used - own
    return free[id(graph)]


def implicit_inputs(graph: GraphProto, nodes: list[NodeProto] | None = None) -> dict[int, list[str]]:
    """For each node of ``graph`` holding subgraphs, the outer names those subgraphs read.

    Keyed by ``id(node)`` (callers keep the node objects alive while they use the
    result, e.g. by passing ``nodes``); the lists are sorted for determinism.
    """
    result: dict[int, list[str]] = {}
    for node in graph.node if nodes is None else nodes:
        subs = subgraphs(node)
        if subs:
            names: set[str] = set()
            for sub in subs:
                names |= outer_references(sub)
            result[id(node)] = sorted(names)
    return result


@dataclass
class GraphView:
    """Producer and consumer indexes over one graph, built once and read by passes.

    Consumers include nodes whose subgraphs read a value implicitly, so a value used only
    inside an If branch still counts as used. Build a new view after mutating the graph.
    """

    graph: GraphProto
    nodes: list[NodeProto] = field(default_factory=list)
    producer: dict[str, NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[NodeProto]] = field(default_factory=dict)
    implicit: dict[int, list[str]] = field(default_factory=dict)
    inputs_of: dict[int, list[str]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: GraphProto) -> GraphView:
        """Index ``graph`` in one sweep over its nodes."""
        nodes = list(graph.node)
        view = cls(graph, nodes=nodes)
        implicit = view.implicit = implicit_inputs(graph, nodes)
        view.initializers = {t.name: t for t in graph.initializer}
        view.graph_inputs = {i.name for i in graph.input}
        view.graph_outputs = {o.name for o in graph.output}
        producer, consumers, inputs_of = view.producer, view.consumers, view.inputs_of
        for node in nodes:
            names = list(node.input)
            if "" in names:
                names = [i for i in names if i]
            extra = implicit.get(id(node))
            if extra:
                names.extend(extra)
            inputs_of[id(node)] = names
            for out in node.output:
                if out:
                    producer[out] = node
            for name in names:
                readers = consumers.get(name)
                if readers is None:
                    consumers[name] = [node]
                else:
                    readers.append(node)
        return view

    def all_inputs(self, node: NodeProto) -> list[str]:
        """A node's explicit non-empty inputs followed by its subgraphs' implicit inputs."""
        cached = self.inputs_of.get(id(node))
        if cached is not None:
            return cached
        names = [i for i in node.input if i]
        names.extend(self.implicit.get(id(node), ()))
        return names

    def is_constant(self, name: str) -> bool:
        """True for initializers that are not also graph inputs (those can be overridden)."""
        return name in self.initializers and name not in self.graph_inputs

    def uses(self, name: str) -> int:
        """How many places read ``name``: node inputs plus graph outputs."""
        return len(self.consumers.get(name, ())) + (name in self.graph_outputs)


def rename_inputs(graph: GraphProto, mapping: dict[str, str], *, nested: bool = True) -> int:
    """Apply ``old -> new`` renames to every node input in ``graph`` and its subgraphs, in one sweep.

    It costs one pass over the graph however many names change. Chains (a->b, b->c) resolve to their end.
    The outputs of ``graph`` itself are not touched; those of nested subgraphs are. A
    subgraph that defines an old name again (shadowing) keeps reading its own value, and so
    do its subgraphs. Callers must make sure no subgraph defines a *new* name. ``nested=False``
    says the caller knows ``graph`` holds no subgraphs. Returns how many names were rewritten.
    """
    resolved = {old: _resolve(mapping, old) for old in mapping}
    resolved = {old: new for old, new in resolved.items() if old != new}
    if not resolved:
        return 0
    count = 0
    active: dict[int, dict[str, str]] = {}
    for scope in iter_scopes(graph) if nested else [GraphScope(graph)]:
        local = resolved if scope.parent is None else active[id(scope.parent)]
        if scope.parent is not None and local:
            shadowed = [name for name in defined_names(scope.graph) if name in local]
            if shadowed:
                local = {k: v for k, v in local.items() if k not in shadowed}
        active[id(scope)] = local
        if not local:
            continue
        for node in scope.graph.node:
            for idx, name in enumerate(node.input):
                new = local.get(name)
                if new is not None:
                    node.input[idx] = new
                    count += 1
        if scope.parent is not None:
            for out in scope.graph.output:
                new = local.get(out.name)
                if new is not None:
                    out.name = new
                    count += 1
    return count


def names_defined_below(graph: GraphProto) -> set[str]:
    """Names defined by the subgraphs nested in ``graph`` (at any depth), not by ``graph`` itself."""
    names: set[str] = set()
    for scope in iter_scopes(graph)[1:]:
        names |= defined_names(scope.graph)
    return names


def _resolve(mapping: dict[str, str], name: str) -> str:
    seen = {name}
    while name in mapping:
        name = mapping[name]
        if name in seen:
            raise ValueError(f"rename cycle through '{name}'")
        seen.add(name)
    return name


def all_names(model: ModelProto) -> set[str]:
    """Every value name used anywhere in the model, for generating fresh names."""
    names: set[str] = set()
    for scope in iter_scopes(model.graph):
        g = scope.graph
        names |= defined_names(g)
        names.update(o.name for o in g.output)
        names.update(v.name for v in g.value_info)
        for node in g.node:
            names.update(node.input)
    return names


class NameGenerator:
    """Deterministic fresh names that never collide with names in the model."""

    def __init__(self, model: ModelProto) -> None:
        self._taken = all_names(model)
        self._taken.update(n.name for s in iter_scopes(model.graph) for n in s.graph.node)

    def fresh(self, base: str) -> str:
        """Return ``base`` if free, else ``base_1``, ``base_2``, ... and reserve it."""
        name, counter = base, 0
        while name in self._taken:
            counter += 1
            name = f"{base}_{counter}"
        self._taken.add(name)
        return name


def opset_version(model: ModelProto, domain: str = "") -> int | None:
    """The model's imported opset version for ``domain`` ('' and 'ai.onnx' are the same)."""
    wanted = "" if domain in STANDARD_DOMAINS else domain
    for imp in model.opset_import:
        if (imp.domain if imp.domain not in STANDARD_DOMAINS else "") == wanted:
            return imp.version
    return None


def visible_outer_constants(scope: GraphScope) -> dict[str, onnx.TensorProto]:
    """Initializers of the graphs enclosing ``scope`` that its graph can read by name (a subgraph's captured weights).

    The nearest definition wins: a name that the graph itself or an intermediate scope defines (input, node
    output, initializer) shadows any further out; initializers that are also graph inputs (overridable) are left out.
    """
    found: dict[str, onnx.TensorProto] = {}
    shadowed = defined_names(scope.graph)
    parent = scope.parent
    while parent is not None:
        inputs = {i.name for i in parent.graph.input}
        for tensor in parent.graph.initializer:
            if tensor.name not in shadowed and tensor.name not in found and tensor.name not in inputs:
                found[tensor.name] = tensor
        shadowed |= defined_names(parent.graph)
        parent = parent.parent
    return found


def with_outer_constants(view: GraphView, scope: GraphScope) -> GraphView:
    """``view`` of a subgraph that also sees the constants it captures from enclosing graphs (read-only: a pass that
    rewrites a layer reading one writes its new tensors into the subgraph and leaves the outer tensor as it is)."""
    outer = visible_outer_constants(scope) if scope.parent is not None else {}
    if not outer:
        return view
    augmented = copy.copy(view)
    augmented.initializers = {**outer, **view.initializers}
    return augmented


def drop_unread_initializers(model: ModelProto, names: set[str]) -> int:
    """Remove the initializers called ``names`` that nothing reads any more in their graph or its subgraphs; returns how many.

    One that is also a graph input (an overridable default) stays: dropping it would change the model's inputs.
    """
    dropped = 0
    for scope in iter_scopes(model.graph):
        graph = scope.graph
        if not any(t.name in names for t in graph.initializer):
            continue
        used = {o.name for o in graph.output} | {i.name for i in graph.input}
        for node in graph.node:
            used.update(node.input)
            for sub in subgraphs(node):
                used |= outer_references(sub)
        kept = [t for t in graph.initializer if t.name not in names or t.name in used]
        if len(kept) != len(graph.initializer):
            dropped += len(graph.initializer) - len(kept)
            del graph.initializer[:]
            graph.initializer.extend(kept)
    return dropped
