"""Model loading and saving: hostile files, external data safety, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor_input
from onnx import TensorProto, helper

import onnxopt
from onnxopt.errors import ModelLoadError, OnnxoptError


def _add_model(size: int = 300):
    return make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [tensor_input("x", [size])],
        [tensor_input("y", [size])],
        [init("w", np.arange(size, dtype=np.float32))],
    )


def _point_external(model, location: str, offset: int = 0, length: int | None = None):
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


def test_roundtrip_is_byte_identical(tmp_path):
    model = _add_model()
    path = tmp_path / "m.onnx"
    onnxopt.save(model, path)
    assert onnxopt.load(path) == model
    first = path.read_bytes()
    onnxopt.save(onnxopt.load(path), path)
    assert path.read_bytes() == first


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"this is plainly not a protobuf \xff\xfe" * 7, "not a valid ONNX model"),
    ],
)
def test_bad_files_give_one_line(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        onnxopt.load(path)
    assert "\n" not in str(info.value)


def test_truncated_and_missing(tmp_path):
    data = _add_model().SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        onnxopt.load(path)
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxopt.load(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        onnxopt.load(tmp_path)


def test_external_data_roundtrip(tmp_path):
    model = _add_model(4096)
    path = tmp_path / "ext.onnx"
    onnxopt.save(model, path, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= 4096 * 4
    assert path.stat().st_size < 4096  # weights are not inline
    assert model.graph.initializer[0].HasField("raw_data"), "saving must not alter the in-memory model"
    loaded = onnxopt.load(path)
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), np.arange(4096, dtype=np.float32))
    # onnx's own loader agrees with our layout
    assert np.array_equal(onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), np.arange(4096, dtype=np.float32))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_never_leaves_the_model_folder(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 2000)
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "m.onnx"
    path.write_bytes(_point_external(_add_model(), location).SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnxopt.load(path)


def test_external_data_symlink_escape(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 2000)
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink(tmp_path / "secret.bin", folder / "w.bin")
    path = folder / "m.onnx"
    path.write_bytes(_point_external(_add_model(), "w.bin").SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnxopt.load(path)


def test_external_data_offset_past_end_is_rejected(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 1200)
    path = tmp_path / "m.onnx"
    path.write_bytes(_point_external(_add_model(), "w.bin", offset=100).SerializeToString())
    with pytest.raises(ModelLoadError, match="has only 1200 bytes"):
        onnxopt.load(path)


def test_external_data_wrong_length_and_missing_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 4000)
    path = tmp_path / "m.onnx"
    path.write_bytes(_point_external(_add_model(), "w.bin", length=16).SerializeToString())
    with pytest.raises(ModelLoadError, match="needs 1200 bytes"):
        onnxopt.load(path)
    path.write_bytes(_point_external(_add_model(), "nope.bin").SerializeToString())
    with pytest.raises(ModelLoadError, match="missing"):
        onnxopt.load(path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"previous")

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("onnxopt.io._fsync_replace", boom)
    with pytest.raises(OSError):
        onnxopt.save(_add_model(), path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OnnxoptError, match="does not exist"):
        onnxopt.save(_add_model(), tmp_path / "nope" / "m.onnx")


def test_large_model_switches_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr("onnxopt.io.PROTOBUF_LIMIT", 4 << 20)  # pretend 4 MiB is the protobuf limit
    model = _add_model(1 << 20)  # 4 MiB of weights
    path = tmp_path / "big.onnx"
    onnxopt.save(model, path)
    assert (tmp_path / "big.onnx.data").exists()
    assert onnxopt.load(path) == model


def test_saved_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "m.onnx"
    onnxopt.save(_add_model(), path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
