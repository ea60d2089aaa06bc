"""INT8 embedding tables for the ``qdq`` pass: ``Gather`` from a large constant float table.

A transformer's word-embedding table is often half of the model's bytes and is read by a
``Gather`` that no Q/DQ placement touches. It is stored as int8 with one symmetric per-tensor
scale, and the Gather's rows are dequantized after the lookup: ``Gather(int8 table, ids) ->
DequantizeLinear``, so only the looked-up rows are converted at run time (the form onnxruntime's
own quantizer writes). Only tables read by that one Gather along axis 0 qualify; a table shared
with another reader (tied LM-head weights) stays float.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator, is_standard
from onnxopt.passbase import PassResult
from onnxopt.passes.noop_rules import get_attr

INT8_MAX = 127


def quantize_gathers(model: ModelProto, min_size: int, result: PassResult) -> None:
    """Store every qualifying embedding table of the main graph as int8 (see the module docstring)."""
    graph = model.graph
    view = GraphView.build(graph)
    names = NameGenerator(model)
    replaced: dict[int, list] = {}
    dropped: set[str] = set()
    added: list[TensorProto] = []
    for node in view.nodes:
        if node.op_type != "Gather" or not is_standard(node) or get_attr(node, "axis", 0) != 0:
            continue
        table = view.initializers.get(node.input[0])
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) < 2 or node.input[0] in view.graph_outputs:
            continue
        if int(np.prod(table.dims)) < min_size or len(view.consumers.get(node.input[0], [])) != 1:
            continue
        values = numpy_helper.to_array(table)
        absmax = float(np.max(np.abs(values))) if values.size else 0.0
        scale = np.float32(absmax / INT8_MAX if absmax > 0 else 1.0)
        quantized = np.clip(np.rint(values / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        q_name, s_name = names.fresh(f"{table.name}_quantized"), names.fresh(f"{table.name}_scale")
        added += [numpy_helper.from_array(quantized, q_name), numpy_helper.from_array(np.array(scale, np.float32), s_name)]
        rows = names.fresh(f"{node.output[0]}_int8")
        gather = helper.make_node("Gather", [q_name, node.input[1]], [rows], name=node.name, axis=0)
        dq = helper.make_node("DequantizeLinear", [rows, s_name], [node.output[0]], name=names.fresh(f"{node.name or table.name}_dq"))
        replaced[id(node)] = [gather, dq]
        dropped.add(table.name)
        result.count("embedding_tables_int8")
    if not replaced:
        return
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
