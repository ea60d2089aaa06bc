"""Calibration inputs: :class:`CalibrationData` from an .npz, a folder of .npy/.npz files or images, arrays, or random data.

Inputs are checked against the model's graph inputs (names, dtypes, ranks, static dims) and
every mismatch is one :class:`CalibrationError` line; folders are read one file at a time.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from onnx import ModelProto, helper

from onnxopt.errors import OnnxoptError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")
RANDOM_WARNING = "calibration on random data: the result is for testing only"
ANONYMOUS_DIMS = frozenset({"?", ""})  # dim_params that exporters write for "unknown", not a shared name

# Casts applied to calibration arrays without complaint (each one adds a note): numpy's float64
# default for float32/float16 models, and int32 ids for int64 inputs. Anything else is an error.
_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.float64), np.dtype(np.float16)),
    (np.dtype(np.float32), np.dtype(np.float16)),
    (np.dtype(np.int32), np.dtype(np.int64)),
}
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class CalibrationError(OnnxoptError):
    """Calibration data that cannot be read or does not fit the model (one line)."""


# ----------------------------------------------------------------------------------------------
# model input specs


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # int: static; str: named dynamic; None: anonymous dynamic

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def fixed_batch(self) -> int | None:
        """Samples per run when the first axis is static, else None (a scalar input: see :func:`_fixed_batches`)."""
        if not self.dims:
            return None
        return self.dims[0] if isinstance(self.dims[0], int) else None

    def describe(self) -> str:
        return "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"


def _fixed_batches(specs: list[_InputSpec] | tuple) -> dict[str, int]:
    """Input name -> samples per run, for the inputs that fix it: a static first axis, else a scalar input's one
    sample per run (each run feeds one of its values); beside a static batch, a scalar takes the batch's first value."""
    fixed = {s.name: s.fixed_batch for s in specs if s.fixed_batch is not None}
    if not fixed:
        fixed = {s.name: 1 for s in specs if not s.dims}
    return fixed  # type: ignore[return-value]


def _input_specs(model: ModelProto) -> list[_InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise CalibrationError(f"model input '{value.name}' is not a tensor; calibration supports tensor inputs only")
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            raise CalibrationError(
                f"model input '{value.name}' has element type {tensor_type.elem_type}, which calibration cannot feed"
            ) from None
        if not tensor_type.HasField("shape"):
            raise CalibrationError(f"model input '{value.name}' has no shape; calibration needs at least its rank")
        dims: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        specs.append(_InputSpec(value.name, dtype, tuple(dims)))
    return specs


def _as_model(model: ModelProto | str | os.PathLike[str]) -> ModelProto:
    from onnxopt.io import load

    return load(model, load_external_data=False) if not isinstance(model, ModelProto) else model


# ----------------------------------------------------------------------------------------------
# sources: one file, one image, one in-memory mapping or one random draw


@dataclass
class _Source:
    """Metadata of one unit of calibration data, and how to load it (samples first)."""

    label: str
    count: int
    shapes: dict[str, tuple[int, ...]]  # per-sample shapes (without the sample axis)
    dtypes: dict[str, np.dtype]
    loader: Callable[[], dict[str, np.ndarray]]  # arrays with the sample axis, at least ``count`` rows
    batched: dict[str, bool] = field(default_factory=dict)  # False: the stored array is one sample

    def key(self) -> tuple:
        return tuple(sorted(self.shapes.items()))


def _array_meta(label: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype], specs: list[_InputSpec] | None):
    """Decide per input whether a stored array is a batch or one sample; returns (count, shapes, batched)."""
    by_name = {s.name: s for s in specs} if specs else {}
    counts: dict[str, int] = {}
    per_sample: dict[str, tuple[int, ...]] = {}
    batched: dict[str, bool] = {}
    for name, shape in shapes.items():
        spec = by_name.get(name)
        if spec is not None and len(shape) == spec.rank - 1:
            counts[name], per_sample[name], batched[name] = 1, tuple(shape), False
        else:
            if not shape:
                raise CalibrationError(f"{label}: array '{name}' is a scalar; the first axis must hold the samples")
            counts[name], per_sample[name], batched[name] = shape[0], tuple(shape[1:]), True
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise CalibrationError(f"{label}: inputs have different numbers of samples ({listed})")
    count = next(iter(counts.values()), 0)
    return count, per_sample, batched


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), np.dtype(dtype)


def _read_headers(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
    """Shapes and dtypes of the arrays in an .npy/.npz file, from the headers only."""
    label = str(path)
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as handle:
                shape, dtype = _npy_header(handle)
            return {"": shape}, {"": dtype}
        shapes, dtypes = {}, {}
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.namelist()):
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    shape, dtype = _npy_header(handle)
                shapes[member[:-4]], dtypes[member[:-4]] = shape, dtype
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{label}: cannot read calibration arrays ({one_line(exc, 200)})") from exc
    if not shapes:
        raise CalibrationError(f"{label}: the archive holds no arrays")
    if any(d.hasobject for d in dtypes.values()):
        raise CalibrationError(f"{label}: holds object arrays, which cannot be fed to a model")
    return shapes, dtypes


def _read_file(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of an .npy (memory-mapped) or .npz file; one line on failure."""
    try:
        if path.suffix.lower() == ".npy":
            return {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in names}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration arrays ({one_line(exc, 200)})") from exc


def _file_source(path: Path, specs: list[_InputSpec]) -> _Source:
    shapes, dtypes = _read_headers(path)
    if "" in shapes:  # a bare .npy: only for one-input models
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise CalibrationError(f"{path}: a .npy file holds one array but the model has {len(specs)} inputs ({names}); use .npz files")
        shapes, dtypes = {specs[0].name: shapes[""]}, {specs[0].name: dtypes[""]}
    count, per_sample, batched = _array_meta(str(path), shapes, dtypes, specs)
    names = list(shapes)
    return _Source(str(path), count, per_sample, dict(dtypes), lambda: _read_file(path, names), batched)


def _mapping_source(label: str, arrays: Mapping[str, Any], specs: list[_InputSpec] | None) -> _Source:
    values = {str(k): np.asarray(v) for k, v in arrays.items()}
    if not values:
        raise CalibrationError(f"{label}: no arrays given")
    for name, value in values.items():
        if value.dtype.hasobject:
            raise CalibrationError(f"{label}: array '{name}' has dtype object, which cannot be fed to a model")
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    count, per_sample, batched = _array_meta(label, shapes, {k: v.dtype for k, v in values.items()}, specs)
    return _Source(label, count, per_sample, {k: v.dtype for k, v in values.items()}, lambda: values, batched)


# ----------------------------------------------------------------------------------------------
# image preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How image files become a model input: x = (pixel * scale - mean) / std, in ``layout``."""

    resize: tuple[int, int] | None = None  # (height, width)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR", "L"] = "RGB"

    @property
    def channels(self) -> int:
        """Channels of the preprocessed image."""
        return 1 if self.color == "L" else 3


_PREPROCESS_KEYS = ("resize", "mean", "std", "scale", "layout", "color")


def parse_preprocess(spec: str | None) -> Preprocess:
    """Parse ``resize=224,mean=0.485,0.456,0.406,std=...,scale=1/255,layout=NCHW,color=RGB``."""
    if spec is None or not spec.strip():
        return Preprocess()
    items: dict[str, list[str]] = {}
    current = None
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if "=" in token:
            current, _, value = token.partition("=")
            current = current.strip().lower()
            if current not in _PREPROCESS_KEYS:
                raise CalibrationError(f"unknown preprocessing key '{current}' in '{spec}' (keys: {', '.join(_PREPROCESS_KEYS)})")
            if current in items:
                raise CalibrationError(f"preprocessing key '{current}' given twice in '{spec}'")
            items[current] = [value.strip()]
        elif current in ("mean", "std"):
            items[current].append(token)
        else:
            raise CalibrationError(f"bad preprocessing item '{token}' in '{spec}': expected key=value")
    kwargs: dict[str, Any] = {}
    try:
        if "resize" in items:
            dims = [int(d) for d in items["resize"][0].lower().split("x")]
            if len(dims) not in (1, 2) or min(dims) <= 0:
                raise ValueError
            kwargs["resize"] = (dims[0], dims[-1])
        for key in ("mean", "std"):
            if key in items:
                kwargs[key] = tuple(_number(v) for v in items[key])
        if "scale" in items:
            kwargs["scale"] = _number(items["scale"][0])
    except (ValueError, ZeroDivisionError):
        raise CalibrationError(
            f"bad preprocessing spec '{spec}': resize=H or HxW (positive integers), mean/std/scale numbers (1/255 allowed)"
        ) from None
    if "std" in kwargs and any(s == 0 for s in kwargs["std"]):
        raise CalibrationError(f"bad preprocessing spec '{spec}': std must not be 0")
    if "layout" in items:
        kwargs["layout"] = items["layout"][0].upper()
        if kwargs["layout"] not in ("NCHW", "NHWC"):
            raise CalibrationError(f"bad preprocessing spec '{spec}': layout must be NCHW or NHWC")
    if "color" in items:
        kwargs["color"] = items["color"][0].upper()
        if kwargs["color"] not in ("RGB", "BGR", "L"):
            raise CalibrationError(f"bad preprocessing spec '{spec}': color must be RGB, BGR or L")
    result = Preprocess(**kwargs)
    for key in ("mean", "std"):
        if len(getattr(result, key)) not in (1, result.channels):
            raise CalibrationError(f"bad preprocessing spec '{spec}': {key} needs 1 or {result.channels} values for color={result.color}")
    return result


def _number(text: str) -> float:
    num, sep, den = text.partition("/")
    value = float(num) / float(den) if sep else float(num)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _import_pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is an install requirement
        raise CalibrationError(f"reading calibration images needs Pillow: pip install pillow ({exc})") from exc
    return Image


def _image_size(path: Path) -> tuple[int, int]:
    Image = _import_pil()
    try:
        with Image.open(path) as image:
            return image.size  # (width, height)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CalibrationError(f"{path}: cannot read image ({one_line(exc, 200)})") from exc


def _load_image(path: Path, prep: Preprocess, size_hw: tuple[int, int] | None, dtype: np.dtype) -> np.ndarray:
    Image = _import_pil()
    try:
        with Image.open(path) as image:
            image = image.convert("L" if prep.color == "L" else "RGB")
            if size_hw is not None and (image.height, image.width) != size_hw:
                image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CalibrationError(f"{path}: cannot read image ({one_line(exc, 200)})") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.color == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(prep.mean, np.float32)
    std = np.asarray(prep.std, np.float32)
    x = (pixels * np.float32(prep.scale) - mean) / std
    if prep.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=dtype)


def _image_sources(files: list[Path], specs: list[_InputSpec], prep: Preprocess, notes: list[str], label: str) -> list[_Source]:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise CalibrationError(f"{label}: image calibration needs a model with one input; this one has {len(specs)} ({names})")
    spec = specs[0]
    if spec.dtype.kind != "f":
        raise CalibrationError(f"{label}: image calibration needs a float input; '{spec.name}' is {spec.dtype}")
    if spec.rank != 4:
        raise CalibrationError(f"{label}: image calibration needs a rank-4 image input; '{spec.name}' is {spec.describe()}")
    h_axis, w_axis, c_axis = (2, 3, 1) if prep.layout == "NCHW" else (1, 2, 3)
    size_hw = prep.resize
    static_hw = (spec.dims[h_axis], spec.dims[w_axis])
    if size_hw is None and all(isinstance(d, int) for d in static_hw):
        size_hw = static_hw  # type: ignore[assignment]
        notes.append(f"images resized to the model's {static_hw[0]}x{static_hw[1]} (no resize= in the preprocessing spec)")
    channels = spec.dims[c_axis]
    if isinstance(channels, int) and channels != prep.channels:
        hint = ""
        other = spec.dims[3 if prep.layout == "NCHW" else 1]
        if other == prep.channels:
            hint = f"; try layout={'NHWC' if prep.layout == 'NCHW' else 'NCHW'}"
        raise CalibrationError(
            f"input '{spec.name}': the model expects {channels} channels on axis {c_axis} ({spec.describe()}), "
            f"the images give {prep.channels} (color={prep.color}, layout={prep.layout}){hint}"
        )
    sources = []
    for path in files:
        if size_hw is None:
            width, height = _image_size(path)
            hw = (height, width)
        else:
            _image_size(path)  # fail early on unreadable files
            hw = size_hw
        shape = (prep.channels, *hw) if prep.layout == "NCHW" else (*hw, prep.channels)

        def loader(path=path, hw=hw):
            return {spec.name: _load_image(path, prep, hw, spec.dtype)}

        sources.append(_Source(str(path), 1, {spec.name: shape}, {spec.name: spec.dtype}, loader, {spec.name: True}))
    return sources


# ----------------------------------------------------------------------------------------------
# CalibrationData


class CalibrationData:
    """A source of calibration inputs for one model, read in batches with bounded memory."""

    def __init__(self, sources: list[_Source], *, names: Sequence[str], source: str, random: bool = False, notes: Sequence[str] = ()):
        self._sources = sources
        self._names = list(names)
        self._specs: list[_InputSpec] | None = None
        self.source = source
        self.random = random
        self.notes: list[str] = list(notes)
        self.progress: Callable[[int, int], None] | None = None  # drawn by the CLI while statistics are collected
        if random:
            self.notes.insert(0, RANDOM_WARNING)

    def failed_batch(self, exc: BaseException) -> CalibrationError:
        """The error for onnxruntime failing on one of these batches (for random data: which dims were guessed)."""
        from onnxopt.verify import guessed_dims_hint

        hint = guessed_dims_hint(self.notes) if self.random else ""
        return CalibrationError(f"onnxruntime failed on a calibration batch: {one_line(exc, 200)}{hint}")

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def resolve(
        cls,
        value: CalibrationData | str | os.PathLike[str] | Mapping[str, Any],
        model: ModelProto,
        *,
        preprocess: str | None = None,
        limit: int | None = None,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> CalibrationData:
        """What ``--calib`` / ``calibration=`` means: data as given, ``"random"`` (testing only), arrays, or a path."""
        if isinstance(value, CalibrationData):
            value.validate(model)
            return value
        if isinstance(value, Mapping):
            return cls.from_arrays(value, model=model)
        if str(value) == "random":
            return cls.random(model, samples=limit or 16, input_shapes=input_shapes)
        return cls.from_path(value, model, preprocess=preprocess, limit=limit)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        model: ModelProto | str | os.PathLike[str],
        *,
        preprocess: str | None = None,
        limit: int | None = None,
    ) -> CalibrationData:
        """Calibration data from an .npz file, a folder of .npy/.npz files or a folder of images, checked against ``model``."""
        model = _as_model(model)
        specs = _input_specs(model)
        path = Path(path)
        notes: list[str] = []
        if limit is not None and limit <= 0:
            raise CalibrationError(f"calibration limit must be positive, got {limit}")
        if not path.exists():
            raise CalibrationError(f"{path}: no such calibration file or folder")
        if path.is_file():
            if path.suffix.lower() != ".npz":
                raise CalibrationError(
                    f"{path}: a calibration file must be an .npz archive (or give a folder of .npy/.npz files or images)"
                )
            if preprocess:
                raise CalibrationError(f"{path}: a preprocessing spec applies to image folders only")
            sources = [_file_source(path, specs)]
        else:
            sources = cls._folder_sources(path, specs, preprocess, notes)
        data = cls(sources, names=[s.name for s in specs], source=str(path), notes=notes)
        data._limit(limit)
        data.validate(model)
        return data

    @staticmethod
    def _folder_sources(folder: Path, specs: list[_InputSpec], preprocess: str | None, notes: list[str]) -> list[_Source]:
        try:
            entries = sorted(
                (p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                key=lambda p: p.relative_to(folder).as_posix(),
            )
        except OSError as exc:
            raise CalibrationError(f"{folder}: cannot list the calibration folder ({one_line(exc, 200)})") from exc
        arrays = [p for p in entries if p.suffix.lower() in ARRAY_SUFFIXES]
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = len(entries) - len(arrays) - len(images)
        if arrays and images:
            raise CalibrationError(f"{folder}: holds both array files ({len(arrays)}) and images ({len(images)}); use one kind per folder")
        if not arrays and not images:
            kinds = ", ".join(ARRAY_SUFFIXES + IMAGE_SUFFIXES)
            raise CalibrationError(f"{folder}: no calibration files ({kinds}) in the folder")
        if skipped:
            notes.append(f"{skipped} file(s) in {folder} that are neither arrays nor images were ignored")
        if arrays:
            if preprocess:
                raise CalibrationError(f"{folder}: a preprocessing spec applies to image folders only; this folder holds array files")
            return [_file_source(p, specs) for p in arrays]
        prep = parse_preprocess(preprocess)
        if not preprocess:
            notes.append("no image preprocessing spec given: pixels scaled to [0, 1], RGB, NCHW")
        return _image_sources(images, specs, prep, notes, str(folder))

    @classmethod
    def from_arrays(cls, mapping: Mapping[str, Any], *, model: ModelProto | None = None) -> CalibrationData:
        """Calibration data from in-memory arrays (first axis = samples); checked against ``model`` when given."""
        specs = _input_specs(model) if model is not None else None
        source = _mapping_source("calibration arrays", mapping, specs)
        data = cls([source], names=list(source.shapes), source="arrays")
        if model is not None:
            data.validate(model)
        return data

    @classmethod
    def random(
        cls,
        model: ModelProto | str | os.PathLike[str],
        *,
        samples: int = 16,
        seed: int = 0,
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> CalibrationData:
        """Seeded random inputs (onnxopt.verify.generate_inputs), flagged ``random``: for testing only."""
        from onnxopt.verify import generate_inputs

        model = _as_model(model)
        specs = _input_specs(model)
        if samples <= 0:
            raise CalibrationError(f"random calibration needs a positive number of samples, got {samples}")
        first, notes = generate_inputs(model, input_shapes, seed=seed)
        # a draw holds as many samples as the batched inputs' first axis; a scalar input repeats its value for each
        per_draw = max((first[s.name].shape[0] for s in specs if s.rank and first[s.name].shape), default=1) or 1

        def with_samples(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {s.name: (feeds[s.name] if s.rank else np.repeat(feeds[s.name][None], per_draw)) for s in specs}

        arrays = with_samples(first)
        try:  # every input must hold per_draw samples
            _array_meta("random", {k: v.shape for k, v in arrays.items()}, {}, None)
        except CalibrationError as exc:
            raise CalibrationError(f"{exc}; give each input's first dim with --input-shape (dims not given are set to 1)") from None
        sources = []
        for draw in range(math.ceil(samples / per_draw)):

            def loader(draw=draw):
                return with_samples(generate_inputs(model, input_shapes, seed=seed + draw)[0])

            shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
            sources.append(_Source(f"random draw {draw}", per_draw, shapes, {k: v.dtype for k, v in arrays.items()}, loader))
        data = cls(sources, names=[s.name for s in specs], source="random", random=True, notes=notes)
        data._limit(samples)
        data.validate(model)
        return data

    # -- properties ----------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """The model input names this data feeds."""
        return list(self._names)

    @property
    def num_samples(self) -> int:
        """Samples available (after ``limit``)."""
        return sum(s.count for s in self._sources)

    def describe(self) -> str:
        """One line for logs: how many samples from where."""
        return f"{self.num_samples} calibration samples from {self.source}" + (" (random: for testing only)" if self.random else "")

    def _limit(self, limit: int | None) -> None:
        if limit is None:
            return
        kept, remaining = [], limit
        for source in self._sources:
            if remaining <= 0:
                break
            if source.count > remaining:
                source.count = remaining
            kept.append(source)
            remaining -= source.count
        self._sources = kept

    # -- validation ----------------------------------------------------------------------------

    def validate(self, model: ModelProto | str | os.PathLike[str]) -> None:
        """Check names, dtypes, ranks and static dims against the model's inputs; one CalibrationError line on a mismatch."""
        specs = _input_specs(_as_model(model))
        if not self._sources or self.num_samples == 0:
            raise CalibrationError(f"{self.source}: the calibration data holds no samples")
        wanted = [s.name for s in specs]
        casts: set[tuple[str, np.dtype, np.dtype]] = set()
        for source in self._sources:
            have = set(source.shapes)
            missing = [n for n in wanted if n not in have]
            if missing:
                raise CalibrationError(f"{source.label}: no array for model input '{missing[0]}' (model inputs: {', '.join(wanted)})")
            extra = sorted(have - set(wanted))
            if extra:
                raise CalibrationError(f"{source.label}: array '{extra[0]}' is not a model input (model inputs: {', '.join(wanted)})")
            symbols: dict[str, tuple[str, int]] = {}
            for spec in specs:
                got_dtype = np.dtype(source.dtypes[spec.name])
                if got_dtype != spec.dtype:
                    if (got_dtype, spec.dtype) not in _CASTS:
                        raise CalibrationError(f"{source.label}: input '{spec.name}' has dtype {got_dtype}, the model expects {spec.dtype}")
                    casts.add((spec.name, got_dtype, spec.dtype))
                self._check_shape(source, spec, symbols)
        fixed = _fixed_batches(specs)
        if len(set(fixed.values())) > 1:
            listed = ", ".join(f"{n}: {b}" for n, b in fixed.items())
            raise CalibrationError(f"the model's inputs fix different batch sizes ({listed}); calibration cannot batch them")
        for name, got, want in sorted(casts, key=lambda c: c[0]):
            note = f"calibration input '{name}' cast from {got} to {want}"
            if note not in self.notes:
                self.notes.append(note)
        self._specs = specs
        self._names = wanted

    @staticmethod
    def _check_shape(source: _Source, spec: _InputSpec, symbols: dict[str, tuple[str, int]]) -> None:
        shape = source.shapes[spec.name]
        sample_dims = spec.dims[1:]
        expected = "[N," + ",".join("?" if d is None else str(d) for d in sample_dims) + "]" if spec.dims else "a scalar per sample"
        got = "(" + ",".join(str(d) for d in (source.count, *shape)) + ")"
        if len(shape) != len(sample_dims):
            raise CalibrationError(
                f"{source.label}: input '{spec.name}' has shape {got}, the model expects {expected} (first axis = samples): rank differs"
            )
        for axis, (want, have) in enumerate(zip(sample_dims, shape), start=1):
            if isinstance(want, int) and want != have:
                raise CalibrationError(
                    f"{source.label}: input '{spec.name}' has shape {got}, the model expects {expected} (first axis = samples): "
                    f"dim {axis} is {have}, not {want}"
                )
            if isinstance(want, str) and want not in ANONYMOUS_DIMS:  # '?' (paddle2onnx) names no dimension
                seen = symbols.setdefault(want, (spec.name, have))
                if seen[1] != have:
                    raise CalibrationError(
                        f"{source.label}: dim '{want}' is {seen[1]} in input '{seen[0]}' but {have} in input '{spec.name}'"
                    )

    # -- batching ------------------------------------------------------------------------------

    def _batch_size(self, batch_size: int) -> int:
        if batch_size <= 0:
            raise CalibrationError(f"calibration batch size must be positive, got {batch_size}")
        fixed = list(_fixed_batches(self._specs or ()).values())
        return fixed[0] if fixed else batch_size

    def plan(self, batch_size: int) -> list[list[tuple[int, int, int]]]:
        """The batches ``batches(batch_size)`` yields, as (source index, start, stop) segments, from metadata only.

        Consecutive samples of equal shape form full batches; a change of shape (files of different sizes
        along a dynamic dim) ends the batch early. A model with a static batch dim takes exactly that many
        samples per run; a remainder that cannot fill one is dropped.
        """
        size = self._batch_size(batch_size)
        fixed = bool(_fixed_batches(self._specs or ()))
        batches: list[list[tuple[int, int, int]]] = []
        current: list[tuple[int, int, int]] = []
        filled, key = 0, None
        for index, source in enumerate(self._sources):
            if source.key() != key and current:
                if not fixed:
                    batches.append(current)
                current, filled = [], 0
            key = source.key()
            start = 0
            while start < source.count:
                take = min(size - filled, source.count - start)
                current.append((index, start, start + take))
                filled += take
                start += take
                if filled == size:
                    batches.append(current)
                    current, filled = [], 0
        if current and not fixed:
            batches.append(current)
        return batches

    def num_batches(self, batch_size: int) -> int:
        """How many batches ``batches(batch_size)`` yields."""
        return len(self.plan(batch_size))

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of up to ``batch_size`` samples each, read lazily: one source file and one batch in memory at a time."""
        specs = {s.name: s for s in self._specs or ()}
        cached_index, cached = -1, {}
        for segments in self.plan(batch_size):
            parts: dict[str, list[np.ndarray]] = {name: [] for name in self._names}
            for index, start, stop in segments:
                if index != cached_index:
                    source = self._sources[index]
                    cached_index, cached = index, _with_sample_axis(source, source.loader())
                for name in self._names:
                    parts[name].append(cached[name][start:stop])
            feeds = {}
            for name, chunks in parts.items():
                array = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
                spec = specs.get(name)
                if spec is not None:
                    if array.dtype != spec.dtype:
                        array = array.astype(spec.dtype)
                    if spec.rank == 0:  # one value per run: the batch's first (a static batch dim elsewhere can hold several)
                        array = array.reshape(-1)[:1].reshape(())
                feeds[name] = np.ascontiguousarray(array) if array.ndim else array  # (ascontiguousarray makes a scalar 1-d)
            yield feeds
        cached = {}

    def first_batch(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """The first batch (of ``batch_size`` samples, or the model's static batch)."""
        return next(iter(self.batches(batch_size)))


def _with_sample_axis(source: _Source, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    result = {}
    for name in source.shapes:
        if name not in arrays:
            raise CalibrationError(f"{source.label}: array '{name}' disappeared while reading")
        array = arrays[name]
        if not source.batched.get(name, True):
            array = array[None]
        expected = source.shapes[name]
        if tuple(array.shape[1:]) != expected or array.shape[0] < source.count:
            raise CalibrationError(f"{source.label}: array '{name}' has shape {tuple(array.shape)}; its header said {expected} per sample")
        result[name] = array
    return result
