"""Shape inference that degrades gracefully and never copies large weights.

onnx's inference runs on a *light copy* of the model in which large initializers are
turned into typed graph inputs (their values are never needed for shapes; small ones,
which may be shape tensors, are kept). If inference fails on the whole model it is
retried with fewer features, and at worst returns what the model already declares.

onnx has no schemas for other domains' ops (onnxruntime's com.microsoft contrib ops, say),
so every shape after one would be lost. A pass that emits such an op registers a *stand-in*
(:func:`register_standin`): standard nodes that write the same outputs with the same types and
shapes, put in the op's place in the light copy only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
from onnx import ModelProto, NodeProto, TypeProto, ValueInfoProto, helper

from onnxopt.graph import iter_scopes

log = logging.getLogger("onnxopt")

SMALL_TENSOR_ELEMENTS = 4096
# float tensors this small keep their values too: Resize scales, Pad values and Range bounds drive output shapes
SMALL_FLOAT_ELEMENTS = 16


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def light_copy(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose main-graph initializers are typed inputs, but small integer ones and tiny others.

    Shape inference needs the values of integer tensors (shape computations) and of a few tiny
    float ones (Resize's scales: without them every shape after an upsampling is unknown); every
    other weight keeps its type and shape as a graph input, without its bytes.
    """
    from onnxopt.io import payload_bytes

    copy = ModelProto()
    if payload_bytes(model) < (1 << 26):
        copy.CopyFrom(model)
    else:
        _copy_without_weights(model, copy)
    graph = copy.graph
    inputs = {i.name for i in graph.input}
    keep = []
    for tensor in graph.initializer:
        limit = SMALL_TENSOR_ELEMENTS if tensor.data_type in _INT_TYPES else SMALL_FLOAT_ELEMENTS
        if _numel(tensor.dims) <= limit and tensor.data_location != onnx.TensorProto.EXTERNAL:
            keep.append(tensor)
            continue
        if tensor.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    if len(keep) != len(graph.initializer):
        kept = [onnx.TensorProto() for _ in keep]
        for dst, src in zip(kept, keep):
            dst.CopyFrom(src)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return copy


def _copy_without_weights(model: ModelProto, copy: ModelProto) -> None:
    """Copy everything but large main-graph initializer payloads (kept as empty typed stubs)."""
    saved = model.graph.initializer
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(copy, field, getattr(model, field))
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    copy.metadata_props.extend(model.metadata_props)
    graph = copy.graph
    src = model.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    for tensor in saved:
        if _numel(tensor.dims) <= SMALL_TENSOR_ELEMENTS:
            graph.initializer.append(tensor)
        else:
            stub = graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL


def _collect(model: ModelProto) -> dict[str, TypeProto]:
    types: dict[str, TypeProto] = {}
    for scope in iter_scopes(model.graph):
        graph = scope.graph
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            if value.type.WhichOneof("value") is not None:
                types.setdefault(value.name, value.type)
        for tensor in graph.initializer:
            if tensor.name not in types:
                types[tensor.name] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    return types


DATA_PROP_LIMIT = 1 << 16  # largest integer tensor (elements) onnx may propagate values of


def _data_prop_is_safe(types: dict[str, TypeProto]) -> bool:
    """Whether onnx's value propagation can run without materializing huge tensors.

    onnx propagates the values of 1-D tensors (shape computations) with no size limit:
    a Concat of a 1-D activation of 2**26 elements takes a minute and 15 GB, and a chain
    of self-concatenations grows exponentially. Inference without propagation already
    knows static sizes, so propagation is refused when any tensor of rank <= 1 is
    statically larger than :data:`DATA_PROP_LIMIT` elements.
    """
    for type_proto in types.values():
        shape = static_shape(type_proto)
        if shape is not None and len(shape) <= 1 and _numel(shape) > DATA_PROP_LIMIT:
            return False
    return True


_INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})


def _infer(light: ModelProto, data_prop: bool) -> dict[str, TypeProto] | None:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=data_prop)
    except Exception as exc:  # onnx raises many types; degrade instead
        log.debug("shape inference (data_prop=%s) failed: %s", data_prop, exc)
        return None
    return _collect(inferred)


StaticType = Callable[[str], "tuple[int, tuple[int, ...]] | None"]
StandIn = Callable[[NodeProto, StaticType], "tuple[list[NodeProto], list[ValueInfoProto]] | None"]
_STANDINS: dict[tuple[str, str], StandIn] = {}


def register_standin(domain: str, op_type: str, standin: StandIn) -> None:
    """Teach shape inference an op of another domain.

    ``standin(node, static_type)`` returns standard nodes writing ``node``'s outputs with the
    same types and shapes, plus typed graph inputs those nodes read (weights of a known shape,
    no data), or None when it cannot; ``static_type(name)`` gives (element type, dims) of an
    initializer or a static graph input.
    """
    _STANDINS[(domain, op_type)] = standin


def _put_standins(light: ModelProto) -> None:
    """Replace, in the light copy, every node that has a registered stand-in by its stand-in."""
    scopes = iter_scopes(light.graph)
    if not any((n.domain, n.op_type) in _STANDINS for scope in scopes for n in scope.graph.node if n.domain):
        return
    known: dict[str, tuple[int, tuple[int, ...]]] = {}  # names are unique across scopes, so one table serves all
    for scope in scopes:
        known.update((t.name, (t.data_type, tuple(t.dims))) for t in scope.graph.initializer)
        for v in scope.graph.input:
            if _static_input(v):
                known[v.name] = (v.type.tensor_type.elem_type, tuple(d.dim_value for d in v.type.tensor_type.shape.dim))
    for scope in reversed(scopes):  # innermost first: rebuilding a graph copies its subgraphs
        graph = scope.graph
        if not any((n.domain, n.op_type) in _STANDINS for n in graph.node):
            continue
        rebuilt: list[NodeProto] = []
        written: set[str] = set()
        for node in graph.node:
            standin = _STANDINS.get((node.domain, node.op_type))
            found = standin(node, known.get) if standin is not None else None
            if found is None:
                rebuilt.append(node)
                continue
            nodes, inputs = found
            rebuilt.extend(nodes)
            light.graph.input.extend(inputs)  # main-graph inputs are visible in every subgraph (If branches take none)
            written.update(o for o in node.output if o)
        kept = [v for v in graph.value_info if v.name not in written]  # the stand-ins' outputs are inferred afresh
        del graph.node[:]
        graph.node.extend(rebuilt)
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _static_input(value: ValueInfoProto) -> bool:
    tensor = value.type.tensor_type if value.type.WhichOneof("value") == "tensor_type" else None
    return tensor is not None and tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim)


def infer_types(model: ModelProto) -> dict[str, TypeProto]:
    """Inferred types of every named value (all graphs); missing names are unknown.

    Runs onnx's inference without value propagation first, then with it when that is
    safe (see :func:`_data_prop_is_safe`); on failure falls back to the previous result and
    at worst to what the model declares. Failures are logged at debug level, never raised.
    """
    light = light_copy(model)
    if _STANDINS:
        _put_standins(light)
    plain = _infer(light, data_prop=False)
    if plain is None:
        return _collect(model)
    if not _data_prop_is_safe(plain):
        log.debug("shape inference: value propagation skipped (huge integer tensors)")
        return plain
    return _infer(light, data_prop=True) or plain


def static_shape(type_proto: TypeProto | None) -> tuple[int, ...] | None:
    """The fully known shape of a tensor type, or None if unknown or symbolic."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value") or dim.dim_value < 0:
            return None
        dims.append(dim.dim_value)
    return tuple(dims)


def elem_type(type_proto: TypeProto | None) -> int | None:
    """The element type of a tensor type, or None."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
        return None
    return type_proto.tensor_type.elem_type or None
