"""Structural and spec validation of models before and after optimization.

Checks run in order of cost: opset support, SSA and name resolution in every graph
(with outer scopes for subgraphs), cycles, onnx's checker, then strict type inference.
An unsorted but acyclic graph is sorted instead of rejected, as onnxruntime does.
"""

from __future__ import annotations

import logging

import onnx
from onnx import ModelProto

from onnxopt.errors import InvalidModelError, one_line
from onnxopt.graph import STANDARD_DOMAINS, iter_scopes, node_label
from onnxopt.toposort import sort_graph

log = logging.getLogger("onnxopt")


def _check_opsets(model: ModelProto) -> None:
    max_supported = onnx.defs.onnx_opset_version()
    seen_default = False
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            seen_default = True
            if imp.version < 1 or imp.version > max_supported:
                raise InvalidModelError(f"the model imports ai.onnx opset {imp.version}, but this onnx supports 1..{max_supported}")
    if not seen_default and any(n.domain in STANDARD_DOMAINS for s in iter_scopes(model.graph) for n in s.graph.node):
        raise InvalidModelError("the model uses standard ONNX ops but imports no ai.onnx opset")
    domains = {imp.domain if imp.domain not in STANDARD_DOMAINS else "" for imp in model.opset_import}
    known_funcs = {(f.domain, f.name) for f in model.functions}
    for scope in iter_scopes(model.graph):
        for node in scope.graph.node:
            dom = node.domain if node.domain not in STANDARD_DOMAINS else ""
            if dom not in domains and (node.domain, node.op_type) not in known_funcs:
                raise InvalidModelError(f"node {node_label(node)} uses domain '{node.domain}', which the model does not import")


def check_names(model: ModelProto) -> None:
    """SSA form, every read defined, every graph output produced; iterative over scopes."""
    visible: dict[int, set[str]] = {}
    for scope in iter_scopes(model.graph):
        graph = scope.graph
        outer = visible[id(scope.parent.graph)] if scope.parent is not None else set()
        defined: set[str] = set()
        for value in graph.input:
            if value.name in defined:
                raise InvalidModelError(f"graph '{graph.name}' lists input '{value.name}' twice")
            defined.add(value.name)
        for tensor in graph.initializer:
            if tensor.name in defined and tensor.name not in {i.name for i in graph.input}:
                raise InvalidModelError(f"graph '{graph.name}' defines initializer '{tensor.name}' twice")
            defined.add(tensor.name)
        defined.update(t.values.name for t in graph.sparse_initializer)
        for node in graph.node:
            for out in node.output:
                if not out:
                    continue
                if out in defined:
                    raise InvalidModelError(
                        f"value '{out}' is written twice (node {node_label(node)} and an earlier "
                        "input, initializer or node); ONNX graphs must be in SSA form"
                    )
                defined.add(out)
        scope_names = outer | defined
        for node in graph.node:
            for name in node.input:
                if name and name not in scope_names:
                    raise InvalidModelError(f"node {node_label(node)} reads '{name}', which no node, input or initializer defines")
        for out in graph.output:
            if out.name not in scope_names:
                raise InvalidModelError(f"graph output '{out.name}' is not produced by any node, input or initializer")
        visible[id(graph)] = scope_names


def _sort_all(model: ModelProto) -> int:
    sorted_graphs = 0
    for scope in iter_scopes(model.graph):
        if sort_graph(scope.graph):
            sorted_graphs += 1
    return sorted_graphs


def check_types(model: ModelProto) -> str | None:
    """Run onnx's strict type and shape inference; return its message on failure, else None."""
    from onnxopt.shapes import light_copy

    try:
        onnx.shape_inference.infer_shapes(light_copy(model), check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises several exception types here
        return one_line(exc, None)
    return None


def _ort_accepts(model: ModelProto) -> bool:
    from onnxopt.verify import create_session

    try:
        create_session(model)
    except Exception:
        return False
    return True


def validate_model(model: ModelProto, *, types: bool = True) -> list[str]:
    """Raise :class:`InvalidModelError` for a broken model; return warnings for dubious ones.

    Sorts unsorted graphs in place (and warns). Strict type inference failures reject the
    model only when onnxruntime also refuses to load it; otherwise they become a warning,
    because onnx's inference has gaps that real models hit.
    """
    warnings: list[str] = []
    _check_opsets(model)
    check_names(model)
    if _sort_all(model):
        warnings.append("nodes were not in topological order; sorted them")
    try:
        onnx.checker.check_model(_checker_view(model))
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"invalid model: {one_line(exc, 500)}") from exc
    if types:
        problem = check_types(model)
        if problem is not None:
            if _ort_accepts(model):
                warnings.append(f"onnx type inference rejects part of the model, onnxruntime accepts it: {problem[:300]}")
            else:
                raise InvalidModelError(f"invalid model: {problem[:500]}")
    return warnings


def _checker_view(model: ModelProto) -> ModelProto:
    """The model for onnx's checker; over 2 GB, a copy without large weight payloads."""
    from onnxopt.io import serialized_size

    if serialized_size(model) is not None:
        return model
    from onnxopt.shapes import light_copy

    return light_copy(model)
