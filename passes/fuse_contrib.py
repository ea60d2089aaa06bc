"""onnxruntime contrib-op fusions (com.microsoft domain) for the ``ort-cpu`` / ``ort-gpu`` targets.

Rules (each a matcher that raises :class:`~onnxopt.passes.noop_rules.NoMatch` with a reason):
``Add(x, bias)`` + GELU -> ``BiasGelu`` / ``FastGelu(x, bias)``, and ``Add(x, skip)`` [+ bias
``Add``] + ``LayerNormalization(axis=-1)`` -> ``SkipLayerNormalization``. The rewrite helpers
here (:class:`ContribFusion`, :func:`apply_rewrites`) also serve ``fuse_activations``, which
writes com.microsoft ``Gelu`` / ``FastGelu`` for these targets. On every other target nothing
here emits a non-standard op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, helper, numpy_helper

from onnxopt.errors import OptionError
from onnxopt.graph import GraphScope, GraphView, is_standard, iter_scopes
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.passes.fuse_linear import symbolic_dims
from onnxopt.passes.fusion_support import Fusion, check_private, const_name, debug, elem, producer, rank, select
from onnxopt.passes.noop_rules import NoMatch, get_attr, require
from onnxopt.registry import register_pass
from onnxopt.shapes import infer_types, light_copy

MS_DOMAIN = "com.microsoft"
MS_VERSION = 1
ORT_TARGETS = frozenset({"ort-cpu", "ort-gpu"})
# Element types with a native kernel of every op emitted here (CPU: float only; CUDA: float and float16).
KERNEL_TYPES = {
    "ort-cpu": frozenset({TensorProto.FLOAT}),
    "ort-gpu": frozenset({TensorProto.FLOAT, TensorProto.FLOAT16}),
}
KINDS = ("bias_gelu", "fast_gelu_bias", "skip_layernorm")


@dataclass
class ContribFusion(Fusion):
    """A :class:`Fusion` whose new node is a contrib op, may write several outputs and may take an earlier place.

    ``outputs`` is the new node's full output list ("" for an unused optional output; empty
    means ``[output]``); ``anchor`` is the pattern node whose place the new node takes
    (default: the producer of ``output``).
    """

    domain: str = MS_DOMAIN
    outputs: list[str] = field(default_factory=list)
    anchor: NodeProto | None = None


def ort_target(ctx: PassContext) -> bool:
    """Whether the run targets onnxruntime (``ort-cpu`` or ``ort-gpu``)."""
    return ctx.target in ORT_TARGETS


def has_kernel(ctx: PassContext, dtype: int) -> bool:
    """Whether the target's onnxruntime kernels of the emitted contrib ops take ``dtype``."""
    return dtype in KERNEL_TYPES.get(ctx.target, frozenset())


def import_domain(model: ModelProto) -> None:
    """Add the com.microsoft opset import (version 1) unless the model has one."""
    if not any(imp.domain == MS_DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, MS_VERSION))


def apply_rewrites(graph: GraphProto, view: GraphView, fusions: list[Fusion], ctx: PassContext, result: PassResult) -> None:
    """Replace each fusion's nodes by its new node, in one rebuild of the node list.

    Like :func:`~onnxopt.passes.fusion_support.apply_fusions` (same names, same placement)
    for standard fusions; a :class:`ContribFusion` also gets its domain, its extra outputs
    and its anchor's place, the outputs of a contrib node keep their inferred types as
    value_info (onnx cannot infer through com.microsoft ops; see :func:`declared_type`), and
    the model imports the com.microsoft domain.
    """
    if not fusions:
        return
    replaced: dict[int, list[NodeProto]] = {}
    stale: set[str] = set()
    declared: list[ValueInfoProto] = []
    known = {v.name for v in graph.value_info} | {o.name for o in graph.output}
    symbols = model_symbols(ctx.model)
    for fusion in fusions:
        inputs: list[str] = []
        for index, item in enumerate(fusion.inputs):
            if isinstance(item, str):
                inputs.append(item)
                continue
            name = ctx.names.fresh(f"{fusion.output}_{fusion.op_type.lower()}_in{index}")
            graph.initializer.append(numpy_helper.from_array(item, name))
            inputs.append(name)
        contrib = isinstance(fusion, ContribFusion)
        outputs = list(fusion.outputs) if contrib and fusion.outputs else [fusion.output]  # type: ignore[attr-defined]
        node = helper.make_node(
            fusion.op_type,
            inputs,
            outputs,
            name=ctx.names.fresh(f"{fusion.output}_{fusion.op_type}"),
            domain=fusion.domain if contrib else None,  # type: ignore[attr-defined]
            **fusion.attrs,
        )
        written = {o for o in outputs if o}
        for old in fusion.nodes:
            replaced[id(old)] = []
            stale.update(o for o in old.output if o and o not in written)
        anchor = fusion.anchor if contrib and fusion.anchor is not None else view.producer[fusion.output]  # type: ignore[attr-defined]
        replaced[id(anchor)] = [node]
        if contrib:
            for name in outputs:
                type_proto = ctx.types.get(name) if name else None
                if type_proto is not None and name not in known:
                    declared.append(declared_type(name, type_proto, symbols))
                    known.add(name)
        result.count(fusion.kind)
    rebuilt: list[NodeProto] = []
    for old in view.nodes:
        rebuilt.extend(replaced.get(id(old), [old]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    if any(v.name in stale for v in graph.value_info):
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    graph.value_info.extend(declared)
    if any(isinstance(f, ContribFusion) for f in fusions):
        import_domain(ctx.model)


def model_symbols(model: ModelProto) -> set[str]:
    """The dim_params of the main graph's inputs and outputs: the model's own, stable shape symbols."""
    names: set[str] = set()
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.WhichOneof("value") == "tensor_type":
            names.update(d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param)
    return names


def declared_type(name: str, type_proto: TypeProto, symbols: set[str]) -> ValueInfoProto:
    """A value_info of ``type_proto`` that keeps static dims and the model's own symbols only.

    Symbols that onnx generated (``unk__N``) are only meaningful within one inference run;
    written into the model they would be taken as facts by later runs, so such dims are
    written as unknown.
    """
    value = ValueInfoProto(name=name)
    value.type.CopyFrom(type_proto)
    if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.HasField("shape"):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in symbols:
                dim.Clear()
    return value


def standin_nodes(node: NodeProto) -> list[NodeProto] | None:
    """Standard nodes writing the same outputs with the same types and shapes as a contrib node this module emits, or None."""
    if node.domain != MS_DOMAIN:
        return None
    inputs = list(node.input)
    if node.op_type in ("Gelu", "FastGelu", "BiasGelu") and len(node.output) == 1:
        if len(inputs) == 2 and inputs[1]:
            return [helper.make_node("Add", inputs, list(node.output))]
        return [helper.make_node("Identity", inputs[:1], list(node.output))] if len(inputs) == 1 else None
    if node.op_type == "SkipLayerNormalization" and not any(node.output[1:3]):
        outputs = [o for i, o in enumerate(node.output) if o and i in (0, 3)]
        return [helper.make_node("Identity", inputs[:1], [o]) for o in outputs]
    return None


def standin_types(ctx: PassContext) -> dict:
    """Inferred types with every contrib node of this module replaced by a standard stand-in (see :func:`standin_nodes`).

    onnx cannot infer through com.microsoft ops, so shape symbols downstream of one are lost
    or stale; the stand-ins give one consistent inference run. ``ctx.types`` when the model
    has no such node.
    """
    scopes = iter_scopes(ctx.model.graph)
    if not any(n.domain == MS_DOMAIN for scope in scopes for n in scope.graph.node):
        return ctx.types
    light = light_copy(ctx.model)
    for scope in iter_scopes(light.graph):
        graph = scope.graph
        written: set[str] = set()
        rebuilt: list[NodeProto] = []
        for node in graph.node:
            standin = standin_nodes(node)
            if standin is None:
                rebuilt.append(node)
                continue
            rebuilt.extend(standin)
            written.update(o for o in node.output if o)
        if written:
            kept = [v for v in graph.value_info if v.name not in written]
            del graph.node[:]
            graph.node.extend(rebuilt)
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return infer_types(light)


# ----------------------------------------------------------------------------- shared checks


def static_hidden(ctx: PassContext, x: str) -> int:
    """The static size of the last axis of ``x``; NoMatch when the rank or that size is unknown."""
    dims = symbolic_dims(ctx.types.get(x))
    require(dims is not None and len(dims) >= 1, f"the rank of '{x}' is unknown")
    hidden = dims[-1]  # type: ignore[index]
    require(isinstance(hidden, int) and hidden > 0, f"the last axis of '{x}' is not static")
    return hidden  # type: ignore[return-value]


def vector(view: GraphView, name: str, hidden: int, x_rank: int, role: str) -> str | np.ndarray:
    """A constant that is a vector of ``hidden`` values along the last axis: its name when 1-D, else a 1-D copy."""
    array = const_name(view, name)
    require(array is not None, f"the {role} '{name}' is not a constant of this graph")
    require(array.dtype.kind == "f", f"the {role} is not a float constant")  # type: ignore[union-attr]
    require(array.ndim <= x_rank, f"the {role} raises the rank")  # type: ignore[union-attr]
    require(array.ndim >= 1 and array.shape[-1] == hidden, f"the {role} shape {array.shape} is not (..., {hidden})")  # type: ignore[union-attr]
    require(all(d == 1 for d in array.shape[:-1]), f"the {role} shape {array.shape} varies along other axes")  # type: ignore[union-attr]
    return name if array.ndim == 1 else np.ascontiguousarray(array.reshape(hidden))  # type: ignore[union-attr]


def match_bias_add(view: GraphView, ctx: PassContext, add: NodeProto) -> tuple[str, str | np.ndarray]:
    """``Add(x, bias)`` (either order) with a constant bias along the last axis of a non-constant x: (x, bias)."""
    require(len(add.input) == 2, "the Add does not have two inputs")
    constant = [const_name(view, name) is not None for name in add.input]
    require(sum(constant) == 1, "the Add does not add one constant to one computed value")
    x, bias = (add.input[1], add.input[0]) if constant[0] else (add.input[0], add.input[1])
    hidden = static_hidden(ctx, x)
    return x, vector(view, bias, hidden, rank(ctx, x), "bias")  # type: ignore[arg-type]


def check_dtype(ctx: PassContext, x: str) -> None:
    """``x`` must have an element type the target's kernels take."""
    dtype = elem(ctx, x)
    require(has_kernel(ctx, dtype), f"'{x}' has element type {dtype}, which {ctx.target} has no contrib kernel for")


# ----------------------------------------------------------------------------- rules


def gelu_kind(node: NodeProto) -> tuple[str, str]:
    """(kind, fused op) for an exact or tanh GELU node: com.microsoft Gelu / FastGelu or standard Gelu."""
    if node.domain == MS_DOMAIN and node.op_type == "Gelu" and len(node.input) == 1:
        return "bias_gelu", "BiasGelu"
    if node.domain == MS_DOMAIN and node.op_type == "FastGelu" and (len(node.input) == 1 or not node.input[1]):
        return "fast_gelu_bias", "FastGelu"
    require(is_standard(node) and node.op_type == "Gelu", f"'{node.name}' is not a GELU")
    approximate = get_attr(node, "approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    require(approximate in ("none", "tanh"), f"Gelu approximate='{approximate}' is unknown")
    return ("bias_gelu", "BiasGelu") if approximate == "none" else ("fast_gelu_bias", "FastGelu")


def match_bias_gelu(gelu: NodeProto, view: GraphView, ctx: PassContext) -> ContribFusion:
    """``Gelu(Add(x, bias))`` -> com.microsoft BiasGelu(x, bias); the tanh form -> FastGelu(x, bias)."""
    kind, op_type = gelu_kind(gelu)
    require(len(gelu.output) == 1, "the GELU has extra outputs")
    add = producer(view, gelu.input[0], "Add")
    x, bias = match_bias_add(view, ctx, add)
    check_dtype(ctx, x)
    check_private(view, [add], add.output[0])
    readers = view.consumers.get(add.output[0], [])
    require(add.output[0] not in view.graph_outputs, f"the biased value '{add.output[0]}' is a graph output")
    require(all(r is gelu for r in readers), f"the biased value '{add.output[0]}' is also read outside the GELU")
    return ContribFusion(kind, op_type, [x, bias], gelu.output[0], [add, gelu], 1)


def same_dims(a: list | None, b: list | None) -> bool:
    """Whether two symbolic shapes are provably equal (every dim static or a shared symbol)."""
    return a is not None and b is not None and len(a) == len(b) and all(d is not None and d == e for d, e in zip(a, b))


def skip_fits(skip: list | None, full: list, broadcast: bool) -> bool:
    """Whether a skip of dims ``skip`` is one SkipLayerNormalization adds to an input of dims ``full`` (rank 3).

    Equal dims always; with ``broadcast`` also (1, S, H) and (S, H).
    """
    if same_dims(skip, full):
        return True
    if not broadcast or skip is None:
        return False
    return same_dims(skip, [1, *full[1:]]) or same_dims(skip, full[1:])


def split_residual(view: GraphView, ctx: PassContext, add: NodeProto) -> tuple[str, str, str | np.ndarray | None, list[NodeProto]]:
    """The residual ``Add(a, b)``: (input, skip, bias or None, bias nodes), absorbing a private bias Add on a or b."""
    require(len(add.input) == 2, "the Add does not have two inputs")
    a, b = add.input
    require(const_name(view, a) is None and const_name(view, b) is None, "the Add adds a constant (a bias, not a skip)")
    if a != b:
        for operand, other in ((a, b), (b, a)):
            inner = view.producer.get(operand)
            if inner is None or inner.op_type != "Add" or not is_standard(inner):
                continue
            try:
                x, bias = match_bias_add(view, ctx, inner)
                check_private(view, [inner, add], add.output[0])
            except NoMatch as exc:
                debug("fuse_contrib", inner, exc)
                continue
            return x, other, bias, [inner]
    return a, b, None, []


def match_skip_layernorm(ln: NodeProto, view: GraphView, ctx: PassContext) -> ContribFusion:
    """``LayerNormalization(Add(x, skip) [+ bias], gamma, beta, axis=-1)`` -> com.microsoft SkipLayerNormalization."""
    require(is_standard(ln) and ln.op_type == "LayerNormalization", "not a LayerNormalization")
    require(all(not o for o in ln.output[1:]), "the LayerNormalization writes its mean / inverse deviation")
    x = ln.input[0]
    x_rank = rank(ctx, x)
    require(x_rank == 3, f"the input '{x}' is not 3-D (rank {x_rank})")
    axis = int(get_attr(ln, "axis", -1))  # type: ignore[arg-type]
    require(axis in (-1, x_rank - 1), f"the LayerNormalization normalizes from axis {axis}, not the last axis")  # type: ignore[operator]
    require(int(get_attr(ln, "stash_type", 1)) == 1, "the LayerNormalization does not compute in float (stash_type)")  # type: ignore[arg-type]
    check_dtype(ctx, x)
    hidden = static_hidden(ctx, x)
    gamma = vector(view, ln.input[1], hidden, 1, "scale")
    beta = vector(view, ln.input[2], hidden, 1, "bias") if len(ln.input) > 2 and ln.input[2] else None
    add = producer(view, x, "Add")
    first, skip, bias, bias_nodes = split_residual(view, ctx, add)
    full = symbolic_dims(ctx.types.get(x))
    require(same_dims(symbolic_dims(ctx.types.get(first)), full), f"the input '{first}' is not provably of the sum's shape")
    require(
        skip_fits(symbolic_dims(ctx.types.get(skip)), full, ctx.target == "ort-cpu"),  # type: ignore[arg-type]
        f"the skip '{skip}' is not provably of the input's shape" + (" or (1, S, H) / (S, H)" if ctx.target == "ort-cpu" else ""),
    )
    inputs: list[str | np.ndarray] = [first, skip, gamma, beta if beta is not None else ""]
    if bias is not None:
        inputs.append(bias)
    while inputs[-1] == "":
        inputs.pop()
    sum_read = x in view.graph_outputs or any(r is not ln for r in view.consumers.get(x, []))
    outputs = [ln.output[0], "", "", x] if sum_read else []
    eps = float(get_attr(ln, "epsilon", 1e-5))  # type: ignore[arg-type]
    nodes = [*bias_nodes, add, ln]
    attrs = {"epsilon": eps}
    return ContribFusion("skip_layernorm", "SkipLayerNormalization", inputs, ln.output[0], nodes, 1, attrs, outputs=outputs, anchor=add)


# (kind, anchor op types, matcher)
MATCHERS = (
    ("bias_gelu", ("Gelu",), match_bias_gelu),
    ("fast_gelu_bias", ("Gelu", "FastGelu"), match_bias_gelu),
    ("skip_layernorm", ("LayerNormalization",), match_skip_layernorm),
)


def anchors_of(node: NodeProto, kind: str) -> bool:
    """Whether ``node`` can anchor a match of ``kind`` (standard ops, or the com.microsoft GELUs this module knows)."""
    if not (is_standard(node) or (node.domain == MS_DOMAIN and node.op_type in ("Gelu", "FastGelu"))):
        return False
    if kind == "skip_layernorm":
        return is_standard(node) and node.op_type == "LayerNormalization"
    try:
        return gelu_kind(node)[0] == kind
    except NoMatch:
        return False


@register_pass
class FuseContrib(Pass):
    """Fuse bias + GELU and residual Add + LayerNormalization into onnxruntime contrib ops (ort-cpu / ort-gpu only).

    Pre: types inferred. Does nothing unless the target is ``ort-cpu`` or ``ort-gpu``.
    ``Add(x, bias)`` then a GELU (com.microsoft Gelu / FastGelu as ``fuse_activations``
    writes them, or a standard Gelu) -> ``BiasGelu(x, bias)`` / ``FastGelu(x, bias)``: bias a
    float constant of shape (..., 1, H) with H the static last axis of the computed x.
    ``LayerNormalization(Add(input, skip) [with a private Add(., bias) on one operand],
    gamma, beta)`` -> ``SkipLayerNormalization(input, skip, gamma, beta, bias)``: rank-3 input
    (batch, seq, hidden), axis -1, stash_type float, static hidden size, gamma/beta 1-D
    constants of that size, input and the Add's sum provably of one shape (static dims or
    shared symbols); the skip of that shape too, or on ``ort-cpu`` (checked with
    onnxruntime 1.32) (1, S, H) / (S, H). Epsilon is carried over. When the sum is also read
    elsewhere (or is a graph output) the node writes it as its 4th output,
    input_skip_bias_sum, under its old name. Element types: float (ort-cpu), float and
    float16 (ort-gpu). The first new contrib op adds the com.microsoft opset import
    (version 1). Intermediates read outside a pattern, graph-output intermediates and
    unknown custom-domain ops are left alone.

    Types come from one inference run in which the contrib nodes already in the model
    stand in as standard ops of the same shapes (onnx cannot infer through them).

    Post: the fused node writes the pattern's last value; value_info keeps the dtype, rank
    and static dims of contrib outputs so later passes still see them.
    """

    name = "fuse_contrib"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_contrib."""

        kinds: tuple[str, ...] = option(KINDS, "fusions to apply, separated by '|' (bias_gelu|fast_gelu_bias|skip_layernorm)")

        def validate(self) -> None:
            """Every kind must be one the pass knows."""
            unknown = [kind for kind in self.kinds if kind not in KINDS]
            if unknown:
                raise OptionError(f"option 'kinds' of pass 'fuse_contrib': unknown kind '{unknown[0]}' (known: {', '.join(KINDS)})")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every rule on ort-* targets, then rewrite once."""
        result = PassResult()
        if not ort_target(ctx):
            return result
        view = ctx.view(scope.graph)
        ctx = dataclasses.replace(ctx, _types=standin_types(ctx))
        wanted = set(self.options.kinds)  # type: ignore[attr-defined]
        matches: list[Fusion] = []
        for kind, types, matcher in MATCHERS:
            if kind not in wanted:
                continue
            for node in view.nodes:
                if node.op_type not in types or not anchors_of(node, kind):
                    continue
                try:
                    matches.append(matcher(node, view, ctx))
                except NoMatch as exc:
                    debug(self.name, node, exc)
        found = select(matches, set(), ctx, self.name, result)
        apply_rewrites(scope.graph, view, found, ctx, result)
        return result
