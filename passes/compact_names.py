"""Short value names, no node names or doc strings: the ``compact_names`` pass (smaller files, opt-in).

Exporters name every value after its module path (``/encoder/layer.3/attention/self/query/MatMul_output_0``)
and quantization passes append suffixes to those (``..._quantized``, ``..._scale``). In a small INT8
model the names can be a tenth of the file: PP-OCR's 0.6 MB direction classifier keeps about 36 KB of
them after ``qdq,qoperator``. This pass renames every internal value (node outputs, initializers,
value_info, subgraph inputs and outputs) to the shortest free identifier, in order of first
appearance, and drops node names and node/graph doc strings. The main graph's inputs and outputs keep
their names, so callers and feeds are unaffected; what the model computes is unchanged.

Run it last: options that pick nodes by name (``exclude=``, ``keep_nodes=``) and tools that compare
intermediate tensors by name see the new names afterwards.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from onnx import GraphProto, ModelProto

from onnxopt.graph import iter_scopes, subgraphs
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, option
from onnxopt.registry import register_pass

FIRST_CHARS = string.ascii_lowercase + string.ascii_uppercase + "_"
NEXT_CHARS = FIRST_CHARS + string.digits


@dataclass
class CompactNamesOptions(PassOptions):
    """Options of :class:`CompactNames`."""

    node_names: bool = option(False, "keep node names (false: drop them; onnxruntime names nodes itself)")
    doc_strings: bool = option(False, "keep node and graph doc strings (false: drop them)")


def short_names(reserved: set[str]) -> Iterator[str]:
    """C identifiers in order of length, then alphabet (a, b, ..., _, aa, ab, ...), skipping ``reserved``."""
    length = 1
    while True:
        for index in range(len(FIRST_CHARS) * len(NEXT_CHARS) ** (length - 1)):
            chars = []
            for _ in range(length - 1):
                index, digit = divmod(index, len(NEXT_CHARS))
                chars.append(NEXT_CHARS[digit])
            name = FIRST_CHARS[index] + "".join(reversed(chars))
            if name not in reserved:
                yield name
        length += 1


def value_names(graph: GraphProto) -> Iterator[str]:
    """Every value name ``graph`` and its subgraphs mention, in a fixed order (declarations, then nodes, then outputs)."""
    yield from (v.name for v in graph.input)
    yield from (t.name for t in graph.initializer)
    yield from (s.values.name for s in graph.sparse_initializer)
    for node in graph.node:
        yield from node.input
        for sub in subgraphs(node):
            yield from value_names(sub)
        yield from node.output
    yield from (v.name for v in graph.output)
    yield from (v.name for v in graph.value_info)
    for note in graph.quantization_annotation:
        yield note.tensor_name
        yield from (entry.value for entry in note.quant_parameter_tensor_names)


def rename_graph(graph: GraphProto, new: Callable[[str], str]) -> None:
    """Apply ``new`` to every value name of ``graph`` and its subgraphs."""
    for scope in iter_scopes(graph):
        g = scope.graph
        for value in (*g.input, *g.output, *g.value_info):
            value.name = new(value.name)
        for tensor in g.initializer:
            tensor.name = new(tensor.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = new(sparse.values.name)
        for node in g.node:
            node.input[:] = [new(n) for n in node.input]
            node.output[:] = [new(n) for n in node.output]
        for note in g.quantization_annotation:
            note.tensor_name = new(note.tensor_name)
            for entry in note.quant_parameter_tensor_names:
                entry.value = new(entry.value)


def text_bytes(graph: GraphProto) -> int:
    """Characters of value names, node names and doc strings in ``graph`` and its subgraphs."""
    total = sum(len(name) for name in value_names(graph))
    return total + sum(len(node.name) + len(node.doc_string) for scope in iter_scopes(graph) for node in scope.graph.node)


@register_pass
class CompactNames(Pass):
    """Rename internal values to the shortest free identifiers and drop node names and doc strings (opt-in; run last).

    Pre: any model. Post: the main graph's input and output names are unchanged; every other value
    name in the model (subgraphs included, consistently across scopes) is a short identifier
    assigned in order of first appearance; node names and node/graph doc strings are empty unless
    kept by option; model metadata, the model doc string and local functions are untouched. The
    model computes the same outputs. A model with training_info (which refers to value names) is
    left alone with a note.
    """

    name = "compact_names"
    Options = CompactNamesOptions
    preserves_types = False  # value types are keyed by name
    recurse = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Rename the values, then drop the names and doc strings the options do not keep."""
        options: CompactNamesOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        if len(model.training_info):
            result.notes.append("compact_names: left alone: the model has training_info, which refers to value names")
            return result
        before = text_bytes(model.graph)
        graph = model.graph
        interface = {v.name for v in graph.input} | {v.name for v in graph.output}
        fresh = short_names(interface)
        mapping: dict[str, str] = {}
        for old in value_names(graph):
            if old and old not in interface and old not in mapping:
                mapping[old] = next(fresh)
        renamed = sum(old != new for old, new in mapping.items())
        if renamed:
            rename_graph(graph, lambda name: mapping.get(name, name))
            result.count("values_renamed", renamed)
        for scope in iter_scopes(graph):
            sub = scope.graph
            for node in sub.node:
                if node.name and not options.node_names:
                    node.name = ""
                    result.count("node_names_dropped")
                if node.doc_string and not options.doc_strings:
                    node.doc_string = ""
                    result.count("doc_strings_dropped")
            if sub.doc_string and not options.doc_strings:
                sub.doc_string = ""
                result.count("doc_strings_dropped")
        if result.modified:
            saved = before - text_bytes(model.graph)
            result.notes.append(f"compact_names: {renamed} values renamed; names and doc strings {saved / 1024:.1f} KiB shorter")
        return result
