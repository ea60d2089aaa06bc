"""Models over protobuf's 2 GB limit: load from external data, optimize, save, run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import tensor_input
from onnx import TensorProto, helper

import onnxopt
from onnxopt.io import serialized_size
from onnxopt.verify import run_model

ELEMENTS = 300_000_000  # 1.2 GB of float32 per weight, 2.4 GB in all


def _big_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["w", "v"], ["s"]),
            helper.make_node("Identity", ["s"], ["s2"]),
            helper.make_node("ReduceMax", ["s2"], ["m"], keepdims=0),
            helper.make_node("Add", ["x", "m"], ["y"]),
        ],
        "big",
        [tensor_input("x", [2])],
        [tensor_input("y", [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for name, value in (("w", 1), ("v", 2)):
        tensor = model.graph.initializer.add()  # built in place: protobuf cannot copy a message over 2 GB
        tensor.name, tensor.data_type = name, TensorProto.FLOAT
        tensor.dims.append(ELEMENTS)
        tensor.raw_data = np.full(ELEMENTS, value, np.float32).tobytes()
    return model


@pytest.mark.slow
def test_over_2gb_roundtrip_optimize_and_run(tmp_path):
    model = _big_model()
    assert serialized_size(model) is None
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    onnxopt.save(model, src)  # automatically with external data
    assert (src.parent / "big.onnx.data").stat().st_size >= 2 * 4 * ELEMENTS
    del model

    result = onnxopt.optimize(src, "cleanup")
    assert "Identity" not in [n.op_type for n in result.model.graph.node]
    assert not any(r.status == "rolled back" for r in result.report.passes)
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    onnxopt.save(result.model, out)
    assert (out.parent / "big.onnx.data").exists()

    reloaded = onnxopt.load(out)
    onnx.checker.check_model(str(out))
    outputs = run_model(reloaded, {"x": np.array([1.0, -1.0], np.float32)})
    assert np.array_equal(outputs["y"], np.array([4.0, 2.0], np.float32))
