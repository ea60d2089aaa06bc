"""What the fusions know of onnxruntime's com.microsoft contrib ops: targets, kernels, shapes.

The ``ort-cpu`` / ``ort-gpu`` targets may emit these ops. Each op emitted gets a shape-inference
stand-in (:func:`onnxopt.shapes.register_standin`): onnx has no schema for them, and without
one every shape after the first contrib node of a graph would be unknown to later passes.
"""

from __future__ import annotations

from onnx import NodeProto, TensorProto, ValueInfoProto, helper

from onnxopt.passbase import PassContext
from onnxopt.shapes import StaticType, register_standin

MS_DOMAIN = "com.microsoft"
MS_VERSION = 1
ORT_TARGETS = frozenset({"ort-cpu", "ort-gpu"})
# Element types with a native kernel of every op emitted here (CPU: float only; CUDA: float and float16).
KERNEL_TYPES = {
    "ort-cpu": frozenset({TensorProto.FLOAT}),
    "ort-gpu": frozenset({TensorProto.FLOAT, TensorProto.FLOAT16}),
}

StandIn = tuple[list[NodeProto], list[ValueInfoProto]] | None


def ort_target(ctx: PassContext) -> bool:
    """Whether the run targets onnxruntime (``ort-cpu`` or ``ort-gpu``)."""
    return ctx.target in ORT_TARGETS


def has_kernel(ctx: PassContext, dtype: int) -> bool:
    """Whether the target's onnxruntime kernels of the emitted contrib ops take ``dtype``."""
    return dtype in KERNEL_TYPES.get(ctx.target, frozenset())


# ----------------------------------------------------------------------------- shape stand-ins


def _gelu(node: NodeProto, static: StaticType) -> StandIn:
    """Gelu / FastGelu / BiasGelu: the shape of ``x`` (+ bias, which broadcasts along the last axis)."""
    inputs = [i for i in node.input if i]
    if len(node.output) != 1 or not 1 <= len(inputs) <= 2:
        return None
    op = "Add" if len(inputs) == 2 else "Identity"
    return [helper.make_node(op, inputs, list(node.output))], []


def _skip_layernorm(node: NodeProto, static: StaticType) -> StandIn:
    """SkipLayerNormalization: output 0 and the sum (output 3) have the input's shape; mean / inv-std are not stood in for."""
    if len(node.input) < 2 or any(node.output[1:3]):
        return None
    outputs = [o for index, o in enumerate(node.output) if o and index in (0, 3)]
    return [helper.make_node("Identity", [node.input[0]], [o]) for o in outputs], []


def _attention(node: NodeProto, static: StaticType) -> StandIn:
    """Attention (packed QKV weights [Din, 3D]): ``MatMul(input, P)`` with P a typed [Din, Dv] stand-in input."""
    weights = static(node.input[1]) if len(node.input) > 1 else None
    if weights is None or len(weights[1]) != 2 or any(node.output[1:]):
        return None
    elem, (din, total) = weights
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
    v_hidden = sizes[2] if len(sizes) == 3 else total // 3
    placeholder = f"{node.output[0]}__standin_weight"
    value = helper.make_tensor_value_info(placeholder, elem, [din, v_hidden])
    return [helper.make_node("MatMul", [node.input[0], placeholder], [node.output[0]])], [value]


def _multihead_attention(node: NodeProto, static: StaticType) -> StandIn:
    """MultiHeadAttention with 3-D query, key, value: ``(query @ key^T) @ value`` has the output's shape."""
    if len(node.input) < 3 or not all(node.input[:3]) or any(node.output[1:]):
        return None
    query, key, value = node.input[:3]
    out = node.output[0]
    return [
        helper.make_node("Transpose", [key], [f"{out}__standin_kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", [query, f"{out}__standin_kt"], [f"{out}__standin_scores"]),
        helper.make_node("MatMul", [f"{out}__standin_scores", value], [out]),
    ], []


for _op, _standin in (
    ("Gelu", _gelu),
    ("FastGelu", _gelu),
    ("BiasGelu", _gelu),
    ("SkipLayerNormalization", _skip_layernorm),
    ("Attention", _attention),
    ("MultiHeadAttention", _multihead_attention),
):
    register_standin(MS_DOMAIN, _op, _standin)
