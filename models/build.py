"""Builders of small, deterministic test models (onnx.helper + seeded numpy weights).

``cnn_with_bn()`` is a tiny image classifier and ``transformer_block()`` one encoder layer as
exporters write them, both with the redundancies real exporters leave behind, so that the
cleanup passes have something to do. ``python -m models.build OUT_DIR`` writes both;
``python -m models.build --example`` regenerates the committed ``models/example_cnn.onnx``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
EXAMPLE_PATH = Path(__file__).resolve().parent / "example_cnn.onnx"


class _Graph:
    """Collects nodes and initializers, naming nodes uniquely in creation order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: object) -> str:
        """Append a node with one output named ``output``; returns that name."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"{op}_{len(self.nodes)}", **attrs))
        return output

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; returns its name."""
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def const(self, output: str, array: np.ndarray) -> str:
        """A Constant node (what exporters emit for small literals)."""
        return self.node("Constant", [], output, value=numpy_helper.from_array(np.asarray(array), output))

    def weight(self, name: str, shape: Sequence[int], scale: float) -> str:
        """A seeded normal weight of ``shape`` times ``scale``."""
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> ModelProto:
        """The checked model (opset 17, IR 8)."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="onnxopt-models"
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _conv_bn_relu(g: _Graph, x: str, prefix: str, cin: int, cout: int, *, stride: int = 1, relu: bool = True, gamma: str = "") -> str:
    """Conv(3x3, no bias) + BatchNormalization (+ Relu); ``gamma`` reuses a scale initializer by name."""
    w = g.weight(f"{prefix}.conv.weight", (cout, cin, 3, 3), math.sqrt(2.0 / (cin * 9)))
    y = g.node("Conv", [x, w], f"{prefix}.conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
    scale = gamma or g.init(f"{prefix}.bn.weight", (1.0 + 0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    bias = g.init(f"{prefix}.bn.bias", (0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    mean = g.init(f"{prefix}.bn.running_mean", (0.1 * g.rng.standard_normal(cout)).astype(np.float32))
    var = g.init(f"{prefix}.bn.running_var", g.rng.uniform(0.5, 1.5, cout).astype(np.float32))
    y = g.node("BatchNormalization", [y, scale, bias, mean, var], f"{prefix}.bn", epsilon=1e-5)
    return g.node("Relu", [y], f"{prefix}.relu") if relu else y


def cnn_with_bn() -> ModelProto:
    """A small CNN: Conv+BN+Relu blocks, a residual Add, GlobalAveragePool, Flatten, Gemm.

    Input ``input`` float[1,3,32,32], output ``logits`` float[1,10]. Exporter-style
    redundancies on purpose: Identity nodes, a Shape->Gather->Unsqueeze->Concat->Reshape
    chain that rebuilds a static shape (a no-op Reshape), a Constant node, and a duplicated
    initializer (two BatchNormalization scales with equal values under different names).
    """
    g = _Graph(seed=0)
    x = g.node("Identity", ["input"], "input.identity")
    x = _conv_bn_relu(g, x, "stem", 3, 16)
    skip = x
    gamma = g.rng.uniform(0.8, 1.2, 16).astype(np.float32)
    y = _conv_bn_relu(g, x, "block1.a", 16, 16, gamma=g.init("block1.a.bn.weight", gamma))
    # the same values again under another name: a duplicated initializer
    y = _conv_bn_relu(g, y, "block1.b", 16, 16, relu=False, gamma=g.init("block1.b.bn.weight", gamma.copy()))
    y = g.node("Add", [y, skip], "block1.add")
    y = g.node("Relu", [y], "block1.relu")
    # the exporter's dynamic-looking reshape of a static shape: Reshape(y, [N, 16, 32, 32])
    shape = g.node("Shape", [y], "block1.shape")
    zero = g.init("block1.index0", np.array(0, dtype=np.int64))
    batch = g.node("Gather", [shape, zero], "block1.batch", axis=0)
    axes = g.init("block1.unsqueeze_axes", np.array([0], dtype=np.int64))
    batch = g.node("Unsqueeze", [batch, axes], "block1.batch1d")
    rest = g.const("block1.rest", np.array([16, 32, 32], dtype=np.int64))
    target = g.node("Concat", [batch, rest], "block1.target", axis=0)
    y = g.node("Reshape", [y, target], "block1.reshape")
    y = _conv_bn_relu(g, y, "down", 16, 32, stride=2)
    y = g.node("GlobalAveragePool", [y], "pool")
    y = g.node("Flatten", [y], "flatten", axis=1)
    w = g.weight("fc.weight", (10, 32), math.sqrt(1.0 / 32))
    b = g.init("fc.bias", (0.01 * g.rng.standard_normal(10)).astype(np.float32))
    w = g.node("Identity", [w], "fc.weight.identity")
    y = g.node("Gemm", [y, w, b], "fc", transB=1)
    g.node("Identity", [y], "logits")
    return g.model(
        "cnn_with_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    )


def _layer_norm(g: _Graph, x: str, prefix: str, width: int) -> str:
    """LayerNorm over the last axis, decomposed the way exporters write it."""
    mean = g.node("ReduceMean", [x], f"{prefix}.mean", axes=[-1], keepdims=1)
    centered = g.node("Sub", [x, mean], f"{prefix}.centered")
    two = g.const(f"{prefix}.two", np.array(2.0, dtype=np.float32))
    square = g.node("Pow", [centered, two], f"{prefix}.square")
    var = g.node("ReduceMean", [square], f"{prefix}.var", axes=[-1], keepdims=1)
    eps = g.const(f"{prefix}.eps", np.array(1e-5, dtype=np.float32))
    var = g.node("Add", [var, eps], f"{prefix}.var_eps")
    std = g.node("Sqrt", [var], f"{prefix}.std")
    normed = g.node("Div", [centered, std], f"{prefix}.normed")
    gamma = g.init(f"{prefix}.weight", (1.0 + 0.1 * g.rng.standard_normal(width)).astype(np.float32))
    beta = g.init(f"{prefix}.bias", (0.1 * g.rng.standard_normal(width)).astype(np.float32))
    scaled = g.node("Mul", [normed, gamma], f"{prefix}.scaled")
    return g.node("Add", [scaled, beta], f"{prefix}.out")


def _linear(g: _Graph, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
    """MatMul + Add, as exporters write nn.Linear on 3-D inputs."""
    w = g.weight(f"{prefix}.weight", (fan_in, fan_out), math.sqrt(1.0 / fan_in))
    b = g.init(f"{prefix}.bias", (0.02 * g.rng.standard_normal(fan_out)).astype(np.float32))
    y = g.node("MatMul", [x, w], f"{prefix}.matmul")
    return g.node("Add", [y, b], f"{prefix}.out")


def _split_heads(g: _Graph, x: str, prefix: str, dims: tuple[str, str], heads: int, head_dim: int, perm: list[int]) -> str:
    """Reshape [B,S,H*D] -> [B,S,H,D] with a shape built from Shape/Gather, then Transpose."""
    tail = g.const(f"{prefix}.heads", np.array([heads, head_dim], dtype=np.int64))
    shape = g.node("Concat", [dims[0], dims[1], tail], f"{prefix}.shape", axis=0)
    y = g.node("Reshape", [x, shape], f"{prefix}.split")
    return g.node("Transpose", [y], f"{prefix}.heads_first", perm=perm)


def transformer_block(width: int = 32, heads: int = 4, ffn: int = 128) -> ModelProto:
    """One pre-norm encoder layer as an exporter writes it, with dynamic batch and sequence.

    Input ``x`` float[batch,seq,width], output ``y`` float[batch,seq,width]. LayerNorm is
    decomposed (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add), projections are
    MatMul+Add, attention uses Reshape/Transpose/MatMul/Softmax with head shapes computed by
    Shape->Gather->Unsqueeze chains, GELU is the erf form, and both sublayers are residual.
    """
    head_dim = width // heads
    g = _Graph(seed=1)
    h = _layer_norm(g, "x", "ln1", width)
    shape = g.node("Shape", [h], "attn.in_shape")
    dims = []
    for axis, label in enumerate(("batch", "seq")):
        index = g.const(f"attn.{label}_index", np.array(axis, dtype=np.int64))
        dim = g.node("Gather", [shape, index], f"attn.{label}", axis=0)
        axes = g.const(f"attn.{label}_axes", np.array([0], dtype=np.int64))
        dims.append(g.node("Unsqueeze", [dim, axes], f"attn.{label}_1d"))
    batch_seq = (dims[0], dims[1])
    q = _split_heads(g, _linear(g, h, "attn.q", width, width), "attn.q", batch_seq, heads, head_dim, [0, 2, 1, 3])
    k = _split_heads(g, _linear(g, h, "attn.k", width, width), "attn.k", batch_seq, heads, head_dim, [0, 2, 3, 1])
    v = _split_heads(g, _linear(g, h, "attn.v", width, width), "attn.v", batch_seq, heads, head_dim, [0, 2, 1, 3])
    scores = g.node("MatMul", [q, k], "attn.scores")
    scale = g.const("attn.scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    scores = g.node("Div", [scores, scale], "attn.scaled")
    probs = g.node("Softmax", [scores], "attn.probs", axis=-1)
    context = g.node("MatMul", [probs, v], "attn.context")
    context = g.node("Transpose", [context], "attn.context_t", perm=[0, 2, 1, 3])
    merged_shape = g.const("attn.merged_shape", np.array([0, 0, width], dtype=np.int64))
    context = g.node("Reshape", [context, merged_shape], "attn.merged")
    attn = _linear(g, context, "attn.out", width, width)
    x = g.node("Add", ["x", attn], "res1")
    h = _layer_norm(g, x, "ln2", width)
    h = _linear(g, h, "ffn.up", width, ffn)
    sqrt2 = g.const("ffn.sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    erf = g.node("Erf", [g.node("Div", [h, sqrt2], "ffn.gelu.div")], "ffn.gelu.erf")
    one = g.const("ffn.one", np.array(1.0, dtype=np.float32))
    half = g.const("ffn.half", np.array(0.5, dtype=np.float32))
    gate = g.node("Add", [erf, one], "ffn.gelu.add")
    h = g.node("Mul", [g.node("Mul", [h, gate], "ffn.gelu.mul"), half], "ffn.gelu.out")
    h = _linear(g, h, "ffn.down", ffn, width)
    g.node("Add", [x, h], "y")
    value = ["batch", "seq", width]
    return g.model(
        "transformer_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, value)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, value)],
    )


BUILDERS = {"cnn_with_bn": cnn_with_bn, "transformer_block": transformer_block}


def serialize(model: ModelProto) -> bytes:
    """Deterministic bytes of a model (what the files on disk hold)."""
    return model.SerializeToString(deterministic=True)


def write(model: ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` deterministically; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize(model))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.build OUT_DIR`` writes every model; ``--example`` rewrites the committed one."""
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="folder to write <name>.onnx files into")
    parser.add_argument("--example", action="store_true", help=f"regenerate {EXAMPLE_PATH.name} next to this module")
    args = parser.parse_args(argv)
    if args.out_dir is None and not args.example:
        parser.error("give OUT_DIR, --example, or both")
    written: list[Path] = []
    if args.out_dir is not None:
        written += [write(build(), args.out_dir / f"{name}.onnx") for name, build in BUILDERS.items()]
    if args.example:
        written.append(write(cnn_with_bn(), EXAMPLE_PATH))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
