"""Linear-algebra fusions: MatMul + Add into Gemm, Transpose into Gemm's trans flags, Div by a constant into Mul, affine runs into MatMul.

Each pass collects every match of a graph first (the ``match_*`` functions only read the
graph and raise :class:`NoMatch` with a reason), then rewrites with the toolkit of
:mod:`onnxopt.passes.fusion_support`: the new node writes the pattern's last value, new
constants become new initializers (old ones are left for ``eliminate_dead_code``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, TypeProto, helper

from onnxopt.graph import GraphScope, GraphView
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.passes.fusion_support import Fusion, apply_fusions, check_private, collect, elem, producer, select, sole_reader
from onnxopt.passes.noop_rules import NoMatch, constant_array, constant_tensor, default_opset, dims_of, get_attr, require
from onnxopt.registry import register_pass

GEMM_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
GEMM_MIN_OPSET = 7  # before 7, Gemm needs the 'broadcast' attribute to broadcast C


def node_attrs(node: NodeProto) -> dict[str, object]:
    """A node's attributes as a name -> value dict (for :class:`Fusion.attrs`)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def symbolic_dims(type_proto: TypeProto | None) -> list[int | str | None] | None:
    """A tensor type's dims: an int when static, the symbol's name when symbolic, None when unknown; None if rank unknown."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in type_proto.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def broadcasts_as_gemm_c(bias: list[int | str | None], out: list[int | str | None]) -> bool:
    """Whether a value of dims ``bias`` broadcasts unidirectionally to ``out`` (rank 2) leaving it unchanged."""
    if len(bias) > len(out):
        return False
    for b, o in zip(reversed(bias), reversed(out)):
        if b == 1:
            continue
        if b is None or o is None or b != o:
            return False
    return True


# ----------------------------------------------------------------------------- matchers


def match_matmul_add(add: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Add(MatMul(A, B), bias)`` (either operand order) with A rank 2, B a rank-2 constant -> Gemm(A, B, bias)."""
    require(default_opset(ctx) >= GEMM_MIN_OPSET, f"Gemm with a broadcast C needs opset >= {GEMM_MIN_OPSET}")
    require(len(add.input) == 2 and not add.attribute, "the Add has legacy broadcast attributes or not two inputs")
    reasons: list[str] = []
    for index in (0, 1):
        try:
            return _matmul_add(add, producer(view, add.input[index], "MatMul"), add.input[1 - index], view, ctx)
        except NoMatch as exc:
            reasons.append(f"input {index}: {exc}")
    raise NoMatch("; ".join(reasons))


def _matmul_add(add: NodeProto, matmul: NodeProto, bias: str, view: GraphView, ctx: PassContext) -> Fusion:
    """The Gemm fusion of ``add`` reading ``matmul``'s output and ``bias``; NoMatch when a guard fails."""
    mm_out = matmul.output[0]
    require(bias != mm_out, "the Add adds the MatMul to itself")
    sole_reader(view, mm_out, "Add")
    check_private(view, [matmul, add], add.output[0])
    a, b = matmul.input[0], matmul.input[1]
    require(elem(ctx, a) in GEMM_TYPES, "the MatMul is not float, float16 or double")
    a_dims = symbolic_dims(ctx.types.get(a))
    require(a_dims is not None and len(a_dims) == 2, "A is not known to have rank 2")
    weight = constant_tensor(view, b)
    require(weight is not None and len(weight.dims) == 2, "B is not a rank-2 constant of this graph")
    bias_dims = symbolic_dims(ctx.types.get(bias))
    require(bias_dims is not None, "the bias shape is unknown")
    out = [a_dims[0], int(weight.dims[1])]  # type: ignore[index, union-attr]
    require(broadcasts_as_gemm_c(bias_dims, out), f"the bias {bias_dims} does not broadcast to the output {out} as Gemm's C")  # type: ignore[arg-type]
    return Fusion("matmul_add_to_gemm", "Gemm", [a, b, bias], add.output[0], [matmul, add], GEMM_MIN_OPSET)


def _rank2_transpose(view: GraphView, ctx: PassContext, name: str, gemm: NodeProto) -> NodeProto | None:
    """The Transpose(perm=[1,0]) writing ``name`` if only ``gemm`` reads it (and it is no graph output), else None."""
    try:
        node = producer(view, name, "Transpose")
        reader = sole_reader(view, name, "Gemm")
    except NoMatch:
        return None
    perm = get_attr(node, "perm")
    if perm is None:
        dims = dims_of(ctx.types.get(node.input[0]))
        if dims is None or len(dims) != 2:
            return None
    elif list(perm) != [1, 0]:  # type: ignore[call-overload]
        return None
    if reader is not gemm or name in view.graph_outputs or name in gemm.input[2:]:
        return None
    return node


def match_transpose_gemm(gemm: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """A Gemm whose A and/or B is a private 2-D Transpose -> the Gemm with transA/transB toggled."""
    require(len(gemm.input) >= 2, "the Gemm has fewer than two inputs")
    attrs = node_attrs(gemm)
    inputs: list[str | np.ndarray] = list(gemm.input)
    removed: list[NodeProto] = []
    for index, flag in ((0, "transA"), (1, "transB")):
        transpose = _rank2_transpose(view, ctx, gemm.input[index], gemm)
        if transpose is None:
            continue
        inputs[index] = transpose.input[0]
        attrs[flag] = 1 - int(attrs.get(flag, 0))  # type: ignore[call-overload]
        if all(n is not transpose for n in removed):
            removed.append(transpose)
    require(bool(removed), "neither A nor B is a private 2-D Transpose")
    return Fusion("transpose_into_gemm", "Gemm", inputs, gemm.output[0], [*removed, gemm], 1, attrs)


def match_div_const(div: NodeProto, view: GraphView, ctx: PassContext, exact_only: bool) -> Fusion:
    """``Div(x, c)`` with a finite, non-zero float constant c whose reciprocal is finite -> ``Mul(x, 1/c)``."""
    require(len(div.input) == 2 and not div.attribute, "the Div has legacy broadcast attributes or not two inputs")
    require(default_opset(ctx) >= 7, "before opset 7 Div broadcasts by attributes")
    c = constant_array(view, div.input[1])
    require(c is not None, "the divisor is not a constant of this graph")
    require(c.dtype in (np.float32, np.float16, np.float64), "the divisor is not float, float16 or double")  # type: ignore[union-attr]
    require(bool(np.all(np.isfinite(c))) and bool(np.all(c != 0)), "the divisor has a zero or non-finite element")
    with np.errstate(over="ignore", divide="ignore"):
        reciprocal = (1.0 / c.astype(np.float64)).astype(c.dtype)  # type: ignore[union-attr]
    require(bool(np.all(np.isfinite(reciprocal))), "a reciprocal is not finite in the divisor's dtype")
    if exact_only:
        mantissa, _ = np.frexp(c)
        require(bool(np.all(np.abs(mantissa) == 0.5)), "a reciprocal is not exact (the divisor is not a power of two)")
    return Fusion("div_to_mul", "Mul", [div.input[0], reciprocal], div.output[0], [div], 7)


AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def last_axis_vector(value: np.ndarray, out_rank: int | None, columns: int) -> np.ndarray | None:
    """``value`` as a float64 vector of ``columns`` when it broadcasts along the last axis only
    of a rank-``out_rank`` result without changing its shape; else None (rank unknown: value rank <= 1).
    """
    if value.ndim > (1 if out_rank is None else out_rank):
        return None
    if any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, columns)):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (columns,)).copy()


@dataclass
class ScaledMatMul(Fusion):
    """``MatMul(x, W * scale)`` then, when ``shift`` is given, ``Add(., shift)``: the folded chain."""

    shift: np.ndarray | None = None

    def build(self, graph: GraphProto, ctx: PassContext) -> list[NodeProto]:
        """The MatMul with its new weight (and the one Add of the folded shifts) writing :attr:`output`."""
        if self.shift is None:
            return super().build(graph, ctx)
        product = ctx.names.fresh(f"{self.output}_scaled_matmul")
        matmul = Fusion(self.kind, "MatMul", self.inputs, product, self.nodes, self.opset)
        add = Fusion(self.kind, "Add", [product, self.shift], self.output, self.nodes, self.opset)
        return [*matmul.build(graph, ctx), *add.build(graph, ctx)]


def match_matmul_affine(matmul: NodeProto, view: GraphView, ctx: PassContext) -> ScaledMatMul:
    """``MatMul(x, W)`` (W a 2-D float constant) followed by a run of per-column Mul/Add/Sub/Div by constants."""
    require(default_opset(ctx) >= 7, "Mul/Add before opset 7 have the 'broadcast' attribute")
    require(len(matmul.input) == 2 and len(matmul.output) == 1, "not a two-input MatMul")
    weight = constant_array(view, matmul.input[1], max_elements=None)
    require(weight is not None and weight.ndim == 2, "the MatMul's B is not a 2-D constant of this graph")
    require(weight.dtype in (np.float32, np.float16, np.float64), "the weight is not float, float16 or double")  # type: ignore[union-attr]
    columns = int(weight.shape[1])  # type: ignore[union-attr]
    out_rank = rank_of(ctx, matmul.output[0])
    scale, shift = np.ones(columns), np.zeros(columns)
    chain: list[NodeProto] = []
    ops: list[str] = []
    current = matmul.output[0]
    while True:
        try:
            node = sole_reader(view, current, AFFINE_OPS)
            require(current not in view.graph_outputs, f"'{current}' is a graph output")
            require(len(node.input) == 2 and not node.attribute, "the reader has legacy broadcast attributes or not two inputs")
            commutes = node.op_type in ("Mul", "Add")
            require(node.input[0] == current or (commutes and node.input[1] == current), "the product is the divisor or subtrahend")
            other = node.input[1] if node.input[0] == current else node.input[0]
            value = constant_array(view, other)
            require(value is not None and value.dtype == weight.dtype, "the operand is not a constant of the weight's dtype")  # type: ignore[union-attr]
            vector = last_axis_vector(value, out_rank, columns)  # type: ignore[arg-type]
            require(vector is not None and bool(np.all(np.isfinite(vector))), "the operand is not a finite per-column constant")
            require(node.op_type != "Div" or bool(np.all(vector != 0)), "division by zero")  # type: ignore[operator]
        except NoMatch as exc:
            require(bool(chain), str(exc))
            break
        if node.op_type == "Mul":
            scale, shift = scale * vector, shift * vector
        elif node.op_type == "Div":
            scale, shift = scale / vector, shift / vector
        else:
            shift = shift + vector if node.op_type == "Add" else shift - vector  # type: ignore[operator]
        chain.append(node)
        ops.append(node.op_type)
        current = node.output[0]
    needs_add = any(op in ("Add", "Sub") for op in ops)
    require(len(chain) > int(needs_add), "a lone bias Add: nothing to fold")
    with np.errstate(over="ignore", invalid="ignore"):
        new_weight = (weight.astype(np.float64) * scale).astype(weight.dtype)  # type: ignore[union-attr]
        new_shift = shift.astype(weight.dtype)  # type: ignore[union-attr]
    require(bool(np.all(np.isfinite(new_weight))) and bool(np.all(np.isfinite(new_shift))), "the folded weight is not finite")
    kind = "affine_into_matmul"
    return ScaledMatMul(kind, "MatMul", [matmul.input[0], new_weight], current, [matmul, *chain], 7, shift=new_shift if needs_add else None)


def rank_of(ctx: PassContext, name: str) -> int | None:
    """The inferred rank of ``name``, or None."""
    dims = dims_of(ctx.types.get(name))
    return None if dims is None else len(dims)


# ----------------------------------------------------------------------------- passes


@register_pass
class FuseMatMulAdd(Pass):
    """Fuse a 2-D MatMul with a constant weight followed by a bias Add into one Gemm.

    Pre: types inferred (``ctx.types``: A's rank and dtype, the bias shape). Matched:
    ``Add(MatMul(A, B), bias)`` (bias on either side of the Add) where A is known to have
    rank 2, B is a rank-2 constant of this graph (initializer not a graph input, or Constant
    node), A is float, float16 or double, and the bias has rank <= 2 and broadcasts
    unidirectionally to the [M, N] output exactly as Gemm's C does (each dim 1 or provably
    equal: shapes [], [N], [1, N], [M, 1], [M, N]; symbolic dims must carry the same name).
    The MatMul output must be read only by the Add and not be a graph output. Needs ai.onnx
    opset >= 7 (older Gemm needs a 'broadcast' attribute). Rank-3 MatMul + Add (batched,
    transformer style) is left alone. Target: every target ("portable", "trt", "ort-cpu",
    "ort-gpu") prefers one Gemm for the rank-2 case, so the rewrite does not depend on
    ``ctx.target``. Custom-domain ops are never touched.

    Post: a Gemm (alpha = beta = 1, no transposes) writes the Add's output (graph outputs
    keep their names); the MatMul and the Add are gone. Results are equal up to the bias
    being added inside the GEMM kernel (float rounding). Surviving values keep their types.
    """

    name = "fuse_matmul_add"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Add, then rewrite."""
        result = PassResult()
        view = ctx.view(scope.graph)
        matches = collect(view, "Add", lambda node: match_matmul_add(node, view, ctx), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result


@register_pass
class FuseTransposeIntoGemm(Pass):
    """Absorb a 2-D Transpose feeding Gemm's A or B into the Gemm's transA/transB flag.

    Pre: types inferred (only used for a Transpose without ``perm``, which must have a
    rank-2 input). Matched: a standard Gemm whose input A and/or B is written by a standard
    Transpose with perm [1, 0] (or no perm on a rank-2 input) whose output is read only by
    that Gemm and is not a graph output (a Gemm reading one Transpose as both A and B has
    both flags toggled). Constant weights are not pre-transposed: toggling transB is as
    fast on every target and needs no new initializer.

    Post: the Gemm reads the Transpose's input with the flag toggled (0 <-> 1) and writes
    its own output; the Transpose is gone. alpha, beta and C are unchanged. The result is
    bit-identical. Surviving values keep their types. Custom-domain ops are never touched.
    """

    name = "fuse_transpose_into_gemm"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Gemm, then rewrite."""
        result = PassResult()
        view = ctx.view(scope.graph)
        matches = collect(view, "Gemm", lambda node: match_transpose_gemm(node, view, ctx), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result


@register_pass
class DivToMul(Pass):
    """Replace division by a float constant with multiplication by its reciprocal.

    Pre: none. Matched: a standard ``Div(x, c)`` where c is a float, float16 or double
    constant of this graph (initializer not a graph input, or Constant node; at most 2^20
    elements) with no zero, inf or NaN element and whose reciprocal, computed in float64
    and cast to c's dtype, is finite. With ``exact_only`` only powers of two (exact
    reciprocals) are rewritten. Needs ai.onnx opset >= 7 (older Div broadcasts by
    attributes, which onnxruntime cannot run to verify). Nothing is done in IR < 4 models (a
    new initializer would have to be a graph input). Integer Div is never touched (it truncates).

    Post: ``Mul(x, r)`` with r a new initializer (the old constant is left for
    ``eliminate_dead_code``) writes the Div's output. ``x * fl(1/c)`` may differ from ``fl(x / c)`` by about one unit in the last
    place (within fp32 verification tolerance); with ``exact_only`` results are identical.
    Surviving values keep their types.
    """

    name = "div_to_mul"
    preserves_types = True

    @dataclass
    class Options(PassOptions):
        """Options of div_to_mul."""

        exact_only: bool = option(False, "only rewrite divisors that are powers of two (bit-identical results)")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Div, then rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        view = ctx.view(scope.graph)
        exact = bool(self.options.exact_only)  # type: ignore[attr-defined]
        matches = collect(view, "Div", lambda node: match_div_const(node, view, ctx, exact), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result


@register_pass
class FoldMatMulAffine(Pass):
    """Fold per-column Mul/Add/Sub/Div by constants after a MatMul with a constant weight into the weight and one Add.

    Pre: types inferred (the MatMul output's rank, for constants of rank > 1). Matched: a
    standard ``MatMul(x, W)`` with W a 2-D float, float16 or double constant of this graph,
    followed by a run of standard Mul or Add (constant on either side), Sub (``y - c``) or
    Div (``y / c``, c non-zero), each constant of W's dtype, finite, and varying only along
    the last axis (shapes [N], [1, N], [1, 1, N], scalars; never raising the output's rank),
    each intermediate read only by the next node and not a graph output. A lone bias Add is
    left alone (nothing to gain). Transformer layer scales (ConvNeXt's ``gamma``) and the
    bias-then-scale runs of exporters are the usual matches.

    Post: ``MatMul(x, W * s)`` with a new weight (W itself is left for other readers and
    ``eliminate_dead_code``), followed, when the run had an Add or Sub, by one
    ``Add(., shift)`` writing the run's last value. Weights are computed in float64 and cast
    back (outputs equal up to float rounding). Nothing is done in IR < 4 models. Surviving
    values keep their types. Custom-domain ops are never touched.
    """

    name = "fold_matmul_affine"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match a run after every MatMul, then rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        view = ctx.view(scope.graph)
        matches = collect(view, "MatMul", lambda node: match_matmul_affine(node, view, ctx), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result
