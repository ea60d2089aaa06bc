"""The TensorRT back ends behind one small interface, imported lazily.

Two families share the ONNX parser and builder API: full TensorRT (``tensorrt`` 10.x, 11.x) and
TensorRT for RTX (``tensorrt_rtx_bindings`` from the ``tensorrt-rtx-cu13-bindings`` wheel). Only
strongly typed networks are built: precision lives in the graph (fp16 weights and Casts, Q/DQ).
Nothing here touches the runtime; see :func:`cuda_device_status` before deserializing anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from onnxopt.errors import OnnxoptError, OptionError, RequirementError, one_line

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")

# (module names tried in order, the extra that installs it, how to install it)
_CANDIDATES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorrt": (("tensorrt",), "pip install 'onnxopt[trt]' (tensorrt >= 10.12 from NVIDIA's package index)"),
    "tensorrt-rtx": (
        ("tensorrt_rtx_bindings", "tensorrt_rtx"),
        "pip install 'onnxopt[trt-rtx]' (tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings from PyPI)",
    ),
}
_LABELS = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}


class BackendUnavailableError(RequirementError):
    """The requested TensorRT back end is not installed or does not load."""


class EngineBuildError(OnnxoptError):
    """The builder rejected a network that parsed (its messages are in the error)."""


@dataclass
class Backend:
    """One loaded back end: its module and what it can do."""

    name: str  # "tensorrt" or "tensorrt-rtx"
    module: Any
    version: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``TensorRT 10.13.0`` / ``TensorRT-RTX 1.7.1.116``."""
        return f"{_LABELS[self.name]} {self.version}"

    @property
    def is_rtx(self) -> bool:
        """TensorRT for RTX: CPU-only ahead-of-time builds, kernels compiled at run time."""
        return self.name == "tensorrt-rtx"

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The leading integers of the version (``10.13.0.35`` -> ``(10, 13, 0, 35)``)."""
        return tuple(int(p) for p in re.findall(r"\d+", self.version)[:4])

    @property
    def supports_timing_cache(self) -> bool:
        """Full TensorRT keeps tactic timings; in TensorRT-RTX the API is a no-op that queries for a GPU."""
        return not self.is_rtx

    @property
    def supports_hardware_compat(self) -> bool:
        """Hardware- and version-compatible engines are full TensorRT features."""
        return not self.is_rtx

    @property
    def parser_version(self) -> str:
        """The ONNX parser's version where the bindings expose it."""
        getter = getattr(self.module, "get_nv_onnx_parser_version", None)
        if getter is None:
            return ""
        try:
            value = int(getter())
        except Exception:  # noqa: BLE001  (informational only)
            return ""
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"

    def network_flags(self) -> int:
        """Creation flags for a strongly typed network (the flag on 10.x; implied on 11 and RTX)."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)


def _import(module_name: str) -> Any:
    """Import a back-end module with its deprecation chatter silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module_name)


def _try_load(name: str) -> tuple[Backend | None, str]:
    modules, _ = _CANDIDATES[name]
    reasons = []
    for module_name in modules:
        try:
            module = _import(module_name)
        except ImportError as exc:
            reasons.append(f"{module_name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  (a broken install: missing shared libraries, stub wheels)
            reasons.append(f"{module_name} failed to load ({type(exc).__name__}: {one_line(exc, 160)})")
            continue
        if not hasattr(module, "Builder") or not hasattr(module, "OnnxParser"):
            reasons.append(f"{module_name} has no Builder/OnnxParser (a stub package?)")
            continue
        backend = Backend(name, module, str(getattr(module, "__version__", "unknown")))
        if name == "tensorrt":
            major_minor = backend.version_tuple[:2]
            if major_minor < (10, 12):
                reasons.append(
                    f"tensorrt {backend.version} is older than 10.12, the first with STRONGLY_TYPED networks this project relies on"
                )
                continue
        return backend, ""
    return None, "; ".join(reasons)


def load_backend(name: str = "auto") -> Backend:
    """Load ``tensorrt``, ``tensorrt-rtx`` or, for ``auto``, the first of them that imports.

    Raises :class:`BackendUnavailableError` (one line naming the extra to install) when none does.
    """
    if name not in BACKENDS:
        raise OptionError(f"unknown back end '{name}' (choose from {', '.join(BACKENDS)})")
    names = ["tensorrt", "tensorrt-rtx"] if name == "auto" else [name]
    reasons = {}
    for candidate in names:
        backend, reason = _try_load(candidate)
        if backend is not None:
            return backend
        reasons[candidate] = reason
    if name == "auto":
        raise BackendUnavailableError(
            "no TensorRT back end is installed: "
            + _CANDIDATES["tensorrt-rtx"][1]
            + ", or "
            + _CANDIDATES["tensorrt"][1]
            + f" [{'; '.join(f'{k}: {v}' for k, v in reasons.items())}]"
        )
    raise BackendUnavailableError(f"{_LABELS[name]} is not installed: {_CANDIDATES[name][1]} [{reasons[name]}]")


@dataclass(frozen=True)
class CudaStatus:
    """Whether a CUDA device is usable, and why not."""

    devices: int
    reason: str = ""

    @property
    def available(self) -> bool:
        """At least one device answered."""
        return self.devices > 0


def cuda_device_status() -> CudaStatus:
    """Ask the CUDA driver (libcuda, through ctypes) how many devices there are; never loads TensorRT's runtime."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return CudaStatus(0, "CUDA_VISIBLE_DEVICES hides every device")
    lib = None
    for candidate in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    if lib is None:
        return CudaStatus(0, "no CUDA driver (libcuda not found)")
    try:
        if lib.cuInit(0) != 0:
            return CudaStatus(0, "the CUDA driver found no usable device (cuInit failed)")
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return CudaStatus(0, "the CUDA driver could not count devices")
    except (AttributeError, OSError) as exc:
        return CudaStatus(0, f"the CUDA driver does not answer ({exc})")
    if count.value == 0:
        return CudaStatus(0, "the CUDA driver reports no device")
    return CudaStatus(count.value)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[list[str]]:
    """Send what native code prints on file descriptor 1 (the parser prints node names) to a list, not the terminal."""
    lines: list[str] = []
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded interpreters): nothing to redirect
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        try:
            sys.stdout.flush()
            os.dup2(sink.fileno(), 1)
            yield lines
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def make_logger(backend: Backend) -> Any:
    """A TensorRT logger that keeps warnings and errors for the report instead of printing them."""
    trt = backend.module

    class _Recorder(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: ANN001
            text = one_line(msg, None)
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(text)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(text)

    return _Recorder()
