"""qdq on ort-cpu: a Concat's inputs take its output's scale, so onnxruntime's QLinearConcat copies them.

The rule (qdq_placement.Planner._share_concat_scale) applies to inputs nothing else reads at their own scale, and
leaves the output's calibrated range as it was. Each rewritten model is run against the float model in onnxruntime.
"""

from __future__ import annotations

import numpy as np
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import ModelProto, helper, numpy_helper

import onnxopt
from onnxopt.calibration import CalibrationData


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Normal float32 values from ``rng``."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def upsample_concat(read_elsewhere: bool = False) -> ModelProto:
    """An FPN-style head: x -> {convA, convB} -> nearest 2x Resize each -> Concat -> conv3 -> y.

    convB's weights are 3x convA's, so the two inputs' ranges differ. With ``read_elsewhere`` convA's output also
    feeds convD, whose output is a second graph output ``z``. The shared layers' weights are the same either way.
    """
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["a", "", "up"], ["ua"], name="upA", mode="nearest"),
        helper.make_node("Resize", ["b", "", "up"], ["ub"], name="upB", mode="nearest"),
        helper.make_node("Concat", ["ua", "ub"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    inits = [
        init("wa", rand(rng, 4, 8, 3, 3, scale=0.3)),
        init("wb", rand(rng, 4, 8, 3, 3, scale=0.9)),
        init("up", np.array([1, 1, 2, 2], np.float32)),
        init("w3", rand(rng, 2, 8, 3, 3, scale=0.3)),
    ]
    outputs = [tensor_input("y", [1, 2, 16, 16])]
    if read_elsewhere:
        nodes.append(helper.make_node("Conv", ["a", "wd"], ["z"], name="convD"))
        inits.append(init("wd", rand(rng, 2, 4, 1, 1)))
        outputs.append(tensor_input("z", [1, 2, 8, 8]))
    return make_model(nodes, [tensor_input("x", [1, 8, 8, 8])], outputs, inits, opset=13)


def calibration(model: ModelProto) -> CalibrationData:
    """64 seeded normal samples (enough for the percentile histograms)."""
    x = np.random.default_rng(1).standard_normal((64, 8, 8, 8)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x}, model=model)


def quantize(model: ModelProto, passes: str = "qdq:method=percentile,keep_outputs=false") -> ModelProto:
    """The passes for ort-cpu on a copy of ``model``, without fault isolation."""
    return onnxopt.optimize(model, passes, target="ort-cpu", calibration=calibration(model), isolate=False).model


def scale_of(model: ModelProto, name: str) -> float:
    """The scale of the QuantizeLinear that reads ``name``."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    return float(values[q.input[1]])


def check_fidelity(original: ModelProto, quantized: ModelProto) -> None:
    """The quantized model keeps int8 fidelity against the float one in onnxruntime."""
    x = np.random.default_rng(7).standard_normal((1, 8, 8, 8)).astype(np.float32)
    assert_equivalent(original, quantized, {"x": x}, precision="int8")


def test_concat_inputs_and_what_feeds_them_take_the_output_scale() -> None:
    model = upsample_concat()
    out = quantize(model)
    cat = scale_of(out, "cat")
    assert [scale_of(out, name) for name in ("a", "ua", "b", "ub")] == [cat] * 4
    check_fidelity(model, out)


def test_the_output_range_is_not_widened_and_an_input_read_elsewhere_keeps_its_own() -> None:
    """convD reads convA's output at its own scale; the Concat's output and its other input are as without convD.

    Channel equalization is off: it would rescale convA differently once convD reads its output.
    """
    spec = "qdq:method=percentile,keep_outputs=false,equalize=false"
    shared, partly = quantize(upsample_concat(), spec), quantize(upsample_concat(read_elsewhere=True), spec)
    assert scale_of(partly, "cat") == scale_of(shared, "cat")
    assert scale_of(partly, "ub") == scale_of(partly, "cat")
    assert scale_of(partly, "a") == scale_of(partly, "ua") != scale_of(partly, "cat")
    check_fidelity(upsample_concat(read_elsewhere=True), partly)


def test_qoperator_writes_a_qlinearconcat_with_one_scale() -> None:
    model = upsample_concat()
    out = quantize(model, "qdq:method=percentile,keep_outputs=false,qoperator")
    concat = next(n for n in out.graph.node if n.op_type == "QLinearConcat")
    values = {t.name: numpy_helper.to_array(t).item() for t in out.graph.initializer if t.name in concat.input}
    params = {(values[concat.input[i]], values[concat.input[i + 1]]) for i in range(0, len(concat.input), 3)}
    assert len(params) == 1  # output and every input: the same scale and zero point
    check_fidelity(model, out)


def test_trt_placement_is_unchanged() -> None:
    """TensorRT already joins Concat inputs with the output (the union of the ranges); no borrowing there."""
    model = upsample_concat()
    spec = "qdq:method=percentile,keep_outputs=false"
    out = onnxopt.optimize(model, spec, target="trt", calibration=calibration(model), isolate=False).model
    dq_inputs = [n for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert {n.input[0] for n in dq_inputs} >= {"ua", "ub"}
    assert scale_of(out, "ua") == scale_of(out, "ub")
    check_fidelity(model, out)
