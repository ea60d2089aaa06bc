"""Shared match/rewrite toolkit of the fusion passes.

A :class:`Fusion` records one match (the pattern's nodes and the op that replaces them);
matchers raise :class:`~onnxopt.passes.noop_rules.NoMatch` with a readable reason; after every
match of a graph was collected, :func:`select` drops overlapping or opset-blocked ones and
:func:`apply_fusions` rewrites the graph once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView, is_standard, node_label, opset_version
from onnxopt.passbase import PassContext, PassResult
from onnxopt.passes.noop_rules import NoMatch, constant_array, constant_tensor, dims_of, require

log = logging.getLogger("onnxopt")

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
REL_TOL = 1e-6


@dataclass
class Fusion:
    """One match: the pattern's nodes and the op that replaces them.

    ``inputs`` are value names, or numpy arrays that become new initializers at rewrite
    time; ``output`` is the pattern's last value, which the new node writes. ``domain`` is
    the new op's ("" standard; another domain is imported, version 1, when the rewrite emits
    it); ``outputs`` its full output list when it writes more than ``output`` ("" for an
    unused optional output); ``anchor`` the pattern node whose place it takes (default: the
    producer of ``output``). A subclass whose replacement is more than one node overrides
    :meth:`build`.
    """

    kind: str
    op_type: str
    inputs: list[str | np.ndarray]
    output: str
    nodes: list[NodeProto]
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    outputs: list[str] = field(default_factory=list)
    anchor: NodeProto | None = None

    def build(self, graph: GraphProto, ctx: PassContext) -> list[NodeProto]:
        """The new nodes (here one) that write :attr:`output`; array inputs become new initializers of ``graph``."""
        inputs = materialize_inputs(graph, self.inputs, f"{self.output}_{self.op_type.lower()}", ctx)
        name = ctx.names.fresh(f"{self.output}_{self.op_type}")
        outputs = self.outputs or [self.output]
        return [helper.make_node(self.op_type, inputs, outputs, name=name, domain=self.domain or None, **self.attrs)]


def import_domain(model: ModelProto, domain: str, version: int = 1) -> None:
    """Add an opset import of ``domain`` unless the model has one."""
    if domain and not any(imp.domain == domain for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def materialize_inputs(graph: GraphProto, items: list[str | np.ndarray], prefix: str, ctx: PassContext) -> list[str]:
    """Value names for ``items``: names stay, each array becomes a new initializer named ``{prefix}_in{index}``."""
    names: list[str] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            names.append(item)
            continue
        name = ctx.names.fresh(f"{prefix}_in{index}")
        graph.initializer.append(numpy_helper.from_array(item, name))
        names.append(name)
    return names


def replace_nodes(graph: GraphProto, nodes: list[NodeProto], replaced: dict[int, list[NodeProto]]) -> None:
    """Rebuild ``graph.node`` from ``nodes``: ids in ``replaced`` become their lists (empty: removed).

    ``nodes`` must be the node objects the ids were taken from (e.g. ``GraphView.nodes``),
    kept alive until now, and this must be the only rebuild (it copies the nodes, so views of the
    graph go stale: nothing is rebuilt when nothing is replaced).
    """
    if not replaced:
        return
    rebuilt: list[NodeProto] = []
    for node in nodes:
        rebuilt.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)


def drop_value_info(graph: GraphProto, stale: set[str]) -> None:
    """Remove the value_info entries of values that no longer exist."""
    if any(v.name in stale for v in graph.value_info):
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def const_name(view: GraphView, name: str) -> np.ndarray | None:
    """The value of a constant of this graph (initializer not a graph input, or Constant node), of any size, or None."""
    return constant_array(view, name, max_elements=None) if name else None


def scalar(view: GraphView, name: str) -> tuple[float, int] | None:
    """(value, rank) of a one-element floating-point constant, or None."""
    array = constant_array(view, name, max_elements=1) if name else None
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(-1)[0]), array.ndim


def close(value: float, expected: float, dtype: np.dtype | None = None) -> bool:
    """Whether ``value`` equals ``expected`` within 1e-6 relative (or the dtype's epsilon when coarser)."""
    tol = REL_TOL
    if dtype is not None and np.dtype(dtype).kind == "f":
        tol = max(tol, float(np.finfo(dtype).eps))
    return abs(value - expected) <= tol * abs(expected)


def producer(view: GraphView, name: str, op_type: str | tuple[str, ...]) -> NodeProto:
    """The standard node of type ``op_type`` writing ``name``; NoMatch otherwise."""
    node = view.producer.get(name)
    types = (op_type,) if isinstance(op_type, str) else op_type
    require(node is not None and node.op_type in types and is_standard(node), f"'{name}' is not made by {'/'.join(types)}")
    return node  # type: ignore[return-value]


def sole_reader(view: GraphView, name: str, op_type: str | tuple[str, ...]) -> NodeProto:
    """The only node reading ``name`` (once or several times), of type ``op_type``; NoMatch otherwise."""
    readers = unique(view.consumers.get(name, []))
    types = (op_type,) if isinstance(op_type, str) else op_type
    require(len(readers) == 1, f"'{name}' has {len(readers)} readers, the pattern needs one")
    node = readers[0]
    require(node.op_type in types and is_standard(node), f"'{name}' is read by {node.op_type}, not {'/'.join(types)}")
    return node


def sole_reader_is(view: GraphView, name: str, node: NodeProto) -> bool:
    """Whether ``node`` is the only reader of ``name`` (which is no graph output)."""
    readers = unique(view.consumers.get(name, []))
    return len(readers) == 1 and readers[0] is node and name not in view.graph_outputs


def unique(nodes: list[NodeProto]) -> list[NodeProto]:
    """``nodes`` without repeats (a node reading a value twice is listed twice by GraphView)."""
    seen: dict[int, NodeProto] = {}
    for node in nodes:
        seen.setdefault(id(node), node)
    return list(seen.values())


def other_input(node: NodeProto, name: str) -> str:
    """The other input of a two-input node one of whose inputs is ``name``."""
    require(len(node.input) == 2 and name in node.input, f"{node_label(node)} does not read '{name}' as one of two inputs")
    return node.input[1] if node.input[0] == name else node.input[0]


def check_private(view: GraphView, nodes: list[NodeProto], output: str, also: set[int] | None = None) -> None:
    """Every value the pattern's nodes write, except ``output``, must be read only inside the pattern (or by ``also``, node ids)."""
    members = {id(n) for n in nodes} | (also or set())
    for node in nodes:
        require(is_standard(node), f"{node_label(node)} is not a standard op")
        for name in node.output:
            if not name or name == output:
                continue
            require(name not in view.graph_outputs, f"the intermediate '{name}' is a graph output")
            outside = [r for r in view.consumers.get(name, []) if id(r) not in members]
            require(not outside, f"the intermediate '{name}' is also read by {node_label(outside[0])}" if outside else "")


def elem(ctx: PassContext, name: str) -> int:
    """The inferred element type of ``name`` (0 when unknown)."""
    type_proto = ctx.types.get(name)
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
        return 0
    return type_proto.tensor_type.elem_type


def rank(ctx: PassContext, name: str) -> int | None:
    """The inferred rank of ``name``, or None."""
    dims = dims_of(ctx.types.get(name))
    return None if dims is None else len(dims)


def apply_fusions(graph: GraphProto, view: GraphView, fusions: list[Fusion], ctx: PassContext, result: PassResult) -> None:
    """Replace each fusion's nodes by its new nodes (:meth:`Fusion.build`), placed where the pattern's output was made.

    Fusions must not share nodes. New initializers get fresh names; value_info of the values
    that disappeared is dropped.
    """
    if not fusions:
        return
    replaced: dict[int, list[NodeProto]] = {}
    stale: set[str] = set()
    for fusion in fusions:
        new_nodes = fusion.build(graph, ctx)
        written = {o for o in fusion.outputs or [fusion.output] if o}
        for old in fusion.nodes:
            replaced[id(old)] = []
            stale.update(o for o in old.output if o and o not in written)
        replaced[id(fusion.anchor if fusion.anchor is not None else view.producer[fusion.output])] = new_nodes
        result.count(fusion.kind)
        import_domain(ctx.model, fusion.domain)
    replace_nodes(graph, view.nodes, replaced)
    drop_value_info(graph, stale)


def collect(view: GraphView, op_type: str, matcher: Callable[[NodeProto], Fusion], pass_name: str) -> list[Fusion]:
    """Every match of ``matcher`` anchored at a standard node of ``op_type`` (misses logged with their reason)."""
    found: list[Fusion] = []
    for node in view.nodes:
        if node.op_type != op_type or not is_standard(node):
            continue
        try:
            found.append(matcher(node))
        except NoMatch as exc:
            debug(pass_name, node, exc)
    return found


def select(fusions: list[Fusion], claimed: set[int], ctx: PassContext, pass_name: str, result: PassResult) -> list[Fusion]:
    """Fusions that do not overlap earlier ones and whose op the model's opset has.

    Matches blocked by the opset are reported once per kind as a note with the reason.
    """
    opset = opset_version(ctx.model) or 1
    chosen: list[Fusion] = []
    blocked: Counter = Counter()
    needed: dict[str, tuple[str, int]] = {}
    for fusion in fusions:
        ids = {id(n) for n in fusion.nodes}
        if ids & claimed:
            continue
        if opset < fusion.opset:
            blocked[fusion.kind] += 1
            needed[fusion.kind] = (fusion.op_type, fusion.opset)
            continue
        claimed |= ids
        chosen.append(fusion)
    for kind, amount in blocked.items():
        op, version = needed[kind]
        result.notes.append(
            f"{pass_name}: {amount} {kind} subgraph(s) kept: {op} needs ai.onnx opset >= {version}, the model imports {opset}"
        )
    return chosen


def debug(pass_name: str, node: NodeProto, exc: NoMatch) -> None:
    """Log why a candidate anchor node did not match (debug level)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s does not match: %s", pass_name, node_label(node), exc)


def gemm_bias_vector(view: GraphView, name: str, beta: float, n: int) -> np.ndarray | None:
    """Gemm's ``beta * C`` as an [N] vector when C is a constant that broadcasts along the columns only."""
    tensor = constant_tensor(view, name)
    if tensor is None:
        return None
    c = numpy_helper.to_array(tensor)
    if c.ndim > 2 or any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, n)):
        return None
    return np.broadcast_to((c.astype(np.float64) * beta).reshape(-1), (n,)).astype(c.dtype)
