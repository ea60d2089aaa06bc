"""onnxruntime contrib-op fusions (com.microsoft domain) for the ``ort-cpu`` / ``ort-gpu`` targets.

Rules (each a matcher that raises :class:`~onnxopt.passes.noop_rules.NoMatch` with a reason):
``Add(x, bias)`` + GELU -> ``BiasGelu`` / ``FastGelu(x, bias)``, and ``Add(x, skip)`` [+ bias
``Add``] + ``LayerNormalization(axis=-1)`` -> ``SkipLayerNormalization``; on ``ort-cpu``, where
that kernel is slow, the residual ``Add`` before a LayerNormalization becomes ``Sum`` instead so
that onnxruntime does not fuse it at load time. The rewrite helpers
here (:class:`ContribFusion`, :func:`apply_rewrites`) also serve ``fuse_activations``, which
writes com.microsoft ``Gelu`` / ``FastGelu`` for these targets. On every other target nothing
here emits a non-standard op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, TensorProto

from onnxopt.graph import GraphScope, GraphView, is_standard
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_choices, option
from onnxopt.passes.contrib_ops import MS_DOMAIN, has_kernel, ort_target
from onnxopt.passes.fuse_linear import symbolic_dims
from onnxopt.passes.fusion_support import Fusion, apply_fusions, check_private, const_name, debug, elem, producer, rank, select
from onnxopt.passes.noop_rules import NoMatch, get_attr, require
from onnxopt.registry import register_pass

KINDS = ("bias_gelu", "fast_gelu_bias", "skip_layernorm", "residual_sum")
SUM_MIN_OPSET = 8  # Sum broadcasts from opset 8


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


def read_only_by(view: GraphView, value: str, reader: NodeProto, role: str, reader_kind: str) -> None:
    """``value`` must be no graph output and read by ``reader`` alone; NoMatch naming the ``role`` otherwise."""
    require(value not in view.graph_outputs, f"the {role} '{value}' is a graph output")
    require(all(r is reader for r in view.consumers.get(value, [])), f"the {role} '{value}' is also read outside the {reader_kind}")


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


def match_bias_gelu(gelu: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Gelu(Add(x, bias))`` -> com.microsoft BiasGelu(x, bias); the tanh form -> FastGelu(x, bias)."""
    kind, op_type = gelu_kind(gelu)
    require(len(gelu.output) == 1, "the GELU has extra outputs")
    add = producer(view, gelu.input[0], "Add")
    x, bias = match_bias_add(view, ctx, add)
    check_dtype(ctx, x)
    check_private(view, [add], add.output[0])
    read_only_by(view, add.output[0], gelu, "biased value", "GELU")
    return Fusion(kind, op_type, [x, bias], gelu.output[0], [add, gelu], 1, domain=MS_DOMAIN)


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


def match_skip_layernorm(ln: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
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
    return Fusion(
        "skip_layernorm", "SkipLayerNormalization", inputs, ln.output[0], nodes, 1, attrs, domain=MS_DOMAIN, outputs=outputs, anchor=add
    )


def match_residual_sum(ln: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """ort-cpu: ``LayerNormalization(Add(a, b))`` with a, b computed float32 -> ``LayerNormalization(Sum(a, b))``.

    onnxruntime's session (ORT_ENABLE_ALL) fuses such an Add into com.microsoft
    SkipLayerNormalization, whose 1.32 CPU kernel is about 6x slower than Add + LayerNormalization;
    its fusion matches ``Add`` only, and a two-input ``Sum`` computes the same sum at Add's speed.
    Only the Adds it would fuse are rewritten: two computed operands (no bias constant, which
    other fusions take), read by this LayerNormalization alone, not a graph output.
    """
    require(is_standard(ln) and ln.op_type == "LayerNormalization", "not a LayerNormalization")
    add = producer(view, ln.input[0], "Add")
    require(len(add.input) == 2, "the Add does not have two inputs")
    require(all(const_name(view, name) is None for name in add.input), "the Add adds a constant (a bias, not a skip)")
    dtype = elem(ctx, add.output[0])
    require(dtype == TensorProto.FLOAT, f"the sum has element type {dtype}, not float32")
    read_only_by(view, add.output[0], ln, "sum", "LayerNormalization")
    return Fusion("residual_sum", "Sum", list(add.input), add.output[0], [add], SUM_MIN_OPSET)


# (kind, anchor op types, matcher)
MATCHERS = (
    ("bias_gelu", ("Gelu",), match_bias_gelu),
    ("fast_gelu_bias", ("Gelu", "FastGelu"), match_bias_gelu),
    ("skip_layernorm", ("LayerNormalization",), match_skip_layernorm),
    ("residual_sum", ("LayerNormalization",), match_residual_sum),
)


def anchors_of(node: NodeProto, kind: str) -> bool:
    """Whether ``node`` can anchor a match of ``kind`` (standard ops, or the com.microsoft GELUs this module knows)."""
    if not (is_standard(node) or (node.domain == MS_DOMAIN and node.op_type in ("Gelu", "FastGelu"))):
        return False
    if kind in ("skip_layernorm", "residual_sum"):
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

    SkipLayerNormalization is not fused for ``ort-cpu`` unless ``skip_layernorm_on_cpu``: on
    onnxruntime 1.32 its CPU kernel measured about 9x slower than Add + LayerNormalization
    (12 blocks of [8, 128, 384], 1 thread: 29 ms against 3.2 ms). Note that onnxruntime's own
    ORT_ENABLE_ALL session optimization makes the same fusion when it can prove the shapes, so
    there (kind ``residual_sum``) the residual float32 ``Add`` of two computed values read only by
    a LayerNormalization is written as ``Sum``, which that fusion does not match (one block of
    [1, 128, 384]: 230 us as SkipLayerNormalization, 42 us as Sum + LayerNormalization).

    Types of values after contrib nodes come from their shape stand-ins
    (:mod:`onnxopt.passes.contrib_ops`).

    Post: the fused node writes the pattern's last value.
    """

    name = "fuse_contrib"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_contrib."""

        kinds: tuple[str, ...] = option(KINDS, "fusions to apply, separated by '|' (bias_gelu|fast_gelu_bias|skip_layernorm|residual_sum)")
        skip_layernorm_on_cpu: bool = option(
            False, "ort-cpu: fuse SkipLayerNormalization too (onnxruntime 1.32's CPU kernel is ~9x slower than Add + LayerNormalization)"
        )

        def validate(self) -> None:
            """Every kind must be one the pass knows."""
            check_choices("fuse_contrib", "kinds", self.kinds, KINDS)

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every rule on ort-* targets, then rewrite once."""
        result = PassResult()
        if not ort_target(ctx):
            return result
        if "qdq" in ctx.later:  # each fusion absorbs a MatMul's bias Add, which onnxruntime fuses into the INT8 MatMul
            if scope.parent is None:
                result.notes.append(f"{self.name}: skipped: qdq runs later (its INT8 MatMuls take the bias Adds these fusions absorb)")
            return result
        view = ctx.view(scope.graph)
        wanted = set(self.options.kinds)  # type: ignore[attr-defined]
        if ctx.target == "ort-cpu" and not self.options.skip_layernorm_on_cpu:  # type: ignore[attr-defined]
            wanted.discard("skip_layernorm")
        else:
            wanted.discard("residual_sum")
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
        apply_fusions(scope.graph, view, found, ctx, result)
        return result
