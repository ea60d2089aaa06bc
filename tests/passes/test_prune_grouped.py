"""Tests of prune_channels through grouped convolutions (1 < group < channels): equal kept counts per group, block-diagonal slices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, helper, numpy_helper
from test_channel_groups import bn, conv, rand, relu
from test_prune_channels import (
    EXACT,
    calibration,
    copy,
    feeds_for,
    masked_and_pruned_outputs,
    option_set,
    run,
    weights,
    zero_channels,
)

import onnxopt
from onnxopt.analysis import analyze
from onnxopt.errors import OnnxoptError
from onnxopt.passes.channel_allocation import Limits, top_mask
from onnxopt.passes.channel_groups import ChannelAnalysis, analyze_channels
from onnxopt.passes.channel_latency import LatencyModel
from onnxopt.passes.channel_surgery import CostModel, apply_pruning
from onnxopt.passes.prune_channels import PASS_NAME, prune_channels
from onnxopt.shapes import infer_types


def grouped_model(groups: int = 4, width: int = 32) -> ModelProto:
    """x[1,3,8,8] -> c1 (width) -> relu -> g (group=groups, width -> width) -> bn -> relu -> c3 (8) -> y."""
    inits: list = []
    nodes = [
        conv("c1", "x", "a", width, 3, inits=inits),
        relu("a", "ra"),
        conv("g", "ra", "b", width, width, group=groups, inits=inits),
        bn("bn", "b", "bb", width, inits),
        relu("bb", "rb"),
        conv("c3", "rb", "y", 8, width, inits=inits),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)


def residual_grouped_model(groups: tuple[int, ...] = (4,), width: int = 32) -> ModelProto:
    """c0 -> relu (r0); a branch of grouped convs (each followed by Relu) reads r0; Add(r0, branch) -> relu -> head (8)."""
    inits: list = []
    nodes = [conv("c0", "x", "a0", width, 3, inits=inits), relu("a0", "r0")]
    x = "r0"
    for i, group in enumerate(groups):
        nodes += [conv(f"g{i}", x, f"b{i}", width, width, group=group, inits=inits), relu(f"b{i}", f"rb{i}")]
        x = f"rb{i}"
    nodes += [helper.make_node("Add", ["r0", x], ["s"], name="add"), relu("s", "rs"), conv("head", "rs", "y", 8, width, inits=inits)]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)


def resnext_model(cardinality: int = 32, width: int = 128) -> ModelProto:
    """A ResNeXt bottleneck (stem 64, 1x1 -> 3x3 grouped (cardinality) -> 1x1 to 256, projection shortcut) -> GAP -> Gemm."""
    inits: list = [init("fc_W", rand(10, 256)), init("fc_B", rand(10))]
    nodes = [
        conv("stem", "x", "s0", 64, 3, inits=inits),
        bn("stem_bn", "s0", "s1", 64, inits),
        relu("s1", "s"),
        conv("a1", "s", "a1o", width, 64, 1, bias=False, inits=inits),
        bn("a1_bn", "a1o", "a1b", width, inits),
        relu("a1b", "a1r"),
        conv("a2", "a1r", "a2o", width, width, 3, bias=False, group=cardinality, inits=inits),
        bn("a2_bn", "a2o", "a2b", width, inits),
        relu("a2b", "a2r"),
        conv("a3", "a2r", "a3o", 256, width, 1, bias=False, inits=inits),
        bn("a3_bn", "a3o", "a3b", 256, inits),
        conv("proj", "s", "po", 256, 64, 1, bias=False, inits=inits),
        bn("proj_bn", "po", "pb", 256, inits),
        helper.make_node("Add", ["a3b", "pb"], ["sum"], name="add"),
        relu("sum", "out"),
        helper.make_node("GlobalAveragePool", ["out"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 16, 16])], [tensor_input("y", [1, 10])], inits)


BUILDERS = {
    "grouped": grouped_model,
    "residual": residual_grouped_model,
    "mixed_groups": lambda: residual_grouped_model((2, 3), 48),  # one group reaches a group=2 and a group=3 conv: lcm 6
    "resnext": resnext_model,
}


def assert_fp32_equal(got: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to fp32 rounding of sums in another order (tolerance relative to the output's scale)."""
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(got, reference, rtol=EXACT["rtol"], atol=EXACT["atol"] * scale)


def grouped_convs(model: ModelProto) -> dict[str, int]:
    """Grouped Conv node name -> its group attribute."""
    out = {}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            out[node.name] = group
    return out


def segment_counts(analysis: ChannelAnalysis, keep: dict[int, np.ndarray]) -> dict[int, list[int]]:
    """Kept channels per segment of every pruned group."""
    return {i: mask.reshape(analysis.groups[i].segments, -1).sum(axis=1).tolist() for i, mask in keep.items()}


def check_grouped_convs(original: ModelProto, pruned: ModelProto) -> None:
    """Every grouped conv keeps its group, and its weight is [Cout', Cin'/group, ...] with Cout' a multiple of group."""
    types = infer_types(pruned)
    arrays = weights(pruned)
    convs = grouped_convs(original)
    assert grouped_convs(pruned) == convs
    for node in pruned.graph.node:
        if node.name in convs:
            group, shape = convs[node.name], arrays[node.input[1]].shape
            cin = types[node.input[0]].tensor_type.shape.dim[1].dim_value
            assert shape[0] % group == 0 and shape[1] * group == cin, (node.name, shape, cin)


# ----------------------------------------------------------------------------- analysis


def test_grouped_conv_produces_and_consumes_under_segments():
    model = grouped_model()
    analysis = analyze_channels(model, infer_types(model))
    reads, makes = analysis.group("c1"), analysis.group("g")
    assert reads.prunable and makes.prunable and (reads.segments, makes.segments) == (4, 4)
    consumer = [(s.constant, s.axis, s.blocks) for s in reads.slices if s.role == "consumer"]
    assert consumer == [("g_W", 1, 4)]
    producer = {(s.constant, s.axis, s.blocks) for s in makes.slices if s.role == "producer"}
    assert producer == {("g_W", 0, 1), ("g_B", 0, 1)}
    assert not any(e.kind == "group" for g in analysis.groups for e in g.edits)  # group=4 stays


def test_groups_reaching_several_grouped_convs_take_the_lcm():
    model = BUILDERS["mixed_groups"]()
    analysis = analyze_channels(model, infer_types(model))
    assert analysis.group("c0").segments == 6 and analysis.group("g0").segments == 6  # c0: g0 reads it, g1 ties into it
    assert analysis.group("c0").spaces == [0, 2] and analysis.group("c0").prunable


def test_grouped_conv_reading_a_concat_blocks_with_a_reason():
    inits: list = []
    nodes = [
        conv("ca", "x", "a", 8, 3, inits=inits),
        conv("cb", "x", "b", 8, 3, inits=inits),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        conv("g", "cat", "y", 8, 16, group=4, inits=inits),
    ]
    model = make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)
    analysis = analyze_channels(model, infer_types(model))
    for name in ("ca", "cb"):
        assert analysis.group(name).reasons == [
            "grouped 'g' (Conv) (group=4) reads channels that are not one whole channel space on axis 1"
        ]


def test_one_output_channel_per_group_leaves_nothing_to_prune():
    inits: list = []
    nodes = [
        conv("c1", "x", "a", 16, 3, inits=inits),
        relu("a", "ra"),
        conv("g", "ra", "b", 8, 16, group=8, inits=inits),  # 2 inputs and 1 output per group
        relu("b", "rb"),
        conv("c3", "rb", "y", 8, 8, inits=inits),
    ]
    model = make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)
    analysis = analyze_channels(model, infer_types(model))
    assert analysis.group("g").reasons == ["grouped convs leave one channel in each of its 8 segments"]
    assert analysis.group("c1").prunable and analysis.group("c1").segments == 8


# ----------------------------------------------------------------------------- exact surgery


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_removing_zero_channels_through_grouped_convs_gives_identical_outputs(name):
    model = BUILDERS[name]()
    keep = zero_channels(model)
    analysis = analyze_channels(model, infer_types(model))
    reading = [i for i in keep if any(s.blocks > 1 for s in analysis.groups[i].slices)]
    assert reading, "some group is read by a grouped conv"
    # the dead positions differ from segment to segment, so a slice that ignores the blocks would be caught
    assert any(len({tuple(row) for row in keep[i].reshape(analysis.groups[i].segments, -1)}) > 1 for i in reading)
    feeds = feeds_for(model)
    reference = run(model, feeds)
    pruned = copy(model)
    apply_pruning(pruned, analysis, keep)
    got = run(pruned, feeds)
    for key in reference:
        assert got[key].shape == reference[key].shape
        assert_fp32_equal(got[key], reference[key])
    check_grouped_convs(model, pruned)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_block_diagonal_slice_equals_zeroing_the_pruned_inputs_of_each_group(name):
    """Non-zero channels: pruned == the original with every consumer's pruned input entries zeroed (per row block for grouped convs)."""
    model = BUILDERS[name]()
    analysis = analyze_channels(model, infer_types(model))
    rng = np.random.default_rng(11)
    keep = {}
    for group in analysis.prunable():
        rows = [rng.permutation(group.channels // group.segments) >= group.channels // group.segments // 3 for _ in range(group.segments)]
        keep[group.index] = np.concatenate(rows)
    masked = copy(model)
    arrays = weights(masked)
    for index, mask in keep.items():
        for piece in analysis.groups[index].slices:
            if piece.role != "consumer":
                continue
            array = np.moveaxis(arrays[piece.constant], piece.axis, 0)  # a view: zeroing writes through
            entries = analysis.value_mask(piece.value, {index: mask})
            if piece.blocks == 1:
                array[~entries] = 0
                continue
            rows_per_block = array.shape[1] // piece.blocks
            for j, block in enumerate(entries.reshape(piece.blocks, -1)):
                array[~block, j * rows_per_block : (j + 1) * rows_per_block] = 0
    reference, got, pruned = masked_and_pruned_outputs(model, masked, arrays, analysis, keep)
    for key in reference:
        assert_fp32_equal(got[key], reference[key])
    check_grouped_convs(model, pruned)


def test_unequal_counts_per_segment_are_a_one_line_error():
    model = grouped_model()
    analysis = analyze_channels(model, infer_types(model))
    mask = np.ones(32, bool)
    mask[[0, 1, 9]] = False  # 6, 7, 8, 8 of the 4 segments
    with pytest.raises(OnnxoptError, match=r"group 'g' keeps \[6, 7, 8, 8\] channels in its 4 segments") as info:
        apply_pruning(copy(model), analysis, {analysis.group("g").index: mask})
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- amounts


def test_limits_keep_multiples_of_the_segments():
    limits = Limits(round_to=8, min_channels=8, max_layer_ratio=0.75)
    assert [limits.kept(32, f, 4) for f in (0.0, 0.3, 0.5, 0.9)] == [32, 24, 16, 8]  # step lcm(8, 4) = 8
    assert [limits.kept(48, f, 6) for f in (0.1, 0.3, 0.6)] == [48, 24, 24]  # step lcm(8, 6) = 24
    assert [limits.kept(48, f, 3) for f in (0.1, 0.3, 0.6)] == [48, 24, 24]  # group=3 does not divide 40 or 32: step 24
    assert Limits(8, 1, 0.75).kept(8, 0.5, 4) == 4  # no wider than round_to: the segments alone
    assert Limits(1, 1, 0.75).kept(12, 0.3, 3) == 9 and Limits(1, 1, 0.75).floor(12, 3) == 3
    for channels, segments in ((12, 3), (24, 6), (32, 4), (48, 6), (96, 32), (128, 32)):
        for bounds in (Limits(), Limits(1, 1, 0.75), Limits(16, 4, 0.5)):
            for fraction in np.linspace(0, 1, 21):
                kept = bounds.kept(channels, float(fraction), segments)
                assert kept % segments == 0 and bounds.floor(channels, segments) <= kept <= channels, (channels, segments, bounds, kept)
    assert [limits.kept(48, f) for f in (0.0, 0.125, 0.25, 0.5, 0.9)] == [48, 40, 40, 24, 16]  # segments 1: unchanged


def test_top_mask_keeps_the_best_of_each_segment():
    scores = np.array([1, 5, 5, 0, 3, 3, 3, 9], float)
    assert top_mask(scores, 4, 2).tolist() == [False, True, True, False, True, False, False, True]  # ties: the lower index
    assert top_mask(scores, 3).tolist() == [False, True, True, False, False, False, False, True]
    with pytest.raises(ValueError, match="do not split into 2 equal segments"):
        top_mask(scores, 3, 2)


# ----------------------------------------------------------------------------- the pass


def check_pass(model: ModelProto, work: ModelProto, outcome, ratio: float) -> None:
    """Valid, same output shapes, grouped convs intact, equal counts per segment, claims == recount == cost and latency models."""
    feeds = feeds_for(model)
    reference, got = run(model, feeds), run(work, feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in reference.items()}
    check_grouped_convs(model, work)
    analysis = outcome.analysis
    assert outcome.keep and all(len(set(c)) == 1 for c in segment_counts(analysis, outcome.keep).values())
    before, after = analyze(model, infer_types(model)), analyze(work, infer_types(work))
    assert outcome.flops == (before.flops, after.flops) and outcome.params == (before.parameters, after.parameters)
    types = infer_types(model)
    assert CostModel.of(model, analysis, types).count(outcome.keep) == (after.parameters, after.flops)
    estimate = LatencyModel.of(model, analysis, types).seconds(outcome.keep)
    assert estimate == pytest.approx(
        LatencyModel.of(work, analyze_channels(work, infer_types(work)), infer_types(work)).seconds(), rel=1e-9
    )
    assert (before.flops - after.flops) / outcome.prunable[1] >= ratio


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
@pytest.mark.parametrize("name", ["grouped", "residual", "mixed_groups"])
def test_pass_prunes_through_grouped_convs_at_30_percent(name, allocation):
    model = BUILDERS[name]()
    work = copy(model)
    data = calibration(model) if allocation == "sensitivity" else None
    outcome = prune_channels(work, option_set(ratio=0.3, allocation=allocation), calibration=data)
    check_pass(model, work, outcome, 0.3)
    steps = {"grouped": 8, "residual": 8, "mixed_groups": 24}  # lcm(round_to=8, segments)
    assert all(int(mask.sum()) % steps[name] == 0 for mask in outcome.keep.values())
    if allocation == "sensitivity":
        assert outcome.scan and outcome.error is not None and outcome.error < 0.5


def test_grouped_conv_flops_follow_the_kept_channels_per_group():
    model = grouped_model()
    work = copy(model)
    outcome = prune_channels(work, option_set(ratio=0.3, round_to=1, min_channels=1, allocation="uniform"))
    analysis = outcome.analysis
    k1 = int(outcome.keep.get(analysis.group("c1").index, np.ones(32, bool)).sum())
    k2 = int(outcome.keep.get(analysis.group("g").index, np.ones(32, bool)).sum())
    assert k1 % 4 == 0 and k2 % 4 == 0 and (k1, k2) != (32, 32)
    pixels = 64
    flops = 2 * pixels * (k1 * 27 + k2 * (k1 // 4) * 9 + 8 * k2 * 9)  # c1, g (Cout' x Cin'/G x 3 x 3), c3
    assert analyze(work, infer_types(work)).flops == flops == outcome.flops[1]
    assert weights(work)["g_W"].shape == (k2, k1 // 4, 3, 3)


def test_resnext_block_at_30_percent():
    model = resnext_model()
    work = copy(model)
    outcome = prune_channels(work, option_set(ratio=0.3, allocation="uniform"))
    check_pass(model, work, outcome, 0.3)
    per_group = weights(work)["a2_W"].shape[1]
    assert 1 <= per_group <= 4 and grouped_convs(work) == {"a2": 32}
    assert any("'a2' (Conv): 128 -> " in n for n in outcome.notes)


def test_merge_similar_skips_grouped_groups():
    model = grouped_model()
    work = copy(model)
    outcome = prune_channels(work, option_set(ratio=0.3, merge_similar=0.98, allocation="uniform"))
    assert outcome.merged == 0
    assert any("not mergeable: grouped conv (equal counts per group) (2)" in n for n in outcome.notes)
    check_pass(model, work, outcome, 0.3)


def test_grouped_pass_is_deterministic():
    model = residual_grouped_model()
    outputs = [
        onnxopt.optimize(model, f"{PASS_NAME}:ratio=0.3,levels=0.25|0.5", calibration=calibration(model), isolate=False).model
        for _ in range(2)
    ]
    assert outputs[0].SerializeToString() == outputs[1].SerializeToString()
    onnx.checker.check_model(outputs[0])
    assert numpy_helper.to_array(next(t for t in outputs[0].graph.initializer if t.name == "g0_W")).shape[1] * 4 == int(
        numpy_helper.to_array(next(t for t in outputs[0].graph.initializer if t.name == "c0_W")).shape[0]
    )
