"""Rules that recognise no-op nodes: nodes whose first output equals one of their inputs.

Each rule is one function per op family, ``rule(node, view, ctx) -> str``: it returns the
name of the input the node forwards unchanged, or raises :class:`NoMatch` with a readable
reason. :func:`match` wraps them into the ``str | None`` form the pass uses (logging the
reason at debug level) and :func:`why_not` returns the reason, for debugging and tests.

Rules only read the graph; they never mutate it. Values they rely on:
  * shapes and element types come from ``ctx.types`` (onnx inference); a rule that needs
    a shape or type that is unknown does not match;
  * constants are initializers that are not graph inputs, or outputs of a Constant node
    in the same graph (values from an enclosing graph are not looked at).

Exactness: x+0, x-0, x*1, x/1 are removed only when the constant is exactly 0 / 1 in every
element. ``x + 0.0`` maps -0.0 to +0.0 (and ``x - (-0.0)`` likewise); removing it keeps
-0.0, a difference within float rounding that compares equal, so it is accepted.
NaN payloads may differ after x*1 on some hardware; NaN stays NaN either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from onnx import NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxopt.graph import GraphView, is_standard, node_label, opset_version
from onnxopt.passbase import PassContext
from onnxopt.passes.constants import constant_value
from onnxopt.shapes import elem_type, static_shape

log = logging.getLogger("onnxopt")

INT64_MAX = (1 << 63) - 1
MAX_CONSTANT_ELEMENTS = 1 << 20  # no-op rules do not inspect larger constants for all-zero/all-one values
PAD_MODES = ("constant", "reflect", "edge", "wrap")


class NoMatch(Exception):
    """Raised by a rule when a node is not a no-op; the message says why."""


Rule = Callable[[NodeProto, GraphView, PassContext], str]


def require(condition: bool, reason: str) -> None:
    """Raise :class:`NoMatch` with ``reason`` unless ``condition`` holds."""
    if not condition:
        raise NoMatch(reason)


# ----------------------------------------------------------------------------- helpers


def default_opset(ctx: PassContext) -> int:
    """The model's ai.onnx opset version (1 when none is imported)."""
    return opset_version(ctx.model) or 1


def first_input(node: NodeProto) -> str:
    """The node's first input name; NoMatch when it has none."""
    require(len(node.input) > 0 and node.input[0] != "", "the node has no first input")
    return node.input[0]


def get_attr(node: NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` (ints as a list), or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                return value.decode("utf-8", errors="replace")
            return list(value) if isinstance(value, (list, tuple)) else value
    return default


def dims_of(type_proto: TypeProto | None) -> list[int | None] | None:
    """A tensor type's dims with None for symbolic ones, or None when the rank is unknown."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in type_proto.tensor_type.shape.dim]


def constant_tensor(view: GraphView, name: str) -> TensorProto | None:
    """The TensorProto behind a constant value of this graph, or None."""
    if view.is_constant(name):
        tensor = view.initializers[name]
        return None if tensor.data_location == TensorProto.EXTERNAL else tensor
    producer = view.producer.get(name)
    if producer is not None and producer.op_type == "Constant" and is_standard(producer):
        return constant_value(producer)
    return None


def constant_array(view: GraphView, name: str, *, max_elements: int | None = MAX_CONSTANT_ELEMENTS) -> np.ndarray | None:
    """The value of a constant of this graph as numpy, or None (unknown, or over ``max_elements``; None: any size)."""
    tensor = constant_tensor(view, name)
    if tensor is None or (max_elements is not None and int(np.prod(tensor.dims, dtype=np.int64)) > max_elements):
        return None
    return numpy_helper.to_array(tensor)


def int_list(node: NodeProto, view: GraphView, *, name: str, index: int, from_input: bool) -> list[int] | None:
    """An int list given as attribute ``name`` or (``from_input``) as constant input ``index``.

    Returns None when it is absent; raises NoMatch when it is an input but not a constant.
    """
    if not from_input:
        value = get_attr(node, name)
        return None if value is None else [int(v) for v in value]  # type: ignore[union-attr]
    if len(node.input) <= index or not node.input[index]:
        return None
    array = constant_array(view, node.input[index])
    require(array is not None, f"'{name}' (input {index}) is not a constant of this graph")
    return [int(v) for v in array.reshape(-1)]  # type: ignore[union-attr]


def same_shape(a: TypeProto | None, b: TypeProto | None) -> bool:
    """Whether two inferred tensor types have provably equal shapes.

    Every dim must match: equal static sizes, or the same symbolic name (shape inference
    gives equal names only to dims it proved equal). Unnamed unknown dims never match.
    """
    if a is None or b is None or a.WhichOneof("value") != "tensor_type" or b.WhichOneof("value") != "tensor_type":
        return False
    if not a.tensor_type.HasField("shape") or not b.tensor_type.HasField("shape"):
        return False
    dims_a, dims_b = a.tensor_type.shape.dim, b.tensor_type.shape.dim
    if len(dims_a) != len(dims_b):
        return False
    for x, y in zip(dims_a, dims_b):
        if x.HasField("dim_value") and y.HasField("dim_value"):
            if x.dim_value != y.dim_value or x.dim_value < 0:
                return False
        elif not (x.HasField("dim_param") and y.HasField("dim_param") and x.dim_param and x.dim_param == y.dim_param):
            return False
    return True


def broadcast_change(x_dims: Sequence[int | None], other: Sequence[int]) -> str | None:
    """Why broadcasting a tensor of ``x_dims`` with shape ``other`` would change its shape, or None."""
    if len(other) > len(x_dims):
        return f"broadcasting with shape {list(other)} raises the rank {len(x_dims)}"
    for position in range(1, len(other) + 1):
        want, have = other[-position], x_dims[-position]
        if want == 1 or want == have:
            continue
        shown = ["?" if d is None else d for d in x_dims]
        return f"broadcasting shape {shown} with {list(other)} changes or may change the shape"
    return None


def resolve_reshape(shape: Sequence[int], target: Sequence[int], allowzero: bool) -> tuple[int, ...] | None:
    """The output shape of Reshape(input of ``shape``, ``target``), or None if invalid."""
    out: list[int | None] = []
    for i, value in enumerate(target):
        if value == 0 and not allowzero:
            if i >= len(shape):
                return None
            out.append(shape[i])
        elif value == -1:
            out.append(None)
        elif value < 0:
            return None
        else:
            out.append(value)
    if out.count(None) > 1:
        return None
    if None in out:
        known = int(np.prod([v for v in out if v is not None], dtype=np.int64))
        total = int(np.prod(shape, dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(None)] = total // known
    return tuple(int(v) for v in out)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- rules


def match_identity(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Identity forwards its input."""
    return first_input(node)


def match_dropout(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Dropout in inference mode (the mask output must be unused: checked by :func:`match`)."""
    if default_opset(ctx) < 7:
        require(bool(get_attr(node, "is_test", 0)), "is_test=0 means training mode in opset < 7")
    elif len(node.input) > 2 and node.input[2]:
        mode = constant_array(view, node.input[2])
        require(mode is not None, "training_mode is not a constant")
        require(not np.any(mode), "training_mode is true")
    return first_input(node)


def match_cast(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Cast (or CastLike) to the input's own element type."""
    source = first_input(node)
    have = elem_type(ctx.types.get(source))
    require(have is not None, f"the element type of '{source}' is unknown")
    if node.op_type == "CastLike":
        require(len(node.input) > 1 and node.input[1] != "", "CastLike has no target input")
        want = elem_type(ctx.types.get(node.input[1]))
    else:
        want = get_attr(node, "to")  # type: ignore[assignment]
    require(want == have, f"casts {_type_name(have)} to {_type_name(want)}")
    return source


def match_reshape(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Reshape to the input's own shape: static (0 copies a dim unless allowzero, -1 is inferred) or proved equal."""
    source = first_input(node)
    if same_shape(ctx.types.get(source), ctx.types.get(node.output[0])):
        return source
    shape = static_shape(ctx.types.get(source))
    require(shape is not None, f"the shape of '{source}' is not fully static")
    target = int_list(node, view, name="shape", index=1, from_input=default_opset(ctx) >= 5)
    require(target is not None, "no target shape")
    resolved = resolve_reshape(shape, target, bool(get_attr(node, "allowzero", 0)))  # type: ignore[arg-type]
    require(resolved == shape, f"reshapes {list(shape)} to {target}")  # type: ignore[arg-type]
    return source


def match_expand(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Expand whose target shape broadcasts to the input's own shape."""
    source = first_input(node)
    require(len(node.input) > 1 and node.input[1] != "", "Expand has no shape input")
    if same_shape(ctx.types.get(source), ctx.types.get(node.output[0])):
        return source  # a computed target shape, proved equal to the input's shape
    target = constant_array(view, node.input[1])
    require(target is not None, "the target shape is not a constant of this graph and the shapes are not provably equal")
    dims = dims_of(ctx.types.get(source))
    require(dims is not None, f"the rank of '{source}' is unknown")
    reason = broadcast_change(dims, [int(v) for v in target.reshape(-1)])  # type: ignore[arg-type, union-attr]
    require(reason is None, str(reason))
    return source


def match_transpose(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Transpose with the identity permutation (the default reversal is one only for rank <= 1)."""
    source = first_input(node)
    perm = get_attr(node, "perm")
    if perm is None:
        dims = dims_of(ctx.types.get(source))
        require(dims is not None and len(dims) <= 1, "the default perm reverses the dims and the rank is not known to be <= 1")
    else:
        require(perm == list(range(len(perm))), f"perm {perm} is not the identity")  # type: ignore[arg-type]
    return source


def match_pad(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Pad with all-zero pads (attribute before opset 11, ``paddings`` in opset 1, input from 11)."""
    source = first_input(node)
    mode = get_attr(node, "mode", "constant")
    require(mode in PAD_MODES, f"unknown pad mode {mode!r}")
    opset = default_opset(ctx)
    attr_name = "paddings" if opset < 2 else "pads"
    pads = int_list(node, view, name=attr_name, index=1, from_input=opset >= 11)
    require(pads is not None, "no pads")
    require(not any(pads), f"pads {pads} are not all zero")  # type: ignore[arg-type]
    return source


def match_slice(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Slice that keeps every element: start 0, end >= dim (INT64_MAX for unknown dims), step 1."""
    source = first_input(node)
    from_input = default_opset(ctx) >= 10
    starts = int_list(node, view, name="starts", index=1, from_input=from_input)
    ends = int_list(node, view, name="ends", index=2, from_input=from_input)
    axes = int_list(node, view, name="axes", index=3, from_input=from_input)
    steps = int_list(node, view, name="steps", index=4, from_input=from_input) if from_input else None
    require(starts is not None and ends is not None and len(starts) == len(ends), "starts/ends missing or of different lengths")
    axes = list(range(len(starts))) if axes is None else axes  # type: ignore[arg-type]
    steps = [1] * len(starts) if steps is None else steps  # type: ignore[arg-type]
    require(len(axes) == len(starts) == len(steps), "axes/steps lengths differ from starts")
    dims = dims_of(ctx.types.get(source))
    for start, end, axis, step in zip(starts, ends, axes, steps):  # type: ignore[arg-type]
        dim = None
        if dims is not None and -len(dims) <= axis < len(dims):
            dim = dims[axis]
        require(step == 1, f"step {step} on axis {axis}")
        require(start == 0 or (dim is not None and start <= -dim), f"start {start} on axis {axis} skips elements")
        if dim is None:
            require(end >= INT64_MAX, f"end {end} on axis {axis} of unknown size may cut elements")
        else:
            require(end >= dim, f"end {end} on axis {axis} of size {dim} cuts elements")
    return source


def match_squeeze(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Squeeze with no/empty axes of a static shape without 1-dims; Unsqueeze with empty axes."""
    source = first_input(node)
    axes = int_list(node, view, name="axes", index=1, from_input=default_opset(ctx) >= 13)
    if node.op_type == "Unsqueeze":
        require(axes is not None and len(axes) == 0, f"Unsqueeze inserts axes {axes}")
        return source
    require(not axes, f"Squeeze removes axes {axes}")
    shape = static_shape(ctx.types.get(source))
    require(shape is not None, f"Squeeze without axes removes every 1-dim and the shape of '{source}' is not static")
    require(1 not in shape, f"Squeeze without axes removes the 1-dims of {list(shape)}")  # type: ignore[arg-type]
    return source


def match_single_input(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Concat/Sum/Max/Min/Mean of one input, and Split into one output, are identities."""
    if node.op_type == "Split":
        require(len(node.output) == 1, f"Split into {len(node.output)} outputs")
    else:
        require(len(node.input) == 1, f"{node.op_type} of {len(node.input)} inputs")
    return first_input(node)


def match_neutral_operand(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Add/Sub of an all-zero constant, Mul/Div by an all-one constant, that keeps the shape.

    Sub and Div forward only their first operand (the constant must be second).
    """
    require(len(node.input) == 2 and all(node.input), f"{node.op_type} needs two inputs")
    neutral = 0 if node.op_type in ("Add", "Sub") else 1
    sides = ((1, 0), (0, 1)) if node.op_type in ("Add", "Mul") else ((1, 0),)
    reasons = []
    for const_index, kept_index in sides:
        reason = _neutral_reason(view, ctx, node.input[const_index], node.input[kept_index], neutral)
        if reason is None:
            return node.input[kept_index]
        reasons.append(reason)
    raise NoMatch("; ".join(reasons))


def _neutral_reason(view: GraphView, ctx: PassContext, constant: str, other: str, neutral: int) -> str | None:
    """Why ``other (op) constant`` is not ``other`` unchanged, or None when it is."""
    tensor = constant_tensor(view, constant)
    if tensor is None:
        return f"'{constant}' is not a constant of this graph"
    other_type = ctx.types.get(other)
    dims = dims_of(other_type)
    if dims is None:
        return f"the rank of '{other}' is unknown"
    if elem_type(other_type) != tensor.data_type:
        return f"'{other}' has element type {_type_name(elem_type(other_type))}, the constant {_type_name(tensor.data_type)}"
    change = broadcast_change(dims, list(tensor.dims))
    if change is not None:
        return change
    array = constant_array(view, constant)
    if array is None:
        return f"'{constant}' is too large to inspect"
    if not np.all(array == neutral):
        return f"'{constant}' is not all {neutral}"
    return None


def _type_name(data_type: object) -> str:
    try:
        return str(TensorProto.DataType.Name(int(data_type)))  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return str(data_type)


RULES: dict[str, Rule] = {
    "Identity": match_identity,
    "Dropout": match_dropout,
    "Cast": match_cast,
    "CastLike": match_cast,
    "Reshape": match_reshape,
    "Expand": match_expand,
    "Transpose": match_transpose,
    "Pad": match_pad,
    "Slice": match_slice,
    "Squeeze": match_squeeze,
    "Unsqueeze": match_squeeze,
    "Concat": match_single_input,
    "Split": match_single_input,
    "Sum": match_single_input,
    "Max": match_single_input,
    "Min": match_single_input,
    "Mean": match_single_input,
    "Add": match_neutral_operand,
    "Sub": match_neutral_operand,
    "Mul": match_neutral_operand,
    "Div": match_neutral_operand,
}


def _check(node: NodeProto, view: GraphView, ctx: PassContext) -> str:
    """Run the node's rule plus the checks common to every rule; NoMatch with the reason."""
    require(is_standard(node), f"domain '{node.domain}' is opaque")
    rule = RULES.get(node.op_type)
    require(rule is not None, f"no rule for {node.op_type}")
    require(len(node.output) > 0 and node.output[0] != "", "the node has no first output")
    unused = [o for o in node.output[1:] if o and view.uses(o)]
    require(not unused, f"output '{unused[0] if unused else ''}' is used")
    source = rule(node, view, ctx)  # type: ignore[misc]
    require(source != "" and source != node.output[0], "the node forwards no input")
    return source


def match(node: NodeProto, view: GraphView, ctx: PassContext) -> str | None:
    """The input that ``node`` forwards unchanged, or None (the reason is logged at debug level)."""
    try:
        return _check(node, view, ctx)
    except NoMatch as exc:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("eliminate_noops: %s is kept: %s", node_label(node), exc)
        return None


def why_not(node: NodeProto, view: GraphView, ctx: PassContext) -> str | None:
    """Why ``node`` is not a no-op, or None when it is one (for debugging and tests)."""
    try:
        _check(node, view, ctx)
    except NoMatch as exc:
        return str(exc)
    return None
