"""Loading and saving models safely.

* Loading never follows external-data paths out of the model's folder, checks every
  offset and length against the file, and turns every failure into one line.
* Saving is atomic (temporary file in the target folder, then rename) and switches to
  external data automatically when the model would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import ModelProto, TensorProto, numpy_helper

from onnxopt.errors import ModelLoadError, OnnxoptError

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # tensors at least this many bytes go to the data file
_ALIGN = 64


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers and attribute tensors, in all graphs."""
    from onnxopt.graph import iter_scopes

    for scope in iter_scopes(model.graph):
        graph = scope.graph
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


@functools.cache
def _element_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type, or None for types without a fixed width."""
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if data_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[data_type]
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None


def _expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes a tensor's raw data must have, or None for types without a fixed width."""
    bits = _element_bits(tensor.data_type)
    if bits is None:
        return None
    return (math.prod(tensor.dims) * bits + 7) // 8


def _read_external(tensor: TensorProto, base_dir: Path, label: str) -> None:
    """Replace a tensor's external reference by its bytes, refusing unsafe paths."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelLoadError(f"{label}: tensor '{tensor.name}' has external data without a location")
    rel = Path(location)
    if rel.is_absolute() or ".." in rel.parts or location.startswith(("/", "\\")) or ":" in location:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}' points its external data outside the model's folder ('{location}'); refusing to read it"
        )
    root = base_dir.resolve()
    target = (base_dir / rel).resolve()
    if root != target and root not in target.parents:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}' external data '{location}' resolves outside the "
            "model's folder (symbolic link?); refusing to read it"
        )
    if not target.is_file():
        raise ModelLoadError(f"{label}: external data file '{location}' for tensor '{tensor.name}' is missing")
    size = target.stat().st_size
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError as exc:
        raise ModelLoadError(f"{label}: tensor '{tensor.name}' has a malformed external offset/length") from exc
    expected = _expected_nbytes(tensor)
    if length is None:
        length = expected if expected is not None else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}' reads bytes {offset}..{offset + length} of '{location}', which has only {size} bytes"
        )
    if expected is not None and length != expected:
        raise ModelLoadError(
            f"{label}: tensor '{tensor.name}' needs {expected} bytes for shape {list(tensor.dims)} but its external data holds {length}"
        )
    with open(target, "rb") as handle:
        handle.seek(offset)
        tensor.raw_data = handle.read(length)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def load(model: ModelProto | str | os.PathLike[str], *, load_external_data: bool = True) -> ModelProto:
    """Load a model from a path (or return a ModelProto unchanged).

    External data is read into memory from inside the model's folder only. Any failure
    (missing, unreadable, truncated, not ONNX) raises :class:`ModelLoadError` with one line.
    Structural validity is checked separately by :func:`onnxopt.validate.validate_model`.
    """
    if isinstance(model, ModelProto):
        return model
    path = Path(model)
    label = str(path)
    if not path.exists():
        raise ModelLoadError(f"{label}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{label}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{label}: cannot read ({exc.strerror or exc})") from exc
    if not data:
        raise ModelLoadError(f"{label}: the file is empty")
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        if "MaxDepth" in str(exc):
            raise ModelLoadError(f"{label}: subgraphs are nested deeper than protobuf can parse") from exc
        raise ModelLoadError(f"{label}: not a valid ONNX model (protobuf parse failed; truncated or corrupt file?)") from exc
    if not proto.HasField("graph") or (proto.ir_version <= 0 and not proto.opset_import):
        raise ModelLoadError(f"{label}: not an ONNX model (no graph / IR version)")
    if load_external_data:
        for tensor in _all_tensors(proto):
            if tensor.data_location == TensorProto.EXTERNAL:
                _read_external(tensor, path.parent, label)
    return proto


def payload_bytes(model: ModelProto) -> int:
    """Bytes of all tensor payloads in the model, from dims and types (no serialization)."""
    total = 0
    for tensor in _all_tensors(model):
        expected = _expected_nbytes(tensor)
        total += expected if expected is not None else len(tensor.raw_data) + sum(len(s) for s in tensor.string_data)
    return total


def serialized_size(model: ModelProto) -> int | None:
    """The exact serialized size, or None when the model is too large to serialize in one piece.

    Protobuf cannot serialize (nor size) a message over 2 GB; such models are saved and
    run with external data.
    """
    if payload_bytes(model) > PROTOBUF_LIMIT:
        return None
    try:
        size = model.ByteSize()
    except EncodeError:
        return None
    return size if size <= PROTOBUF_LIMIT else None


def _tensor_bytes(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _default_mode() -> int:
    """File mode a plain ``open()`` would create under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_replace(tmp: str, final: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; outputs get the usual mode
    os.replace(tmp, final)


def save(
    model: ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data=None`` (default) stores weights in ``<name>.data`` beside the model only
    when the model would exceed protobuf's 2 GB limit; True forces it, False forbids it.
    The in-memory model is left exactly as it was.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxoptError(f"{path}: the output folder '{folder}' does not exist")
    size = serialized_size(model)
    use_external = (size is None or size > PROTOBUF_LIMIT - (1 << 20)) if external_data is None else external_data
    if not use_external:
        if size is None:
            raise OnnxoptError(f"{path}: the model is over 2 GB; save it with external data")
        payload = model.SerializeToString(deterministic=True)
        _write_atomic(path, [payload])
        return path
    _save_with_external_data(model, path)
    return path


def _write_atomic(path: Path, chunks: list[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        _fsync_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_with_external_data(model: ModelProto, path: Path) -> None:
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=path.parent or ".")
    moved: list[tuple[TensorProto, TensorProto | bytes]] = []
    try:
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            for tensor in _all_tensors(model):
                if tensor.data_type == TensorProto.STRING or tensor.data_location == TensorProto.EXTERNAL:
                    continue
                blob = _tensor_bytes(tensor)
                if len(blob) < EXTERNAL_THRESHOLD:
                    continue
                pad = (-offset) % _ALIGN
                handle.write(b"\0" * pad)
                offset += pad
                handle.write(blob)
                moved.append((tensor, _point_to_file(tensor, blob, data_name, offset)))
                offset += len(blob)
        payload = model.SerializeToString(deterministic=True)
    except BaseException:
        os.unlink(tmp_data)
        raise
    finally:
        for tensor, original in moved:
            _restore(tensor, original)
    try:
        _write_atomic(path, [payload])
        _fsync_replace(tmp_data, data_path)
    except BaseException:
        if os.path.exists(tmp_data):
            os.unlink(tmp_data)
        raise


def _point_to_file(tensor: TensorProto, blob: bytes, location: str, offset: int) -> TensorProto | bytes:
    """Point ``tensor`` at the data file; return what :func:`_restore` needs to undo it."""
    original: TensorProto | bytes = blob
    if not tensor.HasField("raw_data"):
        original = TensorProto()
        original.CopyFrom(tensor)
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(blob)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return original


def _restore(tensor: TensorProto, original: TensorProto | bytes) -> None:
    if isinstance(original, TensorProto):
        tensor.CopyFrom(original)
        return
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = original
