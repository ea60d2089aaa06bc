"""Tests of fuse_layernorm's vision forms: InstanceNorm, channels-first LayerNorm and the exporter GroupNorm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt
import onnxopt.passes.fuse_norm  # noqa: F401  (registers the pass)

PASS = "fuse_layernorm"
F32 = TensorProto.FLOAT
C, G = 8, 4
RNG = np.random.default_rng(1)


def counts(result) -> dict[str, int]:
    """The counts of the (single) fuse_layernorm run."""
    return dict(next(r.counts for r in result.report.passes if r.name == PASS))


def feeds(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A random input ``x`` of ``shape`` (away from zero variance)."""
    return {"x": (3 * RNG.standard_normal(shape) + 1).astype(np.float32)}


def moments(
    axes: tuple[int, ...],
    *,
    shape: tuple[int | str, ...] = (2, C, 5, 6),
    opset: int = 17,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    extra_output: str = "",
) -> ModelProto:
    """x -> mean/variance normalization over ``axes`` -> (Mul gamma) -> (Add beta) -> Neg -> y."""
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32))]
    if opset >= 18:
        inits.append(init("axes", np.array(axes, np.int64)))

    def reduce(src: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "axes"], [out])
        return helper.make_node("ReduceMean", [src], [out], axes=list(axes))

    nodes = [
        reduce("x", "m"),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        reduce("sq", "v"),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
    ]
    last = "n"
    if gamma is not None:
        inits.append(init("gamma", gamma))
        nodes.append(helper.make_node("Mul", ["gamma", last], ["g"]))
        last = "g"
    if beta is not None:
        inits.append(init("beta", beta))
        nodes.append(helper.make_node("Add", [last, "beta"], ["b"]))
        last = "b"
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    outputs = [helper.make_tensor_value_info("y", F32, [None] * len(shape))]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, F32, [None] * 4))
    return make_model(nodes, [tensor_input("x", shape)], outputs, inits, opset=opset)


def per_channel(rank: int, lead: int = 0, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """A random per-channel constant of shape [1]*lead + [C] + [1]*(rank-2)."""
    return (offset + scale * RNG.standard_normal((1,) * lead + (C,) + (1,) * (rank - 2))).astype(np.float32)


# ----------------------------------------------------------------------------- InstanceNorm


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma": per_channel(4, 0, 0.2, 1.0), "beta": per_channel(4, 0, 0.1)},
        {"gamma": per_channel(4, 1, 0.2, 1.0), "beta": per_channel(4, 1, 0.1), "opset": 18},
        {"beta": per_channel(4, 1, 0.1), "opset": 18},
        {"shape": (2, C, 3, 4, 5), "gamma": per_channel(5, 0, 0.2, 1.0)},
        {"shape": ("n", C, "h", "w"), "beta": per_channel(4, 0, 0.1)},
    ],
)
def test_instancenorm_fused(kwargs) -> None:
    rank = len(kwargs.get("shape", (2, C, 5, 6)))
    model = moments(tuple(range(2, rank)), **kwargs)
    result = run_pass(model, PASS)
    assert counts(result) == {"instancenorm": 1}
    assert op_types(result.model) == ["InstanceNormalization", "Neg"]
    shape = tuple(d if isinstance(d, int) else 3 for d in kwargs.get("shape", (2, C, 5, 6)))
    assert_equivalent(model, result.model, feeds(shape))


@pytest.mark.parametrize("kwargs", [{}, {"opset": 18}, {"gamma": np.array(1.5, np.float32)}])
def test_spatial_axes_without_per_channel_affine_stay_layernorm(kwargs) -> None:
    """When LayerNormalization(axis=-2) absorbs as much as InstanceNormalization would, the LayerNormalization is kept."""
    model = moments((2, 3), **kwargs)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["LayerNormalization", "Neg"]
    assert_equivalent(model, result.model, feeds((2, C, 5, 6)))


def test_rank3_spatial_axis_prefers_the_form_that_absorbs_the_affine() -> None:
    with_gamma = moments((2,), shape=(2, C, 7), gamma=per_channel(3, 0, 0.2, 1.0), beta=per_channel(3, 0, 0.1))
    result = run_pass(with_gamma, PASS)
    assert op_types(result.model) == ["InstanceNormalization", "Neg"]
    assert_equivalent(with_gamma, result.model, feeds((2, C, 7)))
    plain = moments((2,), shape=(2, C, 7))
    result = run_pass(plain, PASS)
    assert op_types(result.model) == ["LayerNormalization", "Neg"]
    assert_equivalent(plain, result.model, feeds((2, C, 7)))


def test_instancenorm_affine_not_per_channel_stays_outside() -> None:
    model = moments((2, 3), gamma=(1 + RNG.random((C, 5, 1))).astype(np.float32), beta=per_channel(4, 0, 0.1))
    result = run_pass(model, PASS)
    assert op_types(result.model).count("Mul") == 1 and "ReduceMean" not in op_types(result.model)
    assert_equivalent(model, result.model, feeds((2, C, 5, 6)))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"shape": (2, "c", 5, 6)}, "channel count not static"),
        ({"extra_output": "d"}, "intermediate is a graph output"),
    ],
)
def test_instancenorm_guards(kwargs, why) -> None:
    model = moments((2, 3), gamma=per_channel(4, 0, 0.2, 1.0), **kwargs)
    result = run_pass(model, PASS)
    assert "InstanceNormalization" not in op_types(result.model), why
    assert_equivalent(model, result.model, feeds((2, C, 5, 6)))


def test_instancenorm_option_off() -> None:
    model = moments((2, 3), shape=(2, C, 5, 6), gamma=per_channel(4, 0, 0.2, 1.0))
    result = run_pass(model, f"{PASS}:instancenorm=false")
    assert "InstanceNormalization" not in op_types(result.model)  # the LayerNormalization form (axis=-2) is taken instead
    assert_equivalent(model, result.model, feeds((2, C, 5, 6)))


# ----------------------------------------------------------------------------- channels-first LayerNorm


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, C, 5, 6), {"gamma": per_channel(4, 0, 0.2, 1.0), "beta": per_channel(4, 0, 0.1)}),
        ((2, C, 5, 6), {"opset": 18, "gamma": per_channel(4, 1, 0.2, 1.0)}),
        ((2, C, 7), {"beta": per_channel(3, 0, 0.1)}),
        (("n", C, "h", "w"), {}),
    ],
)
def test_channel_layernorm_fused(shape, kwargs) -> None:
    model = moments((1,), shape=shape, **kwargs)
    result = run_pass(model, PASS)
    assert counts(result) == {"channel_layernorm": 1}
    assert op_types(result.model) == ["Transpose", "LayerNormalization", "Transpose", "Neg"]
    rank = len(shape)
    first, ln, last = result.model.graph.node[:3]
    assert list(first.attribute[0].ints) == [0, *range(2, rank), 1]
    assert list(last.attribute[0].ints) == [0, rank - 1, *range(1, rank - 1)]
    assert len(ln.input) == (3 if "beta" in kwargs else 2)
    concrete = tuple(d if isinstance(d, int) else 3 for d in shape)
    assert_equivalent(model, result.model, feeds(concrete))


def test_channel_layernorm_guards() -> None:
    dynamic = moments((1,), shape=(2, "c", 5, 6))
    assert "LayerNormalization" not in op_types(run_pass(dynamic, PASS).model)
    off = moments((1,))
    assert "LayerNormalization" not in op_types(run_pass(off, f"{PASS}:channel_layernorm=false").model)
    spatial_gamma = moments((1,), gamma=(1 + RNG.random((1, 5, 6))).astype(np.float32))
    result = run_pass(spatial_gamma, PASS)
    assert op_types(result.model) == ["Transpose", "LayerNormalization", "Transpose", "Mul", "Neg"]
    assert_equivalent(spatial_gamma, result.model, feeds((2, C, 5, 6)))


def test_channel_layernorm_in_the_default_preset_cancels_transposes() -> None:
    """ConvNeXt's downsampling LayerNorm sits between channels-last Transposes: the default preset merges them away."""
    base = moments((1,), gamma=per_channel(4, 0, 0.2, 1.0), beta=per_channel(4, 0, 0.1))
    graph = base.graph
    nodes = [helper.make_node("Transpose", ["x_last"], ["x"], perm=[0, 3, 1, 2]), *graph.node]
    model = make_model(nodes, [tensor_input("x_last", (2, 5, 6, C))], list(graph.output), list(graph.initializer))
    result = onnxopt.optimize(model, "default", isolate=False)
    assert op_types(result.model) == ["LayerNormalization", "Transpose", "Neg"]
    assert_equivalent(model, result.model, {"x_last": (3 * RNG.standard_normal((2, 5, 6, C)) + 1).astype(np.float32)})


# ----------------------------------------------------------------------------- GroupNorm


def run_trt(model: ModelProto, passes: str) -> onnxopt.OptimizeResult:
    """Optimize for target trt (GroupNormalization is emitted for TensorRT only) without fault isolation."""
    return onnxopt.optimize(model, passes, isolate=False, target="trt")


def groupnorm(
    *,
    opset: int = 21,
    inner: str = "InstanceNormalization",
    back: str = "const",
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    groups: int = G,
    first_target: list[int] | None = None,
    inner_scale: float = 1.0,
    extra_output: str = "",
    batch: int | str = 2,
) -> ModelProto:
    """x [N, C, 5, 6] -> Reshape [0, G, -1] -> unscaled norm -> Reshape back -> (Mul) -> (Add) -> Neg -> y."""
    size = C // groups * 30
    inits = [init("t1", np.array(first_target or [0, groups, -1], np.int64))]
    nodes = [helper.make_node("Reshape", ["x", "t1"], ["r"])]
    if inner == "InstanceNormalization":
        inits += [init("ones", np.full(groups, inner_scale, np.float32)), init("zeros", np.zeros(groups, np.float32))]
        nodes.append(helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["i"], epsilon=1e-5))
    else:
        inits.append(init("ones", np.full(size, inner_scale, np.float32)))
        nodes.append(helper.make_node("LayerNormalization", ["r", "ones"], ["i"], axis=-1, epsilon=1e-5))
    if back == "shape":
        nodes += [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Reshape", ["i", "xs"], ["back"])]
    else:
        inits.append(init("t2", np.array({"const": [0, C, 5, 6], "minus": [0, -1, 5, 6], "wrong": [0, C, 6, 5]}[back], np.int64)))
        nodes.append(helper.make_node("Reshape", ["i", "t2"], ["back"]))
    last = "back"
    if gamma is not None:
        inits.append(init("gamma", gamma))
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["g"]))
        last = "g"
    if beta is not None:
        inits.append(init("beta", beta))
        nodes.append(helper.make_node("Add", ["beta", last], ["b"]))
        last = "b"
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    outputs = [helper.make_tensor_value_info("y", F32, [None] * 4)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, F32, [None] * 4))
    return make_model(nodes, [tensor_input("x", (batch, C, 5, 6))], outputs, inits, opset=opset, ir_version=10)


GAMMA = per_channel(4, 0, 0.3, 1.0)
BETA = per_channel(4, 0, 0.2)
X = (2, C, 5, 6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma": GAMMA, "beta": BETA},
        {"gamma": GAMMA, "beta": BETA, "back": "shape", "batch": "n"},
        {"gamma": GAMMA, "beta": BETA, "back": "minus", "first_target": [2, G, 60]},
        {"gamma": GAMMA, "inner": "LayerNormalization"},
        {},
    ],
)
def test_groupnorm_fused(kwargs) -> None:
    model = groupnorm(**kwargs)
    result = run_trt(model, PASS)
    assert counts(result) == {"groupnorm": 1}
    assert op_types(result.model) == ["GroupNormalization", "Neg"]
    node = result.model.graph.node[0]
    scale = next(t for t in result.model.graph.initializer if t.name == node.input[1])
    assert list(scale.dims) == [C]
    assert_equivalent(model, result.model, feeds(X))


def test_groupnorm_from_decomposed_layernorm_in_two_rounds() -> None:
    """The decomposed form: LayerNorm over [N, G, -1] first, then the GroupNorm around it (the default preset's fixpoint)."""
    base = groupnorm(gamma=GAMMA, beta=BETA, inner="LayerNormalization")
    ln = moments((-1,), shape=(2, G, 60), opset=21)
    graph = base.graph
    renamed = {"x": "r", "y": "i"}
    inner = []
    for node in ln.graph.node:
        if node.op_type == "Neg":
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(n, n) for n in node.input]
        copy.output[:] = ["i" if n == "n" else n for n in node.output]
        inner.append(copy)
    nodes = [graph.node[0], *inner, *graph.node[2:]]
    inits = [t for t in graph.initializer if t.name != "ones"] + list(ln.graph.initializer)
    model = make_model(nodes, list(graph.input), list(graph.output), inits, opset=21, ir_version=10)
    result = run_trt(model, "default")
    assert op_types(result.model) == ["GroupNormalization", "Neg"]
    assert_equivalent(model, result.model, feeds(X))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"inner_scale": 2.0}, "the inner scale is not ones"),
        ({"back": "wrong"}, "the second Reshape does not restore the shape"),
        ({"first_target": [0, 3, -1], "groups": 3}, "groups do not divide the channels"),
        ({"first_target": [0, -1, 60]}, "the group count is not a constant of the target"),
        ({"extra_output": "r"}, "an intermediate is a graph output"),
    ],
)
def test_groupnorm_guards(kwargs, why) -> None:
    model = groupnorm(gamma=GAMMA, beta=BETA, **kwargs)
    result = run_trt(model, PASS)
    assert "GroupNormalization" not in op_types(result.model), why
    assert_equivalent(model, result.model, feeds(X))


def test_groupnorm_per_channel_gamma_below_opset_21_is_kept_with_a_note() -> None:
    for model in (groupnorm(opset=18, gamma=GAMMA, beta=BETA), groupnorm(opset=20)):  # GroupNormalization-18 is never emitted
        result = run_trt(model, PASS)
        assert "GroupNormalization" not in op_types(result.model)
    model = groupnorm(opset=20, gamma=GAMMA, beta=BETA)
    result = run_trt(model, PASS)
    assert "GroupNormalization" not in op_types(result.model)
    assert any("GroupNormalization needs ai.onnx opset >= 21" in w for w in result.report.notes)


@pytest.mark.parametrize("target", ["portable", "ort-cpu", "ort-gpu"])
def test_groupnorm_left_for_targets_other_than_trt(target) -> None:
    model = groupnorm(gamma=GAMMA, beta=BETA)
    result = onnxopt.optimize(model, PASS, isolate=False, target=target)
    assert "GroupNormalization" not in op_types(result.model)
    assert run_trt(model, f"{PASS}:groupnorm=false").model.graph.node[1].op_type == "InstanceNormalization"


def test_deterministic() -> None:
    for model in (groupnorm(gamma=GAMMA, beta=BETA), moments((1,), gamma=GAMMA), moments((2, 3), gamma=GAMMA)):
        first = run_trt(model, PASS).model.SerializeToString(deterministic=True)
        assert first == run_trt(model, PASS).model.SerializeToString(deterministic=True)
