"""The ONNX backend node tests as a conformance suite for the cleanup pipeline.

onnx 1.23 no longer ships the node-test files; ``load_model_tests(kind="node")`` builds
them in memory. They are materialized once per onnx version into
``$ONNXOPT_CACHE/onnx-node-tests/<version>/`` in the files' usual layout (``model.onnx``,
``test_data_set_0/input_N.pb``, ``output_N.pb``) plus an ``index.json`` with the case names,
so collection only reads the index. Each case: run the original in onnxruntime (CPU, graph
optimizations off); a case onnxruntime cannot load or run, or computes outside the case's
tolerance, is "not run by onnxruntime" and skipped. Otherwise optimize without fault
isolation (a pass bug fails the case instead of being rolled back), require the onnx
checker at the level the original passes, run the result and compare with the expected
outputs at the case's rtol/atol. Every case runs twice: as written (inputs fed at run time)
and with its inputs baked in as initializers, where constant folding has to compute the op.
A failing case names the first pass that broke it (the pipeline rerun with a check after
every pass).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, TypeProto, helper, numpy_helper

import onnxopt
from models.real import cache_root
from onnxopt.errors import VerificationError, one_line
from onnxopt.graph import GraphScope
from onnxopt.manager import PassManager
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.verify import OutputComparison, VerificationResult

PASSES = "default"
# A floor against a suite that silently stops exercising cases. Which cases onnxruntime itself runs
# correctly moves with its build: 1740 / 1722 (inputs / constant inputs) were seen on one machine,
# 1716 / 1698 with onnxruntime 1.32.0, onnx 1.23.2 and numpy 2.4 on another.
MIN_EXERCISED = 1650

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ the case store


def store_dir() -> Path:
    """Where this onnx version's node tests are materialized."""
    return cache_root() / "onnx-node-tests" / onnx.__version__


def _encode(value: Any, type_proto: TypeProto, name: str) -> bytes:
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(value, name).SerializeToString()
    if kind == "optional_type":
        return numpy_helper.from_optional(value, name).SerializeToString()
    if kind == "map_type":
        return numpy_helper.from_dict(value, name).SerializeToString()
    tensor = value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(np.asarray(value), name)
    return tensor.SerializeToString()


def _decode(path: Path, type_proto: TypeProto) -> Any:
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.to_list(_parse(onnx.SequenceProto, data))
    if kind == "optional_type":
        return numpy_helper.to_optional(_parse(onnx.OptionalProto, data))
    if kind == "map_type":
        return numpy_helper.to_dict(_parse(onnx.MapProto, data))
    return numpy_helper.to_array(_parse(onnx.TensorProto, data))


def _parse(cls: type, data: bytes) -> Any:
    message = cls()
    message.ParseFromString(data)
    return message


def _write_cases(root: Path) -> list[dict]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow casts on purpose
        cases = load_model_tests(kind="node")
    index = []
    for case in sorted(cases, key=lambda c: c.name):
        folder = root / case.name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(case.model.SerializeToString(deterministic=True))
        for number, (inputs, outputs) in enumerate(case.data_sets):
            data_dir = folder / f"test_data_set_{number}"
            data_dir.mkdir()
            for prefix, values, infos in (("input", inputs, case.model.graph.input), ("output", outputs, case.model.graph.output)):
                for i, (value, info) in enumerate(zip(values, infos)):
                    (data_dir / f"{prefix}_{i}.pb").write_bytes(_encode(value, info.type, info.name))
        index.append({"name": case.name, "rtol": case.rtol, "atol": case.atol})
    return index


@lru_cache(maxsize=1)
def case_index() -> dict[str, dict]:
    """Case name -> {name, rtol, atol}, materializing the cases on first use (atomically)."""
    root = store_dir()
    if not (root / "index.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root.parent))
        try:
            index = _write_cases(tmp)
            (tmp / "index.json").write_text(json.dumps({"onnx": onnx.__version__, "cases": index}, indent=1))
            try:
                os.replace(tmp, root)
            except OSError:
                if not (root / "index.json").is_file():  # not another process winning the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    entries = json.loads((root / "index.json").read_text())["cases"]
    return {entry["name"]: entry for entry in entries}


def load_case(name: str) -> tuple[ModelProto, list[tuple[dict[str, Any], list[Any]]]]:
    """The case's model and its data sets as (feeds by input name, expected outputs in order)."""
    folder = store_dir() / name
    model = onnx.load(folder / "model.onnx")
    data_sets = []
    for data_dir in sorted(folder.glob("test_data_set_*")):
        inputs = model.graph.input
        feeds = {
            info.name: _decode(data_dir / f"input_{i}.pb", info.type)
            for i, info in enumerate(inputs)
            if (data_dir / f"input_{i}.pb").exists()
        }
        expected = [_decode(data_dir / f"output_{i}.pb", info.type) for i, info in enumerate(model.graph.output)]
        data_sets.append((feeds, expected))
    return model, data_sets


# ------------------------------------------------------------------ running and comparing


def _ml_dtype(dtype: np.dtype) -> bool:
    """True for the ml_dtypes types (bfloat16, float8, int4, int2, float4) numpy and onnxruntime's feeds lack."""
    return dtype.isbuiltin == 2  # a user-defined numpy type


def _as_comparable(array: np.ndarray) -> np.ndarray:
    """ml_dtypes arrays as float32 so numpy can compare them."""
    return array.astype(np.float32) if _ml_dtype(array.dtype) else array


def mismatch(expected: Any, actual: Any, rtol: float, atol: float) -> str:
    """Why ``actual`` is not ``expected`` within rtol/atol, or "" when it is."""
    if expected is None or actual is None:
        return "" if expected is None and actual is None else f"got {type(actual).__name__}, expected {type(expected).__name__}"
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"got {type(actual).__name__}, expected a sequence"
        if len(actual) != len(expected):
            return f"sequence of {len(actual)}, expected {len(expected)}"
        return next((f"item {i}: {m}" for i, (e, a) in enumerate(zip(expected, actual)) if (m := mismatch(e, a, rtol, atol))), "")
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    if expected.dtype.kind in "OUSb":
        return "" if np.array_equal(expected, actual) else "values differ"
    expected, actual = _as_comparable(expected).astype(np.float64), _as_comparable(actual).astype(np.float64)
    if np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
        return ""
    diff = np.abs(actual - expected)
    return f"max abs diff {np.nanmax(diff):.3g} (rtol={rtol}, atol={atol})"


def make_session(model: ModelProto) -> Any:
    """A quiet single-threaded CPU session with graph optimizations off."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _exotic(elem_type: int) -> bool:
    """True for element types numpy lacks (onnx maps them to ml_dtypes)."""
    try:
        return _ml_dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        return False


def _to_ortvalue(value: Any) -> Any:
    """An OrtValue for a tensor feed; ml_dtypes arrays go in as ONNX's (packed) raw bytes."""
    array = np.asarray(value)
    if not _ml_dtype(array.dtype):
        return ort.OrtValue.ortvalue_from_numpy(array)
    raw = np.frombuffer(numpy_helper.from_array(array).raw_data, np.uint8)
    if array.dtype.itemsize == 2:
        buffer = raw.view(np.uint16).reshape(array.shape)
    else:  # onnxruntime reads the packed bytes from the front of a buffer shaped like the tensor
        buffer = np.zeros(array.shape, np.uint8)
        buffer.reshape(-1)[: raw.size] = raw
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buffer, helper.np_dtype_to_tensor_dtype(array.dtype))


def _from_ortvalue(value: Any, elem_type: int) -> np.ndarray:
    """A numpy (or ml_dtypes) array from an output OrtValue of an exotic element type."""
    expected = f"tensor({TensorProto.DataType.Name(elem_type).lower()})"
    if value.data_type() != expected:
        raise TypeError(f"onnxruntime returned {value.data_type()}, the graph declares {expected}")
    raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return numpy_helper.to_array(helper.make_tensor("out", elem_type, value.shape(), raw, raw=True))


def run(session: Any, model: ModelProto, feeds: dict[str, Any]) -> list[Any]:
    """Outputs in graph-output order; OrtValues carry the types numpy lacks in and out."""
    names = [o.name for o in model.graph.output]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    out_types = [o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0 for o in model.graph.output]
    if not any(_exotic(t) for t in out_types) and not any(isinstance(v, np.ndarray) and _ml_dtype(v.dtype) for v in feeds.values()):
        return session.run(names, feeds, quiet)
    values = session.run_with_ort_values(names, {k: _to_ortvalue(v) for k, v in feeds.items()}, quiet)
    return [_from_ortvalue(v, t) if _exotic(t) else v.numpy() for v, t in zip(values, out_types)]


def checker_level(model: ModelProto) -> int:
    """2 when ``model`` passes the full check (with shape inference), 1 for the basic check, else 0."""
    for level, full in ((2, True), (1, False)):
        try:
            onnx.checker.check_model(model, full_check=full)
            return level
        except Exception:
            continue
    return 0


@dataclass(frozen=True)
class Outcome:
    """What happened to one case: status 'excluded', 'passed' or 'failed', the stage and why."""

    status: str
    stage: str = ""
    detail: str = ""
    changed_by: tuple[str, ...] = ()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc, 300)}"


DataSets = list[tuple[dict[str, Any], list[Any]]]


def _first_mismatch(names: list[str], expected: list[Any], actual: list[Any], rtol: float, atol: float) -> str:
    return next((f"output '{n}': {m}" for n, e, a in zip(names, expected, actual) if (m := mismatch(e, a, rtol, atol))), "")


def check_candidate(
    model: ModelProto, level: int, names: list[str], data_sets: DataSets, rtol: float, atol: float
) -> tuple[str, str] | None:
    """(stage, reason) of the first problem of a rewritten model, or None when it is correct."""
    if level:
        try:
            onnx.checker.check_model(model, full_check=level == 2)
        except Exception as exc:
            return f"checker ({'full' if level == 2 else 'basic'})", _short(exc)
    if [o.name for o in model.graph.output] != names:
        return "interface", f"outputs {[o.name for o in model.graph.output]}, expected {names}"
    try:
        session = make_session(model)
    except Exception as exc:
        return "onnxruntime cannot load the optimized model", _short(exc)
    for feeds, expected in data_sets:
        try:
            actual = run(session, model, feeds)
        except Exception as exc:
            return "onnxruntime fails to run the optimized model", _short(exc)
        if bad := _first_mismatch(names, expected, actual, rtol, atol):
            return "outputs", bad
    return None


@dataclass
class CaseVerifier:
    """A PassManager verifier that checks every intermediate model against the case (to blame a pass)."""

    level: int
    names: list[str]
    data_sets: DataSets
    rtol: float
    atol: float

    def check(self, model: ModelProto) -> VerificationResult:
        """The case's checks as a VerificationResult (one failing entry per problem)."""
        result = VerificationResult("case")
        problem = check_candidate(model, self.level, self.names, self.data_sets, self.rtol, self.atol)
        if problem:
            result.outputs.append(OutputComparison(problem[0], passed=False, reason=problem[1]))
        return result


def blame(model: ModelProto, verifier: CaseVerifier) -> str:
    """Rerun the pipeline checking after every changing pass; names the first pass that broke the case."""
    working = ModelProto()
    working.CopyFrom(model)
    manager = PassManager.from_spec(PASSES, verify="each", isolate=False)
    manager.verifier = verifier
    try:
        manager.run(working)
    except VerificationError as exc:  # "pass 'x' (step s, iteration i) diverges from the original: ..."
        return f"first broken by {str(exc).partition(' diverges')[0]}"
    except Exception as exc:
        return f"the pipeline raised {_short(exc)}"
    return "no single pass diverged when checked one by one"


def with_constant_inputs(model: ModelProto, feeds: dict[str, Any]) -> ModelProto | None:
    """The case with its inputs baked in as initializers (None unless every input is a given tensor).

    From IR 4 on the inputs are removed, so their values are constants the pipeline may
    fold. Below IR 4 an initializer must stay a graph input (onnxruntime then does not
    accept a feed for it, so the case runs on the baked-in values either way).
    """
    if any(info.type.WhichOneof("value") != "tensor_type" or info.name not in feeds for info in model.graph.input):
        return None
    variant = ModelProto()
    variant.CopyFrom(model)
    variant.graph.initializer.extend(numpy_helper.from_array(np.asarray(feeds[i.name]), i.name) for i in model.graph.input)
    if variant.ir_version >= 4:
        del variant.graph.input[:]
    return variant


def evaluate(name: str, constant_inputs: bool = False) -> Outcome:
    """Run one case through onnxruntime, the pipeline, the checker and onnxruntime again."""
    entry = case_index()[name]
    rtol, atol = entry["rtol"], entry["atol"]
    model, data_sets = load_case(name)
    if constant_inputs:
        variant = with_constant_inputs(model, data_sets[0][0]) if len(data_sets) == 1 else None
        if variant is None:
            return Outcome("excluded", "inputs cannot be initializers (not tensors)")
        model, data_sets = variant, [({}, data_sets[0][1])]
    try:
        session = make_session(model)
    except Exception as exc:
        return Outcome("excluded", "onnxruntime cannot load the original", _short(exc))
    names = [o.name for o in model.graph.output]
    for feeds, expected in data_sets:
        try:
            actual = run(session, model, feeds)
        except Exception as exc:
            return Outcome("excluded", "onnxruntime fails to run the original", _short(exc))
        if bad := _first_mismatch(names, expected, actual, rtol, atol):
            return Outcome("excluded", "onnxruntime's result is outside the case's tolerance", bad)
    try:
        result = onnxopt.optimize(model, PASSES, isolate=False)
    except Exception as exc:
        return Outcome("failed", "optimize", _short(exc))
    changed_by = tuple(dict.fromkeys(r.name for r in result.report.changed_passes()))
    verifier = CaseVerifier(checker_level(model), names, data_sets, rtol, atol)
    problem = verifier.check(result.model).failures()
    if problem:
        return Outcome("failed", problem[0].name, f"{problem[0].reason} [{blame(model, verifier)}]", changed_by)
    return Outcome("passed", changed_by=changed_by)


_OUTCOMES: dict[tuple[str, bool], Outcome] = {}


def outcome(name: str, constant_inputs: bool = False) -> Outcome:
    """``evaluate(...)``, memoized for the session (the summary test reuses the per-case runs)."""
    key = (name, constant_inputs)
    if key not in _OUTCOMES:
        _OUTCOMES[key] = evaluate(name, constant_inputs)
    return _OUTCOMES[key]


# ------------------------------------------------------------------ the tests


def _require(name: str, result: Outcome) -> None:
    if result.status == "excluded":
        pytest.skip(f"not run by onnxruntime: {result.stage}")
    assert result.status == "passed", f"{name}: {result.stage}: {result.detail}"


@pytest.mark.parametrize("name", list(case_index()))
def test_node_case(name):
    _require(name, outcome(name))


@pytest.mark.parametrize("name", list(case_index()))
def test_node_case_with_constant_inputs(name):
    """The same case with its inputs as initializers: constant folding must compute what the op does."""
    _require(name, outcome(name, constant_inputs=True))


@pytest.mark.parametrize("constant_inputs", [False, True], ids=["inputs", "constant-inputs"])
def test_conformance_summary(constant_inputs, capsys):
    outcomes = {name: outcome(name, constant_inputs) for name in case_index()}
    counts = Counter(o.status for o in outcomes.values())
    exercised = counts["passed"] + counts["failed"]
    changed = Counter(p for o in outcomes.values() for p in o.changed_by)
    with capsys.disabled():
        print(
            f"\nconformance ({PASSES}, {'constant inputs' if constant_inputs else 'inputs'}): {len(outcomes)} cases, "
            f"{exercised} run by onnxruntime, {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['excluded']} not run; cases changed by pass: {', '.join(f'{p}={n}' for p, n in sorted(changed.items())) or 'none'}"
        )
    assert exercised >= MIN_EXERCISED, f"only {exercised} cases exercised ({dict(counts)})"


class SwapSubInputs(Pass):
    """A deliberately wrong rewrite (a - b becomes b - a), to prove the suite catches one."""

    name = "swap_sub_inputs"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Swap the operands of every Sub."""
        result = PassResult()
        for node in scope.graph.node:
            if node.op_type == "Sub":
                node.input[0], node.input[1] = node.input[1], node.input[0]
                result.count("swapped")
        return result


class Crash(Pass):
    """A pass that raises, to prove failures surface instead of being rolled back."""

    name = "crash"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Raise."""
        raise RuntimeError("boom")


def test_a_wrong_rewrite_fails_its_case_and_is_blamed(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PASSES", [SwapSubInputs()])
    result = evaluate("test_sub")
    assert (result.status, result.stage, result.changed_by) == ("failed", "outputs", ("swap_sub_inputs",))
    assert "pass 'swap_sub_inputs'" in result.detail


def test_a_crashing_pass_fails_its_case(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PASSES", [Crash()])
    result = evaluate("test_relu")
    assert (result.status, result.stage) == ("failed", "optimize") and "boom" in result.detail
