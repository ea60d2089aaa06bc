"""Calibration data loaders, validation, statistics collection in onnxruntime and range methods."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor_input
from onnx import TensorProto, helper

import onnxopt.calibration as calib
import onnxopt.calibration.data as calib_data
import onnxopt.io
from onnxopt.calibration import RANDOM_WARNING, CalibrationData, CalibrationError, collect_stats, compute_range, parse_preprocess
from onnxopt.verify import run_model

PIL = pytest.importorskip("PIL", reason="Pillow is an install requirement (pip install pillow)")
from PIL import Image  # noqa: E402

W = np.arange(-6, 6, dtype=np.float32).reshape(4, 3) / 4


def linear_model(batch="N") -> onnx.ModelProto:
    """x [N,4] -> MatMul W -> h -> Relu -> y [N,3]."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [tensor_input("x", [batch, 4])], [tensor_input("y", [batch, 3])], [init("W", W)])


def two_input_model() -> onnx.ModelProto:
    """ids, mask int64 [batch, seq] -> float sum [batch, seq]."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["fi"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["mask"], ["fm"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["fi", "fm"], ["out"]),
    ]
    inputs = [tensor_input("ids", ["batch", "seq"], TensorProto.INT64), tensor_input("mask", ["batch", "seq"], TensorProto.INT64)]
    return make_model(nodes, inputs, [tensor_input("out", ["batch", "seq"])])


def image_model(channels=3, layout="NCHW", hw=("h", "w")) -> onnx.ModelProto:
    shape = ["N", channels, *hw] if layout == "NCHW" else ["N", *hw, channels]
    return make_model([helper.make_node("Relu", ["img"], ["out"])], [tensor_input("img", shape)], [tensor_input("out", shape)])


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# -- loaders ---------------------------------------------------------------------------------------


def test_npz_file(tmp_path):
    x = samples(10)
    np.savez(tmp_path / "c.npz", x=x)
    data = CalibrationData.from_path(tmp_path / "c.npz", linear_model())
    assert data.input_names == ["x"] and data.num_samples == 10 and not data.random
    batches = list(data.batches(4))
    assert [b["x"].shape for b in batches] == [(4, 4), (4, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(data.first_batch()["x"], x[:1])


def test_npz_limit_and_model_path(tmp_path):
    np.savez(tmp_path / "c.npz", x=samples(10))
    onnxopt.io.save(linear_model(), tmp_path / "m.onnx")
    data = CalibrationData.from_path(tmp_path / "c.npz", tmp_path / "m.onnx", limit=3)
    assert data.num_samples == 3 and data.num_batches(2) == 2


def test_folder_of_npy_single_samples_and_batches(tmp_path):
    x = samples(7)
    np.save(tmp_path / "b.npy", x[1:4])  # a batch of 3
    np.save(tmp_path / "a.npy", x[0])  # one sample (rank 1 = model rank - 1)
    np.save(tmp_path / "c.npy", x[4:])
    (tmp_path / "notes.txt").write_text("ignored")
    data = CalibrationData.from_path(tmp_path, linear_model())
    assert data.num_samples == 7
    assert any("ignored" in n for n in data.notes)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in data.batches(2)]), x)  # sorted by name
    assert [b["x"].shape[0] for b in data.batches(5)] == [5, 2]


def test_folder_of_npz_two_inputs(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        ids = rng.integers(0, 100, (2, 6))
        np.savez(tmp_path / f"s{i}.npz", ids=ids, mask=np.ones_like(ids))
    data = CalibrationData.from_path(tmp_path, two_input_model())
    assert data.num_samples == 6 and sorted(data.input_names) == ["ids", "mask"]
    batch = data.first_batch(4)
    assert batch["ids"].shape == (4, 6) and batch["ids"].dtype == np.int64


def test_batches_split_on_shape_change(tmp_path):
    """Files of different sequence lengths (a dynamic dim) never share a batch."""
    for i, seq in enumerate((5, 5, 8)):
        ids = np.full((1, seq), i, np.int64)
        np.savez(tmp_path / f"{i}.npz", ids=ids, mask=np.ones_like(ids))
    data = CalibrationData.from_path(tmp_path, two_input_model())
    assert [b["ids"].shape for b in data.batches(8)] == [(2, 5), (1, 8)]


def test_static_batch_model_takes_its_batch(tmp_path):
    np.savez(tmp_path / "c.npz", x=samples(5))
    data = CalibrationData.from_path(tmp_path / "c.npz", linear_model(batch=2))
    assert [b["x"].shape for b in data.batches(8)] == [(2, 4), (2, 4)]  # the fifth sample cannot fill a run


def write_image(path, array):
    Image.fromarray(array).save(path)


def test_image_folder_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 6, 8, 3), dtype=np.uint8)
    for i, suffix in enumerate(("png", "bmp", "webp")):
        Image.fromarray(pixels[i]).save(tmp_path / f"{i}.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
    spec = "mean=0.485,0.456,0.406,std=0.229,0.224,0.225,scale=1/255,layout=NCHW,color=BGR"
    data = CalibrationData.from_path(tmp_path, image_model(), preprocess=spec)
    assert data.num_samples == 3
    batch = data.first_batch(3)["img"]
    expected = (pixels[..., ::-1] / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch, expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    assert batch.dtype == np.float32


def test_image_resize_layout_and_gray(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"{i}.jpg", np.full((20, 30, 3), 100 + i, np.uint8))
    data = CalibrationData.from_path(tmp_path, image_model(3, "NHWC"), preprocess="resize=8x12,layout=NHWC")
    assert data.first_batch(2)["img"].shape == (2, 8, 12, 3)
    gray = CalibrationData.from_path(tmp_path, image_model(1), preprocess="resize=16,color=L,scale=1")
    assert gray.first_batch()["img"].shape == (1, 1, 16, 16)
    static = CalibrationData.from_path(tmp_path, image_model(3, hw=(10, 14)))
    assert static.first_batch()["img"].shape == (1, 3, 10, 14)
    assert any("resized to the model's 10x14" in n for n in static.notes)


def test_image_errors(tmp_path):
    write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CalibrationError, match="one input") as exc:
        CalibrationData.from_path(tmp_path, two_input_model(), preprocess="resize=4")
    one_line(exc)
    with pytest.raises(CalibrationError, match="try layout=NHWC") as exc:
        CalibrationData.from_path(tmp_path, image_model(3, "NHWC", hw=(4, 4)), preprocess="resize=4")
    one_line(exc)
    with pytest.raises(CalibrationError, match="rank-4") as exc:
        CalibrationData.from_path(tmp_path, linear_model())
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="b.png: cannot read image") as exc:
        CalibrationData.from_path(tmp_path, image_model(), preprocess="resize=4")
    one_line(exc)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("resize=224,size=3", "unknown preprocessing key 'size'"),
        ("resize=0", "resize=H or HxW"),
        ("resize=axb", "resize=H or HxW"),
        ("mean=0.5,0.5", "mean needs 1 or 3 values"),
        ("std=0", "std must not be 0"),
        ("scale=1/0", "1/255 allowed"),
        ("layout=NCWH", "layout must be NCHW or NHWC"),
        ("color=CMYK", "color must be RGB, BGR or L"),
        ("resize=4,resize=5", "given twice"),
        ("resize=4,oops", "expected key=value"),
    ],
)
def test_preprocess_spec_errors(spec, match):
    with pytest.raises(CalibrationError, match=match) as exc:
        parse_preprocess(spec)
    one_line(exc)


def test_preprocess_spec_parses():
    prep = parse_preprocess("resize=48x320, mean=0.485,0.456,0.406, std=0.5, scale=1/255, layout=nhwc, color=bgr")
    assert prep.resize == (48, 320) and prep.mean == (0.485, 0.456, 0.406) and prep.std == (0.5,)
    assert prep.scale == pytest.approx(1 / 255) and prep.layout == "NHWC" and prep.color == "BGR"
    assert parse_preprocess("resize=224").resize == (224, 224)


def test_from_arrays_and_random():
    model = linear_model()
    data = CalibrationData.from_arrays({"x": samples(6).astype(np.float64)}, model=model)
    assert data.first_batch(6)["x"].dtype == np.float32
    assert any("cast from float64 to float32" in n for n in data.notes)
    rand = CalibrationData.random(model, samples=5, seed=3)
    assert rand.random and rand.notes[0] == RANDOM_WARNING and rand.num_samples == 5
    again = CalibrationData.random(model, samples=5, seed=3)
    np.testing.assert_array_equal(rand.first_batch(5)["x"], again.first_batch(5)["x"])
    assert not np.array_equal(rand.first_batch(5)["x"], CalibrationData.random(model, samples=5, seed=4).first_batch(5)["x"])
    shaped = CalibrationData.random(two_input_model(), samples=4, input_shapes={"ids": (2, 7), "mask": (2, 7)})
    assert [b["ids"].shape for b in shaped.batches(8)] == [(4, 7)]


def scalar_input_model(batch) -> onnx.ModelProto:
    """y = x * float(n): a batched input x [batch, 3] beside a scalar int64 input n (a loop count, say)."""
    nodes = [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "nf"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3]), helper.make_tensor_value_info("n", TensorProto.INT64, [])]
    graph = helper.make_graph(nodes, "scalar", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", ["N", 2])
def test_random_data_feeds_a_scalar_input_once_per_run(batch):
    """A rank-0 input beside a batched one: random draws repeat its value per sample, each run feeds it as a scalar."""
    model = scalar_input_model(batch)
    data = CalibrationData.random(model, samples=4, input_shapes={"x": (2, 3)} if batch == "N" else None)
    feeds = list(data.batches(8))
    assert feeds and all(f["n"].shape == () and f["n"].dtype == np.int64 for f in feeds)
    assert sum(f["x"].shape[0] for f in feeds) == 4
    # a dynamic batch: one sample per run, so every scalar value is used; a static batch of 2: its first value
    assert [f["x"].shape[0] for f in feeds] == ([1, 1, 1, 1] if batch == "N" else [2, 2])
    for f in feeds:  # every batch runs in onnxruntime
        run_model(model, f)


# -- validation errors (each one line, naming the input, expected and got) -------------------------


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"ids": np.zeros((2, 3), np.int64)}, "no array for model input 'mask'"),
        ({"ids": np.zeros((2, 3), np.int64), "mask": np.zeros((2, 3), np.int64), "x": np.zeros(2)}, "array 'x' is not a model input"),
        (
            {"ids": np.zeros((2, 3), np.float32), "mask": np.zeros((2, 3), np.int64)},
            "input 'ids' has dtype float32, the model expects int64",
        ),
        ({"ids": np.zeros((2, 3, 1), np.int64), "mask": np.zeros((2, 3), np.int64)}, r"input 'ids' has shape \(2,3,1\).*rank differs"),
        ({"ids": np.zeros((2, 3), np.int64), "mask": np.zeros((3, 3), np.int64)}, r"different numbers of samples \(ids: 2, mask: 3\)"),
        ({"ids": np.zeros((2, 3), np.int64), "mask": np.zeros((2, 4), np.int64)}, "dim 'seq' is 3 in input 'ids' but 4 in input 'mask'"),
    ],
)
def test_validation_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(CalibrationError, match=match) as exc:
        CalibrationData.from_path(tmp_path / "c.npz", two_input_model())
    one_line(exc)


def test_static_dim_error(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 5), np.float32))
    with pytest.raises(CalibrationError, match=r"input 'x' has shape \(3,5\), the model expects \[N,4\].*dim 1 is 5, not 4") as exc:
        CalibrationData.from_path(tmp_path / "c.npz", linear_model())
    one_line(exc)


def test_file_errors(tmp_path):
    model = linear_model()
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    cases = [
        (tmp_path / "missing.npz", "no such calibration file"),
        (tmp_path / "bad.npz", "bad.npz: cannot read calibration arrays"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no calibration files"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", samples(1))
    write_image(mixed / "b.png", np.zeros((4, 4, 3), np.uint8))
    cases.append((mixed, "holds both array files"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.npy").write_bytes(b"\x93NUMPY garbage")
    cases.append((corrupt, "a.npy: cannot read calibration arrays"))
    (tmp_path / "x.txt").write_text("hi")
    cases.append((tmp_path / "x.txt", "must be an .npz archive"))
    for path, match in cases:
        with pytest.raises(CalibrationError, match=match) as exc:
            CalibrationData.from_path(path, model)
        one_line(exc)
    np.savez(tmp_path / "ok.npz", x=samples(2))
    with pytest.raises(CalibrationError, match="image folders only"):
        CalibrationData.from_path(tmp_path / "ok.npz", model, preprocess="resize=4")
    multi = tmp_path / "multi"
    multi.mkdir()
    np.save(multi / "a.npy", np.zeros((1, 3), np.int64))
    with pytest.raises(CalibrationError, match="model has 2 inputs"):
        CalibrationData.from_path(multi, two_input_model())
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32))
    with pytest.raises(CalibrationError, match="holds no samples"):
        CalibrationData.from_path(tmp_path / "empty.npz", model)


def test_folder_batches_read_one_file_at_a_time(tmp_path, monkeypatch):
    x = samples(40)
    for i in range(40):
        np.save(tmp_path / f"{i:03d}.npy", x[i])
    reads = []
    real = calib_data._read_file
    monkeypatch.setattr(calib_data, "_read_file", lambda path, names: reads.append(path.name) or real(path, names))
    data = CalibrationData.from_path(tmp_path, linear_model())
    assert reads == []  # validation reads headers only
    iterator = data.batches(4)
    first = next(iterator)
    assert len(reads) == 4 and first["x"].shape == (4, 4)
    rest = list(iterator)
    assert len(reads) == 40 and len(rest) == 9
    np.testing.assert_array_equal(np.concatenate([first["x"], *(b["x"] for b in rest)]), x)


# -- statistics ------------------------------------------------------------------------------------


def reference_activations(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """x, h and y computed by onnxruntime on all samples at once (so rounding matches the batched runs)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend([onnx.ValueInfoProto(name="h"), onnx.ValueInfoProto(name="x")])
    out = run_model(copy, {"x": x})
    return {"x": x, "h": out["h"], "y": out["y"]}


def test_collect_stats_matches_numpy(tmp_path):
    model = linear_model()
    before = model.SerializeToString()
    x = samples(37, seed=5)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    calls = []
    stats = collect_stats(model, ["h", "y", "x", "W"], data, batch_size=8, bins=64, progress=lambda d, t: calls.append((d, t)))
    assert model.SerializeToString() == before
    assert calls == [(i, 10) for i in range(1, 11)]  # 5 batches, two sweeps
    ref = reference_activations(model, x) | {"W": W}
    for name, values in ref.items():
        s = stats[name]
        absmax = float(np.abs(values).max())
        assert s.min == pytest.approx(values.min(), rel=1e-6) and s.max == pytest.approx(values.max(), rel=1e-6)
        assert s.absmax == pytest.approx(absmax, rel=1e-6) and s.count == values.size
        expected, edges = np.histogram(values, bins=128, range=(-s.absmax, s.absmax))
        np.testing.assert_array_equal(s.histogram, expected)
        np.testing.assert_allclose(s.edges, edges)
        assert s.histogram.sum() == values.size
        counts, abs_edges = s.abs_histogram()
        assert counts.sum() == values.size
        if name != "W":  # W's values lie on bin edges, where folded negative bins close on the other side
            np.testing.assert_array_equal(counts, np.histogram(np.abs(values), bins=64, range=(0, s.absmax))[0])
        assert abs_edges[0] == 0 and abs_edges[-1] == pytest.approx(s.absmax)
    np.testing.assert_allclose(stats["h"].mean_axis1, ref["h"].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["h"].mean_last, ref["h"].mean(axis=0), rtol=1e-5, atol=1e-6)
    again = collect_stats(model, ["h", "y", "x", "W"], data, batch_size=8, bins=64)
    for name in ref:
        np.testing.assert_array_equal(again[name].histogram, stats[name].histogram)
        assert again[name].min == stats[name].min and again[name].max == stats[name].max


def test_collect_stats_per_channel_mean_axis1():
    rng = np.random.default_rng(0)
    model = image_model(3, hw=(4, 5))
    x = (rng.standard_normal((6, 3, 4, 5)) + np.array([1.0, -2.0, 3.0])[None, :, None, None]).astype(np.float32)
    stats = collect_stats(model, ["out"], CalibrationData.from_arrays({"img": x}, model=model), batch_size=4)
    np.testing.assert_allclose(stats["out"].mean_axis1, np.maximum(x, 0).mean(axis=(0, 2, 3)), rtol=1e-5)
    assert stats["out"].mean == pytest.approx(float(np.maximum(x, 0).mean()), rel=1e-5)


def test_collect_stats_errors():
    model = two_input_model()
    data = CalibrationData.from_arrays({"ids": np.ones((2, 3), np.int64), "mask": np.ones((2, 3), np.int64)}, model=model)
    with pytest.raises(CalibrationError, match="tensor 'ids' is tensor\\(int64\\); calibration collects float tensors only") as exc:
        collect_stats(model, ["ids"], data)
    one_line(exc)
    with pytest.raises(CalibrationError, match="tensor 'nope' is not produced"):
        collect_stats(model, ["nope"], data)
    assert collect_stats(model, [], data) == {}
    wrong = CalibrationData.from_arrays({"x": samples(2)})
    with pytest.raises(CalibrationError, match="no array for model input 'ids'"):
        collect_stats(model, ["out"], wrong)


def test_collect_stats_failure_on_random_data_with_guessed_dims_says_how_to_choose_them():
    """A Conv of kernel 3 over a time axis the random data set to 1: onnxruntime fails, the error names --input-shape."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    model = make_model(
        nodes, [tensor_input("x", [1, 2, "t"])], [tensor_input("y", [1, 2, "u"])], [init("w", np.ones((2, 2, 3), np.float32))]
    )
    with pytest.raises(CalibrationError, match="onnxruntime failed on a calibration batch") as exc:
        collect_stats(model, ["y"], CalibrationData.random(model, samples=2))
    assert "(the generated inputs set 1 free dim(s) to 1: choose them with --input-shape" in str(exc.value)
    one_line(exc)
    stats = collect_stats(model, ["y"], CalibrationData.random(model, samples=2, input_shapes={"x": (1, 2, 8)}))
    assert stats["y"].count == 2 * 2 * 6


def test_collect_stats_nonfinite_values_left_out():
    model = linear_model()
    x = samples(4)
    x[1, 2] = np.inf
    x[2, 0] = np.nan
    stats = collect_stats(model, ["x"], CalibrationData.from_arrays({"x": x}, model=model))["x"]
    finite = x[np.isfinite(x)]
    assert stats.nonfinite == 2 and stats.count == finite.size and stats.max == pytest.approx(finite.max())
    assert stats.histogram.sum() == finite.size


def test_collect_stats_tensor_with_only_nonfinite_values_has_a_zero_range():
    """A mask that is inf everywhere is not an error: count 0, every value counted in nonfinite (callers keep it float)."""
    model = linear_model()
    x = np.full_like(samples(4), np.inf)
    stats = collect_stats(model, ["x"], CalibrationData.from_arrays({"x": x}, model=model))["x"]
    assert (stats.count, stats.nonfinite, stats.min, stats.max, stats.absmax) == (0, x.size, 0.0, 0.0, 0.0)
    assert stats.histogram.sum() == 0
    assert compute_range(stats, "percentile", symmetric=False) == (0.0, 0.0)


def test_collect_stats_external_data(tmp_path, monkeypatch):
    """A model saved with external data, given by path; and the >2 GB session path (saved to a temporary folder)."""
    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    model = make_model(nodes, [tensor_input("x", ["N", 4])], [tensor_input("y", ["N", 512])], [init("W", w)])
    onnxopt.io.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    x = samples(9)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    stats = collect_stats(tmp_path / "m.onnx", ["h"], data, batch_size=4)
    assert stats["h"].max == pytest.approx(float((x @ w).max()), rel=1e-5)
    monkeypatch.setattr(onnxopt.io, "serialized_size", lambda m: None)  # as if over 2 GB
    big = collect_stats(model, ["h"], data, batch_size=4)
    np.testing.assert_array_equal(big["h"].histogram, stats["h"].histogram)


# -- ranges ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_with_outliers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    x[:5] = 50.0  # 10 outliers: 0.005% of the values
    x[5:10] = -40.0
    return calib.stats_from_array("g", x, bins=2048)


def test_ranges_clip_outliers(gaussian_with_outliers):
    s = gaussian_with_outliers
    lo, hi = compute_range(s, "minmax", symmetric=True)
    assert (lo, hi) == (-50.0, 50.0)
    p = compute_range(s, "percentile", symmetric=True, percentile=99.99)[1]
    assert 3.0 < p < 6.0  # |x| at 99.99% of a unit Gaussian is 3.9
    e = compute_range(s, "entropy", symmetric=True)[1]
    assert 2.0 < e < 15.0
    m = compute_range(s, "mse", symmetric=True)[1]
    assert p < m < 50.0  # 10 far outliers pull the MSE threshold up, but not to the maximum
    assert compute_range(s, "entropy", symmetric=True) == (-e, e)


def test_asymmetric_ranges_contain_zero():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(100_000), 0)  # post-ReLU
    x[:5] = 30.0
    s = calib.stats_from_array("r", x)
    for method in calib.RANGE_METHODS:
        lo, hi = compute_range(s, method, symmetric=False)
        assert lo == 0.0 and 0 < hi <= 30.0
    assert compute_range(s, "minmax", symmetric=False) == (0.0, 30.0)
    assert compute_range(s, "percentile", symmetric=False)[1] < 5.0
    assert compute_range(s, "entropy", symmetric=False)[1] < 10.0
    assert compute_range(s, "mse", symmetric=False)[1] < 30.0
    shifted = calib.stats_from_array("s", rng.uniform(2.0, 3.0, 10_000))
    assert compute_range(shifted, "minmax", symmetric=False)[0] == 0.0


def test_ranges_keep_uniform_data():
    x = np.random.default_rng(2).uniform(-1, 1, 100_000)
    s = calib.stats_from_array("u", x)
    for method in calib.RANGE_METHODS:
        t = compute_range(s, method, symmetric=True)[1]
        assert 0.9 < t <= 1.0, method


def test_range_edge_cases(gaussian_with_outliers):
    zero = calib.stats_from_array("z", np.zeros(10, np.float32), bins=16)
    assert compute_range(zero, "entropy", symmetric=True) == (0.0, 0.0)
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        compute_range(gaussian_with_outliers, "kl", symmetric=True)
    with pytest.raises(CalibrationError, match="percentile must be in"):
        compute_range(gaussian_with_outliers, "percentile", symmetric=True, percentile=0)
    with pytest.raises(CalibrationError, match="float tensors only"):
        calib.stats_from_array("i", np.arange(4))


def test_anonymous_dim_names_are_not_tied():
    """paddle2onnx writes '?' for every unknown dim (PP-OCR cls: [?, 3, ?, ?]); they are not one dimension."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", 1, ["?", 3, "?", "?"])
    y = helper.make_tensor_value_info("y", 1, ["?", 3, "?", "?"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    data = CalibrationData.from_arrays({"x": np.zeros((2, 3, 48, 192), np.float32)}, model=model)
    assert data.num_samples == 2
    assert next(iter(data.batches(2)))["x"].shape == (2, 3, 48, 192)


def test_entropy_never_clips_more_than_the_percentile_allows():
    """KL alone clips a near-zero mass with a sparse tail at 1/16 of the range; the percentile bound keeps the tail."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(500, 0.05), size=400).ravel()  # softmax-like: most values ~0, one large per row
    s = calib.stats_from_array("p", probs, bins=2048)
    floor = compute_range(s, "percentile", symmetric=True, percentile=99.9)[1]
    for symmetric in (True, False):
        hi = compute_range(s, "entropy", symmetric=symmetric, percentile=99.9)[1]
        assert hi >= floor * 0.999
        assert hi > s.absmax / 16 * 1.5  # the unbounded KL search would stop at its first window
