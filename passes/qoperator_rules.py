"""Match rules of the ``qoperator`` pass: one Q/DQ node group -> one onnxruntime QOperator node.

Every rule is anchored at a float op and matches ``DequantizeLinear`` inputs -> op -> one
``QuantizeLinear`` (per-tensor activations), the group onnxruntime's CPU QDQ transformer turns
into the same QLinear kernel at load time. Rules raise :class:`NoMatch` with the reason a group
does not qualify and never touch the graph; the pass applies the matches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto

from onnxopt.graph import GraphView, is_standard, node_label
from onnxopt.passbase import PassContext
from onnxopt.passes.contrib_ops import MS_DOMAIN
from onnxopt.passes.fusion_support import check_private, elem, producer, rank, sole_reader
from onnxopt.passes.noop_rules import NoMatch, constant_tensor, default_opset, get_attr, require

QUANTIZED_TYPES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}
SCALE_RTOL = 1e-5  # a bias scale must equal input scale x weight scale within float32 rounding
ZERO = "zero"  # the marker of an absent zero point: the pass writes a shared zero of the value's type


@dataclass(frozen=True)
class QValue:
    """A quantized value as the group reads or writes it: the integer tensor, its scale and zero point names."""

    value: str
    scale: str
    zero_point: str  # "" when the Q/DQ node omits it (then zero, of the value's type)
    dtype: int


@dataclass(frozen=True)
class NewConstant:
    """An input the pass writes as an initializer (once per graph and value), named after ``hint``."""

    hint: str
    value: np.ndarray

    def key(self) -> tuple[str, str, bytes]:
        """What makes two such constants the same initializer."""
        return self.hint, str(self.value.dtype), self.value.tobytes()


Input = str | tuple[str, int] | NewConstant  # see QMatch.inputs


@dataclass
class QMatch:
    """One group: the nodes it replaces, the QOperator node that replaces them, and its inputs.

    ``inputs`` are value names; ``(ZERO, dtype)`` pairs stand for a shared zero point the pass
    writes, a :class:`NewConstant` for another constant it writes. ``anchor`` is the float op, whose name
    the new node keeps.
    """

    kind: str
    op_type: str
    domain: str
    inputs: list[Input]
    output: str
    nodes: list[NodeProto]
    anchor: NodeProto
    attrs: dict[str, object] = field(default_factory=dict)
    channels_last: bool = False  # the node reads and writes NHWC: the pass puts a Transpose on each side
    repeat: int = 1  # the node is applied this many times in a row, each step reading the previous one's output
    keep_nchw: bool = False  # the pass puts a no-op Reshape after the node (see match_resize)


Rule = Callable[[NodeProto, GraphView, PassContext, bool], QMatch]


def _array(view: GraphView, name: str) -> np.ndarray | None:
    tensor = constant_tensor(view, name) if name else None
    if tensor is None:
        return None
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _zero(q: QValue) -> str | tuple[str, int]:
    return q.zero_point or (ZERO, q.dtype)


def _check_block(node: NodeProto) -> None:
    require(not get_attr(node, "block_size", 0), f"{node_label(node)} is blockwise")
    require(get_attr(node, "saturate", 1) == 1, f"{node_label(node)} sets saturate=0")


def _value_type(view: GraphView, ctx: PassContext, node: NodeProto, name: str, zero_point: str) -> int:
    zp = constant_tensor(view, zero_point) if zero_point else None
    if zp is not None:
        return zp.data_type
    if node.op_type == "QuantizeLinear":
        return int(get_attr(node, "output_dtype", 0) or TensorProto.UINT8)
    return elem(ctx, name)


def dequantized(view: GraphView, ctx: PassContext, name: str, *, per_tensor: bool = True) -> tuple[QValue, NodeProto]:
    """The quantized value that a DequantizeLinear writing ``name`` reads (per-tensor unless ``per_tensor`` is false)."""
    dq = producer(view, name, "DequantizeLinear")
    _check_block(dq)
    value, scale = dq.input[0], dq.input[1]
    zero_point = dq.input[2] if len(dq.input) > 2 else ""
    scales = _array(view, scale)
    require(scales is not None and scales.dtype == np.float32, f"the scale of {node_label(dq)} is not a float32 constant")
    zeros = _array(view, zero_point)
    require(not zero_point or zeros is not None, f"the zero point of {node_label(dq)} is not a constant")
    if per_tensor:  # the QLinear ops take rank-0 scales and zero points
        require(scales.ndim == 0 and (zeros is None or zeros.ndim == 0), f"{node_label(dq)} has no rank-0 scale and zero point")  # type: ignore[union-attr]
    dtype = _value_type(view, ctx, dq, value, zero_point)
    require(
        dtype in QUANTIZED_TYPES or dtype == TensorProto.INT32,
        f"{node_label(dq)} reads a {TensorProto.DataType.Name(dtype) if dtype else 'untyped'} value",
    )
    return QValue(value, scale, zero_point, dtype), dq


def quantized_output(view: GraphView, name: str) -> tuple[QValue, NodeProto]:
    """The per-tensor QuantizeLinear that alone reads ``name``."""
    q = sole_reader(view, name, "QuantizeLinear")
    _check_block(q)
    require(name not in view.graph_outputs, f"'{name}' is a graph output")
    scales = _array(view, q.input[1])
    require(scales is not None and scales.ndim == 0 and scales.dtype == np.float32, f"{node_label(q)} has no rank-0 float32 scale")
    zero_point = q.input[2] if len(q.input) > 2 else ""
    zeros = _array(view, zero_point)
    require(not zero_point or (zeros is not None and zeros.ndim == 0), f"the zero point of {node_label(q)} is not a rank-0 constant")
    dtype = int(constant_tensor(view, zero_point).data_type) if zero_point else int(get_attr(q, "output_dtype", 0) or TensorProto.UINT8)  # type: ignore[union-attr]
    require(dtype in QUANTIZED_TYPES, f"{node_label(q)} writes {TensorProto.DataType.Name(dtype)}")
    return QValue(q.output[0], q.input[1], zero_point, dtype), q


def _zero_point_value(view: GraphView, q: QValue) -> int:
    array = _array(view, q.zero_point)
    return int(array.reshape(-1)[0]) if array is not None else 0


def _scale_value(view: GraphView, q: QValue) -> float:
    return float(_array(view, q.scale).reshape(-1)[0])  # type: ignore[union-attr]


def _absorbed_activation(view: GraphView, node: NodeProto, out: QValue) -> None:
    """A Relu/Clip between the op and its Q that the Q's own saturation already applies; NoMatch otherwise."""
    qmin, qmax = QUANTIZED_TYPES[out.dtype]
    zero, scale = _zero_point_value(view, out), _scale_value(view, out)
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    if node.op_type == "Relu":
        require(zero == qmin, f"{node_label(node)}: the zero point of the Q after it is not the type's minimum")
        return
    lo = _array(view, node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(get_attr(node, "min", -np.inf))
    hi = _array(view, node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(get_attr(node, "max", np.inf))
    require(lo is not None and hi is not None and lo.size == 1 and hi.size == 1, f"{node_label(node)} has non-constant bounds")
    tol = scale / 2
    require(float(lo) <= low + tol and float(hi) >= high - tol, f"{node_label(node)} clips inside the Q range [{low:g}, {high:g}]")  # type: ignore[arg-type]


def _output_group(view: GraphView, anchor: NodeProto, *, activation: bool) -> tuple[QValue, NodeProto, list[NodeProto]]:
    """The Q that reads the anchor's output, through an absorbable Relu/Clip when ``activation``; the nodes replaced."""
    require(len([o for o in anchor.output if o]) == 1, f"{node_label(anchor)} has several outputs")
    nodes = [anchor]
    name = anchor.output[0]
    readers = view.consumers.get(name, [])
    act = readers[0] if activation and len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and is_standard(readers[0]) else None
    if act is not None and name not in view.graph_outputs:
        out, q = quantized_output(view, act.output[0])
        _absorbed_activation(view, act, out)
        nodes.append(act)
    else:
        out, q = quantized_output(view, name)
    nodes.append(q)
    check_private(view, nodes, q.output[0])
    return out, q, nodes


def _same_type(*values: QValue) -> None:
    types = {v.dtype for v in values}
    require(len(types) == 1, f"mixed integer types {sorted(TensorProto.DataType.Name(t) for t in types)}")


def _weight(view: GraphView, ctx: PassContext, name: str, axis: int, channels: int | None) -> QValue:
    """A constant int8/uint8 weight read per-tensor or per-channel along ``axis``, with zero zero points when per-channel."""
    w, dq = dequantized(view, ctx, name, per_tensor=False)
    require(w.dtype in QUANTIZED_TYPES, f"the weight of {node_label(dq)} is {TensorProto.DataType.Name(w.dtype)}")
    values = constant_tensor(view, w.value)
    require(values is not None, f"the weight '{w.value}' is not a constant")
    scales = _array(view, w.scale)
    if scales.size != 1:  # type: ignore[union-attr]
        dims = list(values.dims)  # type: ignore[union-attr]
        dq_axis = int(get_attr(dq, "axis", 1))
        dq_axis = dq_axis + len(dims) if dq_axis < 0 else dq_axis
        require(
            dq_axis == axis and scales.ndim == 1 and channels is not None and scales.size == channels,
            "weight scales not along the output channels",
        )  # type: ignore[union-attr]
        zeros = _array(view, w.zero_point)
        require(zeros is None or not zeros.any(), "per-channel weight zero points other than 0")
        return QValue(w.value, w.scale, "", w.dtype)
    zeros = _array(view, w.zero_point)
    require(scales.ndim == 0 and (zeros is None or zeros.ndim == 0), "the per-tensor weight scale or zero point is not rank 0")  # type: ignore[union-attr]
    return w


def _bias(view: GraphView, ctx: PassContext, name: str, x: QValue, w: QValue) -> str:
    """The int32 bias read through a DequantizeLinear whose scale is input scale x weight scale."""
    b, dq = dequantized(view, ctx, name, per_tensor=False)
    require(
        b.dtype == TensorProto.INT32 and constant_tensor(view, b.value) is not None,
        "the bias is not a constant int32 read through a DequantizeLinear",
    )
    zeros = _array(view, b.zero_point)
    require(zeros is None or not zeros.any(), "the bias has a zero point other than 0")
    expected = _scale_value(view, x) * _array(view, w.scale).astype(np.float32).reshape(-1)  # type: ignore[union-attr]
    actual = _array(view, b.scale).astype(np.float32).reshape(-1)  # type: ignore[union-attr]
    require(actual.size in (1, expected.size), "the bias scale does not match the weight's channels")
    require(bool(np.allclose(actual, expected, rtol=SCALE_RTOL, atol=0)), "the bias scale is not input scale x weight scale")
    return b.value


def match_conv(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x), DQ(w)[, DQ(b int32)] -> Conv [-> Relu/Clip] -> Q  =>  QLinearConv."""
    x, _ = dequantized(view, ctx, node.input[0])
    weight = constant_tensor(view, producer(view, node.input[1], "DequantizeLinear").input[0])
    require(weight is not None and len(weight.dims) >= 3, "the weight is not a constant of rank >= 3")
    w = _weight(view, ctx, node.input[1], 0, weight.dims[0])  # type: ignore[union-attr]
    require(x.dtype == TensorProto.UINT8 or w.dtype == TensorProto.INT8, "int8 input with a uint8 weight (no onnxruntime kernel)")
    out, q, nodes = _output_group(view, node, activation=True)
    _same_type(x, out)
    inputs: list[Input] = [x.value, x.scale, _zero(x), w.value, w.scale, _zero(w), out.scale, _zero(out)]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(_bias(view, ctx, node.input[2], x, w))
    attrs = {a.name: a for a in node.attribute}
    return QMatch("conv", "QLinearConv", "", inputs, q.output[0], nodes, node, attrs)


def match_matmul(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(a), DQ(b) -> MatMul -> Q  =>  QLinearMatMul (b per-tensor, or per column when 2-D)."""
    a, _ = dequantized(view, ctx, node.input[0])
    b_dq = producer(view, node.input[1], "DequantizeLinear")
    b_values = constant_tensor(view, b_dq.input[0])
    if b_values is not None and len(b_values.dims) == 2:
        b = _weight(view, ctx, node.input[1], 1, b_values.dims[1])
    else:
        b, _ = dequantized(view, ctx, node.input[1])
        require(b.dtype in QUANTIZED_TYPES, "b is not int8/uint8")
    require(a.dtype == TensorProto.UINT8 or b.dtype == TensorProto.INT8, "int8 a with a uint8 b (no onnxruntime kernel)")
    out, q, nodes = _output_group(view, node, activation=True)
    _same_type(a, out)
    inputs: list[Input] = [a.value, a.scale, _zero(a), b.value, b.scale, _zero(b), out.scale, _zero(out)]
    return QMatch("matmul", "QLinearMatMul", "", inputs, q.output[0], nodes, node)


def _contrib(contrib: bool) -> None:
    require(contrib, "contrib=false: com.microsoft QLinear ops are not emitted")


def match_binary(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(a), DQ(b) -> Add/Mul -> Q  =>  com.microsoft QLinearAdd / QLinearMul."""
    _contrib(contrib)
    require(len(node.input) == 2, f"{node_label(node)} does not have two inputs")
    a, _ = dequantized(view, ctx, node.input[0])
    b, _ = dequantized(view, ctx, node.input[1])
    out, q, nodes = _output_group(view, node, activation=True)
    _same_type(a, b, out)
    inputs: list[Input] = [a.value, a.scale, _zero(a), b.value, b.scale, _zero(b), out.scale, _zero(out)]
    return QMatch(node.op_type.lower(), f"QLinear{node.op_type}", MS_DOMAIN, inputs, q.output[0], nodes, node)


def match_unary(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x) -> GlobalAveragePool / AveragePool / Sigmoid / LeakyRelu -> Q  =>  com.microsoft QLinear<op>."""
    _contrib(contrib)
    x, _ = dequantized(view, ctx, node.input[0])
    out, q, nodes = _output_group(view, node, activation=True)
    _same_type(x, out)
    attrs: dict[str, object] = {a.name: a for a in node.attribute}
    if node.op_type in ("GlobalAveragePool", "AveragePool"):
        dims = rank(ctx, node.input[0])
        require(dims is not None and dims >= 3, f"the input of {node_label(node)} has no known rank >= 3")
        require(all(d == 1 for d in get_attr(node, "dilations", []) or []), f"{node_label(node)} has dilations")  # type: ignore[union-attr]
        attrs.pop("dilations", None)
        attrs["channels_last"] = 0
    inputs: list[Input] = [x.value, x.scale, _zero(x), out.scale, _zero(out)]
    return QMatch(node.op_type.lower(), f"QLinear{node.op_type}", MS_DOMAIN, inputs, q.output[0], nodes, node, attrs)


def match_concat(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x1), DQ(x2), ... -> Concat -> Q  =>  com.microsoft QLinearConcat."""
    _contrib(contrib)
    parts = [dequantized(view, ctx, name)[0] for name in node.input]
    out, q, nodes = _output_group(view, node, activation=True)
    _same_type(*parts, out)
    inputs: list[Input] = [out.scale, _zero(out)]
    for part in parts:
        inputs += [part.value, part.scale, _zero(part)]
    return QMatch("concat", "QLinearConcat", MS_DOMAIN, inputs, q.output[0], nodes, node, {"axis": get_attr(node, "axis", 0)})


# op: opset from which it takes int8/uint8
PASS_THROUGH = {"Resize": 11, "MaxPool": 12, "Reshape": 5, "Transpose": 1, "Flatten": 1, "Squeeze": 1, "Unsqueeze": 1}


def match_pass_through(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x) -> MaxPool/Reshape/Transpose/... -> Q with the same scale and zero point  =>  the op on the integers."""
    require(default_opset(ctx) >= PASS_THROUGH[node.op_type], f"{node.op_type} takes integers from opset {PASS_THROUGH[node.op_type]}")
    x, _ = dequantized(view, ctx, node.input[0])
    require(node.op_type != "MaxPool" or len([o for o in node.output if o]) == 1, "MaxPool writes indices")
    out, q, nodes = _output_group(view, node, activation=False)
    _same_type(x, out)
    require(
        _scale_value(view, x) == _scale_value(view, out) and _zero_point_value(view, x) == _zero_point_value(view, out),
        "the Q's scale or zero point differs from the DQ's",
    )
    inputs: list[Input] = [x.value, *node.input[1:]]
    attrs = {a.name: a for a in node.attribute}
    return QMatch(node.op_type.lower(), node.op_type, "", inputs, q.output[0], nodes, node, attrs)


def match_max_pool(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x) -> MaxPool -> Q with the same scale and zero point  =>  MaxPool on the integers; a 2-D pool as
    Transpose -> com.microsoft NhwcMaxPool -> Transpose with ``contrib``.

    onnxruntime runs an integer MaxPool in NCHW about 25x slower than its NHWC kernel (117 us against 4 us
    for one [1, 200, 2, 96] uint8 pool alone), and converts to the NHWC one only where its layout pass carries a Transpose
    to the pool, which it does not after ops that stay NCHW (PP-OCR cls's hard-swish before its last pool).
    Written NHWC, the Transposes cancel against the layout pass's own ones where the neighbours are NHWC.
    """
    found = match_pass_through(node, view, ctx, contrib)
    if not contrib or rank(ctx, node.input[0]) != 4:
        return found
    attrs = {key: value for key, value in found.attrs.items() if key != "storage_order"}  # indices only; NhwcMaxPool refuses it
    return QMatch("maxpool", "NhwcMaxPool", MS_DOMAIN, found.inputs, found.output, found.nodes, node, attrs, channels_last=True)


# (coordinate_transformation_mode, nearest_mode) pairs under which nearest upsampling by an integer factor s reads
# input index floor(i / s) for output index i: half_pixel maps i = s*q + r to q + (r + 0.5)/s - 0.5, strictly within
# 0.5 of q, so either rounding gives q; tf_half_pixel_for_nn maps it to q + (r + 0.5)/s, which floor takes to q
FLOOR_INDEX_MODES = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"),
    ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_ceil"),
    ("tf_half_pixel_for_nn", "floor"),
}
MAX_UPSAMPLE_STEPS = 5  # x32


def match_resize(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch:
    """DQ(x) -> nearest Resize by 2^k on H and W -> Q with the same scale and zero point  =>  k integer Resizes by 2
    (asymmetric, floor) and a no-op Reshape.

    onnxruntime copies a 4-D nearest upsampling by exactly 2 on the last two axes in a fast path (40 us for a
    [1, 96, 40, 40] uint8 tensor on one core); any other factor, coordinate mode or layout takes its generic
    loop, about 20x slower: 200 us for x4 or x8 to 80 x 80 with 24 channels, 770 us for the same x2 in
    NHWC. Its layout pass moves an integer Resize between NHWC convolutions to NHWC. So a factor of 2^k is
    written as k steps of 2 with the index map ``floor(i / 2)`` (the same pixels as the original's
    ``floor(i / s)``, see FLOOR_INDEX_MODES), and the Reshape to ``[0, 0, 0, 0]`` after them keeps the layout
    pass from carrying a Transpose through: it would have to stop at the Reshape, so it leaves the Resizes NCHW.
    """
    require(default_opset(ctx) >= 13, "Resize takes an empty roi from opset 13")
    require(len(node.input) >= 3 and not (len(node.input) > 3 and node.input[3]), f"{node_label(node)} resizes by sizes")
    require(get_attr(node, "mode", "nearest") == "nearest", f"{node_label(node)} interpolates ({get_attr(node, 'mode')})")
    require(get_attr(node, "axes") is None, f"{node_label(node)} sets axes")
    modes = (get_attr(node, "coordinate_transformation_mode", "half_pixel"), get_attr(node, "nearest_mode", "round_prefer_floor"))
    require(modes in FLOOR_INDEX_MODES, f"{node_label(node)}: {modes[0]} / {modes[1]} does not read floor(i / scale)")
    scales = _array(view, node.input[2])
    require(scales is not None and scales.shape == (4,), f"the scales of {node_label(node)} are not 4 constants")
    n_scale, c_scale, h_scale, w_scale = (float(v) for v in scales)  # type: ignore[union-attr]
    steps = int(np.log2(h_scale)) if h_scale >= 2 else 0
    require(
        n_scale == c_scale == 1 and h_scale == w_scale == 2.0**steps and 1 <= steps <= MAX_UPSAMPLE_STEPS,
        f"scales {[float(v) for v in scales]} are not [1, 1, 2^k, 2^k]",  # type: ignore[union-attr]
    )
    found = match_pass_through(node, view, ctx, contrib)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    inputs: list[Input] = [found.inputs[0], "", NewConstant("upsample_2x_scales", np.array([1, 1, 2, 2], np.float32))]
    return QMatch("resize", "Resize", "", inputs, found.output, found.nodes, node, attrs, repeat=steps, keep_nchw=True)


RULES: dict[str, Rule] = {
    "Conv": match_conv,
    "MatMul": match_matmul,
    "Add": match_binary,
    "Mul": match_binary,
    "GlobalAveragePool": match_unary,
    "AveragePool": match_unary,
    "Sigmoid": match_unary,
    "LeakyRelu": match_unary,
    "Concat": match_concat,
    **{op: match_pass_through for op in PASS_THROUGH},
    "MaxPool": match_max_pool,
    "Resize": match_resize,
}


def match(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool) -> QMatch | None:
    """The group anchored at ``node``, or None (the reason is in the NoMatch a caller may ask :func:`why_not` for)."""
    rule = RULES.get(node.op_type)
    if rule is None or not is_standard(node):
        return None
    try:
        return rule(node, view, ctx, contrib)
    except NoMatch:
        return None


def why_not(node: NodeProto, view: GraphView, ctx: PassContext, contrib: bool = True) -> str | None:
    """Why the group anchored at ``node`` is not rewritten (None when it is)."""
    rule = RULES.get(node.op_type)
    if rule is None or not is_standard(node):
        return f"{node.op_type} has no QOperator form here"
    try:
        rule(node, view, ctx, contrib)
    except NoMatch as exc:
        return str(exc)
    return None
