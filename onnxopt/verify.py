"""Numerical verification: run two models in onnxruntime on the same inputs and compare.

Inputs come from an .npz file or are generated (seeded) from the model's input specs,
with ``name:1x3x224x224`` overrides for dynamic dimensions. Tolerances are fitted to
the precision of the rewrite: fp32 rewrites must agree to float rounding; fp16, int8
and pruned models are judged by cosine similarity and top-1 agreement.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto, helper

from onnxopt.errors import OnnxoptError, VerificationError, one_line
from onnxopt.ort import make_session

InputShapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one precision."""

    rtol: float | None = None
    atol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-3, atol=1e-4),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.95),
    "int8": Tolerance(min_cosine=0.99, min_top1=0.9),
    "pruned": Tolerance(min_cosine=0.98, min_top1=0.85),
}
PRECISION_ORDER = ("fp32", "fp16", "int8", "pruned")  # tightest to loosest


def loosest(*precisions: str) -> str:
    """The loosest of known precisions (``fp32`` when none is given)."""
    known = [p for p in precisions if p in PRECISION_ORDER]
    return max(known, key=PRECISION_ORDER.index) if known else "fp32"


def parse_shape_overrides(items: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1x3x224x224`` strings (the name may itself contain ':')."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise OnnxoptError(f"bad --input-shape '{item}': expected NAME:DxDxD, e.g. input:1x3x224x224")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            raise OnnxoptError(f"bad --input-shape '{item}': dimensions must be integers joined by 'x'") from None
        if any(d < 0 for d in shape):
            raise OnnxoptError(f"bad --input-shape '{item}': dimensions must not be negative")
        shapes[name] = shape
    return shapes


def model_inputs(model: ModelProto) -> list:
    """The graph inputs that are real inputs (not initializers with defaults)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


GUESSED_DIM = "set to 1 (use --input-shape to choose)"  # the note on each free dim that generate_inputs guessed


def guessed_dims_hint(notes: list[str]) -> str:
    """For an error on generated inputs: how many free dims were guessed as 1 and how to choose them ('' if none)."""
    guessed = sum(note.endswith(GUESSED_DIM) for note in notes)
    if not guessed:
        return ""
    return f" (the generated inputs set {guessed} free dim(s) to 1: choose them with --input-shape NAME:DxD...)"


def _resolve_shape(value, overrides: InputShapes, notes: list[str]) -> tuple[int, ...]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        if value.name in overrides:
            return overrides[value.name]
        raise OnnxoptError(f"input '{value.name}' has no shape; give one with --input-shape {value.name}:DxD...")
    dims = tensor_type.shape.dim
    if value.name in overrides:
        shape = overrides[value.name]
        if len(shape) != len(dims):
            raise OnnxoptError(f"--input-shape {value.name}: rank {len(shape)} given, the model's input has rank {len(dims)}")
        for i, (want, dim) in enumerate(zip(shape, dims)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != want:
                raise OnnxoptError(f"--input-shape {value.name}: dim {i} is {want}, the model fixes it to {dim.dim_value}")
        return shape
    shape = []
    for dim in dims:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            shape.append(dim.dim_value)
        else:
            shape.append(1)
            notes.append(f"input '{value.name}' dim '{dim.dim_param or '?'}' {GUESSED_DIM}")
    return tuple(shape)


def generate_inputs(model: ModelProto, overrides: InputShapes | None = None, *, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Seeded inputs for every model input, plus notes on dimensions that were guessed."""
    overrides = dict(overrides or {})
    names = {v.name for v in model_inputs(model)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise OnnxoptError(f"--input-shape names '{unknown[0]}', which is not a model input (inputs: {', '.join(sorted(names))})")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    feeds: dict[str, np.ndarray] = {}
    bounds = index_bounds(model)
    for value in model_inputs(model):
        if value.type.WhichOneof("value") != "tensor_type":
            raise OnnxoptError(f"cannot generate input '{value.name}' (not a tensor); give inputs in an .npz file")
        elem = value.type.tensor_type.elem_type
        shape = _resolve_shape(value, overrides, notes)
        feeds[value.name] = _random_array(rng, elem, shape, value.name, bounds.get(value.name, RANDOM_INT_HIGH))
    return feeds, notes


RANDOM_INT_HIGH = 10  # random integer inputs are drawn from [0, 10), or below the smallest table they index
# ops that pass an index tensor through unchanged in value (an input reaching a Gather's indices through them)
_INDEX_PASSTHROUGH = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Slice", "Transpose"})


def index_bounds(model: ModelProto) -> dict[str, int]:
    """Integer graph inputs used as Gather indices into a constant table: the smallest table extent they index.

    Random data below that bound keeps a small embedding (two token types, say) in range.
    """
    from onnxopt.graph import GraphView

    view = GraphView.build(model.graph)
    inits, readers = view.initializers, view.consumers
    bounds: dict[str, int] = {}
    for value in model_inputs(model):
        stack, seen = [value.name], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in readers.get(name, []):
                if node.op_type in _INDEX_PASSTHROUGH and node.input and node.input[0] == name and node.domain in ("", "ai.onnx"):
                    stack.extend(o for o in node.output if o)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in inits:
                    dims = inits[node.input[0]].dims
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                        bounds[value.name] = min(bounds.get(value.name, RANDOM_INT_HIGH), int(dims[axis]))
    return bounds


def _random_array(rng: np.random.Generator, elem: int, shape: tuple[int, ...], name: str, high: int = RANDOM_INT_HIGH) -> np.ndarray:
    try:
        dtype = helper.tensor_dtype_to_np_dtype(elem)
    except (KeyError, ValueError) as exc:
        raise OnnxoptError(f"cannot generate input '{name}' of element type {elem}") from exc
    if elem == TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if elem == TensorProto.STRING:
        return np.array(rng.integers(0, 100, size=shape).astype(str), dtype=object)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        return rng.standard_normal(shape).astype(dtype)
    raise OnnxoptError(f"cannot generate input '{name}' of element type {elem}; give inputs in an .npz file")


def load_inputs(path: str | os.PathLike[str], model: ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, checked against the model's input names."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it is not an .npz archive (one named array per model input)")
        with data:
            feeds = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxoptError(f"cannot read inputs from '{path}': {one_line(exc, 200)}") from exc
    wanted = {v.name for v in model_inputs(model)}
    missing = sorted(wanted - set(feeds))
    if missing:
        raise OnnxoptError(f"'{path}' has no array for model input '{missing[0]}'")
    extra = sorted(set(feeds) - wanted)
    if extra:
        raise OnnxoptError(f"'{path}' has array '{extra[0]}', which is not a model input")
    return feeds


@contextlib.contextmanager
def session_source(model: ModelProto | str | os.PathLike[str]) -> Iterator[bytes | str]:
    """What onnxruntime loads: a path as is, a model's bytes, or (over 2 GB) a temporary copy with external data."""
    from onnxopt.io import save, serialized_size

    if not isinstance(model, ModelProto):
        yield os.fspath(model)
    elif serialized_size(model) is not None:
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(model, path, external_data=True)
            yield str(path)


def create_session(
    model: ModelProto | str | os.PathLike[str], *, optimize: bool = False, threads: int = 1, provider: str = "CPUExecutionProvider"
):
    """An onnxruntime session for ``model`` (a ModelProto, saved with external data when over 2 GB, or a path)."""
    with session_source(model) as source:
        return make_session(source, optimize=optimize, threads=threads, provider=provider)


def run_model(model: ModelProto, feeds: Mapping[str, Any], session=None) -> dict[str, Any]:
    """Run ``model`` on ``feeds`` in onnxruntime; returns outputs by name."""
    session = session or create_session(model)
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as exc:
        raise OnnxoptError(f"onnxruntime failed to run the model: {one_line(exc, 400)}") from exc
    return dict(zip(names, values))


@dataclass
class OutputComparison:
    """Metrics of one output."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    passed: bool = True
    reason: str = ""


@dataclass
class VerificationResult:
    """Per-output comparisons and the overall verdict."""

    precision: str
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every output is within the tolerance."""
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputComparison]:
        """The outputs that are not within the tolerance."""
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        """One line: verdict, worst max-abs error and lowest cosine."""
        worst = max((o.max_abs for o in self.outputs), default=0.0)
        cos = min((o.cosine for o in self.outputs), default=1.0)
        verdict = "passed" if self.passed else "FAILED"
        return f"verification {verdict} ({self.precision}): max abs diff {worst:.3g}, min cosine {cos:.6f}, {len(self.outputs)} outputs"

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return {"precision": self.precision, "passed": self.passed, "outputs": [asdict(o) for o in self.outputs], "notes": self.notes}


def _flatten(value: Any) -> list[np.ndarray]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [np.asarray(v) for v in value]
    return [np.asarray(value)]


def compare_arrays(name: str, ref: Any, out: Any, tol: Tolerance) -> OutputComparison:
    """Compare one output (tensor or sequence of tensors) against the reference."""
    result = OutputComparison(name)
    refs, outs = _flatten(ref), _flatten(out)
    if len(refs) != len(outs):
        result.passed, result.reason = False, f"{len(outs)} tensors, expected {len(refs)}"
        return result
    for r, o in zip(refs, outs):
        if r.shape != o.shape:
            result.passed, result.reason = False, f"shape {o.shape}, expected {r.shape}"
            return result
        if r.dtype.kind not in "fc" or o.dtype.kind not in "fc":
            if r.dtype != o.dtype:
                result.passed, result.reason = False, f"dtype {o.dtype}, expected {r.dtype}"
            elif not np.array_equal(r, o):
                result.passed, result.reason = False, "values differ"
                if r.dtype.kind in "iub":
                    result.max_abs = float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64))))
            continue
        _float_metrics(result, r, o, tol)
    return result


def _float_metrics(result: OutputComparison, r: np.ndarray, o: np.ndarray, tol: Tolerance) -> None:
    r64, o64 = (
        r.astype(np.complex128 if r.dtype.kind == "c" else np.float64),
        o.astype(np.complex128 if o.dtype.kind == "c" else np.float64),
    )
    nan_r, nan_o = np.isnan(r64), np.isnan(o64)
    if not np.array_equal(nan_r, nan_o):
        result.passed, result.reason = False, "NaN in different places"
        return
    finite = np.isfinite(r64) & np.isfinite(o64)
    inf_mismatch = ~finite & ~nan_r & (r64 != o64)
    if np.any(inf_mismatch):
        result.passed, result.reason = False, "infinities differ"
        return
    r64, o64 = np.where(finite, r64, 0), np.where(finite, o64, 0)
    diff = np.abs(r64 - o64)
    if diff.size:
        result.max_abs = max(result.max_abs, float(diff.max()))
        result.max_rel = max(result.max_rel, float((diff / (np.abs(r64) + 1e-12)).max()))
    norm = float(np.linalg.norm(r64) * np.linalg.norm(o64))
    cosine = float(np.real(np.vdot(r64, o64)) / norm) if norm > 0 else (1.0 if diff.size == 0 or diff.max() == 0 else 0.0)
    result.cosine = min(result.cosine, cosine)
    if r.ndim in (2, 3) and r.shape[-1] > 1 and r.dtype.kind == "f":  # class scores, per-step scores; not feature maps
        top1 = _decided_top1(r64, o64, diff)
        if top1 is not None:
            result.top1 = top1 if result.top1 is None else min(result.top1, top1)
    if tol.rtol is not None and tol.atol is not None and diff.size:
        scale = max(1.0, float(np.abs(r64).max()))
        if not np.all(diff <= tol.atol * scale + tol.rtol * np.abs(r64)):
            result.passed, result.reason = False, f"max abs diff {result.max_abs:.3g} exceeds atol={tol.atol} rtol={tol.rtol}"
    if tol.min_cosine is not None and result.cosine < tol.min_cosine:
        result.passed, result.reason = False, f"cosine {result.cosine:.6f} < {tol.min_cosine}"
    if tol.min_top1 is not None and result.top1 is not None and result.top1 < tol.min_top1:
        result.passed, result.reason = False, f"top-1 agreement {result.top1:.3f} < {tol.min_top1}"


def _decided_top1(r: np.ndarray, o: np.ndarray, diff: np.ndarray) -> float | None:
    """Top-1 agreement over the rows whose reference winner leads the runner-up by more than a typical row's error can move.

    Two values each off by at most a row's largest error swap only if they are within twice that of each other.
    Taking the median row's largest error as the noise, a near-tie flipping is noise the cosine already judges (a
    hidden state's argmax is mostly such ties), while a clear winner that changes is a real disagreement, however
    few rows do. None when no row is that clear.
    """
    rows_r, rows_o = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
    if not rows_r.size:
        return None
    noise = 2.0 * float(np.median(diff.reshape(-1, diff.shape[-1]).max(axis=-1)))
    top_two = np.partition(rows_r, -2, axis=-1)[:, -2:]
    decided = top_two[:, 1] - top_two[:, 0] > noise
    if not decided.any():
        return None
    return float(np.mean(np.argmax(rows_r[decided], axis=-1) == np.argmax(rows_o[decided], axis=-1)))


def compare_outputs(reference: Mapping[str, Any], candidate: Mapping[str, Any], precision: str = "fp32") -> VerificationResult:
    """Compare outputs by name with the tolerance of ``precision``."""
    if precision not in TOLERANCES:
        raise OnnxoptError(f"unknown precision '{precision}' (choose from {', '.join(TOLERANCES)})")
    tol = TOLERANCES[precision]
    result = VerificationResult(precision)
    for name, ref in reference.items():
        if name not in candidate:
            result.outputs.append(OutputComparison(name, passed=False, reason="output missing"))
            continue
        result.outputs.append(compare_arrays(name, ref, candidate[name], tol))
    return result


@dataclass
class Verifier:
    """Holds the original model's outputs on fixed inputs, to check rewritten models against."""

    feeds: dict[str, Any]
    reference: dict[str, Any]
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_model(
        cls,
        model: ModelProto,
        *,
        inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        input_shapes: InputShapes | None = None,
        precision: str = "fp32",
        seed: int = 0,
    ) -> Verifier:
        """Run the original model once on given or generated inputs."""
        notes: list[str] = []
        if inputs is None:
            feeds, notes = generate_inputs(model, input_shapes, seed=seed)
        elif isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            feeds = load_inputs(inputs, model)
        try:
            reference = run_model(model, feeds)
        except OnnxoptError as exc:
            hint = guessed_dims_hint(notes)
            where = " on the generated inputs" if hint else ""
            raise OnnxoptError(f"cannot verify: the original model does not run{where} ({exc}){hint}") from exc
        return cls(feeds, reference, precision, notes)

    def check(self, model: ModelProto, precision: str | None = None) -> VerificationResult:
        """Run ``model`` on the stored inputs and compare with the reference (at ``precision``, default the verifier's)."""
        result = compare_outputs(self.reference, run_model(model, self.feeds), precision or self.precision)
        result.notes.extend(self.notes)
        return result


def verify_models(
    original: ModelProto,
    candidate: ModelProto,
    *,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    input_shapes: InputShapes | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> VerificationResult:
    """Compare two models on the same inputs; raises nothing for a mismatch (see ``passed``)."""
    verifier = Verifier.from_model(original, inputs=inputs, input_shapes=input_shapes, precision=precision, seed=seed)
    return verifier.check(candidate)


def require_pass(result: VerificationResult, what: str = "the optimized model") -> None:
    """Raise :class:`VerificationError` naming the worst output when ``result`` failed."""
    if not result.passed:
        bad = result.failures()[0]
        raise VerificationError(f"{what} diverges from the original: output '{bad.name}': {bad.reason}")
