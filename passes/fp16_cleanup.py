"""The fp16 pass's last step: redundant and dead Casts removed, value_info entries retyped or dropped."""

from __future__ import annotations

import onnx
from onnx import GraphProto

from onnxopt.graph import GraphView, is_standard
from onnxopt.passbase import PassResult
from onnxopt.passes.fp16_values import F16, F32
from onnxopt.passes.noop_rules import get_attr


def clean_up(graph: GraphProto, types: dict[str, int | None], result: PassResult) -> None:
    """Remove redundant Cast pairs and no-op Casts; retype or drop value_info entries.

    ``types`` holds the element type of every value of the rewritten graph that is known.
    """
    result.count("casts_removed", _remove_redundant_casts(graph, types))
    _retype_value_info(graph, types, result)


def _remove_redundant_casts(graph: GraphProto, types: dict[str, int | None]) -> int:
    """Bypass Casts that change nothing: to the type they read, or fp16->fp32->fp16 round trips.

    A bypassed Cast is deleted once nothing reads it; graph outputs and values read inside
    subgraphs are never renamed. Returns the number of Casts deleted.
    """
    view = GraphView.build(graph)
    outputs = {o.name for o in graph.output}
    implicit = {name for names in view.implicit.values() for name in names}
    mapping: dict[str, str] = {}
    for node in view.nodes:
        if node.op_type != "Cast" or not is_standard(node) or not node.input or not node.output:
            continue
        out, source = node.output[0], node.input[0]
        if out in outputs or out in implicit:
            continue
        source = mapping.get(source, source)
        to = get_attr(node, "to")
        if types.get(source) == to:
            mapping[out] = source
            continue
        producer = view.producer.get(source)
        if (
            to == F16
            and producer is not None
            and producer.op_type == "Cast"
            and is_standard(producer)
            and get_attr(producer, "to") == F32
            and types.get(producer.input[0]) == F16
        ):
            mapping[out] = producer.input[0]
    if not mapping:
        return 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in mapping:
                node.input[index] = mapping[name]
    return _drop_dead_casts(graph)


def _drop_dead_casts(graph: GraphProto) -> int:
    """Delete Casts whose output nothing reads (repeatedly: a bypassed pair frees its first Cast)."""
    outputs = {o.name for o in graph.output}
    removed = 0
    while True:
        view = GraphView.build(graph)
        dead = {
            id(n)
            for n in view.nodes
            if n.op_type == "Cast" and is_standard(n) and n.output and n.output[0] not in outputs and not view.consumers.get(n.output[0])
        }
        if not dead:
            return removed
        kept = [n for n in view.nodes if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(kept)
        removed += len(dead)


def _retype_value_info(graph: GraphProto, types: dict[str, int | None], result: PassResult) -> None:
    """Retype float32 value_info entries of values now float16; drop those of values that are gone."""
    keep = []
    present = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    retyped = 0
    for value in graph.value_info:
        if value.name not in present:
            continue
        if value.type.WhichOneof("value") == "tensor_type" and types.get(value.name) == F16 and value.type.tensor_type.elem_type == F32:
            value.type.tensor_type.elem_type = F16
            retyped += 1
        keep.append(value)
    if len(keep) != len(graph.value_info):
        result.count("value_info_dropped", len(graph.value_info) - len(keep))
        copies = [onnx.ValueInfoProto() for _ in keep]
        for dst, src in zip(copies, keep):
            dst.CopyFrom(src)
        del graph.value_info[:]
        graph.value_info.extend(copies)
    result.count("value_info_retyped", retyped)
