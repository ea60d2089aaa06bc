"""EngineRunner, ``onnxopt verify --engine`` and ``onnxopt bench --engine``.

Without a CUDA device nothing of TensorRT's runtime may be touched: those tests run everywhere
(``CUDA_VISIBLE_DEVICES=""`` hides devices where there are some). The runner's own logic (names,
dtypes, shapes, profiles, buffer reuse, CUDA error codes, clean-up) is tested on the CPU against
a fake CUDA runtime and a fake engine that computes ``2x + 1`` in host memory. The tests marked
``gpu`` build real TensorRT-RTX engines and run them; they skip, with the driver's reason, without
a device.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from engine_models import matmul_net
from helpers import make_model, tensor_input
from onnx import helper

from onnxopt.cli import main
from onnxopt.engine import Backend, CudaStatus, DeviceUnavailableError, EngineRunner, build_engine, cuda_device_status
from onnxopt.engine import runtime as rt
from onnxopt.errors import OnnxoptError, RequirementError
from onnxopt.verify import compare_outputs, generate_inputs, run_model

STATUS = cuda_device_status()
needs_gpu = pytest.mark.skipif(not STATUS.available, reason=f"needs a CUDA device: {STATUS.reason}")
FAKE_PLAN = b"FAKE-ENGINE-PLAN"


def _run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("onnxopt: error: ")
    return lines[0]


def _stdout(result) -> str:
    return getattr(result, "stdout", result.output)


# --- a fake CUDA runtime and a fake TensorRT module -------------------------------------------


class FakeStream:
    def __int__(self) -> int:
        return 7


class FakeCudart:
    """The calls EngineRunner makes, on host memory; ``fail`` makes that call return an error."""

    class cudaError_t(enum.IntEnum):  # noqa: N801  (cuda-python's names)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.memory: dict[int, ctypes.Array] = {}
        self.mallocs = 0
        self.fail = ""
        self.stream = None
        self.destroyed = 0
        self.copies: list[int] = []

    def _ok(self, name: str, *values):
        if self.fail == name:
            return (self.cudaError_t.cudaErrorMemoryAllocation, *([None] * len(values)))
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaSetDevice(self, device):  # noqa: N802
        return self._ok("cudaSetDevice")

    def cudaMalloc(self, size):  # noqa: N802
        if self.fail == "cudaMalloc":
            return self._ok("cudaMalloc", None)
        buffer = ctypes.create_string_buffer(size)
        self.memory[ctypes.addressof(buffer)] = buffer
        self.mallocs += 1
        return self._ok("cudaMalloc", ctypes.addressof(buffer))

    def cudaFree(self, ptr):  # noqa: N802
        del self.memory[int(ptr)]
        return self._ok("cudaFree")

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert stream is self.stream
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        assert device in self.memory and count <= ctypes.sizeof(self.memory[device])
        ctypes.memmove(dst, src, count)
        self.copies.append(int(kind))
        return self._ok("cudaMemcpyAsync")

    def cudaStreamCreate(self):  # noqa: N802
        self.stream = FakeStream()
        return self._ok("cudaStreamCreate", self.stream)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return self._ok("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.destroyed += 1
        return self._ok("cudaStreamDestroy")

    def cudaGetErrorString(self, err):  # noqa: N802
        return (self.cudaError_t.cudaSuccess, b"out of memory")


def _fake_trt(cudart: FakeCudart) -> types.SimpleNamespace:
    """Runtime -> engine (x float32 [-1, 4], profile batch 1..8 -> y = 2x + 1) -> context, on ``cudart``'s memory."""

    class ILogger:
        class Severity(enum.Enum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3

        def __init__(self) -> None:
            pass

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1

    def nptype(dtype):
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[dtype]

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.executions = 0

        def set_input_shape(self, name, shape):
            if name != "x" or len(shape) != 2 or not 1 <= shape[0] <= 8:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes.get("x", (-1, 4))

        def set_tensor_address(self, name, address):
            assert address in cudart.memory, "the engine got a host pointer, not device memory"
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            assert stream == 7
            shape = self.shapes["x"]
            count = int(np.prod(shape))
            x = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["x"]), np.float32).reshape(shape)
            y = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["y"]), np.float32).reshape(shape)
            y[...] = 2 * x + 1
            self.executions += 1
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self) -> None:
            self.contexts: list[Context] = []

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "x" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def get_tensor_shape(self, name):
            return (-1, 4)

        def get_tensor_profile_shape(self, name, index):
            return [(1, 4), (2, 4), (8, 4)]

        def create_execution_context(self):
            self.contexts.append(Context())
            return self.contexts[-1]

    class Runtime:
        engines: list[Engine] = []

        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            if plan != FAKE_PLAN:
                self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag mismatch)")
                return None
            Runtime.engines.append(Engine())
            return Runtime.engines[-1]

    return types.SimpleNamespace(ILogger=ILogger, TensorIOMode=TensorIOMode, DataType=DataType, nptype=nptype, Runtime=Runtime)


@pytest.fixture
def fake(monkeypatch):
    """A fake device: cuda_device_status answers, cudart and the back end are fakes."""
    cudart = FakeCudart()
    backend = Backend("tensorrt-rtx", _fake_trt(cudart), "0.0-fake")
    monkeypatch.setattr(rt, "cuda_device_status", lambda: CudaStatus(1))
    monkeypatch.setattr(rt, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(rt, "load_backend", lambda name="auto": backend)
    return types.SimpleNamespace(cudart=cudart, backend=backend)


def _x(batch: int) -> np.ndarray:
    return np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) / 7


def _affine_model(offset: float = 1.0):
    """y = 2x + offset on x[N, 4]: what the fake engine computes when offset is 1."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.array(2, np.float32), "two"), onnx.numpy_helper.from_array(np.array(offset, np.float32), "b")]
    return make_model(nodes, [tensor_input("x", ["N", 4])], [tensor_input("y", ["N", 4])], inits)


# --- no device: the TensorRT runtime is never touched -------------------------------------------


class _RecordingModule:
    """A back-end module whose Runtime records being constructed (it must not be)."""

    def __init__(self) -> None:
        self.runtimes: list[object] = []

        class Runtime:
            def __init__(inner, logger) -> None:  # noqa: N805
                self.runtimes.append(inner)

        self.Runtime = Runtime


def test_no_device_raises_before_the_runtime_is_constructed(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reason = cuda_device_status().reason
    assert reason
    module = _RecordingModule()
    with pytest.raises(DeviceUnavailableError) as info:
        EngineRunner(FAKE_PLAN, Backend("tensorrt-rtx", module, "0.0-stub"))
    assert str(info.value) == f"running a TensorRT engine needs a CUDA device: {reason}"
    assert info.value.exit_code == 2 and isinstance(info.value, RequirementError)
    assert module.runtimes == []


def test_no_device_by_name_loads_no_back_end(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    loaded = []
    monkeypatch.setattr(rt, "load_backend", lambda name="auto": loaded.append(name))
    with pytest.raises(DeviceUnavailableError, match="CUDA_VISIBLE_DEVICES hides every device"):
        EngineRunner(FAKE_PLAN, "tensorrt-rtx")
    assert loaded == []


@pytest.mark.skipif(STATUS.available, reason="a CUDA device is present")
def test_no_device_here_names_the_drivers_reason():
    module = _RecordingModule()
    with pytest.raises(DeviceUnavailableError) as info:
        EngineRunner(FAKE_PLAN, Backend("tensorrt-rtx", module, "0.0-stub"))
    assert STATUS.reason in str(info.value) and module.runtimes == []


def test_missing_cuda_bindings_names_the_package(monkeypatch):
    monkeypatch.setattr(rt, "cuda_device_status", lambda: CudaStatus(1))
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    module = _RecordingModule()
    with pytest.raises(RequirementError, match=r"pip install cuda-bindings==13\.5\.0 \(or 'onnxopt\[trt-rtx\]'\)"):
        EngineRunner(FAKE_PLAN, Backend("tensorrt-rtx", module, "0.0-stub"))
    assert module.runtimes == []


def test_unreadable_and_empty_engine_files(tmp_path):
    with pytest.raises(OnnxoptError, match="cannot read the engine '.*missing.engine': No such file"):
        EngineRunner(tmp_path / "missing.engine")
    (tmp_path / "empty.engine").write_bytes(b"")
    with pytest.raises(OnnxoptError, match="the engine '.*empty.engine' is empty"):
        EngineRunner(tmp_path / "empty.engine")


def test_verify_engine_without_device_exits_2_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reason = cuda_device_status().reason
    model = tmp_path / "a.onnx"
    onnx.save(_affine_model(), str(model))
    (tmp_path / "a.engine").write_bytes(FAKE_PLAN)
    result = _run("verify", model, "--engine", tmp_path / "a.engine")
    assert result.exit_code == 2
    assert _error_line(result) == f"onnxopt: error: cannot verify the engine: running a TensorRT engine needs a CUDA device: {reason}"
    both = _run("verify", model, model, "--engine", tmp_path / "a.engine", "--json")
    assert both.exit_code == 2 and "passed" not in both.output


def test_verify_needs_a_candidate_or_an_engine(tmp_path):
    model = tmp_path / "a.onnx"
    onnx.save(_affine_model(), str(model))
    result = _run("verify", model)
    assert result.exit_code == 2
    assert "give B.onnx, --engine E.engine, or both" in _error_line(result)


def test_bench_engine_without_device_is_skipped_with_exit_0(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reason = cuda_device_status().reason
    model = tmp_path / "a.onnx"
    onnx.save(_affine_model(), str(model))
    (tmp_path / "a.engine").write_bytes(FAKE_PLAN)
    result = _run("bench", model, "--engine", tmp_path / "a.engine", "--runs", "3", "--json")
    assert result.exit_code == 0, result.output
    engine = json.loads(_stdout(result))["results"][1]
    assert engine["skipped"] == f"running a TensorRT engine needs a CUDA device: {reason}" and engine["median_ms"] is None


# --- the runner's logic on a fake device --------------------------------------------------------


def test_run_copies_in_executes_and_copies_out(fake, tmp_path):
    path = tmp_path / "fake.engine"
    path.write_bytes(FAKE_PLAN)
    with EngineRunner(path, "tensorrt-rtx") as runner:
        assert [t.name for t in runner.inputs] == ["x"] and [t.name for t in runner.outputs] == ["y"]
        out = runner.run({"x": _x(3)})
        np.testing.assert_array_equal(out["y"], 2 * _x(3) + 1)
        assert out["y"].dtype == np.float32 and out["y"].shape == (3, 4)
        assert fake.cudart.copies == [1, 2]
    assert fake.cudart.memory == {} and fake.cudart.destroyed == 1


def test_buffers_are_reused_and_grow_only_when_needed(fake):
    runner = EngineRunner(FAKE_PLAN, "tensorrt-rtx")
    for batch, mallocs in ((3, 2), (3, 2), (1, 2), (8, 4), (2, 4)):
        np.testing.assert_array_equal(runner.run({"x": _x(batch)})["y"], 2 * _x(batch) + 1)
        assert fake.cudart.mallocs == mallocs, batch
        assert len(fake.cudart.memory) == 2
    runner.close()
    runner.close()
    assert fake.cudart.memory == {} and fake.cudart.destroyed == 1


def test_input_errors_are_one_clear_line(fake):
    runner = EngineRunner(FAKE_PLAN, "tensorrt-rtx")
    cases = [
        ({}, "no value for engine input 'x' (engine inputs: x)"),
        ({"x": _x(2), "z": _x(2)}, "'z' is not an engine input (engine inputs: x)"),
        ({"x": _x(2).astype(np.float64)}, "input 'x' is float64, the engine wants float32"),
        ({"x": np.zeros((2, 5), np.float32)}, "input 'x' has shape [2, 5], the engine's input is [-1, 4] (-1: dynamic)"),
        ({"x": np.zeros((2, 4, 1), np.float32)}, "input 'x' has shape [2, 4, 1]"),
        ({"x": _x(9)}, "input 'x' shape [9, 4] is outside the engine's profile (min [1, 4], max [8, 4])"),
    ]
    for feeds, message in cases:
        with pytest.raises(OnnxoptError) as info:
            runner.run(feeds)
        assert message in str(info.value) and "\n" not in str(info.value)
    np.testing.assert_array_equal(runner.run({"x": _x(8)})["y"], 2 * _x(8) + 1)  # still usable
    runner.close()


def test_time_executes_with_inputs_already_on_the_device(fake):
    with EngineRunner(FAKE_PLAN, "tensorrt-rtx") as runner:
        times = runner.time({"x": _x(4)}, runs=6, warmup=2)
        context = fake.backend.module.Runtime.engines[-1].contexts[-1]
        assert len(times) == 6 and all(t > 0 for t in times)
        assert context.executions == 8
        assert fake.cudart.copies == [1]  # one copy in, none per run


def test_cuda_errors_carry_the_error_string(fake):
    fake.cudart.fail = "cudaMalloc"
    runner = EngineRunner(FAKE_PLAN, "tensorrt-rtx")
    with pytest.raises(rt.EngineRunError) as info:
        runner.run({"x": _x(2)})
    assert str(info.value) == "allocating 32 bytes for 'x' (cudaMalloc) failed: cudaErrorMemoryAllocation (out of memory)"
    runner.close()
    fake.cudart.fail = "cudaStreamCreate"
    with pytest.raises(rt.EngineRunError, match="cudaStreamCreate failed: cudaErrorMemoryAllocation"):
        EngineRunner(FAKE_PLAN, "tensorrt-rtx")


def test_a_plan_that_does_not_deserialize_is_one_line(fake):
    with pytest.raises(rt.EngineRunError) as info:
        EngineRunner(b"not an engine", "tensorrt-rtx")
    message = str(info.value)
    assert message.startswith("TensorRT-RTX 0.0-fake cannot load the engine (built by another back end or version, or not an engine?)")
    assert "magic tag mismatch" in message and "\n" not in message
    assert fake.cudart.memory == {}


def test_verify_engine_on_the_fake_device(fake, tmp_path):
    same, other = tmp_path / "same.onnx", tmp_path / "other.onnx"
    onnx.save(_affine_model(1.0), str(same))
    onnx.save(_affine_model(1.5), str(other))
    engine = tmp_path / "fake.engine"
    engine.write_bytes(FAKE_PLAN)
    ok = _run("verify", same, "--engine", engine, "--input-shape", "x:4x4")
    assert ok.exit_code == 0, ok.output
    assert f"engine {engine}: verification passed (fp32)" in ok.output
    bad = _run("verify", other, "--engine", engine, "--input-shape", "x:4x4", "--json")
    assert bad.exit_code == 3
    data = json.loads(_stdout(bad))
    assert data["passed"] is False and data["engine"] == str(engine) and data["outputs"][0]["max_abs"] == pytest.approx(0.5)
    both = _run("verify", same, other, "--engine", engine, "--json")
    assert both.exit_code == 3
    data = json.loads(_stdout(both))
    assert data["engine"]["passed"] is True and data["candidate"]["passed"] is False and data["passed"] is False


def test_bench_times_the_engine_on_the_fake_device(fake, tmp_path):
    from onnxopt.bench import benchmark

    engine = tmp_path / "fake.engine"
    engine.write_bytes(FAKE_PLAN)
    result = benchmark({"model": _affine_model()}, engines=[engine], runs=5, warmup=1, input_shapes={"x": (2, 4)})
    entry = result.entry(str(engine))
    assert entry.kind == "engine" and not entry.skipped and entry.stats.runs == 5
    assert entry.ratio == pytest.approx(entry.stats.median_ms / result.entries[0].stats.median_ms)
    assert fake.cudart.memory == {}  # closed after timing


# --- a real device -------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_matches_onnxruntime(rtx):
    model = matmul_net()
    plan = build_engine(model, backend=rtx).plan
    feeds, _ = generate_inputs(model)
    reference = run_model(model, feeds)
    with EngineRunner(plan, rtx) as runner:
        out = runner.run(feeds)
        again = runner.run(feeds)
    assert list(out) == ["y"] and out["y"].shape == reference["y"].shape
    assert _cosine(out["y"], reference["y"]) > 0.9999
    np.testing.assert_array_equal(out["y"], again["y"])
    assert compare_outputs(reference, out, "fp16").passed


@pytest.mark.gpu
@needs_gpu
def test_gpu_dynamic_engine_runs_at_two_shapes(rtx):
    model = matmul_net(batch="N")
    plan = build_engine(model, backend=rtx, shapes=["x:1x16/4x16/8x16"]).plan
    with EngineRunner(plan, rtx) as runner:
        for batch in (1, 8, 3):
            feeds, _ = generate_inputs(model, {"x": (batch, 16)}, seed=batch)
            out = runner.run(feeds)["y"]
            assert out.shape == (batch, 8)
            assert _cosine(out, run_model(model, feeds)["y"]) > 0.9999
        with pytest.raises(OnnxoptError, match=r"outside the engine's profile \(min \[1, 16\], max \[8, 16\]\)"):
            runner.run({"x": np.zeros((9, 16), np.float32)})


@pytest.mark.gpu
@needs_gpu
def test_gpu_verify_and_bench_cli(rtx, tmp_path):
    model_path, engine = tmp_path / "mlp.onnx", tmp_path / "mlp.engine"
    onnx.save(matmul_net(), str(model_path))
    build_engine(matmul_net(), backend=rtx).save(engine)
    # fp16 tolerance (cosine, top-1): FP32 matmuls may run in TF32, a few 1e-4 off float32 rounding
    verified = _run("verify", model_path, "--engine", engine, "--backend", "tensorrt-rtx", "--precision", "fp16", "--json")
    assert verified.exit_code == 0, verified.output
    data = json.loads(_stdout(verified))
    assert data["passed"] is True and data["outputs"][0]["cosine"] > 0.9999
    bench = _run("bench", model_path, "--engine", engine, "--backend", "tensorrt-rtx", "--runs", "20", "--json")
    assert bench.exit_code == 0, bench.output
    entry = json.loads(_stdout(bench))["results"][1]
    assert entry["kind"] == "engine" and entry["skipped"] is None and entry["median_ms"] > 0
