"""Redundancy elimination: duplicate initializers and common subexpressions."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, numpy_helper

from onnxopt.graph import GraphScope, GraphView, names_defined_below, opset_version, rename_inputs
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.registry import register_pass
from onnxopt.toposort import topological_order

# Ops whose outputs differ between two runs on the same inputs: two of them are not one.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
# Domains whose ops are known pure functions of their inputs and attributes.
MERGEABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def drop_value_info(graph: GraphProto, names: dict[str, str]) -> None:
    """Remove the value_info entries of values that no longer exist."""
    stale = [index for index, info in enumerate(graph.value_info) if info.name in names]
    for index in reversed(stale):
        del graph.value_info[index]


# ---------------------------------------------------------------------------------------
# Initializers


def _tensor_payload(tensor: TensorProto) -> np.ndarray | list[bytes] | None:
    """The tensor's values in a canonical form (bytes of a flat array, or the strings).

    None for tensors not compared here: external data not loaded, unknown data types,
    or payloads onnx cannot decode.
    """
    if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type == TensorProto.UNDEFINED:
        return None
    try:
        array = numpy_helper.to_array(tensor)
    except Exception:  # malformed payloads are left alone, never merged
        return None
    if tensor.data_type == TensorProto.STRING:
        return [s if isinstance(s, bytes) else str(s).encode() for s in array.reshape(-1)]
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _payload_digest(tensor: TensorProto, payload: np.ndarray | list[bytes]) -> bytes:
    """A blake2b digest of data type, dims and values."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{tensor.data_type}:{list(tensor.dims)}:".encode())
    if isinstance(payload, list):
        for item in payload:
            digest.update(len(item).to_bytes(8, "little"))
            digest.update(item)
    else:
        digest.update(payload)
    return digest.digest()


SAMPLE_BYTES = 1 << 16  # a fingerprint reads about this many bytes of a tensor
EXACT_GROUP_LIMIT = 8  # larger groups of equal fingerprints are split by full digests first


def _split_by_content(graph: GraphProto, indices: list[int]) -> dict[bytes, list[int]]:
    """Group same-shaped initializers by a sampled fingerprint, then (large groups) full digests.

    Tensors are read one at a time. Groups come back with their digest keys; members of a
    group are probably equal and are confirmed byte by byte afterwards.
    """
    sampled: dict[bytes, list[int]] = {}
    for index in indices:
        tensor = graph.initializer[index]
        payload = _tensor_payload(tensor)
        if payload is None:
            continue
        sample = payload if isinstance(payload, list) else np.ascontiguousarray(payload[:: max(1, payload.size // SAMPLE_BYTES)])
        sampled.setdefault(b"s" + _payload_digest(tensor, sample), []).append(index)
        del payload
    groups: dict[bytes, list[int]] = {}
    for key, members in sampled.items():
        if len(members) <= EXACT_GROUP_LIMIT:
            groups[key] = members
            continue
        for index in members:
            tensor = graph.initializer[index]
            payload = _tensor_payload(tensor)
            if payload is not None:
                groups.setdefault(b"f" + _payload_digest(tensor, payload), []).append(index)
    return groups


def _same_payload(a: np.ndarray | list[bytes], b: np.ndarray | list[bytes]) -> bool:
    """Byte-for-byte equality of two canonical payloads."""
    if isinstance(a, list) or isinstance(b, list):
        return a == b
    return a.shape == b.shape and bool(np.array_equal(a, b))


@register_pass
class DedupeInitializers(Pass):
    """Merge initializers that hold the same data type, dims and bytes into the first one.

    Pre: none. Post: within each graph, no two plain initializers hold identical data;
    readers of a removed duplicate (including reads from inside subgraphs) read the first
    copy in file order instead. Initializers that are graph inputs (overridable at run
    time) or graph outputs are never merged, on either side, and neither are tensors with
    unloaded external data. Values compare bitwise (0.0 and -0.0 differ; NaNs with equal
    bits match), whatever storage field holds them. Each graph is deduplicated on its
    own; tensors are hashed one at a time with blake2b and confirmed byte by byte.
    """

    name = "dedupe_initializers"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Hash every candidate initializer, confirm matches, redirect readers, drop duplicates."""
        graph = scope.graph
        result = PassResult()
        if len(graph.initializer) < 2:
            return result
        interface = {i.name for i in graph.input} | {o.name for o in graph.output}
        occurrences: dict[str, int] = {}
        for tensor in graph.initializer:
            occurrences[tensor.name] = occurrences.get(tensor.name, 0) + 1
        by_shape: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for index, tensor in enumerate(graph.initializer):
            if tensor.name in interface or occurrences[tensor.name] > 1:
                continue
            by_shape.setdefault((tensor.data_type, tuple(tensor.dims)), []).append(index)
        groups: dict[bytes, list[int]] = {}
        for indices in by_shape.values():
            if len(indices) > 1:  # only same-typed, same-shaped tensors can be equal: read no others
                for key, members in _split_by_content(graph, indices).items():
                    groups.setdefault(key, []).extend(members)
        candidates = [indices for indices in groups.values() if len(indices) > 1]
        if not candidates:
            return result
        below = names_defined_below(graph)
        mapping: dict[str, str] = {}
        for indices in candidates:
            self._match_group(graph, indices, below, mapping)
        if not mapping:
            return result
        rename_inputs(graph, mapping)
        doomed = [index for index, tensor in enumerate(graph.initializer) if tensor.name in mapping]
        for index in reversed(doomed):
            del graph.initializer[index]
        drop_value_info(graph, mapping)
        result.count("initializers_merged", len(doomed))
        return result

    @staticmethod
    def _match_group(graph: GraphProto, indices: list[int], below: set[str], mapping: dict[str, str]) -> None:
        """Map each tensor of a same-digest group onto the first earlier one with equal bytes."""
        pending = list(indices)
        while len(pending) > 1:
            keep = graph.initializer[pending[0]]
            keep_payload = _tensor_payload(keep)
            rest: list[int] = []
            for index in pending[1:]:
                tensor = graph.initializer[index]
                payload = _tensor_payload(tensor)
                same = (
                    keep_payload is not None
                    and payload is not None
                    and keep.data_type == tensor.data_type
                    and list(keep.dims) == list(tensor.dims)
                    and _same_payload(keep_payload, payload)
                )
                if same and keep.name not in below:
                    mapping[tensor.name] = keep.name
                elif not same:
                    rest.append(index)  # a hash collision: try it against its own kind
            pending = rest


# ---------------------------------------------------------------------------------------
# Common subexpressions


def _attribute_bytes(node: NodeProto) -> bytes:
    """Deterministic serialization of a node's attributes sorted by name.

    Attribute doc strings and the names of tensor attributes (such as a Constant's
    ``value``) do not change what a node computes and are cleared first.
    """
    parts: list[bytes] = []
    for attr in sorted(node.attribute, key=lambda a: a.name):
        if attr.doc_string or attr.type == AttributeProto.TENSOR:
            clean = AttributeProto()
            clean.CopyFrom(attr)
            clean.doc_string = ""
            if clean.type == AttributeProto.TENSOR:
                clean.t.name = ""
            attr = clean
        data = attr.SerializeToString(deterministic=True)
        parts.append(len(data).to_bytes(8, "little"))
        parts.append(data)
    return b"".join(parts)


def _attribute_key(node: NodeProto) -> bytes:
    """A short digest of :func:`_attribute_bytes` (empty for nodes without attributes)."""
    if not len(node.attribute):
        return b""
    return hashlib.blake2b(_attribute_bytes(node), digest_size=32).digest()


def _mergeable(node: NodeProto, has_subgraphs: bool, legacy_dropout: bool) -> bool:
    """Whether the node is a pure, standard op that CSE may merge with an identical one.

    ``legacy_dropout``: the model imports ai.onnx opset < 7, where Dropout trains (is
    random) unless its ``is_test`` attribute is set.
    """
    if node.domain not in MERGEABLE_DOMAINS or node.op_type in NONDETERMINISTIC_OPS:
        return False
    if not any(node.input) and node.op_type != "Constant":
        return False
    if has_subgraphs:
        return False  # If/Loop/Scan: bodies may hold random or custom ops; left alone
    if node.op_type == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            return False  # a training_mode input (opset 12+)
        if legacy_dropout and not any(a.name == "is_test" and a.i for a in node.attribute):
            return False
    return bool(node.output) and any(node.output)


def _node_key(node: NodeProto, mapping: dict[str, str]) -> tuple[Any, ...]:
    """What makes two nodes compute the same values: op, canonical inputs, attributes, arity."""
    inputs = tuple(mapping.get(name, name) for name in node.input)
    return (node.domain or "", node.op_type, node.overload, inputs, _attribute_key(node), len(node.output))


@register_pass
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op on the same inputs with the same attributes.

    Pre: an acyclic graph. Post: within each graph, of two standard-domain nodes with the
    same domain, op type, inputs, attributes and number of outputs, only the earlier one
    (in topological order) remains and readers of the later one's outputs (including
    subgraph reads) read the earlier one's. Nodes are visited in topological order with
    inputs canonicalized by earlier merges, so duplicated chains collapse in one run.
    Identical Constant nodes merge too. Never merged: random ops (RandomNormal[Like],
    RandomUniform[Like], Multinomial, Bernoulli), Dropout in training mode (a
    training_mode input, or opset < 7 without is_test set), custom-domain
    ops (opaque), nodes holding subgraphs (If/Loop/Scan, left alone), input-less nodes
    other than Constant, and a duplicate whose outputs include a graph output (the
    output keeps its producer and name). Value types are unchanged.
    """

    name = "eliminate_common_subexpressions"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Find duplicates in one topological sweep, then redirect readers and drop them."""
        graph = scope.graph
        result = PassResult()
        if len(graph.node) < 2:
            return result
        view = ctx.view(graph)
        nested = bool(view.implicit)  # some node holds a subgraph
        legacy_dropout = (opset_version(ctx.model) or 1) < 7
        below: set[str] | None = None if nested else set()
        table: dict[tuple[Any, ...], int] = {}
        mapping: dict[str, str] = {}
        removed: list[int] = []
        for index in topological_order(graph, view):
            node = view.nodes[index]
            if not _mergeable(node, nested and id(node) in view.implicit, legacy_dropout):
                continue
            key = _node_key(node, mapping)
            first = table.get(key)
            if first is None:
                table[key] = index
                continue
            keep = view.nodes[first]
            if below is None:
                below = names_defined_below(graph)
            if not self._can_merge(keep, node, view, below):
                continue
            for old, new in zip(node.output, keep.output):
                if old:
                    mapping[old] = new
            removed.append(index)
        if not removed:
            return result
        rename_inputs(graph, mapping, nested=nested)
        dropped = set(removed)
        kept = [node for index, node in enumerate(view.nodes) if index not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        drop_value_info(graph, mapping)
        result.count("nodes_merged", len(removed))
        return result

    @staticmethod
    def _can_merge(keep: NodeProto, dup: NodeProto, view: GraphView, below: set[str]) -> bool:
        """Guards on a matched pair: interface names, missing optional outputs, shadowing."""
        if len(keep.attribute) and _attribute_bytes(keep) != _attribute_bytes(dup):
            return False  # a digest collision
        for old, new in zip(dup.output, keep.output):
            if not old:
                continue
            if not new or old in view.graph_outputs or new in below:
                return False
        return True
