"""Shape inference that degrades gracefully and never copies large weights.

onnx's inference runs on a *light copy* of the model in which large initializers are
turned into typed graph inputs (their values are never needed for shapes; small ones,
which may be shape tensors, are kept). If inference fails on the whole model it is
retried with fewer features, and at worst returns what the model already declares.
"""

from __future__ import annotations

import logging

import onnx
from onnx import ModelProto, TypeProto, helper

from onnxopt.graph import iter_scopes

log = logging.getLogger("onnxopt")

SMALL_TENSOR_ELEMENTS = 4096


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def light_copy(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose main-graph initializers are typed inputs, but small integer ones.

    Shape inference only needs the values of integer tensors (shape computations); every
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
        if (
            _numel(tensor.dims) <= SMALL_TENSOR_ELEMENTS
            and tensor.data_location != onnx.TensorProto.EXTERNAL
            and tensor.data_type in _INT_TYPES
        ):
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


def infer_types(model: ModelProto) -> dict[str, TypeProto]:
    """Inferred types of every named value (all graphs); missing names are unknown.

    Runs onnx's inference without value propagation first, then with it when that is
    safe (see :func:`_data_prop_is_safe`); on failure falls back to the previous result and
    at worst to what the model declares. Failures are logged at debug level, never raised.
    """
    light = light_copy(model)
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
