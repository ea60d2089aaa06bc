"""No-op elimination: nodes that compute one of their inputs unchanged are removed.

The rules that recognise no-ops live in :mod:`onnxopt.passes.noop_rules`. This module
collects the matches of one graph, resolves chains of no-ops to the value they all
forward, and only then rewrites the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx import GraphProto, NodeProto

from onnxopt.errors import InvalidModelError
from onnxopt.graph import GraphScope, GraphView, rename_inputs
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_choices, option
from onnxopt.passes.noop_rules import RULES, match
from onnxopt.registry import register_pass


@dataclass
class Plan:
    """What to change in one graph, decided before anything is mutated.

    ``reads`` maps every name that disappears to the surviving name carrying the same
    value; ``renames`` maps a producer's output to the graph output it takes over;
    ``removed`` are the no-op nodes to delete; ``kept`` are no-op nodes that must stay
    because they produce a graph output (turned into Identity).
    """

    reads: dict[str, str] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    removed: list[NodeProto] = field(default_factory=list)
    kept: list[tuple[NodeProto, str]] = field(default_factory=list)


def resolve_roots(forward: dict[str, str]) -> dict[str, str]:
    """For every key of ``forward`` (output -> forwarded input), the first value not forwarded.

    Iterative with path compression, so chains of any length resolve in linear time.
    """
    root: dict[str, str] = {}
    for start in forward:
        path: list[str] = []
        name = start
        while name in forward and name not in root:
            path.append(name)
            name = forward[name]
            if len(path) > len(forward):
                raise InvalidModelError(f"the no-op nodes writing '{start}' form a cycle")
        target = root.get(name, name)
        for item in path:
            root[item] = target
    return root


def plan_graph(view: GraphView, forward: dict[str, str], nodes: dict[str, NodeProto]) -> Plan:
    """Decide which no-op nodes go and how reads are redirected (see :class:`EliminateNoops`)."""
    root = resolve_roots(forward)
    groups: dict[str, list[str]] = {}
    for out in forward:  # node order, so the plan is deterministic
        groups.setdefault(root[out], []).append(out)
    plan = Plan()
    outputs, inputs = view.graph_outputs, view.graph_inputs
    for source, members in groups.items():
        interface = [m for m in members if m in outputs]
        canonical = source
        if interface and source in view.producer and source not in outputs and source not in inputs:
            canonical = interface.pop(0)  # the producer of `source` writes this graph output instead
            plan.renames[source] = canonical
            plan.reads[source] = canonical
            plan.removed.append(nodes[canonical])
        for member in members:
            if member in interface:
                plan.kept.append((nodes[member], forward[member]))
            elif member != canonical:
                plan.reads[member] = canonical
                plan.removed.append(nodes[member])
    return plan


@register_pass
class EliminateNoops(Pass):
    """Remove nodes that pass an input through unchanged (Identity, x+0, x*1, full Slice, ...).

    Pre: types inferred (``ctx.types``). Recognised: Identity; Dropout in inference mode
    with its mask unused; Cast/CastLike to the same type; Reshape to the same static shape;
    Expand, Add/Sub of 0 and Mul/Div by 1 whose broadcast keeps the shape (Sub/Div only
    with the constant second); identity Transpose; all-zero Pad; whole-tensor Slice;
    Squeeze of a static shape without 1-dims and Unsqueeze with empty axes; Concat, Sum,
    Max, Min, Mean of one input and Split into one output. Custom-domain ops are opaque.

    Post: readers of a removed node's output (in subgraphs too) read its input instead;
    chains are resolved in one run. A graph output stays produced under its name: when
    the forwarded value is made by a node of the same graph (and is not an interface
    name), that node writes the output directly; otherwise the no-op node stays and, if it
    was not one already, becomes an Identity. Surviving values keep their types. Removing
    ``x + 0.0`` keeps -0.0 where the Add would have produced +0.0 (equal values).
    """

    name = "eliminate_noops"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    @dataclass
    class Options(PassOptions):
        """Options of eliminate_noops."""

        exclude: tuple[str, ...] = option((), "op types to leave alone, separated by '|', e.g. exclude=Add|Mul")

        def validate(self) -> None:
            """Every excluded op type must be one the pass knows."""
            check_choices("eliminate_noops", "exclude", self.exclude, RULES, what="op type")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every node of the graph, plan, then rewrite."""
        graph = scope.graph
        view = ctx.view(graph)
        excluded = frozenset(self.options.exclude)  # type: ignore[attr-defined]
        forward: dict[str, str] = {}
        nodes: dict[str, NodeProto] = {}
        for node in view.nodes:
            if node.op_type in RULES and node.op_type not in excluded:
                source = match(node, view, ctx)
                if source is not None:
                    forward[node.output[0]] = source
                    nodes[node.output[0]] = node
        result = PassResult()
        if not forward:
            return result
        plan = plan_graph(view, forward, nodes)
        self._apply(graph, view, plan, result)
        return result

    @staticmethod
    def _apply(graph: GraphProto, view: GraphView, plan: Plan, result: PassResult) -> None:
        """Mutate the graph as planned and count what changed."""
        for old, new in plan.renames.items():
            producer = view.producer[old]
            for index, out in enumerate(producer.output):
                if out == old:
                    producer.output[index] = new
        if plan.reads:
            rename_inputs(graph, plan.reads)
        dropped: list[str] = []
        for node, source in plan.kept:
            if node.op_type != "Identity":
                forwarded = plan.reads.get(source, source)
                output = node.output[0]
                node.op_type = "Identity"
                del node.attribute[:]
                del node.input[:]
                node.input.append(forwarded)
                dropped.extend(node.output[1:])
                del node.output[:]
                node.output.append(output)
                result.count("replaced_by_identity")
        if plan.removed:
            gone = {id(node) for node in plan.removed}
            kept_nodes = [node for node in view.nodes if id(node) not in gone]
            for node in plan.removed:
                result.count(node.op_type)
            del graph.node[:]
            graph.node.extend(kept_nodes)
        stale = set(plan.reads).union(dropped)
        for node in plan.removed:
            stale.update(node.output[1:])
        if any(v.name in stale for v in graph.value_info):
            fresh = [v for v in graph.value_info if v.name not in stale]
            del graph.value_info[:]
            graph.value_info.extend(fresh)
