"""Attention fusion: exporter scaled dot-product attention subgraphs become one attention op.

The matcher proves every reshape of the pattern with the layout algebra of
:mod:`onnxopt.passes.attention_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from onnxopt.graph import GraphScope, GraphView, is_standard, opset_version
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.passes.attention_layout import (
    MAX_CONE,
    SHAPE_OPS,
    Layout,
    Proof,
    Term,
    axis_term,
    dim_terms,
    fits,
    product,
    reshape_layout,
    roles,
    sized,
)
from onnxopt.passes.contrib_ops import MS_DOMAIN, MS_VERSION
from onnxopt.passes.fusion_support import (
    Fusion,
    check_private,
    const_name,
    debug,
    drop_value_info,
    elem,
    import_domain,
    other_input,
    producer,
    replace_nodes,
    select,
    sole_reader_is,
    unique,
)
from onnxopt.passes.noop_rules import NoMatch, dims_of, get_attr, require
from onnxopt.registry import register_pass

LAYOUT_OPS = ("Transpose", "Reshape")
SCALE_OPS = ("Mul", "Div")
MAX_CHAIN = 12

# ----------------------------------------------------------------------------- chains


@dataclass
class Chain:
    """A Q, K or V operand: its rank-3 source, the layout and scale nodes after it, and its factor."""

    source: str
    nodes: list[NodeProto]
    scale: float
    layout: Layout
    unit: set[str]


def scalar_factor(node: NodeProto, data: str, view: GraphView, ctx: PassContext) -> float:
    """The factor ``data * c`` or ``data / c`` applies, for a one-element float constant c; NoMatch otherwise."""
    require(node.op_type in SCALE_OPS and len(node.input) == 2, "not a scaling")
    require(node.input[0] == data or node.op_type == "Mul", "the scale divides instead of being divided")
    other = other_input(node, data)
    array = const_name(view, other)
    require(array is not None, f"the scale '{other}' is not a constant")
    require(array.size == 1 and array.dtype.kind == "f", "the scale is not a one-element float constant")  # type: ignore[union-attr]
    require(elem(ctx, other) == elem(ctx, data), "the scale has another dtype")
    x_rank = len(dims_of(ctx.types.get(data)) or [])
    require(array.ndim <= x_rank, "the scale raises the rank")  # type: ignore[union-attr]
    value = float(array.reshape(-1)[0])  # type: ignore[union-attr]
    require(np.isfinite(value) and value != 0.0, "the scale is zero or not finite")
    return value if node.op_type == "Mul" else 1.0 / value


def scaled_operand(node: NodeProto, view: GraphView, ctx: PassContext) -> tuple[str, float]:
    """(data input, factor) of a Mul or Div by a one-element float constant; NoMatch otherwise."""
    require(node.op_type in SCALE_OPS and len(node.input) == 2, "not a scaling")
    if node.op_type == "Div":
        data = node.input[0]
    else:
        data = node.input[0] if const_name(view, node.input[1]) is not None else node.input[1]
    return data, scalar_factor(node, data, view, ctx)


def readers_but_shape(view: GraphView, name: str) -> list[NodeProto]:
    """The readers of ``name`` other than Shape nodes (those are checked with the dead cone)."""
    return [r for r in unique(view.consumers.get(name, [])) if r.op_type != "Shape"]


def back_chain(view: GraphView, ctx: PassContext, name: str, proof: Proof, tag: str, seq_role: str) -> Chain:
    """Walk back from a MatMul operand through private Transpose/Reshape/scalar Mul-Div to its rank-3 source."""
    nodes: list[NodeProto] = []
    current = name
    while len(nodes) < MAX_CHAIN:
        node = view.producer.get(current)
        if node is None or not is_standard(node) or node.op_type not in LAYOUT_OPS + SCALE_OPS:
            break
        if nodes and (len(readers_but_shape(view, current)) != 1 or current in view.graph_outputs):
            break
        if node.op_type in SCALE_OPS:
            try:
                data = scaled_operand(node, view, ctx)[0]
            except NoMatch:
                break
        else:
            data = node.input[0]
        nodes.append(node)
        current = data
    source = current
    dims = dim_terms(ctx, source, placeholder=source)
    require(dims is not None and len(dims) == 3, f"the {tag} source '{source}' is not known to have rank 3")
    require(isinstance(dims[2], int) and dims[2] > 0, f"the hidden size of the {tag} source is not static")  # type: ignore[index]
    layout: Layout = [[("B", sized(dims[0]))], [(seq_role, sized(dims[1]))], [("D", sized(dims[2]))]]  # type: ignore[index]
    proof.layouts[source] = layout
    proof.origin[source] = tag
    scale = 1.0
    for node in reversed(nodes):
        if node.op_type in SCALE_OPS:
            scale *= scaled_operand(node, view, ctx)[1]
        elif node.op_type == "Transpose":
            perm = get_attr(node, "perm")
            perm = list(reversed(range(len(layout)))) if perm is None else [int(p) for p in perm]  # type: ignore[union-attr]
            require(sorted(perm) == list(range(len(layout))), "a Transpose perm does not fit the rank")
            layout = [layout[p] for p in perm]
        else:
            require(len(node.input) == 2, "a Reshape without a shape input")
            target, is_scalar = proof.value(node.input[1])
            require(not is_scalar, "a scalar Reshape target")
            layout = reshape_layout(layout, target, bool(get_attr(node, "allowzero", 0)))
        proof.layouts[node.output[0]] = layout
        proof.origin[node.output[0]] = tag
    unit = {role for role, d in (("B", dims[0]), (seq_role, dims[1])) if d == 1}  # type: ignore[index]
    return Chain(source, nodes, scale, layout, unit)


def expect(chain: Chain, want: list[str], what: str) -> None:
    """Require the chain's layout roles to be exactly ``want`` (one atom per axis)."""
    require(fits(chain.layout, [[w] for w in want], chain.unit), f"the {what} operand has layout {roles(chain.layout)}, not {want}")


# ----------------------------------------------------------------------------- the match


@dataclass
class Plan:
    """One attention match: operands, proven sizes, mask and what to emit."""

    fusion: Fusion
    q: str
    k: str
    v: str
    heads: int
    scale: float
    mask: str | None
    mask_dims: list[Term] | None
    expand: bool
    guard: bool
    dtype: int
    seq: Term
    kv_seq: Term
    packed: Packed | None = None
    shapes: list[tuple[NodeProto, ShapeSpec]] = field(default_factory=list)
    lowest_mask: bool = False  # the mask is built with the lowest float (fully masked rows average V)
    tail: bool = False  # the pattern's last Reshape stays: the fused op writes its (B, S, N*Hv) input, renamed in place


@dataclass
class Packed:
    """Q, K, V projections of one input packed for com.microsoft Attention: (Din, 3D) weight, (3D,) bias."""

    x: str
    weight: np.ndarray
    bias: np.ndarray
    nodes: list[NodeProto]
    dropped: list[str]


def projection(view: GraphView, ctx: PassContext, source: str) -> tuple[str, str, str | None, list[NodeProto]]:
    """``[Add(] MatMul(x, W) [, b)]`` writing ``source``: (x, W name, b name or None, nodes); W and b private constants."""
    node = producer(view, source, ("MatMul", "Add"))
    nodes = [node]
    bias = None
    if node.op_type == "Add":
        mm = next((view.producer[i] for i in node.input if i in view.producer and view.producer[i].op_type == "MatMul"), None)
        require(mm is not None and is_standard(mm), "the projection Add does not add to a MatMul")
        bias = other_input(node, mm.output[0])  # type: ignore[union-attr]
        nodes.insert(0, mm)  # type: ignore[arg-type]
        node = mm  # type: ignore[assignment]
    x, weight = node.input
    for name in (weight, bias):
        if name is None:
            continue
        require(const_name(view, name) is not None, f"the projection constant '{name}' is not a constant of this graph")
        require(len(unique(view.consumers.get(name, []))) == 1 and name not in view.graph_outputs, f"the weight '{name}' is shared")
    return x, weight, bias, nodes


def match_packed(view: GraphView, ctx: PassContext, plan: Plan, hidden: int) -> Packed:
    """The three projections of ``plan`` as one packed weight; NoMatch unless they read one input with private weights."""
    parts = [projection(view, ctx, src) for src in (plan.q, plan.k, plan.v)]
    xs = {p[0] for p in parts}
    require(len(xs) == 1, "Q, K and V are projected from different inputs")
    x = parts[0][0]
    x_dims = dims_of(ctx.types.get(x))
    require(
        x_dims is not None and len(x_dims) == 3 and x_dims[2] is not None, "the projected input is not rank 3 with a static hidden size"
    )
    weights, biases = [], []
    for _, w, b, _ in parts:
        array = const_name(view, w)
        require(array is not None and array.shape == (x_dims[2], hidden), f"the weight '{w}' is not ({x_dims[2]}, {hidden})")  # type: ignore[index, union-attr]
        weights.append(array)
        bias = np.zeros(hidden, array.dtype) if b is None else const_name(view, b)  # type: ignore[union-attr]
        require(bias is not None and bias.shape == (hidden,) and bias.dtype == array.dtype, "a projection bias is not a (D,) vector")  # type: ignore[union-attr]
        biases.append(bias)
    require(all(w.dtype == helper.tensor_dtype_to_np_dtype(plan.dtype) for w in weights), "the weights have another dtype")
    nodes = [n for p in parts for n in p[3]]
    dropped = sorted({name for _, w, b, _ in parts for name in (w, b) if name and view.is_constant(name)})
    return Packed(x, np.concatenate(weights, axis=1), np.concatenate(biases), nodes, dropped)


def size_eq(a: Term, b: Term) -> bool:
    """Whether two terms are provably equal."""
    return sized(a) == sized(b)


def finite_mask(view: GraphView, name: str) -> bool:
    """Whether the mask is provably finite: a finite constant or a Where of two finite constants."""
    array = const_name(view, name)
    if array is not None:
        return bool(np.isfinite(array).all())
    node = view.producer.get(name)
    if node is None or node.op_type != "Where" or not is_standard(node):
        return False
    branches = [const_name(view, i) for i in node.input[1:]]
    return all(b is not None and bool(np.isfinite(b).all()) for b in branches)


def lowest_float_mask(view: GraphView, name: str, dtype: int) -> bool:
    """Whether the mask is built with the dtype's lowest finite value (a Where branch or a Mul factor)."""
    node = view.producer.get(name)
    if node is None or node.op_type not in ("Where", "Mul") or not is_standard(node):
        return False
    lowest = float(np.finfo(helper.tensor_dtype_to_np_dtype(dtype)).min)
    arrays = [const_name(view, i) for i in node.input]
    return any(a is not None and a.dtype.kind == "f" and bool((a <= lowest).any()) and bool(np.isfinite(a).all()) for a in arrays)


def check_mask(ctx: PassContext, mask: str, full: list[Term], dtype: int) -> tuple[list[Term] | None, bool]:
    """Mask dims (None when not inferred) and whether it must be expanded to (., ., S, T); NoMatch when not broadcastable."""
    require(elem(ctx, mask) == dtype, "the mask has another dtype than the scores")
    dims = dims_of(ctx.types.get(mask))
    require(dims is not None, "the rank of the mask is unknown")
    require(len(dims) <= 4, "the mask has rank > 4")  # type: ignore[arg-type]
    terms = dim_terms(ctx, mask, placeholder="mask")
    aligned: list[Term] = [1] * (4 - len(terms)) + list(terms)  # type: ignore[arg-type]
    proven = True
    for i, (m, f) in enumerate(zip(aligned, full)):
        if m == 1 or size_eq(m, f):
            continue
        require(not (isinstance(m, int) and isinstance(f, int)), f"the mask dim {i} ({m}) does not broadcast to {f}")
        proven = False
    expand = len(terms) < 4 or not proven or not (size_eq(aligned[2], full[2]) and size_eq(aligned[3], full[3]))  # type: ignore[arg-type]
    return aligned, expand


def dead_cone(view: GraphView, removed: list[NodeProto], seeds: list[str]) -> list[NodeProto]:
    """Nodes computing ``seeds`` (shape inputs of the pattern) that only the pattern reads: they die with it."""
    gone = {id(n) for n in removed}
    cone: dict[int, NodeProto] = {}
    stack = list(seeds)
    while stack and len(cone) < MAX_CONE:
        node = view.producer.get(stack.pop())
        if node is None or id(node) in cone or id(node) in gone or node.op_type not in SHAPE_OPS or not is_standard(node):
            continue
        cone[id(node)] = node
        stack.extend(i for i in node.input if i)
    order = {id(n): i for i, n in enumerate(view.nodes)}
    dead: list[NodeProto] = []
    for node in sorted(cone.values(), key=lambda n: -order[id(n)]):
        outs = [o for o in node.output if o]
        if any(o in view.graph_outputs for o in outs):
            continue
        if all(id(r) in gone for o in outs for r in view.consumers.get(o, [])) and any(view.consumers.get(o) for o in outs):
            gone.add(id(node))
            dead.append(node)
    return dead


ShapeSpec = list[int | tuple[int, str, str]]  # per axis: a static size, or (factor, "q"/"k"/"v", role "B"/"S"/"T")


def live_shapes(view: GraphView, nodes: list[NodeProto], output: str, proof: Proof) -> list[tuple[NodeProto, ShapeSpec]]:
    """Shape nodes outside the pattern reading its intermediates, with their values rebuilt from the proven layouts.

    Such a Shape (an exporter's shape computation shared with other blocks) is replaced by Shape
    slices of the surviving Q/K/V sources (or the packed input); NoMatch when an axis mixes symbols.
    """
    members = {id(n) for n in nodes}
    found: list[tuple[NodeProto, ShapeSpec]] = []
    for node in nodes:
        for name in node.output:
            if not name or name == output:
                continue
            for reader in unique(view.consumers.get(name, [])):
                if id(reader) in members or reader.op_type != "Shape" or not is_standard(reader) or reader.input[0] != name:
                    continue
                layout = proof.layouts.get(name)
                require(layout is not None and name in proof.origin, f"the shape of '{name}' is read elsewhere")
                spec: ShapeSpec = []
                for axis in layout:  # type: ignore[union-attr]
                    coef, syms = product([a[1] for a in axis])
                    symbolic = [a[0] for a in axis if a[1][1]]
                    if not syms:
                        spec.append(coef)
                        continue
                    require(
                        len(symbolic) == 1 and len(syms) == 1 and symbolic[0] in ("B", "S", "T"), f"the shape of '{name}' mixes symbols"
                    )
                    spec.append((coef, proof.origin[name], symbolic[0]))
                n = len(spec)
                start, end = int(get_attr(reader, "start", 0)), get_attr(reader, "end", None)  # type: ignore[arg-type]
                lo, hi = max(-n, min(start, n)), (n if end is None else max(-n, min(int(end), n)))  # type: ignore[arg-type]
                found.append((reader, spec[slice(lo, hi)]))
    return found


def match_attention(softmax: NodeProto, view: GraphView, ctx: PassContext, op_type: str, opset: int, packed: bool = False) -> Plan:
    """``Softmax`` anchoring ``MatMul(Softmax(MatMul(Q, K^T) * scale + mask), V)`` (see :class:`FuseAttention`)."""
    require(softmax.op_type == "Softmax" and is_standard(softmax), "not a Softmax")
    scores_rank = len(dims_of(ctx.types.get(softmax.input[0])) or [])
    require(scores_rank == 4, "the Softmax input is not known to have rank 4")
    axis = int(get_attr(softmax, "axis", -1 if (opset_version(ctx.model) or 1) >= 13 else 1))  # type: ignore[arg-type]
    require(axis in (-1, 3), "the Softmax is not on the last axis")
    dtype = elem(ctx, softmax.input[0])
    require(dtype in (TensorProto.FLOAT, TensorProto.FLOAT16), "the scores are not float or float16")
    require(
        dtype == TensorProto.FLOAT or op_type != "MultiHeadAttention" or ctx.target == "ort-gpu", "float16 MultiHeadAttention is CUDA only"
    )
    # scores side: [Add(mask)] <- [Mul/Div scalar]* <- MatMul(q, k)
    core: list[NodeProto] = [softmax]
    current = softmax.input[0]
    mask: str | None = None
    node = view.producer.get(current)
    if node is not None and node.op_type == "Add" and is_standard(node):
        require(len(node.input) == 2 and node.input[0] != node.input[1], "the Add before the Softmax is not scores + mask")
        found = None
        for data in node.input:
            try:
                found = scores_chain(view, ctx, data), data
                break
            except NoMatch:
                continue
        require(found is not None, "the Add before the Softmax does not add a mask to scaled Q*K scores")
        (scale_nodes, scale, qk), data = found  # type: ignore[misc]
        mask = other_input(node, data)
        core.append(node)
    else:
        scale_nodes, scale, qk = scores_chain(view, ctx, current)
    core += scale_nodes
    core.append(qk)
    proof = Proof(ctx, view)
    q = back_chain(view, ctx, qk.input[0], proof, "q", "S")
    k = back_chain(view, ctx, qk.input[1], proof, "k", "T")
    expect(q, ["B", "D.0", "S", "D.1"], "query")
    expect(k, ["B", "D.0", "D.1", "T"], "key")
    # value side: Softmax -> [IsNaN + Where guard] -> MatMul(p, v)
    probs = softmax.output[0]
    guard = False
    readers = unique(view.consumers.get(probs, []))
    if len(readers) == 2 and {r.op_type for r in readers} == {"IsNaN", "Where"}:
        isnan = next(r for r in readers if r.op_type == "IsNaN")
        where = next(r for r in readers if r.op_type == "Where")
        zero = const_name(view, where.input[1])
        require(list(where.input) == [isnan.output[0], where.input[1], probs], "the Where is not a NaN guard")
        require(zero is not None and zero.size == 1 and float(zero.reshape(-1)[0]) == 0.0, "the NaN guard does not write 0")  # type: ignore[union-attr]
        require(sole_reader_is(view, isnan.output[0], where), "the IsNaN is read elsewhere")
        core += [isnan, where]
        probs = where.output[0]
        guard = True
    pv = single_reader(view, probs, "MatMul")
    require(pv.input[0] == probs, "the probabilities are not the left MatMul operand")
    core.append(pv)
    v = back_chain(view, ctx, pv.input[1], proof, "v", "T")
    expect(v, ["B", "D.0", "T", "D.1"], "value")
    require(all(x.op_type not in SCALE_OPS for x in v.nodes), "the value is scaled")
    # sizes agree
    b, n, s, h = (axis_term(q.layout[i]) for i in range(4))
    kb, kn, kh, t = (axis_term(k.layout[i]) for i in range(4))
    vb, vn, vt, hv = (axis_term(v.layout[i]) for i in range(4))
    require(isinstance(n, int) and isinstance(h, int) and isinstance(hv, int), "the head count or head size is not static")
    require(size_eq(b, kb) and size_eq(b, vb), "Q, K and V batch sizes are not provably equal")
    require(n == kn == vn, "Q, K and V head counts differ")
    require(h == kh, "Q and K head sizes differ")
    require(size_eq(t, vt), "K and V sequence lengths are not provably equal")
    # output side: MatMul(p, v) -> Transpose/Reshape chain -> (B, S, N * Hv)
    layout: Layout = [[("B", sized(b))], [("N", (n, ()))], [("S", sized(s))], [("H", (hv, ()))]]  # type: ignore[list-item]
    proof.layouts[pv.output[0]] = layout
    proof.origin[pv.output[0]] = "q"
    current = pv.output[0]
    out_nodes: list[NodeProto] = []
    unit = {role for role, d in (("B", b), ("S", s)) if d == 1}
    tail: NodeProto | None = None
    while not fits(layout, [["B"], ["S"], ["N", "H"]], unit):
        require(len(out_nodes) < MAX_CHAIN, "the output chain is too long")
        require(current not in view.graph_outputs, f"the intermediate '{current}' is a graph output")
        nxt = readers_but_shape(view, current)
        require(
            len(nxt) == 1 and nxt[0].op_type in LAYOUT_OPS and is_standard(nxt[0]), "the attention output is not reshaped to (B, S, hidden)"
        )
        node = nxt[0]
        require(node.input[0] == current, "the output chain reads the value as a shape")
        if node.op_type == "Transpose":
            perm = get_attr(node, "perm")
            perm = list(reversed(range(len(layout)))) if perm is None else [int(p) for p in perm]  # type: ignore[union-attr]
            require(sorted(perm) == list(range(len(layout))), "a Transpose perm does not fit the rank")
            layout = [layout[p] for p in perm]
        else:
            in_order = [r for axis in roles(layout) for r in axis] == [r for r in ("B", "S", "N", "H") if r not in unit]
            try:
                target, is_scalar = proof.value(node.input[1])
                require(not is_scalar, "a scalar Reshape target")
                reshaped = reshape_layout(layout, target, bool(get_attr(node, "allowzero", 0)))
                require(not in_order or fits(reshaped, [["B"], ["S"], ["N", "H"]], unit), "the Reshape does not make (B, S, hidden)")
            except NoMatch:
                if not in_order:
                    raise
                tail = node  # the data is (B, S, N*Hv) in row-major order: this Reshape stays, reading the fused output
                break
            layout = reshaped
        out_nodes.append(node)
        current = node.output[0]
        proof.layouts[current] = layout
        proof.origin[current] = "q"
    output = current
    if tail is not None:
        require(len(unique(view.consumers.get(output, []))) == 1 and output not in view.graph_outputs, f"'{output}' is read elsewhere")
    require(elem(ctx, v.source) == dtype and elem(ctx, q.source) == dtype and elem(ctx, k.source) == dtype, "Q, K, V dtypes differ")
    nodes = [*q.nodes, *k.nodes, *v.nodes, *core, *out_nodes]
    seeds = [n.input[1] for n in nodes if n.op_type == "Reshape"]
    seeds += [r.output[0] for n in nodes for o in n.output for r in view.consumers.get(o, []) if r.op_type == "Shape"]
    nodes += dead_cone(view, nodes, seeds)
    shapes = live_shapes(view, nodes, output, proof)
    check_private(view, nodes, output, {id(node) for node, _ in shapes})
    total = scale * q.scale * k.scale
    mask_dims, expand, lowest = (None, False, False)
    if mask is not None:
        mask_dims, expand = check_mask(ctx, mask, [b, n, s, t], dtype)
        lowest = lowest_float_mask(view, mask, dtype)
        if guard and finite_mask(view, mask):
            guard = False
    elif guard:
        guard = False
    fusion = Fusion("attention", op_type, [q.source, k.source, v.source], output, nodes, opset, {})
    plan = Plan(fusion, q.source, k.source, v.source, n, total, mask, mask_dims, expand, guard, dtype, s, t)
    plan.tail = tail is not None
    plan.lowest_mask = lowest
    plan.shapes = shapes
    if packed and op_type == "MultiHeadAttention" and h == hv:
        try:
            plan.packed = match_packed(view, ctx, plan, n * h)
            extended = nodes + plan.packed.nodes
            extended += dead_cone(
                view,
                extended,
                [r.output[0] for x in plan.packed.nodes for r in view.consumers.get(x.output[0], []) if r.op_type == "Shape"],
            )
            plan.shapes = live_shapes(view, extended, output, proof)
            check_private(view, extended, output, {id(node) for node, _ in plan.shapes})
            fusion.nodes = extended
            fusion.op_type = "Attention"
        except NoMatch as exc:
            plan.packed = None
            debug("fuse_attention", softmax, NoMatch(f"kept as MultiHeadAttention, not packed: {exc}"))
    return plan


def scores_chain(view: GraphView, ctx: PassContext, name: str) -> tuple[list[NodeProto], float, NodeProto]:
    """``MatMul(q, k)`` then Mul/Div by one-element constants up to ``name``: (scale nodes, factor, MatMul)."""
    nodes: list[NodeProto] = []
    scale = 1.0
    current = name
    while True:
        node = producer(view, current, ("MatMul", *SCALE_OPS))
        if node.op_type == "MatMul":
            return nodes, scale, node
        require(len(nodes) < MAX_CHAIN, "too many scalings")
        current, factor = scaled_operand(node, view, ctx)
        scale *= factor
        nodes.append(node)


def single_reader(view: GraphView, name: str, op_type: str) -> NodeProto:
    """The only non-Shape reader of ``name``, of type ``op_type``; NoMatch otherwise."""
    readers = readers_but_shape(view, name)
    require(len(readers) == 1 and readers[0].op_type == op_type and is_standard(readers[0]), f"'{name}' is not read by one {op_type}")
    return readers[0]


# ----------------------------------------------------------------------------- the rewrite


class Emitter:
    """Builds the new nodes of one graph, sharing the expanded masks between attention blocks."""

    def __init__(self, graph: Any, ctx: PassContext) -> None:
        self.graph = graph
        self.ctx = ctx
        self.cache: dict[tuple, str] = {}

    def const(self, base: str, array: np.ndarray) -> str:
        """A new initializer."""
        name = self.ctx.names.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, out: list[NodeProto], op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        """Append a new standard node writing a fresh value; return its name."""
        name = self.ctx.names.fresh(base)
        out.append(helper.make_node(op, inputs, [name], name=self.ctx.names.fresh(f"{base}_{op}"), **attrs))
        return name

    def dim(self, out: list[NodeProto], source: str, index: int, base: str) -> str:
        """A 1-D int64 tensor holding dim ``index`` of ``source`` at run time."""
        if (opset_version(self.ctx.model) or 1) >= 15:
            return self.node(out, "Shape", [source], base, start=index, end=index + 1)
        shape = self.node(out, "Shape", [source], f"{base}_shape")
        lo, hi = self.const(f"{base}_lo", np.array([index], np.int64)), self.const(f"{base}_hi", np.array([index + 1], np.int64))
        return self.node(out, "Slice", [shape, lo, hi], base)

    def bias(self, out: list[NodeProto], plan: Plan) -> str:
        """The mask as a rank-4 (B|1, N|1, S, T) attention bias."""
        assert plan.mask is not None
        if not plan.expand:
            return plan.mask
        key = (plan.mask, repr(plan.seq), repr(plan.kv_seq)) if all(not _placeholder(x) for x in (plan.seq, plan.kv_seq)) else None
        key = key or (plan.mask, plan.q, plan.k)
        if key in self.cache:
            return self.cache[key]
        base = f"{plan.mask}_bias"
        if isinstance(plan.seq, int) and isinstance(plan.kv_seq, int):
            shape = self.const(f"{base}_shape", np.array([1, 1, plan.seq, plan.kv_seq], np.int64))
        else:
            ones = self.const(f"{base}_ones", np.array([1, 1], np.int64))
            s = self.dim(out, plan.packed.x if plan.packed else plan.q, 1, f"{base}_s")
            t = self.dim(out, plan.packed.x if plan.packed else plan.k, 1, f"{base}_t")
            shape = self.node(out, "Concat", [ones, s, t], f"{base}_shape", axis=0)
        name = self.node(out, "Expand", [plan.mask, shape], base)
        self.cache[key] = name
        return name

    def shape(self, plan: Plan, node: NodeProto, spec: ShapeSpec) -> list[NodeProto]:
        """Nodes writing what the Shape ``node`` read from a removed intermediate, from the surviving sources."""
        out: list[NodeProto] = []
        base = node.output[0]
        parts: list[str] = []
        for item in spec:
            if isinstance(item, int):
                parts.append(self.const(f"{base}_dim", np.array([item], np.int64)))
                continue
            coef, tag, role = item
            source = plan.packed.x if plan.packed else {"q": plan.q, "k": plan.k, "v": plan.v}[tag]
            dim = self.dim(out, source, 0 if role == "B" else 1, f"{base}_{role}")
            if coef != 1:
                dim = self.node(out, "Mul", [dim, self.const(f"{base}_factor", np.array([coef], np.int64))], f"{base}_{role}x")
            parts.append(dim)
        if not parts:
            parts.append(self.const(f"{base}_empty", np.zeros(0, np.int64)))
        out.append(helper.make_node("Concat", parts, [base], name=self.ctx.names.fresh(f"{base}_Concat"), axis=0))
        return out

    def emit(self, plan: Plan) -> list[NodeProto]:
        """The nodes replacing one match, the last one writing the pattern's output."""
        out: list[NodeProto] = []
        output = plan.fusion.output
        target = self.ctx.names.fresh(f"{output}_attention") if plan.guard else output
        bias = self.bias(out, plan) if plan.mask is not None else ""
        if plan.packed is not None:
            weight = self.const(f"{output}_qkv_weight", plan.packed.weight)
            qkv_bias = self.const(f"{output}_qkv_bias", plan.packed.bias)
            inputs = [plan.packed.x, weight, qkv_bias, "", "", bias] if bias else [plan.packed.x, weight, qkv_bias]
            attrs: dict[str, Any] = {"num_heads": plan.heads, "scale": plan.scale}
            domain = MS_DOMAIN
        elif plan.fusion.op_type == "MultiHeadAttention":
            inputs = [plan.q, plan.k, plan.v, "", "", bias] if bias else [plan.q, plan.k, plan.v]
            attrs = {"num_heads": plan.heads, "scale": plan.scale}
            domain = MS_DOMAIN
        else:
            inputs = [plan.q, plan.k, plan.v, bias] if bias else [plan.q, plan.k, plan.v]
            attrs = {"q_num_heads": plan.heads, "kv_num_heads": plan.heads, "scale": plan.scale}
            domain = ""
        out.append(
            helper.make_node(
                plan.fusion.op_type, inputs, [target], name=self.ctx.names.fresh(f"{output}_{plan.fusion.op_type}"), domain=domain, **attrs
            )
        )
        if plan.guard:
            isnan = self.node(out, "IsNaN", [target], f"{output}_isnan")
            zero = self.const(f"{output}_zero", np.zeros((), helper.tensor_dtype_to_np_dtype(plan.dtype)))
            out.append(helper.make_node("Where", [isnan, zero, target], [output], name=self.ctx.names.fresh(f"{output}_guard")))
        return out


def _placeholder(x: Term) -> bool:
    """Whether a term holds an unnamed (placeholder) symbol."""
    return not isinstance(x, int) and any(s.startswith("?") for s in x[1])


def rewrite(scope: GraphScope, view: GraphView, plans: list[Plan], ctx: PassContext, result: PassResult) -> None:
    """Replace every chosen match by its new nodes, placed where the pattern's output was written."""
    if not plans:
        return
    order = {id(n): i for i, n in enumerate(view.nodes)}
    plans = sorted(plans, key=lambda p: order[id(view.producer[p.fusion.output])])
    emitter = Emitter(scope.graph, ctx)
    replaced: dict[int, list[NodeProto]] = {}
    stale: set[str] = set()
    for plan in plans:
        for old in plan.fusion.nodes:
            replaced[id(old)] = []
            stale.update(o for o in old.output if o and (o != plan.fusion.output or plan.tail))
        replaced[id(view.producer[plan.fusion.output])] = emitter.emit(plan)
        for node, spec in plan.shapes:
            replaced[id(node)] = emitter.shape(plan, node, spec)
        result.count("attention")
    replace_nodes(scope.graph, view.nodes, replaced)
    drop_value_info(scope.graph, stale)
    dropped = {name for p in plans if p.packed for name in p.packed.dropped}
    if dropped:
        kept_init = [t for t in scope.graph.initializer if t.name not in dropped]
        del scope.graph.initializer[:]
        scope.graph.initializer.extend(kept_init)
    if any(p.fusion.op_type == "MultiHeadAttention" or p.packed for p in plans):
        import_domain(ctx.model, MS_DOMAIN, MS_VERSION)


@register_pass
class FuseAttention(Pass):
    """Fuse exporter scaled dot-product attention into one op: com.microsoft (ort-*) or ai.onnx Attention (opset >= 23).

    Pre: types inferred (``ctx.types``). Matched, anchored at a Softmax on the last axis of a
    rank-4 float tensor: ``MatMul(Softmax(MatMul(Q', K') [* / c]* [+ mask]) [NaN guard], V')``
    where Q', K', V' are private chains of Transpose, Reshape and Mul/Div by one-element float
    constants from rank-3 (B, S, D) / (B, T, D) / (B, T, Dv) sources with a static hidden size,
    and the output goes through Transpose/Reshape to (B, S, N * Hv). Every Reshape is proven
    from constants and Shape/Gather/Slice/Concat/Unsqueeze chains (0 and -1 honoured), so that
    Q' is exactly (B, N, S, H) with head n holding channels [n*H, (n+1)*H), K' exactly
    (B, N, H, T) (one Transpose, two Transposes or the 3-D Reshape/Transpose form of sdpa
    exports), V' (B, N, T, Hv); N >= 2, H, Hv are static, batch and sequence may be symbolic
    (equal only when they carry the same name). A last Reshape whose target cannot be proven
    but whose input is (B, S, N, Hv) in row-major order stays, reading the fused output. The
    scale is the product of every constant factor on Q, K and the scores (sdpa's sqrt(scale) on
    Q and K separately included); scores scaled after the mask Add are not matched. The mask
    (rank <= 4, the scores' dtype) must broadcast to (B, N, S, T) without enlarging it: a dim
    proven to be neither 1 nor the scores' dim is a NoMatch; it is expanded to (., ., S, T)
    (once per graph and mask) unless proven to be so, and a dim left unproven is checked by the
    fused op at run time (it fails loudly where the original would compute a differently shaped
    result). A ``Where(IsNaN(p), 0, p)`` guard after the Softmax (sdpa exports) is absorbed when
    the mask is absent or a Where of finite constants (it can then only act on NaN activations);
    otherwise ``Where(IsNaN(y), 0, y)`` is kept on the output (fully masked -inf rows give 0 as
    in the original). Every intermediate, including Shape nodes reading them, must be private to
    the pattern; shape computations only the pattern read are removed with it.

    Targets: ``ort-cpu``/``ort-gpu``: com.microsoft Attention with the Q/K/V weights packed into
    one (Din, 3D) weight and (3D,) bias when the three projections are ``MatMul(x, W) [+ b]`` of
    one input with private constant weights (option ``packed``, measured faster on CPU);
    otherwise com.microsoft MultiHeadAttention on the projected Q, K, V (the projections stay, so
    one read elsewhere is fine). Both get num_heads, scale and the mask as attention_bias
    (float, plus float16 on ``ort-gpu``); the com.microsoft opset import is added.
    key_padding_mask is not used (its mask_filter_value is not exact). ``portable``: ai.onnx
    Attention (q_num_heads = kv_num_heads = N, scale) when the model imports opset >= 23, else a
    note. A mask built with the lowest float (Where branch or Mul factor, the HF eager mask) is
    kept there with a note: onnxruntime 1.32's Attention writes 0 for rows whose keys are all
    masked where the decomposed graph averages V (-inf masks with the NaN guard, the sdpa form,
    give 0 in both; other masks are passed as they are). ``trt``: nothing is
    rewritten (TensorRT fuses MatMul-Softmax-MatMul itself); a note counts the matches.
    Custom-domain ops are never touched; nothing is done in IR < 4 models.

    Post: the fused node (or the guard's Where) writes the pattern's output. Results equal the
    original up to float rounding. Old projection weights the packed form replaced are removed.
    """

    name = "fuse_attention"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_attention."""

        packed: bool = option(True, "ort-*: com.microsoft Attention with packed QKV weights when the projections allow it")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Softmax, choose by target, then rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        view = ctx.view(scope.graph)
        op_type, opset = ("Attention", 23) if ctx.target in ("portable", "trt") else ("MultiHeadAttention", 1)
        plans: dict[int, Plan] = {}
        packed = bool(self.options.packed)  # type: ignore[attr-defined]
        # packed Attention keeps its QKV weights float (QAttention cannot take an attention_bias mask); with
        # MultiHeadAttention the projections stay MatMuls that int8_dynamic quantizes (MiniLM, 1 thread: 0.42x of FP32)
        unpacked_for_int8 = "int8_dynamic" in ctx.later and packed
        packed = packed and not unpacked_for_int8
        if "qdq" in ctx.later and ctx.target != "portable":
            # a fused attention op keeps its projections (packed) or bias Adds and score MatMuls (MultiHeadAttention) float;
            # INT8 MatMuls everywhere are faster (MiniLM, 1 thread: 0.55x of FP32 unfused vs 0.67x with MultiHeadAttention)
            if any(n.op_type == "Softmax" for n in view.nodes):
                result.notes.append(f"{self.name}: attention left unfused: the qdq pass that follows quantizes its MatMuls")
            return result
        for node in view.nodes:
            if node.op_type != "Softmax" or not is_standard(node):
                continue
            try:
                plan = match_attention(node, view, ctx, op_type, opset, packed)
            except NoMatch as exc:
                debug(self.name, node, exc)
                continue
            plans[id(plan.fusion)] = plan
        if not plans:
            return result
        if ctx.target == "trt":
            result.notes.append(
                f"{self.name}: {len(plans)} attention subgraph(s) kept for TensorRT, which fuses MatMul-Softmax-MatMul itself"
            )
            return result
        if ctx.target == "portable" and (opset_version(ctx.model) or 1) >= 23:
            kept = [k for k, p in plans.items() if p.lowest_mask]
            if kept:
                result.notes.append(
                    f"{self.name}: {len(kept)} attention subgraph(s) kept: their mask uses the lowest float, and onnxruntime's "
                    "Attention writes 0 for fully masked rows where the decomposed graph averages V"
                )
                plans = {k: p for k, p in plans.items() if not p.lowest_mask}
        chosen = select([p.fusion for p in plans.values()], set(), ctx, self.name, result)
        rewrite(scope, view, [plans[id(f)] for f in chosen], ctx, result)
        if unpacked_for_int8 and chosen and ctx.target != "portable":
            result.notes.append(f"{self.name}: attention fused unpacked: the int8_dynamic pass that follows quantizes its projections")
        return result
