"""Run a serialized TensorRT / TensorRT-RTX engine on numpy inputs, with cuda-python for device memory.

``EngineRunner(plan_or_path, backend="auto")`` checks for a CUDA device first (through the driver,
never through TensorRT: the TensorRT runtime can crash the process without one), then
deserializes the engine. ``run(feeds)`` returns the outputs as numpy arrays; ``time(feeds)``
returns seconds per execution with the inputs already on the device. Every CUDA call's return
code is checked. Use it as a context manager, or call ``close()``, to free device memory.
"""

from __future__ import annotations

import contextlib
import os
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.engine.backends import Backend, cuda_device_status, load_backend, make_logger
from onnxopt.errors import OnnxoptError, RequirementError

PlanSource = bytes | bytearray | memoryview | str | os.PathLike[str]


class DeviceUnavailableError(RequirementError):
    """No CUDA device answers, so the engine is not run (exit 2: nothing was verified)."""

    exit_code = 2


class EngineRunError(OnnxoptError):
    """The engine does not load, or a CUDA call or an execution failed."""


def read_plan(source: PlanSource) -> tuple[bytes, str]:
    """The plan bytes and a label (`` 'path'`` or empty) from bytes or an engine file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        plan, label = bytes(source), ""
    else:
        label = f" '{os.fspath(source)}'"
        try:
            plan = Path(source).read_bytes()
        except OSError as exc:
            raise OnnxoptError(f"cannot read the engine{label}: {exc.strerror or exc}") from exc
    if not plan:
        raise OnnxoptError(f"the engine{label} is empty")
    return plan, label


def require_device() -> None:
    """Raise :class:`DeviceUnavailableError` with the driver's reason when no CUDA device answers."""
    status = cuda_device_status()
    if not status.available:
        raise DeviceUnavailableError(f"running a TensorRT engine needs a CUDA device: {status.reason}")


def _import_cudart() -> Any:
    """``cuda.bindings.runtime``, or a one-line RequirementError naming what to install."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise RequirementError(
            f"running an engine needs cuda-bindings: pip install cuda-bindings==13.5.0 (or 'onnxopt[trt-rtx]') ({exc})"
        ) from exc
    return cudart


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(cudaError_t, value...)`` result; raise with cudaGetErrorString's text on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        text = ""
        with contextlib.suppress(Exception):
            text = cudart.cudaGetErrorString(err)[1].decode(errors="replace")
        name = getattr(err, "name", str(err))
        raise EngineRunError(f"{what} failed: {name}" + (f" ({text})" if text else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class TensorSpec:
    """One IO tensor of the engine: name, direction, numpy dtype (None when numpy has none) and shape (-1: dynamic)."""

    name: str
    is_input: bool
    dtype: np.dtype | None
    dtype_name: str
    shape: tuple[int, ...]
    on_host: bool = False

    @property
    def dynamic(self) -> bool:
        """At least one dimension is set at run time."""
        return any(d < 0 for d in self.shape)


@dataclass
class _Buffer:
    ptr: int
    nbytes: int


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype | None:
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _tensor_specs(trt: Any, engine: Any) -> list[TensorSpec]:
    specs = []
    host = getattr(getattr(trt, "TensorLocation", None), "HOST", None)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        on_host = host is not None and engine.get_tensor_location(name) == host
        specs.append(
            TensorSpec(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=_numpy_dtype(trt, dtype),
                dtype_name=str(dtype).rsplit(".", 1)[-1].lower(),
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                on_host=on_host,
            )
        )
    return specs


class EngineRunner:
    """A deserialized engine with an execution context, a CUDA stream and reusable device buffers."""

    def __init__(self, plan: PlanSource, backend: str | Backend = "auto", *, device: int = 0) -> None:
        """Read ``plan`` (bytes or a path), check for a CUDA device, then deserialize with ``backend``.

        Raises :class:`DeviceUnavailableError` before anything of TensorRT is loaded when no device
        answers, a RequirementError when cuda-bindings or the back end is missing, and
        :class:`EngineRunError` when the plan does not deserialize.
        """
        self._buffers: dict[str, _Buffer] = {}
        self._staged: dict[str, np.ndarray] = {}
        self._stream: Any = None
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._output_shapes: dict[str, tuple[int, ...]] = {}
        self.tensors: list[TensorSpec] = []
        data, label = read_plan(plan)
        require_device()
        self._cudart = _import_cudart()
        self.backend = backend if isinstance(backend, Backend) else load_backend(backend)
        try:
            _check(self._cudart, self._cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
            self._load(data, label)
            self._stream = _check(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        except BaseException:
            self.close()
            raise

    def _load(self, plan: bytes, label: str) -> None:
        trt = self.backend.module
        self._logger = make_logger(self.backend)
        self._runtime = trt.Runtime(self._logger)
        try:
            self._engine = self._runtime.deserialize_cuda_engine(plan)
        except Exception as exc:  # noqa: BLE001  (the bindings raise for some corrupt plans)
            self._logger.errors.append(f"{type(exc).__name__}: {exc}")
        if self._engine is None:
            why = "; ".join(self._logger.errors[-2:]) or "not an engine of this back end and version"
            raise EngineRunError(
                f"{self.backend.label} cannot load the engine{label} (built by another back end or version, or not an engine?): {why}"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineRunError(f"{self.backend.label} could not create an execution context: " + "; ".join(self._logger.errors[-2:]))
        self.tensors = _tensor_specs(trt, self._engine)

    @property
    def inputs(self) -> list[TensorSpec]:
        """The engine's input tensors, in engine order."""
        return [t for t in self.tensors if t.is_input]

    @property
    def outputs(self) -> list[TensorSpec]:
        """The engine's output tensors, in engine order."""
        return [t for t in self.tensors if not t.is_input]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Copy ``feeds`` to the device, execute once and return every output by name."""
        self.prepare(feeds)
        self.execute()
        return self._copy_out()

    def time(self, feeds: Mapping[str, Any], runs: int = 50, warmup: int = 5) -> list[float]:
        """Seconds per run of execute + synchronize, the inputs copied to the device once beforehand."""
        self.prepare(feeds)
        for _ in range(max(0, warmup)):
            self.execute()
        times = []
        for _ in range(runs):
            start = _time.perf_counter()
            self.execute()
            times.append(_time.perf_counter() - start)
        return times

    def prepare(self, feeds: Mapping[str, Any]) -> None:
        """Check ``feeds`` against the engine's inputs, set their shapes, copy them in and bind the outputs."""
        self._check_names(feeds)
        for spec in self.inputs:
            self._bind_input(spec, feeds[spec.name])
        self._bind_outputs()
        self._sync()

    def execute(self) -> None:
        """Enqueue one execution on the stream and wait for it (``prepare`` first)."""
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineRunError("the engine failed to execute: " + ("; ".join(self._logger.errors[-2:]) or "no message from TensorRT"))
        self._sync()

    def _check_names(self, feeds: Mapping[str, Any]) -> None:
        names = [t.name for t in self.inputs]
        listed = ", ".join(names)
        missing = [n for n in names if n not in feeds]
        if missing:
            raise OnnxoptError(f"no value for engine input '{missing[0]}' (engine inputs: {listed})")
        extra = sorted(set(feeds) - set(names))
        if extra:
            raise OnnxoptError(f"'{extra[0]}' is not an engine input (engine inputs: {listed})")

    def _bind_input(self, spec: TensorSpec, value: Any) -> None:
        array = np.asarray(value, order="C")  # (ascontiguousarray makes a scalar 1-d)
        if spec.dtype is None:
            raise OnnxoptError(f"engine input '{spec.name}' is {spec.dtype_name}, which numpy cannot hold; EngineRunner does not feed it")
        if array.dtype != spec.dtype:
            raise OnnxoptError(f"input '{spec.name}' is {array.dtype}, the engine wants {spec.dtype}")
        self._check_shape(spec, array.shape)
        self._staged[spec.name] = array  # alive until the copy is synchronized (or, on the host, until execution)
        if spec.on_host:
            self._set_address(spec.name, array.ctypes.data)
            return
        buffer = self._device_buffer(spec.name, array.nbytes)
        if array.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            result = self._cudart.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes, kind, self._stream)
            _check(self._cudart, result, f"copying input '{spec.name}' to the device (cudaMemcpyAsync)")
        self._set_address(spec.name, buffer.ptr)

    def _check_shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        if len(shape) != len(spec.shape) or any(e >= 0 and e != d for e, d in zip(spec.shape, shape)):
            raise OnnxoptError(f"input '{spec.name}' has shape {list(shape)}, the engine's input is {list(spec.shape)} (-1: dynamic)")
        if spec.dynamic and not self._context.set_input_shape(spec.name, shape):
            lo, _, hi = (list(d) for d in self._engine.get_tensor_profile_shape(spec.name, 0))
            raise OnnxoptError(f"input '{spec.name}' shape {list(shape)} is outside the engine's profile (min {lo}, max {hi})")

    def _bind_outputs(self) -> None:
        self._output_shapes = {}
        for spec in self.outputs:
            if spec.dtype is None:
                raise OnnxoptError(f"engine output '{spec.name}' is {spec.dtype_name}, which numpy cannot hold; not readable here")
            if spec.on_host:
                raise OnnxoptError(f"engine output '{spec.name}' lives in host memory (a shape tensor), not supported here")
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise OnnxoptError(f"engine output '{spec.name}' has a data-dependent shape {list(shape)}, not supported here")
            nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
            self._set_address(spec.name, self._device_buffer(spec.name, nbytes).ptr)
            self._output_shapes[spec.name] = shape

    def _copy_out(self) -> dict[str, np.ndarray]:
        outputs = {}
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.outputs:
            host = np.empty(self._output_shapes[spec.name], dtype=spec.dtype)
            if host.nbytes:
                result = self._cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[spec.name].ptr, host.nbytes, kind, self._stream)
                _check(self._cudart, result, f"copying output '{spec.name}' from the device (cudaMemcpyAsync)")
            outputs[spec.name] = host
        self._sync()
        return outputs

    def _device_buffer(self, name: str, nbytes: int) -> _Buffer:
        """The tensor's device buffer, reallocated only when it must grow."""
        buffer = self._buffers.get(name)
        if buffer is not None and buffer.nbytes >= nbytes:
            return buffer
        if buffer is not None:
            self._sync()
            _check(self._cudart, self._cudart.cudaFree(buffer.ptr), "cudaFree")
            del self._buffers[name]
        size = max(int(nbytes), 1)
        ptr = _check(self._cudart, self._cudart.cudaMalloc(size), f"allocating {size} bytes for '{name}' (cudaMalloc)")
        self._buffers[name] = buffer = _Buffer(int(ptr), size)
        return buffer

    def _set_address(self, name: str, address: int) -> None:
        if not self._context.set_tensor_address(name, int(address)):
            raise EngineRunError(f"TensorRT rejected the address of tensor '{name}': " + "; ".join(self._logger.errors[-2:]))

    def _sync(self) -> None:
        _check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free the device buffers and the stream, then release the context, engine and runtime (idempotent)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is not None:
            if self._stream is not None:
                with contextlib.suppress(Exception):
                    cudart.cudaStreamSynchronize(self._stream)
            for buffer in self._buffers.values():
                with contextlib.suppress(Exception):
                    cudart.cudaFree(buffer.ptr)
            if self._stream is not None:
                with contextlib.suppress(Exception):
                    cudart.cudaStreamDestroy(self._stream)
        self._buffers, self._staged, self._stream = {}, {}, None
        self._context = None  # the context before the engine, the engine before the runtime
        self._engine = None
        self._runtime = None

    def __enter__(self) -> EngineRunner:
        """The runner itself; closed on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Free everything."""
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
