"""Tests of fuse_matmul_add, fuse_transpose_into_gemm, div_to_mul and fold_matmul_affine: rewrites, guards, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt.passes.fuse_linear  # noqa: F401  (registers the passes)

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    """Random normal values."""
    return RNG.standard_normal(shape).astype(dtype)


def counts(result, name: str) -> dict[str, int]:
    """The counts of the single run of pass ``name``."""
    records = [r for r in result.report.passes if r.name == name]
    assert len(records) == 1
    return dict(records[0].counts)


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as a dict."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ----------------------------------------------------------------------------- fuse_matmul_add


def linear_model(
    *,
    bias_shape: tuple[int, ...] = (4,),
    bias_first: bool = False,
    m: int | str = 3,
    dtype=np.float32,
    opset: int = 17,
    a_rank: int = 2,
    weight_is_input: bool = False,
    bias_is_input: bool = False,
    extra_output: bool = False,
    constant_node: bool = False,
) -> ModelProto:
    """a (m x 5) -> MatMul(W 5x4) -> Add(bias) -> Relu -> y, like a torch Linear export."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    a_shape = [m, 5] if a_rank == 2 else [2, m, 5]
    inits = []
    inputs = [tensor_input("a", a_shape, elem)]
    nodes = []
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(rand(5, 4, dtype=dtype), "W")))
    else:
        inits.append(init("W", rand(5, 4, dtype=dtype)))
    if weight_is_input:
        inputs.append(tensor_input("W", [5, 4], elem))
    if bias_is_input:
        inputs.append(tensor_input("bias", list(bias_shape), elem))
    else:
        inits.append(init("bias", rand(*bias_shape, dtype=dtype)))
    add_inputs = ["bias", "mm"] if bias_first else ["mm", "bias"]
    nodes += [
        helper.make_node("MatMul", ["a", "W"], ["mm"]),
        helper.make_node("Add", add_inputs, ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    outputs = [tensor_input("y", [None] * len(a_shape), elem)]
    if extra_output:
        outputs.append(tensor_input("mm", [None] * len(a_shape), elem))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4), (3, 4), (3, 1), (), (1,), (1, 1)])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_becomes_gemm(bias_shape, bias_first):
    model = linear_model(bias_shape=bias_shape, bias_first=bias_first)
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["Gemm", "Relu"]
    assert counts(result, "fuse_matmul_add") == {"matmul_add_to_gemm": 1}
    gemm = result.model.graph.node[0]
    assert list(gemm.input) == ["a", "W", "bias"] and gemm.output[0] == "z"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_matmul_add_other_float_types(dtype):
    model = linear_model(dtype=dtype)
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["Gemm", "Relu"]
    assert_equivalent(model, result.model, precision="fp16" if dtype == np.float16 else "fp32")


def test_matmul_add_dynamic_batch_and_constant_node_weight():
    model = linear_model(m="batch", constant_node=True, bias_is_input=True, bias_shape=(4,))
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["Constant", "Gemm", "Relu"]
    assert_equivalent(model, result.model, input_shapes={"a": (7, 5)})


def test_matmul_add_opset_7():
    model = linear_model(opset=7)
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["Gemm", "Relu"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"a_rank": 3},  # transformer-style batched MatMul is left alone
        {"weight_is_input": True},  # an overridable initializer is not a constant
        {"extra_output": True},  # the MatMul output is a graph output
        {"bias_shape": (1, 3, 4)},  # the Add would broadcast to rank 3
        {"bias_shape": (2, 4), "bias_is_input": True},  # [n, 4]: n is not provably M
        {"bias_shape": (4,), "m": "batch", "bias_is_input": True, "opset": 6},  # old Gemm needs broadcast=1
        {"bias_shape": ("batch", 4), "m": "other", "bias_is_input": True},  # symbolic dims not provably equal
        {"bias_shape": (5, 4), "m": "batch", "bias_is_input": True},  # static vs symbolic
    ],
)
def test_matmul_add_guards(kwargs):
    model = linear_model(**kwargs)
    if kwargs.get("bias_shape") == (2, 4):
        model.graph.input[-1].type.tensor_type.shape.dim[0].dim_param = "n"
    result = run_pass(model, "fuse_matmul_add")
    assert "Gemm" not in op_types(result.model)
    assert not result.report.changed_passes()


def test_matmul_add_symbolic_bias_same_name():
    model = linear_model(bias_shape=("batch", 4), m="batch", bias_is_input=True)
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["Gemm", "Relu"]
    feeds = {"a": rand(6, 5), "bias": rand(6, 4)}
    assert_equivalent(model, result.model, feeds)


def test_matmul_add_int_not_fused_and_matmul_read_twice():
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["z"]),
        helper.make_node("Mul", ["mm", "z"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("a", [3, 5])], [tensor_input("y", [3, 4])], [init("W", rand(5, 4)), init("bias", rand(4))])
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["MatMul", "Add", "Mul"]
    ints = make_model(
        nodes[:2],
        [tensor_input("a", [3, 5], TensorProto.INT32)],
        [tensor_input("z", [3, 4], TensorProto.INT32)],
        [init("W", np.ones((5, 4), np.int32)), init("bias", np.ones(4, np.int32))],
    )
    assert op_types(run_pass(ints, "fuse_matmul_add").model) == ["MatMul", "Add"]


def test_matmul_add_both_inputs_matmul():
    """Add(MatMul(a, W), MatMul(a, V)): one of them becomes the Gemm, the other is its C."""
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["m1"]),
        helper.make_node("MatMul", ["a", "V"], ["m2"]),
        helper.make_node("Add", ["m1", "m2"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("a", [3, 5])], [tensor_input("y", [3, 4])], [init("W", rand(5, 4)), init("V", rand(5, 4))])
    result = run_pass(model, "fuse_matmul_add")
    assert sorted(op_types(result.model)) == ["Gemm", "MatMul"]
    assert result.model.graph.node[-1].output[0] == "y"
    assert_equivalent(model, result.model)


def test_matmul_add_in_subgraph():
    """A subgraph's own weight is a constant there; a weight captured from the outer graph is not."""
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["z"])]
    body = helper.make_graph(nodes, "then", [], [tensor_input("z", [3, 4])], [init("W", rand(5, 4))])
    other = helper.make_graph(
        [helper.make_node("MatMul", ["a", "V"], ["mm2"]), helper.make_node("Add", ["mm2", "bias"], ["o"])],
        "else",
        [],
        [tensor_input("o", [3, 4])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other)],
        [tensor_input("a", [3, 5]), tensor_input("cond", [], TensorProto.BOOL)],
        [tensor_input("y", [3, 4])],
        [init("V", rand(5, 4)), init("bias", rand(4))],
    )
    result = run_pass(model, "fuse_matmul_add")
    branches = {a.name: [n.op_type for n in a.g.node] for a in result.model.graph.node[0].attribute}
    assert branches == {"then_branch": ["Gemm"], "else_branch": ["MatMul", "Add"]}
    for cond in (True, False):
        assert_equivalent(model, result.model, {"a": rand(3, 5), "cond": np.array(cond)})


def test_matmul_add_custom_domain_untouched():
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm"], domain="custom"), helper.make_node("Add", ["mm", "bias"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [tensor_input("a", [3, 5])], [tensor_input("y", [3, 4])], [init("W", rand(5, 4)), init("bias", rand(4))]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], ir_version=8)
    result = run_pass(model, "fuse_matmul_add")
    assert op_types(result.model) == ["MatMul", "Add"]


# ----------------------------------------------------------------------------- fuse_transpose_into_gemm


def gemm_model(
    *, t_a: bool, t_b: bool, trans_a: int = 0, trans_b: int = 0, b_const: bool = True, perm: bool = True, **gemm_attrs
) -> ModelProto:
    """a -> (Transpose) -> Gemm(A, (Transpose) B, C) -> y (3x4)."""
    a_shape = [3, 5] if (t_a == bool(trans_a)) else [5, 3]
    b_shape = [5, 4] if (t_b == bool(trans_b)) else [4, 5]
    perm_attr = {"perm": [1, 0]} if perm else {}
    nodes = []
    a, b = "a", "b"
    if t_a:
        nodes.append(helper.make_node("Transpose", ["a"], ["at"], **perm_attr))
        a = "at"
    if t_b:
        nodes.append(helper.make_node("Transpose", ["b"], ["bt"], **perm_attr))
        b = "bt"
    nodes.append(helper.make_node("Gemm", [a, b, "c"], ["y"], transA=trans_a, transB=trans_b, **gemm_attrs))
    inputs = [tensor_input("a", a_shape)]
    inits = [init("c", rand(4))]
    if b_const:
        inits.append(init("b", rand(*b_shape)))
    else:
        inputs.append(tensor_input("b", b_shape))
    return make_model(nodes, inputs, [tensor_input("y", [3, 4])], inits)


@pytest.mark.parametrize(("t_a", "t_b"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("b_const", [True, False])
def test_transpose_into_gemm(t_a, t_b, trans_a, trans_b, b_const):
    model = gemm_model(t_a=t_a, t_b=t_b, trans_a=trans_a, trans_b=trans_b, b_const=b_const, alpha=0.5, beta=2.0)
    result = run_pass(model, "fuse_transpose_into_gemm")
    assert op_types(result.model) == ["Gemm"]
    gemm = result.model.graph.node[0]
    got = attrs(gemm)
    assert got["transA"] == trans_a ^ t_a and got["transB"] == trans_b ^ t_b
    assert got["alpha"] == 0.5 and got["beta"] == 2.0
    assert list(gemm.input) == ["a", "b", "c"]
    assert counts(result, "fuse_transpose_into_gemm") == {"transpose_into_gemm": 1}
    assert_equivalent(model, result.model)


def test_transpose_without_perm_into_gemm():
    model = gemm_model(t_a=True, t_b=True, perm=False)
    result = run_pass(model, "fuse_transpose_into_gemm")
    assert op_types(result.model) == ["Gemm"]
    assert_equivalent(model, result.model)


def test_transpose_read_as_a_and_b():
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]), helper.make_node("Gemm", ["at", "at"], ["y"])]
    model = make_model(nodes, [tensor_input("a", [4, 4])], [tensor_input("y", [4, 4])])
    result = run_pass(model, "fuse_transpose_into_gemm")
    assert op_types(result.model) == ["Gemm"]
    assert attrs(result.model.graph.node[0]) == {"transA": 1, "transB": 1}
    assert_equivalent(model, result.model)


def test_transpose_into_gemm_guards():
    shared = [
        helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
        helper.make_node("Gemm", ["a", "bt", "c"], ["y"]),
        helper.make_node("Neg", ["bt"], ["z"]),
    ]
    model = make_model(
        shared,
        [tensor_input("a", [3, 5])],
        [tensor_input("y", [3, 4]), tensor_input("z", [5, 4])],
        [init("b", rand(4, 5)), init("c", rand(4))],
    )
    assert op_types(run_pass(model, "fuse_transpose_into_gemm").model) == ["Transpose", "Gemm", "Neg"]
    as_output = make_model(
        shared[:2],
        [tensor_input("a", [3, 5])],
        [tensor_input("y", [3, 4]), tensor_input("bt", [5, 4])],
        [init("b", rand(4, 5)), init("c", rand(4))],
    )
    assert op_types(run_pass(as_output, "fuse_transpose_into_gemm").model) == ["Transpose", "Gemm"]
    as_c = make_model(
        [helper.make_node("Transpose", ["s"], ["st"], perm=[1, 0]), helper.make_node("Gemm", ["st", "st", "st"], ["y"])],
        [tensor_input("s", [4, 4])],
        [tensor_input("y", [4, 4])],
    )
    assert op_types(run_pass(as_c, "fuse_transpose_into_gemm").model) == ["Transpose", "Gemm"]


# ----------------------------------------------------------------------------- div_to_mul


def div_model(divisor: np.ndarray, *, shape=(2, 3, 4), opset: int = 17, ir_version: int = 8, as_input: bool = False) -> ModelProto:
    """x -> Div(x, c) -> y."""
    elem = helper.np_dtype_to_tensor_dtype(divisor.dtype)
    inputs = [tensor_input("x", list(shape), elem)]
    if as_input:
        inputs.append(tensor_input("c", list(divisor.shape), elem))
    nodes = [helper.make_node("Div", ["x", "c"], ["y"])]
    return make_model(nodes, inputs, [tensor_input("y", list(shape), elem)], [init("c", divisor)], opset=opset, ir_version=ir_version)


@pytest.mark.parametrize(
    "divisor",
    [
        np.array(3.0, np.float32),
        np.array([7.0], np.float32),
        (RNG.random(4) + 0.1).astype(np.float32),
        np.array(-0.1, np.float64),
        np.array(8.0, np.float16),
    ],
)
def test_div_to_mul(divisor):
    model = div_model(divisor)
    result = run_pass(model, "div_to_mul")
    assert op_types(result.model) == ["Mul"]
    assert counts(result, "div_to_mul") == {"div_to_mul": 1}
    mul = result.model.graph.node[0]
    recip = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == mul.input[1]))
    assert recip.dtype == divisor.dtype
    assert np.allclose(recip, 1.0 / divisor.astype(np.float64), rtol=1e-3)
    assert_equivalent(model, result.model, precision="fp16" if divisor.dtype == np.float16 else "fp32")


def test_div_to_mul_power_of_two_is_bit_exact():
    model = div_model(np.array([0.25, 2.0, 4.0, 1024.0], np.float32))
    result = run_pass(model, "div_to_mul:exact_only=true")
    assert op_types(result.model) == ["Mul"]
    feeds = {"x": rand(2, 3, 4)}
    from onnxopt.verify import run_model

    assert np.array_equal(run_model(model, feeds)["y"], run_model(result.model, feeds)["y"])


def test_div_to_mul_not_before_opset_7():
    nodes = [helper.make_node("Div", ["x", "c"], ["y"], broadcast=1, axis=1)]
    model = make_model(
        nodes, [tensor_input("x", [2, 3, 4])], [tensor_input("y", [2, 3, 4])], [init("c", np.array([2.0, 3.0, 5.0], np.float32))], opset=6
    )
    assert op_types(run_pass(model, "div_to_mul").model) == ["Div"]
    assert op_types(run_pass(div_model(np.array(3.0, np.float32), opset=7), "div_to_mul").model) == ["Mul"]


@pytest.mark.parametrize(
    ("divisor", "kwargs", "spec"),
    [
        (np.array([1.0, 0.0], np.float32), {"shape": (3, 2)}, "div_to_mul"),  # a zero
        (np.array(np.inf, np.float32), {}, "div_to_mul"),
        (np.array(np.nan, np.float32), {}, "div_to_mul"),
        (np.array(1e-45, np.float32), {}, "div_to_mul"),  # subnormal: the reciprocal overflows
        (np.array(3, np.int64), {}, "div_to_mul"),  # integer Div truncates
        (np.array(3.0, np.float32), {"as_input": True}, "div_to_mul"),  # overridable initializer
        (np.array(3.0, np.float32), {}, "div_to_mul:exact_only=true"),  # not a power of two
    ],
)
def test_div_to_mul_guards(divisor, kwargs, spec):
    model = div_model(divisor, **kwargs)
    result = run_pass(model, spec)
    assert op_types(result.model) == ["Div"]


def test_div_to_mul_skips_ir3():
    model = div_model(np.array(3.0, np.float32))
    model.ir_version = 3
    model.graph.input.append(tensor_input("c", [], F32))
    assert op_types(run_pass(model, "div_to_mul").model) == ["Div"]


def test_div_to_mul_dynamic_divisor_untouched():
    nodes = [helper.make_node("Div", ["x", "d"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3]), tensor_input("d", [3])], [tensor_input("y", [3])])
    assert op_types(run_pass(model, "div_to_mul").model) == ["Div"]


def test_deterministic():
    def build() -> ModelProto:
        inits = [
            init("W", np.arange(20, dtype=np.float32).reshape(5, 4)),
            init("bias", np.ones(4, np.float32)),
            init("c", np.array(3.0, np.float32)),
        ]
        nodes = [
            helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
            helper.make_node("MatMul", ["at", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "bias"], ["z"]),
            helper.make_node("Div", ["z", "c"], ["y"]),
        ]
        return make_model(nodes, [tensor_input("a", [5, 3])], [tensor_input("y", [3, 4])], inits)

    spec = "fuse_matmul_add,fuse_transpose_into_gemm,div_to_mul"
    first = run_pass(build(), spec).model
    second = run_pass(build(), spec).model
    assert first.SerializeToString() == second.SerializeToString()
    assert op_types(first) == ["Gemm", "Mul"]
    assert attrs(first.graph.node[0]).get("transA") == 1
    assert_equivalent(build(), first)


# ----------------------------------------------------------------------------- fold_matmul_affine


def scaled_model(
    chain: tuple[tuple[str, tuple[int, ...]], ...] = (("Add", (4,)), ("Mul", (4,))),
    *,
    swap: bool = False,
    extra_output: str = "",
    shared_weight: bool = False,
    dtype=np.float32,
) -> ModelProto:
    """x [2, 3, 5] -> MatMul(W 5x4) -> each (op, constant shape) of ``chain`` -> Relu -> y (ConvNeXt's MLP tail)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [init("W", rand(5, 4, dtype=dtype))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["v0"])]
    for index, (op, shape) in enumerate(chain):
        constant = (rand(*shape, dtype=dtype) + (2 if op == "Div" else 0)).astype(dtype)
        inits.append(init(f"c{index}", constant))
        operands = [f"c{index}", f"v{index}"] if swap and op in ("Mul", "Add") else [f"v{index}", f"c{index}"]
        nodes.append(helper.make_node(op, operands, [f"v{index + 1}"]))
    nodes.append(helper.make_node("Relu", [f"v{len(chain)}"], ["y"]))
    outputs = [tensor_input("y", [2, 3, 4], elem)]
    if extra_output:
        outputs.append(tensor_input(extra_output, [2, 3, 4], elem))
    if shared_weight:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"]))
        outputs.append(tensor_input("z", [2, 3, 4], elem))
    return make_model(nodes, [tensor_input("x", [2, 3, 5], elem)], outputs, inits)


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        ((("Add", (4,)), ("Mul", (4,))), ["MatMul", "Add", "Relu"]),
        ((("Mul", (1, 1, 4)),), ["MatMul", "Relu"]),
        ((("Mul", ()), ("Div", (4,)), ("Sub", (1, 4)), ("Add", (4,))), ["MatMul", "Add", "Relu"]),
        ((("Div", (1,)),), ["MatMul", "Relu"]),
    ],
)
@pytest.mark.parametrize("swap", [False, True])
def test_matmul_affine_folded(chain, expected, swap):
    model = scaled_model(chain, swap=swap)
    result = run_pass(model, "fold_matmul_affine")
    assert op_types(result.model) == expected
    assert counts(result, "fold_matmul_affine") == {"affine_into_matmul": 1}
    assert_equivalent(model, result.model)


def test_matmul_affine_folds_into_a_weight_over_a_million_elements():
    """A 1024 x 1040 weight (over 2**20 elements) takes the per-column scale like a small one."""
    weight = rand(1024, 1040) * np.float32(0.03)
    scale = rand(1040)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Mul", ["m", "s"], ["v"]),
        helper.make_node("Relu", ["v"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [2, 1024])], [tensor_input("y", [2, 1040])], [init("W", weight), init("s", scale)])
    result = run_pass(model, "fold_matmul_affine")
    assert op_types(result.model) == ["MatMul", "Relu"]
    assert_equivalent(model, result.model)


def test_matmul_affine_keeps_a_shared_weight_for_its_other_reader():
    model = scaled_model(shared_weight=True)
    result = run_pass(model, "fold_matmul_affine")
    assert op_types(result.model) == ["MatMul", "Add", "Relu", "MatMul"]
    assert result.model.graph.node[3].input[1] == "W"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    ("chain", "kwargs", "why"),
    [
        ((("Add", (4,)),), {}, "a lone bias Add gains nothing"),
        ((("Mul", (3, 4)),), {}, "the scale varies along another axis than the last"),
        ((("Mul", (1, 1, 1, 4)),), {}, "the scale raises the rank"),
        ((("Mul", (4,)),), {"extra_output": "v0"}, "the product is a graph output"),
        ((("Mul", (4,)),), {"dtype": np.float64, "extra_output": "v0"}, "the product is a graph output (double)"),
    ],
)
def test_matmul_affine_guards(chain, kwargs, why):
    model = scaled_model(chain, **kwargs)
    result = run_pass(model, "fold_matmul_affine")
    assert op_types(result.model)[: len(chain) + 1] == ["MatMul", *(op for op, _ in chain)], why
    assert_equivalent(model, result.model)


def test_matmul_affine_divisor_on_the_left_is_kept():
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["p"]), helper.make_node("Div", ["c", "p"], ["y"])],
        [tensor_input("x", [3, 5])],
        [tensor_input("y", [3, 4])],
        [init("W", rand(5, 4)), init("c", rand(4))],
    )
    assert op_types(run_pass(model, "fold_matmul_affine").model) == ["MatMul", "Div"]


def test_matmul_affine_in_default_preset_and_deterministic():
    model = scaled_model((("Add", (4,)), ("Mul", (4,))))
    first = run_pass(model, "default").model
    assert op_types(first) == ["MatMul", "Add", "Relu"]
    assert_equivalent(model, first)
    assert first.SerializeToString(deterministic=True) == run_pass(model, "default").model.SerializeToString(deterministic=True)
