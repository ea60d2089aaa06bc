"""Tests of merge_layout_chains: Transpose, Reshape, Squeeze/Unsqueeze/Flatten chains, opset forms and guards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt.passes.fuse_layout  # noqa: F401  (registers the pass)

PASS = "merge_layout_chains"
F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def counts(result) -> dict[str, int]:
    """The counts of the merge_layout_chains run."""
    return dict(next(r.counts for r in result.report.passes if r.name == PASS))


def chain(
    nodes: list[onnx.NodeProto],
    x_shape: list,
    inits: list | None = None,
    *,
    opset: int = 17,
    outputs: tuple[str, ...] = ("y",),
    rank: int | None = None,
) -> ModelProto:
    """x -> nodes ... -> last node writes 'v' -> Neg -> y (extra graph outputs by name), outputs of rank ``rank`` (default x's)."""
    body = [*nodes, helper.make_node("Neg", ["v"], ["y"])]
    outs = [tensor_input(name, [None] * (len(x_shape) if rank is None else rank)) for name in outputs]
    return make_model(body, [tensor_input("x", x_shape)], outs, inits or [], opset=opset)


def transpose(src: str, dst: str, perm: list[int] | None) -> onnx.NodeProto:
    """A Transpose node (no perm attribute when ``perm`` is None)."""
    return helper.make_node("Transpose", [src], [dst], **({"perm": perm} if perm is not None else {}))


def feeds_for(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Random input x of ``shape``."""
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


# ----------------------------------------------------------------------------- Transpose


def test_transpose_pair_composes():
    model = chain([transpose("x", "t", [0, 2, 3, 1]), transpose("t", "v", [0, 2, 1, 3])], [2, 3, 4, 5])
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Transpose", "Neg"]
    assert counts(result) == {"transpose_pair_merged": 1}
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("perms", [([0, 2, 3, 1], [0, 3, 1, 2]), (None, None), ([1, 0, 2], [1, 0, 2])])
def test_inverse_transposes_cancel(perms):
    model = chain(
        [transpose("x", "t", perms[0]), transpose("t", "v", perms[1])], [2, 3, 4, 5] if perms[0] and len(perms[0]) == 4 else [2, 3, 4]
    )
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Neg"]
    assert result.model.graph.node[0].input[0] == "x"
    assert counts(result) == {"transpose_pair_removed": 1}
    assert_equivalent(model, result.model)


def test_transpose_chain_collapses_in_one_run():
    perms = [[0, 2, 3, 1], [0, 3, 1, 2], [1, 0, 2, 3], [0, 1, 3, 2], [3, 2, 1, 0]]
    names = ["x", "t0", "t1", "t2", "t3", "v"]
    model = chain([transpose(names[i], names[i + 1], p) for i, p in enumerate(perms)], [2, 3, 4, 5])
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Transpose", "Neg"]
    assert_equivalent(model, result.model)


def test_cancelled_pair_keeps_graph_output():
    model = chain([transpose("x", "t", [1, 0]), transpose("t", "v", [1, 0])], [3, 4], outputs=("y", "v"))
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Identity", "Neg"]
    assert [o.name for o in result.model.graph.output] == ["y", "v"]
    assert_equivalent(model, result.model)


def test_transpose_guards():
    shared = [transpose("x", "t", [1, 0]), transpose("t", "v", [1, 0]), helper.make_node("Relu", ["t"], ["r"])]
    model = chain(shared, [3, 4], outputs=("y", "r"))
    assert op_types(run_pass(model, PASS).model) == ["Transpose", "Transpose", "Relu", "Neg"]
    as_output = chain(shared[:2], [3, 4], outputs=("y", "t"))
    assert op_types(run_pass(as_output, PASS).model) == ["Transpose", "Transpose", "Neg"]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["d"]), transpose("d", "t", None), transpose("t", "v", None)]
    unknown_rank = make_model(
        [*nodes, helper.make_node("Neg", ["v"], ["y"])],
        [tensor_input("x", [3, 4]), tensor_input("shape", ["n"], TensorProto.INT64)],
        [tensor_input("y", [None, None])],
    )
    assert op_types(run_pass(unknown_rank, PASS).model) == ["Reshape", "Transpose", "Transpose", "Neg"]


def test_custom_domain_untouched():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], domain="custom"), transpose("t", "v", [1, 0])]
    graph = helper.make_graph(
        [*nodes, helper.make_node("Neg", ["v"], ["y"])], "g", [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], ir_version=8)
    assert op_types(run_pass(model, PASS).model) == ["Transpose", "Transpose", "Neg"]


def test_cancelled_pair_read_in_subgraph():
    """Readers inside an If branch are redirected to the surviving value."""
    then = helper.make_graph([helper.make_node("Relu", ["v"], ["o"])], "then", [], [tensor_input("o", [4, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["v"], ["o2"])], "else", [], [tensor_input("o2", [4, 3])])
    nodes = [
        transpose("x", "t", [1, 0]),
        transpose("t", "v", [1, 0]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4]), tensor_input("c", [], TensorProto.BOOL)], [tensor_input("y", [4, 3])])
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["If"]
    for cond in (True, False):
        assert_equivalent(model, result.model, {"x": feeds_for((3, 4))["x"], "c": np.array(cond)})


# ----------------------------------------------------------------------------- Reshape


def shape_init(name: str, values: list[int]) -> onnx.TensorProto:
    """An int64 shape initializer."""
    return init(name, np.array(values, np.int64))


def unsqueeze(src: str, dst: str, axes: list[int], opset: int) -> tuple[onnx.NodeProto, list]:
    """An Unsqueeze in the form of ``opset`` (axes attribute before 13, input from 13)."""
    if opset >= 13:
        return helper.make_node("Unsqueeze", [src, f"{dst}_axes"], [dst]), [init(f"{dst}_axes", np.array(axes, np.int64))]
    return helper.make_node("Unsqueeze", [src], [dst], axes=axes), []


def squeeze(src: str, dst: str, axes: list[int] | None, opset: int) -> tuple[onnx.NodeProto, list]:
    """A Squeeze in the form of ``opset`` (no axes when ``axes`` is None)."""
    if axes is None:
        return helper.make_node("Squeeze", [src], [dst]), []
    if opset >= 13:
        return helper.make_node("Squeeze", [src, f"{dst}_axes"], [dst]), [init(f"{dst}_axes", np.array(axes, np.int64))]
    return helper.make_node("Squeeze", [src], [dst], axes=axes), []


@pytest.mark.parametrize("second", [[6, 20], [-1, 4], [2, -1, 5]])
def test_reshape_pair_merges(second):
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["v"])]
    model = chain(nodes, [2, 3, 4, 5], [shape_init("s1", [6, 4, 5]), shape_init("s2", second)])
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Reshape", "Neg"]
    assert list(result.model.graph.node[0].input) == ["x", "s2"]
    assert counts(result) == {"reshape_reshape_merged": 1}
    assert_equivalent(model, result.model)


def test_reshape_with_zero_in_second_target_is_kept():
    """[0, -1] copies dim 0 of the FIRST reshape's output (6), not of x (2)."""
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["v"])]
    model = chain(nodes, [2, 3, 4, 5], [shape_init("s1", [6, 4, 5]), shape_init("s2", [0, -1])])
    assert op_types(run_pass(model, PASS).model) == ["Reshape", "Reshape", "Neg"]


def test_reshape_allowzero_second_merges():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["v"], allowzero=1)]
    model = chain(nodes, [2, 3, 4, 5], [shape_init("s1", [6, 20]), shape_init("s2", [4, 30])], opset=14)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Reshape", "Neg"]
    assert_equivalent(model, result.model)


def test_reshape_dynamic_target_is_kept():
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Reshape", ["x", "s1"], ["r"]),
        helper.make_node("Reshape", ["r", "sx"], ["v"]),
    ]
    model = chain(nodes, [2, 3, 4, 5], [shape_init("s1", [6, 20])])
    assert op_types(run_pass(model, PASS).model) == ["Shape", "Reshape", "Reshape", "Neg"]


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("first", ["Squeeze", "Unsqueeze", "Flatten"])
def test_layout_op_then_reshape(opset, first):
    if first == "Squeeze":
        node, extra = squeeze("x", "r", [1], opset)
    elif first == "Unsqueeze":
        node, extra = unsqueeze("x", "r", [0, -1], opset)
    else:
        node, extra = helper.make_node("Flatten", ["x"], ["r"], axis=2), []
    nodes = [node, helper.make_node("Reshape", ["r", "s2"], ["v"])]
    model = chain(nodes, [2, 1, 4, 5], [*extra, shape_init("s2", [5, -1])], opset=opset)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Reshape", "Neg"]
    assert counts(result) == {f"{first.lower()}_reshape_merged": 1}
    assert_equivalent(model, result.model)


def test_reshape_opset_1_attribute_form():
    nodes = [helper.make_node("Reshape", ["x"], ["r"], shape=[6, 20]), helper.make_node("Reshape", ["r"], ["v"], shape=[4, 30])]
    model = chain(nodes, [2, 3, 4, 5], opset=4)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Reshape", "Neg"]
    assert [a.name for a in result.model.graph.node[0].attribute] == ["shape"]
    # onnxruntime runs Reshape from opset 5 only, so this form is checked structurally.
    onnx.checker.check_model(result.model)


# ----------------------------------------------------------------------------- Squeeze / Unsqueeze


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(("added", "removed"), [([0], [0]), ([1, 3], [3, 1]), ([-1], [3]), ([0, -1], [-5, 4])])
def test_unsqueeze_squeeze_cancel(opset, added, removed):
    u, e1 = unsqueeze("x", "u", added, opset)
    s, e2 = squeeze("u", "v", removed, opset)
    model = chain([u, s], [2, 3, 4], [*e1, *e2], opset=opset)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Neg"]
    assert counts(result) == {"unsqueeze_squeeze_removed": 1}
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("added", "removed"), [([0], [1]), ([0, 1], [0]), ([0], None)])
def test_unsqueeze_squeeze_different_axes_kept(added, removed):
    u, e1 = unsqueeze("x", "u", added, 13)
    s, e2 = squeeze("u", "v", removed, 13)
    model = chain([u, s], [1, 3, 4], [*e1, *e2])
    assert op_types(run_pass(model, PASS).model) == ["Unsqueeze", "Squeeze", "Neg"]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [[1], [-2], None])
def test_squeeze_unsqueeze_cancel(opset, axes):
    s, e1 = squeeze("x", "s", axes, opset)
    u, e2 = unsqueeze("s", "v", [1], opset)
    model = chain([s, u], [2, 1, 4], [*e1, *e2], opset=opset)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Neg"]
    assert counts(result) == {"squeeze_unsqueeze_removed": 1}
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(("shape", "axes", "back"), [([2, "n", 4], [1], [1]), ([2, 1, 4], [1], [0]), ([1, 1, 4], None, [1])])
def test_squeeze_unsqueeze_guards(shape, axes, back):
    """Unknown squeezed dim, other axes added back, or a Squeeze that drops more than comes back."""
    s, e1 = squeeze("x", "s", axes, 13)
    u, e2 = unsqueeze("s", "v", back, 13)
    model = chain([s, u], shape, [*e1, *e2])
    assert op_types(run_pass(model, PASS).model) == ["Squeeze", "Unsqueeze", "Neg"]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(
    ("inner", "outer", "combined"),
    [([1], [2], [1, 2]), ([0], [1, 3], [0, 1, 3]), ([1], [0], [0, 2]), ([-1], [0], [0, 4]), ([0, 2], [-1, 1], [0, 1, 3, 6])],
)
def test_unsqueeze_pair_merges(opset, inner, outer, combined):
    u1, e1 = unsqueeze("x", "u", inner, opset)
    u2, e2 = unsqueeze("u", "v", outer, opset)
    rank = 3 + len(inner) + len(outer)
    model = chain([u1, u2], [2, 3, 4], [*e1, *e2], opset=opset, rank=rank)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Unsqueeze", "Neg"]
    assert counts(result) == {"unsqueeze_pair_merged": 1}
    node = result.model.graph.node[0]
    if opset >= 13:
        axes = next(t for t in result.model.graph.initializer if t.name == node.input[1])
        assert onnx.numpy_helper.to_array(axes).tolist() == combined
    else:
        assert list(node.attribute[0].ints) == combined
    assert_equivalent(model, result.model)


def test_unsqueeze_chain_collapses_and_guards():
    """Three Unsqueezes become one; a shared intermediate or negative axes on an unknown rank stop the merge."""
    nodes, extra = [], []
    for src, dst, axis in (("x", "a", [1]), ("a", "b", [2]), ("b", "v", [3])):
        node, e = unsqueeze(src, dst, axis, 13)
        nodes.append(node)
        extra.extend(e)
    model = chain(nodes, ["n"], extra, rank=4)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Unsqueeze", "Neg"]
    assert_equivalent(model, result.model, input_shapes={"x": (5,)})

    u1, e1 = unsqueeze("x", "u", [0], 13)
    u2, e2 = unsqueeze("u", "v", [0], 13)
    shared = chain([u1, u2], [2, 3], [*e1, *e2], outputs=("y", "u"), rank=4)
    assert op_types(run_pass(shared, PASS).model) == ["Unsqueeze", "Unsqueeze", "Neg"]

    u1, e1 = unsqueeze("r", "u", [-1], 13)
    u2, e2 = unsqueeze("u", "v", [0], 13)
    body = [helper.make_node("Reshape", ["x", "shape"], ["r"]), u1, u2, helper.make_node("Neg", ["v"], ["y"])]
    inputs = [tensor_input("x", [2, 3]), tensor_input("shape", [None], TensorProto.INT64)]
    unknown_rank = make_model(body, inputs, [tensor_input("y", [None] * 4)], [*e1, *e2])
    assert op_types(run_pass(unknown_rank, PASS).model) == ["Reshape", "Unsqueeze", "Unsqueeze", "Neg"]


def test_mixed_chain_and_determinism():
    def build() -> ModelProto:
        u, e1 = unsqueeze("x", "u", [0], 13)
        s, e2 = squeeze("u", "s", [0], 13)
        nodes = [
            transpose("x", "t0", [0, 2, 1]),
            transpose("t0", "t1", [0, 2, 1]),
            helper.make_node("Reshape", ["t1", "s1"], ["r1"]),
            helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
            helper.make_node("Flatten", ["r2"], ["f"], axis=1),
            helper.make_node("Reshape", ["f", "s3"], ["v"]),
        ]
        return chain(
            [*nodes, u, s],
            [2, 3, 4],
            [shape_init("s1", [6, 4]), shape_init("s2", [4, 6]), shape_init("s3", [3, 8]), *e1, *e2],
            outputs=("y", "s"),
        )

    first = run_pass(build(), PASS)
    second = run_pass(build(), PASS)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert op_types(first.model) == ["Reshape", "Identity", "Neg"]
    assert_equivalent(build(), first.model)
