"""One convolution in onnxruntime CPU: float32 against the Q/DQ uint8 form qdq writes for ort-cpu.

    python benchmarks/conv_kernels.py [--runs 40] [--cases stems|depthwise|dense|all]

Each case is a single padded Conv + Relu: float32 in and out, or uint8 in and out with int8
per-channel weights and an int32 bias (onnxruntime fuses it into QLinearConv). Prints the median
of interleaved runs at 1 thread and the ratio int8 / float. This is the evidence behind
``qdq_placement.slow_int8_convs``: on ort-cpu, spatial convolutions with fewer than 64
multiply-adds per output value (RGB/grey stems) and depthwise ones over fewer than 32 channels
run slower in int8, so qdq computes them in float with int8 weights (``qdq:slow_convs=true``
quantizes them anyway).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (output channels, input channels, groups, input size, kernel, stride)
CASES = {
    "stems": [
        (16, 3, 1, 640, 3, 2),
        (32, 3, 1, 224, 3, 2),
        (32, 1, 1, 224, 3, 2),
        (32, 4, 1, 224, 3, 2),
        (32, 8, 1, 224, 3, 2),
        (96, 3, 1, 224, 4, 4),
        (64, 3, 1, 224, 7, 2),
    ],
    "depthwise": [
        (8, 8, 8, 160, 3, 1),
        (16, 16, 16, 320, 3, 1),
        (16, 16, 16, 112, 3, 1),
        (24, 24, 24, 160, 3, 1),
        (32, 32, 32, 112, 3, 1),
        (32, 32, 32, 320, 3, 2),
        (48, 48, 48, 160, 3, 1),
        (64, 64, 64, 160, 3, 1),
        (96, 96, 96, 80, 5, 1),
        (192, 192, 192, 40, 3, 1),
    ],
    "dense": [
        (16, 16, 1, 320, 1, 1),
        (64, 16, 1, 160, 1, 1),
        (64, 32, 1, 112, 3, 1),
    ],
}


def conv_model(cout: int, cin: int, group: int, size: int, kernel: int, stride: int, *, quantized: bool) -> onnx.ModelProto:
    """Conv + Relu on [1, cin, size, size]: float32, or Q/DQ with uint8 activations and int8 per-channel weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32) * 0.3
    bias = rng.standard_normal(cout).astype(np.float32) * 0.1
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [kernel // 2] * 4, "group": group}
    if not quantized:
        inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Relu", ["c"], ["y"])]
        dtype = TensorProto.FLOAT
    else:
        x_scale = 0.02
        w_scale = (np.abs(weight).reshape(cout, -1).max(1) / 127).astype(np.float32)
        arrays = {
            "wq": np.round(weight / w_scale[:, None, None, None]).astype(np.int8),
            "ws": w_scale,
            "wz": np.zeros(cout, np.int8),
            "bq": np.round(bias / (w_scale * x_scale)).astype(np.int32),
            "bs": (w_scale * x_scale).astype(np.float32),
            "bz": np.zeros(cout, np.int32),
            "xs": np.array(x_scale, np.float32),
            "xz": np.array(128, np.uint8),
            "ys": np.array(0.05, np.float32),
            "yz": np.array(0, np.uint8),
        }
        inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
        nodes = [
            helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
            helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0),
            helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], **attrs),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["y"]),
        ]
        dtype = TensorProto.UINT8
    inputs = [helper.make_tensor_value_info("x", dtype, [1, cin, size, size])]
    graph = helper.make_graph(nodes, "conv", inputs, [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure(case: tuple[int, ...], runs: int) -> tuple[float, float]:
    """Median milliseconds of the float and the int8 form, interleaved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sessions, feeds = [], []
    x = np.random.default_rng(1).random((1, case[1], case[3], case[3])).astype(np.float32)
    for quantized in (False, True):
        model = conv_model(*case, quantized=quantized)
        sessions.append(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]))
        feeds.append({"x": (x * 255).astype(np.uint8) if quantized else x})
    times: list[list[float]] = [[], []]
    for i in range(runs + 5):
        for k in (0, 1):
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            if i >= 5:
                times[k].append(time.perf_counter() - start)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--cases", default="all", choices=[*CASES, "all"])
    args = parser.parse_args()
    groups = list(CASES) if args.cases == "all" else [args.cases]
    print("| kind | Cout | Cin | groups | size | kernel/stride | MACs per output | float ms | int8 ms | int8 / float |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in groups:
        for case in CASES[kind]:
            cout, cin, group, size, kernel, stride = case
            fp, q = measure(case, args.runs)
            macs = cin // group * kernel * kernel
            row = [kind, cout, cin, group, size, f"{kernel}/{stride}", macs, f"{fp:.3f}", f"{q:.3f}", f"{q / fp:.2f}"]
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
