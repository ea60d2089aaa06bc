"""Verification: input generation, shape overrides, metrics and tolerances."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import TensorProto, helper

from onnxopt.errors import OnnxoptError
from onnxopt.verify import Verifier, compare_outputs, generate_inputs, index_bounds, parse_shape_overrides, run_model, verify_models


def _model(op="Relu"):
    return make_model([helper.make_node(op, ["x"], ["y"])], [tensor_input("x", ["N", 10])], [tensor_input("y", ["N", 10])])


def test_shape_overrides():
    assert parse_shape_overrides(["x:1x3x224x224", "a:b:2"]) == {"x": (1, 3, 224, 224), "a:b": (2,)}
    for bad in ["x", "x:1xa", "x:-1"]:
        with pytest.raises(OnnxoptError):
            parse_shape_overrides([bad])


def test_generated_inputs_use_overrides_and_note_guesses():
    feeds, notes = generate_inputs(_model(), {"x": (4, 10)})
    assert feeds["x"].shape == (4, 10) and feeds["x"].dtype == np.float32 and not notes
    feeds, notes = generate_inputs(_model())
    assert feeds["x"].shape == (1, 10) and "set to 1" in notes[0]
    with pytest.raises(OnnxoptError, match="rank 1 given"):
        generate_inputs(_model(), {"x": (4,)})
    with pytest.raises(OnnxoptError, match="fixes it to 10"):
        generate_inputs(_model(), {"x": (4, 11)})
    with pytest.raises(OnnxoptError, match="not a model input"):
        generate_inputs(_model(), {"z": (1,)})


def test_a_model_that_fails_on_guessed_dims_names_them_and_the_option():
    """A Conv of kernel 3 over a free time axis the generated inputs set to 1: the error says so (not 'does not run')."""
    weight = init("w", np.ones((2, 2, 3), np.float32))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])], [tensor_input("x", [1, 2, "t"])], [tensor_input("y", [1, 2, "u"])], [weight]
    )
    with pytest.raises(OnnxoptError) as exc:
        Verifier.from_model(model)
    message = str(exc.value)
    assert message.startswith("cannot verify: the original model does not run on the generated inputs (")
    assert message.endswith("(the generated inputs set 1 free dim(s) to 1: choose them with --input-shape NAME:DxD...)")
    assert "\n" not in message
    assert Verifier.from_model(model, input_shapes={"x": (1, 2, 8)}).reference["y"].shape == (1, 2, 6)


def test_generation_is_seeded():
    a, _ = generate_inputs(_model(), {"x": (2, 10)})
    b, _ = generate_inputs(_model(), {"x": (2, 10)})
    assert np.array_equal(a["x"], b["x"])


def _embeddings_model():
    """ids -> Gather(words [50, 4]); types -> Cast -> Unsqueeze -> Squeeze -> Gather(two types [2, 4]); sum."""
    nodes = [
        helper.make_node("Gather", ["words", "ids"], ["w"]),
        helper.make_node("Cast", ["types"], ["t64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["t64", "axes"], ["t3"]),
        helper.make_node("Squeeze", ["t3", "axes"], ["t2"]),
        helper.make_node("Gather", ["type_table", "t2"], ["t"]),
        helper.make_node("Add", ["w", "t"], ["y"]),
    ]
    inputs = [tensor_input("ids", ["N", "S"], TensorProto.INT64), tensor_input("types", ["N", "S"], TensorProto.INT32)]
    inits = [init("words", np.ones((50, 4), np.float32)), init("type_table", np.ones((2, 4), np.float32))]
    inits.append(init("axes", np.array([0], np.int64)))
    return make_model(nodes, inputs, [tensor_input("y", ["N", "S", 4])], inits)


def test_random_indices_stay_inside_the_tables_they_index():
    model = _embeddings_model()
    assert index_bounds(model) == {"ids": 10, "types": 2}
    feeds, _ = generate_inputs(model, {"ids": (4, 64), "types": (4, 64)})
    assert feeds["types"].dtype == np.int32 and set(np.unique(feeds["types"])) == {0, 1}
    assert feeds["ids"].max() < 10
    run_model(model, feeds)  # onnxruntime rejects an index past a table's end


def test_identical_models_pass_and_different_ones_fail():
    assert verify_models(_model(), _model()).passed
    result = verify_models(_model("Relu"), _model("Sigmoid"))
    assert not result.passed and result.failures()[0].name == "y"


def test_tolerances_by_precision():
    ref = {"y": np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10)}
    noisy = {"y": ref["y"] + np.float32(1e-3)}
    assert not compare_outputs(ref, noisy, "fp32").passed
    assert compare_outputs(ref, noisy, "fp16").passed
    assert compare_outputs(ref, {"y": ref["y"].copy()}, "fp32").passed


def test_nan_and_integer_outputs():
    ref = {"f": np.array([1.0, np.nan], np.float32), "i": np.array([1, 2], np.int64)}
    assert compare_outputs(ref, {"f": np.array([1.0, np.nan], np.float32), "i": np.array([1, 2])}, "fp32").passed
    assert not compare_outputs(ref, {"f": np.array([np.nan, 1.0], np.float32), "i": np.array([1, 2])}, "fp32").passed
    assert not compare_outputs(ref, {"f": ref["f"], "i": np.array([1, 3])}, "fp32").passed
    assert not compare_outputs(ref, {"f": ref["f"]}, "fp32").passed


def test_npz_inputs(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((3, 10), np.float32))
    verifier = Verifier.from_model(_model(), inputs=path)
    assert verifier.reference["y"].shape == (3, 10)
    np.savez(path, other=np.ones((3, 10), np.float32))
    with pytest.raises(OnnxoptError, match="no array for model input 'x'"):
        Verifier.from_model(_model(), inputs=path)


def test_bool_and_int_inputs():
    model = make_model(
        [helper.make_node("Where", ["c", "a", "b"], ["y"])],
        [tensor_input("c", [3], TensorProto.BOOL), tensor_input("a", [3], TensorProto.INT64), tensor_input("b", [3], TensorProto.INT64)],
        [tensor_input("y", [3], TensorProto.INT64)],
    )
    assert verify_models(model, model).passed


def test_top1_is_judged_on_class_scores_not_on_feature_maps():
    rng = np.random.default_rng(0)
    feature_map = np.full((1, 4, 8, 8), 0.5, np.float32) + rng.normal(0, 1e-4, (1, 4, 8, 8)).astype(np.float32)
    jittered = feature_map + rng.normal(0, 1e-4, feature_map.shape).astype(np.float32)  # argmax along width flips
    result = compare_outputs({"y": feature_map}, {"y": jittered}, "fp16")
    assert result.passed and result.outputs[0].top1 is None
    scores = rng.standard_normal((16, 10)).astype(np.float32)
    scores[np.arange(16), np.arange(16) % 10] += 4.0  # clear winners, two of every ten in columns 0 and 1
    swapped = scores.copy()
    swapped[:, [0, 1]] = scores[:, [1, 0]]
    assert compare_outputs({"y": scores}, {"y": swapped}, "fp16").outputs[0].top1 < 0.95


def test_top1_ignores_near_ties_that_the_error_can_flip_but_not_clear_winners():
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 64, 32)).astype(np.float32)  # a hidden state: many rows with near-tied maxima
    noisy = hidden + rng.normal(0, 0.02, hidden.shape).astype(np.float32)  # int8-size error, cosine ~0.9998
    plain = float(np.mean(hidden.argmax(-1) == noisy.argmax(-1)))
    result = compare_outputs({"y": hidden}, {"y": noisy}, "int8").outputs[0]
    assert result.cosine > 0.999 and result.top1 is not None and result.top1 > plain and result.top1 >= 0.99
    logits = rng.standard_normal((256, 10)).astype(np.float32)
    logits[np.arange(256), rng.integers(0, 10, 256)] += 4.0  # confident classifier
    wrong = logits.copy()
    flipped = np.arange(256) < 64  # a quarter of the clear winners change class
    winners = logits.argmax(-1)
    wrong[flipped, winners[flipped]] -= 8.0
    result = compare_outputs({"y": logits}, {"y": wrong}, "int8").outputs[0]
    assert result.top1 is not None and result.top1 <= 0.8 and not compare_outputs({"y": logits}, {"y": wrong}, "int8").passed
