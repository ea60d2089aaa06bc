"""Activation fusions: decomposed GELU, HardSwish, HardSigmoid, Mish and Softplus become one standard op.

Products are matched by flattening a tree of Mul (and Div by a constant, Pow by a small
integer) into its non-constant factors and one constant coefficient, so every operand
order and placement of the constants an exporter writes is one case. The match/rewrite
toolkit is shared with :mod:`onnxopt.passes.fuse_norm`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, NodeProto, helper

from onnxopt.graph import GraphScope, GraphView, is_standard, opset_version
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_choices, option
from onnxopt.passes.contrib_ops import MS_DOMAIN, has_kernel, ort_target
from onnxopt.passes.fusion_support import (
    FLOAT_TYPES,
    Fusion,
    apply_fusions,
    check_private,
    close,
    const_name,
    debug,
    elem,
    other_input,
    producer,
    rank,
    scalar,
    select,
    sole_reader,
)
from onnxopt.passes.noop_rules import NoMatch, get_attr, require
from onnxopt.registry import register_pass

KINDS = ("gelu", "gelu_tanh", "hardswish", "hardsigmoid", "mish", "softplus")
MAX_PRODUCT_NODES = 8
MAX_CLIMB = 4
# The com.microsoft op each GELU kind becomes on the ort-* targets (any opset).
CONTRIB_GELU = {"gelu": "Gelu", "gelu_tanh": "FastGelu"}


@dataclass
class Product:
    """A flattened product: non-constant factors (repeats for powers), the constant coefficient, the nodes."""

    factors: list[str] = field(default_factory=list)
    coef: float = 1.0
    nodes: list[NodeProto] = field(default_factory=list)
    const_rank: int = 0


def private(view: GraphView, name: str) -> bool:
    """Whether ``name`` is read exactly once and is not a graph output."""
    return view.uses(name) == 1


def small_power(view: GraphView, node: NodeProto) -> int | None:
    """k for ``Pow(v, k)`` with a scalar constant integer exponent 2..4, else None."""
    if len(node.input) != 2:
        return None
    array = const_name(view, node.input[1])
    if array is None or array.size != 1 or array.ndim != 0:
        return None
    value = float(array.reshape(-1)[0])
    return int(value) if value in (2.0, 3.0, 4.0) else None


def flatten_product(view: GraphView, name: str, top: str | None = None) -> Product:
    """Flatten the Mul/Div/Pow tree writing ``name``; a value is expanded when it is ``top`` or private.

    Bounded by :data:`MAX_PRODUCT_NODES` nodes (an explicit stack; no recursion).
    """
    product = Product()
    stack: list[tuple[str, bool]] = [(name, False)]  # (value, divides)
    while stack:
        value, divides = stack.pop()
        constant = scalar(view, value)
        if constant is not None:
            require(constant[0] != 0.0 or not divides, "division by a zero constant")
            product.coef = product.coef / constant[0] if divides else product.coef * constant[0]
            product.const_rank = max(product.const_rank, constant[1])
            continue
        require(not divides, f"the divisor '{value}' is not a constant")
        node = view.producer.get(value)
        expand = node is not None and is_standard(node) and (value == top or private(view, value))
        if expand and len(product.nodes) < MAX_PRODUCT_NODES and len(node.input) == 2:  # type: ignore[union-attr]
            if node.op_type == "Mul":  # type: ignore[union-attr]
                product.nodes.append(node)  # type: ignore[arg-type]
                stack.extend([(node.input[1], False), (node.input[0], False)])  # type: ignore[union-attr]
                continue
            if node.op_type == "Div" and scalar(view, node.input[1]) is not None:  # type: ignore[union-attr]
                product.nodes.append(node)  # type: ignore[arg-type]
                stack.extend([(node.input[1], True), (node.input[0], False)])  # type: ignore[union-attr]
                continue
            power = small_power(view, node) if node.op_type == "Pow" else None  # type: ignore[union-attr, arg-type]
            if power is not None:
                product.nodes.append(node)  # type: ignore[arg-type]
                product.factors.extend([node.input[0]] * power)  # type: ignore[union-attr]
                continue
        product.factors.append(value)
    return product


def check_input(ctx: PassContext, x: str, const_rank: int) -> None:
    """The input must be a float tensor, and the constants must not raise its rank."""
    require(elem(ctx, x) in FLOAT_TYPES, f"'{x}' is not a float tensor of known type")
    x_rank = rank(ctx, x)
    require(const_rank == 0 or (x_rank is not None and const_rank <= x_rank), "a constant operand may raise the rank")


def dtype_of(ctx: PassContext, x: str) -> np.dtype:
    """The numpy dtype of a float value (for the constant tolerance)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem(ctx, x)))


def match_plus_one(view: GraphView, value: str, dtype: np.dtype) -> tuple[NodeProto, int]:
    """The private ``Add(value, 1)`` (either order) reading ``value``: (node, rank of the 1)."""
    require(private(view, value), f"'{value}' has other readers")
    add = sole_reader(view, value, "Add")
    one = scalar(view, other_input(add, value))
    require(one is not None and close(one[0], 1.0, dtype), "the Add does not add 1")
    return add, one[1]  # type: ignore[index]


def match_half_product(view: GraphView, x: str, gate: str, dtype: np.dtype) -> Product:
    """The product ``0.5 * x * gate`` (any order) whose leaf ``gate`` is private; climbs at most :data:`MAX_CLIMB` nodes."""
    require(private(view, gate), f"'{gate}' has other readers")
    node = sole_reader(view, gate, ("Mul",))
    for _ in range(MAX_CLIMB):
        top = node.output[0]
        product = flatten_product(view, top, top)
        if sorted(product.factors) == sorted([x, gate]) and close(product.coef, 0.5, dtype):
            return product
        readers = view.consumers.get(top, [])
        require(private(view, top) and readers[0].op_type in ("Mul", "Div") and is_standard(readers[0]), "no 0.5 * x * gate product")
        node = readers[0]
        require(node.input[0] == top or node.op_type == "Mul", "the product is a divisor")
    raise NoMatch("no 0.5 * x * gate product within reach")


def match_gelu(erf: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``x * 0.5 * (1 + Erf(x / sqrt(2)))`` in its exporter forms -> Gelu (approximate='none')."""
    inner_value = erf.input[0]
    require(private(view, inner_value), "the Erf input has other readers")
    inner = flatten_product(view, inner_value)
    require(len(inner.factors) == 1, "the Erf input is not a scaled value")
    x = inner.factors[0]
    dtype = dtype_of(ctx, x) if elem(ctx, x) in FLOAT_TYPES else np.dtype(np.float32)
    require(close(inner.coef, 1.0 / math.sqrt(2.0), dtype), f"the Erf input scale {inner.coef:.9g} is not 1/sqrt(2)")
    add, one_rank = match_plus_one(view, erf.output[0], dtype)
    product = match_half_product(view, x, add.output[0], dtype)
    check_input(ctx, x, max(inner.const_rank, one_rank, product.const_rank))
    nodes = [*inner.nodes, erf, add, *product.nodes]
    output = product.nodes[0].output[0]
    check_private(view, nodes, output)
    return Fusion("gelu", "Gelu", [x], output, nodes, 20, {"approximate": "none"})


def match_gelu_tanh(tanh: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` in its exporter forms -> Gelu('tanh')."""
    require(private(view, tanh.input[0]), "the Tanh input has other readers")
    outer = flatten_product(view, tanh.input[0])
    require(len(outer.factors) == 1, "the Tanh input is not a scaled sum")
    total = producer(view, outer.factors[0], "Add")
    require(outer.factors[0] == tanh.input[0] or private(view, outer.factors[0]), "the cubic sum has other readers")
    terms = [flatten_product(view, term) for term in total.input]
    require(len(terms) == 2 and all(t.factors for t in terms), "the sum does not have two terms in x")
    x = terms[0].factors[0]
    require(all(f == x for t in terms for f in t.factors), "the sum's terms are not powers of one value")
    by_power = {len(t.factors): t for t in terms}
    require(sorted(by_power) == [1, 3], "the sum is not x + c * x^3")
    dtype = dtype_of(ctx, x) if elem(ctx, x) in FLOAT_TYPES else np.dtype(np.float32)
    linear, cubic = by_power[1].coef, by_power[3].coef
    require(linear != 0.0 and close(outer.coef * linear, math.sqrt(2.0 / math.pi), dtype), "the Tanh scale is not sqrt(2/pi)")
    require(close(cubic / linear, 0.044715, dtype), "the cubic coefficient is not 0.044715")
    add, one_rank = match_plus_one(view, tanh.output[0], dtype)
    product = match_half_product(view, x, add.output[0], dtype)
    ranks = [outer.const_rank, one_rank, product.const_rank, *(t.const_rank for t in terms)]
    check_input(ctx, x, max(ranks))
    nodes = [*outer.nodes, total, *terms[0].nodes, *terms[1].nodes, tanh, add, *product.nodes]
    output = product.nodes[0].output[0]
    check_private(view, nodes, output)
    return Fusion("gelu_tanh", "Gelu", [x], output, nodes, 20, {"approximate": "tanh"})


def match_hardswish(hsig: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` -> HardSwish."""
    x = hsig.input[0]
    alpha, beta = float(get_attr(hsig, "alpha", 0.2)), float(get_attr(hsig, "beta", 0.5))  # type: ignore[arg-type]
    require(
        close(alpha, 1.0 / 6.0, np.dtype(np.float32)) and close(beta, 0.5, np.dtype(np.float32)), "HardSigmoid is not alpha=1/6, beta=0.5"
    )
    require((opset_version(ctx.model) or 1) >= 14, "below opset 14 x * HardSigmoid(x) is already the fused form (no note)")
    require(private(view, hsig.output[0]), "the HardSigmoid output has other readers")
    mul = sole_reader(view, hsig.output[0], "Mul")
    require(other_input(mul, hsig.output[0]) == x, "the HardSigmoid output does not multiply its own input")
    check_input(ctx, x, 0)
    check_private(view, [hsig, mul], mul.output[0])
    return Fusion("hardswish", "HardSwish", [x], mul.output[0], [hsig, mul], 14)


@dataclass
class HardSwishPair(Fusion):
    """``x * HardSigmoid(x, alpha=1/6, beta=0.5)``: HardSwish below opset 14 (onnxruntime fuses the pair into a Conv)."""

    def build(self, graph: GraphProto, ctx: PassContext) -> list[NodeProto]:
        """A HardSigmoid and the Mul by its input."""
        x = self.inputs[0]
        gate = ctx.names.fresh(f"{self.output}_hardsigmoid")
        return [
            helper.make_node("HardSigmoid", [x], [gate], name=ctx.names.fresh(gate), alpha=1.0 / 6.0, beta=0.5),
            helper.make_node("Mul", [x, gate], [self.output], name=ctx.names.fresh(f"{self.output}_Mul")),
        ]


def clip_bounds(view: GraphView, clip: NodeProto, opset: int) -> tuple[float, float] | None:
    """(min, max) of a Clip with constant bounds (inputs from opset 11, attributes before), or None."""
    if opset < 11:
        return float(get_attr(clip, "min", -math.inf)), float(get_attr(clip, "max", math.inf))  # type: ignore[arg-type]
    if len(clip.input) != 3:
        return None
    low, high = scalar(view, clip.input[1]), scalar(view, clip.input[2])
    return None if low is None or high is None else (low[0], high[0])


def int8_clip_form(ctx: PassContext) -> bool:
    """Whether the Clip forms stay: qdq follows on ort-cpu, whose QDQ transformer runs x + 3, the Clip and the
    products in uint8 (QLinearAdd, QLinearMul; the Clip absorbed), while a HardSigmoid runs in float between a DQ
    and a Q (PP-OCR det INT8: 0.505 of FP32 latency with the Clip form, 0.569 with HardSigmoid). qdq fuses the ones
    it leaves float (a Q/DQ inside a Clip form stops the match, so only float ones match after it)."""
    return ctx.target == "ort-cpu" and "qdq" in ctx.later


def match_clip_hard(clip: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Clip(x + 3, 0, 6) / 6`` -> HardSigmoid(x, 1/6, 0.5); ``x * Clip(x + 3, 0, 6) / 6`` -> HardSwish.

    The products are flattened (Mul by 1/6 or Div by 6, operands in any order). Below opset 14
    the HardSwish is written as ``x * HardSigmoid(x)``, the form onnxruntime fuses into a Conv.
    """
    bounds = clip_bounds(view, clip, opset_version(ctx.model) or 1)
    require(bounds is not None and bounds[0] == 0.0 and bounds[1] == 6.0, "the Clip is not Clip(., 0, 6) with constant bounds")
    require(private(view, clip.input[0]), "the Clip input has other readers")
    add = producer(view, clip.input[0], "Add")
    constant = next((name for name in add.input if scalar(view, name) is not None), None)
    require(constant is not None and len(add.input) == 2, "the Clip does not read x + constant")
    three = scalar(view, constant)
    x = other_input(add, constant)  # type: ignore[arg-type]
    dtype = dtype_of(ctx, x) if elem(ctx, x) in FLOAT_TYPES else np.dtype(np.float32)
    require(close(three[0], 3.0, dtype), "the Add does not add 3")  # type: ignore[index]
    gate = clip.output[0]
    require(private(view, gate), "the Clip output has other readers")
    node = sole_reader(view, gate, ("Mul", "Div"))
    found: Fusion | None = None  # a HardSigmoid, kept unless a larger product is a HardSwish
    for _ in range(MAX_CLIMB):
        top = node.output[0]
        product = flatten_product(view, top, top)
        factors = sorted(product.factors)
        if close(product.coef, 1.0 / 6.0, dtype) and factors in ([gate], sorted([x, gate])):
            check_input(ctx, x, max(three[1], product.const_rank))  # type: ignore[index]
            nodes = [add, clip, *product.nodes]
            check_private(view, nodes, top)
            if factors != [gate]:
                if (opset_version(ctx.model) or 1) >= 14:
                    return Fusion("hardswish", "HardSwish", [x], top, nodes, 14)
                return HardSwishPair("hardswish", "HardSigmoid", [x], top, nodes, 6)
            found = Fusion("hardsigmoid", "HardSigmoid", [x], top, nodes, 6, {"alpha": 1.0 / 6.0, "beta": 0.5})
        readers = view.consumers.get(top, [])
        if not (private(view, top) and readers[0].op_type in ("Mul", "Div") and is_standard(readers[0])):
            break
        node = readers[0]
        if node.input[0] != top and node.op_type != "Mul":
            break  # the product is a divisor
    if found is None:
        raise NoMatch("no Clip(x + 3, 0, 6) / 6 product within reach")
    return found


def match_softplus_log(log: NodeProto, view: GraphView, ctx: PassContext) -> tuple[str, list[NodeProto], int]:
    """``Log(Add(Exp(x), 1))``: (x, nodes, rank of the 1)."""
    require(private(view, log.input[0]), "the Log input has other readers")
    add = producer(view, log.input[0], "Add")
    exp = next((view.producer[i] for i in add.input if i in view.producer and view.producer[i].op_type == "Exp"), None)
    require(exp is not None and is_standard(exp), "the Log does not read Exp(x) + 1")
    x = exp.input[0]  # type: ignore[union-attr]
    dtype = dtype_of(ctx, x) if elem(ctx, x) in FLOAT_TYPES else np.dtype(np.float32)
    one = scalar(view, other_input(add, exp.output[0]))  # type: ignore[union-attr]
    require(one is not None and close(one[0], 1.0, dtype), "the Add does not add 1")
    return x, [exp, add, log], one[1]  # type: ignore[list-item, index]


def match_softplus(log: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Log(Exp(x) + 1)`` -> Softplus."""
    x, nodes, one_rank = match_softplus_log(log, view, ctx)
    check_input(ctx, x, one_rank)
    check_private(view, nodes, log.output[0])
    return Fusion("softplus", "Softplus", [x], log.output[0], nodes, 1)


def match_mish(tanh: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``x * Tanh(Softplus(x))`` (Softplus as an op or as Log(Exp(x) + 1)) -> Mish."""
    inner = view.producer.get(tanh.input[0])
    require(inner is not None and inner.op_type in ("Softplus", "Log") and is_standard(inner), "the Tanh does not read a softplus")
    if inner.op_type == "Softplus":  # type: ignore[union-attr]
        x, soft_nodes, one_rank = inner.input[0], [inner], 0  # type: ignore[union-attr]
    else:
        x, soft_nodes, one_rank = match_softplus_log(inner, view, ctx)  # type: ignore[arg-type]
    require(private(view, tanh.input[0]) and private(view, tanh.output[0]), "a Mish intermediate has other readers")
    mul = sole_reader(view, tanh.output[0], "Mul")
    require(other_input(mul, tanh.output[0]) == x, "the Tanh output does not multiply the softplus input")
    check_input(ctx, x, one_rank)
    nodes = [*soft_nodes, tanh, mul]  # type: ignore[list-item]
    check_private(view, nodes, mul.output[0])
    return Fusion("mish", "Mish", [x], mul.output[0], nodes, 18)


def for_target(fusion: Fusion, ctx: PassContext) -> Fusion:
    """On ort-* targets a GELU fusion becomes com.microsoft Gelu / FastGelu (any opset) when a kernel takes its dtype."""
    op_type = CONTRIB_GELU.get(fusion.kind)
    if op_type is None or not ort_target(ctx) or not has_kernel(ctx, elem(ctx, fusion.inputs[0])):  # type: ignore[arg-type]
        return fusion
    return Fusion(fusion.kind, op_type, list(fusion.inputs), fusion.output, fusion.nodes, 1, domain=MS_DOMAIN)


# (kinds it may return, '|'-separated; anchor op; matcher), in priority order: Mish before Softplus so a Mish claims its softplus.
MATCHERS = (
    ("gelu", "Erf", match_gelu),
    ("gelu_tanh", "Tanh", match_gelu_tanh),
    ("hardswish", "HardSigmoid", match_hardswish),
    ("hardswish|hardsigmoid", "Clip", match_clip_hard),
    ("mish", "Tanh", match_mish),
    ("softplus", "Log", match_softplus),
)


@register_pass
class FuseActivations(Pass):
    """Fuse decomposed activations into Gelu, HardSwish, HardSigmoid, Mish and Softplus when the opset has them.

    Pre: types inferred (``ctx.types``: the input's float dtype and rank). Matched:
    erf-GELU ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (Div by sqrt(2) or Mul by 1/sqrt(2), the 0.5
    and the operands in any order, 1 added on either side) -> Gelu (opset >= 20); tanh-GELU
    ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (x^3 as Pow or Mul chain,
    constants anywhere in the products, as torch and jax2tf write it) -> Gelu(approximate=
    'tanh') (opset >= 20); ``x * HardSigmoid(x, alpha=1/6, beta=0.5)`` -> HardSwish (opset
    >= 14); ``x * Clip(x + 3, 0, 6) / 6`` (Div by 6 or Mul by 1/6 anywhere in the product, as
    paddle2onnx and tf2onnx write it) -> HardSwish, or below opset 14 ``x * HardSigmoid(x)``
    (2 ops instead of 4, which onnxruntime fuses into the producing Conv); ``Clip(x + 3, 0, 6)
    / 6`` -> HardSigmoid(alpha=1/6, beta=0.5) (kind ``hardsigmoid``); ``x * Tanh(Softplus(x))``
    -> Mish (opset >= 18); ``Log(Exp(x) + 1)`` -> Softplus.
    Constants are one-element float constants equal to the expected value within 1e-6
    relative (or the constant dtype's epsilon when that is coarser, e.g. float16); their
    rank must not exceed the input's. Every intermediate must be read only inside the
    pattern and not be a graph output. Below the needed opset nothing is rewritten and a
    note says why. Targets ``ort-cpu`` / ``ort-gpu``: the GELUs become com.microsoft
    ``Gelu`` (erf) and ``FastGelu`` (tanh) at any opset, when the input's dtype has a kernel
    there (ort-cpu: float; ort-gpu: float, float16), and the model imports com.microsoft 1.
    Swish/SiLU (``x * Sigmoid(x)``) has no standard op and stays as it is.

    Post: the new node writes the pattern's last value (graph outputs keep their names).
    Softplus for Log(Exp(x) + 1) is exact where the original overflowed to inf (large x).
    Custom-domain ops are never touched.
    """

    name = "fuse_activations"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_activations."""

        kinds: tuple[str, ...] = option(KINDS, "fusions to apply, separated by '|' (gelu|gelu_tanh|hardswish|hardsigmoid|mish|softplus)")

        def validate(self) -> None:
            """Every kind must be one the pass knows."""
            check_choices("fuse_activations", "kinds", self.kinds, KINDS)

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every activation pattern (Mish before Softplus), then rewrite."""
        result = PassResult()
        view = ctx.view(scope.graph)
        wanted = set(self.options.kinds)  # type: ignore[attr-defined]
        matches: list[Fusion] = []
        anchors = Counter(anchor for kinds, anchor, _ in MATCHERS if wanted & set(kinds.split("|")))
        if not anchors:
            return result
        clip_kept = 0
        for kinds, anchor, matcher in MATCHERS:
            if not wanted & set(kinds.split("|")):
                continue
            keep_clip = matcher is match_clip_hard and int8_clip_form(ctx)
            for node in view.nodes:
                if node.op_type != anchor or not is_standard(node):
                    continue
                try:
                    fusion = matcher(node, view, ctx)
                except NoMatch as exc:
                    debug(self.name, node, exc)
                    continue
                if keep_clip:
                    clip_kept += 1
                elif fusion.kind in wanted:
                    matches.append(for_target(fusion, ctx))
        if clip_kept:
            result.notes.append(
                f"{self.name}: {clip_kept} Clip-form hard-swish/hard-sigmoid(s) kept: qdq runs later on ort-cpu, "
                "where onnxruntime runs them in uint8"
            )
        found = select(matches, set(), ctx, self.name, result)
        apply_fusions(scope.graph, view, found, ctx, result)
        return result
