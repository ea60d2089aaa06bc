"""Deployment build step: strongly typed TensorRT / TensorRT-RTX engines from the optimized graph.

``build_engine(model, backend="auto", shapes=..., ...)`` parses (pre-flight), builds and returns
the serialized plan with a :class:`BuildReport`; ``preflight(model)`` only parses and lists what
the parser rejects. Back ends are imported lazily: importing this package needs neither.
``EngineRunner(plan)`` runs an engine (a CUDA device and cuda-bindings needed; checked first).
"""

from __future__ import annotations

from onnxopt.engine.backends import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    CudaStatus,
    EngineBuildError,
    cuda_device_status,
    load_backend,
)
from onnxopt.engine.build import BuildResult, ShapeProfile, ShapeProfileError, build_engine, parse_shapes, sparse_weights
from onnxopt.engine.preflight import Finding, ParserIssue, PreflightError, PreflightReport, check_model, preflight
from onnxopt.engine.report import BuildReport, TensorInfo, render
from onnxopt.engine.runtime import DeviceUnavailableError, EngineRunner

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "BuildReport",
    "BuildResult",
    "CudaStatus",
    "DeviceUnavailableError",
    "EngineBuildError",
    "EngineRunner",
    "Finding",
    "ParserIssue",
    "PreflightError",
    "PreflightReport",
    "ShapeProfile",
    "ShapeProfileError",
    "TensorInfo",
    "build_engine",
    "check_model",
    "cuda_device_status",
    "load_backend",
    "parse_shapes",
    "preflight",
    "render",
    "sparse_weights",
]
