"""Shared test helpers: building small models and checking outputs in onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime  # a missing onnxruntime is an error, never a skip
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.verify import compare_outputs, generate_inputs, run_model

DEFAULT_OPSET = 17


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[TensorProto] = (),
    *,
    opset: int = DEFAULT_OPSET,
    ir_version: int = 8,
    name: str = "test",
) -> ModelProto:
    """A checked model from parts."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def tensor_input(name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A tensor value_info."""
    return helper.make_tensor_value_info(name, dtype, list(shape) if shape is not None else None)


def init(name: str, array: Any) -> TensorProto:
    """An initializer from a numpy array."""
    return numpy_helper.from_array(np.asarray(array), name)


def run_pass(model: ModelProto, passes: str | Sequence[Any]) -> onnxopt.OptimizeResult:
    """Optimize a copy of ``model`` with ``passes`` without fault isolation (so bugs raise)."""
    return onnxopt.optimize(model, passes, isolate=False)


def assert_equivalent(
    original: ModelProto,
    optimized: ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    precision: str = "fp32",
) -> None:
    """Run both models in onnxruntime on the same inputs and require equal outputs."""
    onnx.checker.check_model(optimized)
    if feeds is None:
        feeds, _ = generate_inputs(original, input_shapes)
    reference = run_model(original, feeds)
    candidate = run_model(optimized, feeds)
    assert list(candidate) == list(reference), "output names or order changed"
    result = compare_outputs(reference, candidate, precision)
    assert result.passed, result.failures()


def op_types(model: ModelProto) -> list[str]:
    """The op types of the main graph's nodes, in order."""
    return [n.op_type for n in model.graph.node]


def session_graph(model: ModelProto, folder: Path, level: Any = None) -> ModelProto:
    """The graph onnxruntime's CPU session runs after its own load-time optimizations (``level``, default ORT_ENABLE_ALL)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    options.optimized_model_filepath = str(folder / "session.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def benchmark_model(name: str) -> tuple[ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A model of ``benchmarks/quantize.py`` (fetched into the cache, free dims given distinct names), its 8 calibration
    samples (seed 1) and one evaluation input (seed 2), as the benchmark builds them."""
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import quantize as bench  # benchmarks/quantize.py

    model = onnx.load(str(bench._cached(name)))
    bench._distinct_dim_names(model)
    feeds = {k: v[:1] for k, v in bench.inputs(name, 1, seed=2).items()}
    return model, bench.inputs(name, 8, seed=1), feeds
