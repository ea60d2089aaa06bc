"""onnxopt: an ONNX graph optimizer that proves every rewrite numerically.

Public API::

    import onnxopt
    model = onnxopt.load("model.onnx")
    result = onnxopt.optimize(model, passes="default", verify="end")
    onnxopt.save(result.model, "out.onnx")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from onnx import ModelProto

from onnxopt.errors import OnnxoptError, OptionError, VerificationError
from onnxopt.io import load, save
from onnxopt.manager import OptimizeResult, PassManager
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.pipeline import FixpointGroup
from onnxopt.registry import all_passes, get_pass, register_pass
from onnxopt.validate import validate_model

__version__ = "0.1.0"

__all__ = [
    "FixpointGroup",
    "OnnxoptError",
    "OptimizeResult",
    "OptionError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassOptions",
    "PassResult",
    "Requirement",
    "VerificationError",
    "all_passes",
    "build_engine",
    "get_pass",
    "load",
    "optimize",
    "option",
    "register_pass",
    "save",
    "validate_model",
]


def build_engine(model: ModelProto | str | os.PathLike[str], **options: Any) -> Any:
    """Compile a model into a TensorRT engine: the plan bytes and a build report (see :func:`onnxopt.engine.build_engine`)."""
    from onnxopt.engine import build_engine as build

    return build(model, **options)


def optimize(
    model: ModelProto | str | os.PathLike[str],
    passes: str | Sequence[Any] = "default",
    *,
    target: str = "portable",
    opset: int | None = None,
    verify: str = "off",
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    precision: str = "fp32",
    isolate: bool = True,
    validate: bool = True,
    calibration: Any = None,
    calibration_preprocess: str | None = None,
    calibration_limit: int | None = None,
    teacher: ModelProto | str | os.PathLike[str] | None = None,
) -> OptimizeResult:
    """Optimize a model (path or ModelProto; a given ModelProto is not modified).

    ``passes`` is a pass string such as ``"cleanup,fold_constants:max_bytes=4096"`` or a
    list of names, pass instances and :class:`FixpointGroup` objects. ``opset`` upgrades the
    model to that ai.onnx opset first (verified); target ``trt`` upgrades to at least 17. ``verify`` is "off",
    "end" or "each"; verification inputs come from ``inputs`` (.npz path or dict) or are
    generated from the input specs with ``input_shapes`` for dynamic dimensions.
    ``calibration`` (for passes that need it) is a :class:`~onnxopt.calibration.CalibrationData`,
    a path (.npz, or a folder of .npy/.npz files or images with ``calibration_preprocess``), a
    mapping of arrays, or ``"random"`` (testing only: the report warns). ``teacher`` (path or
    ModelProto) is the reference model of ``reconstruct``; by default the model before the
    first lossy pass.
    """
    if isinstance(model, ModelProto):
        working = ModelProto()
        working.CopyFrom(model)
    else:
        working = load(model)
    warnings = validate_model(working) if validate else []
    data = None
    if calibration is not None:
        from onnxopt.calibration import CalibrationData

        data = CalibrationData.resolve(
            calibration, working, preprocess=calibration_preprocess, limit=calibration_limit, input_shapes=input_shapes
        )
    reference = load(teacher) if teacher is not None and not isinstance(teacher, ModelProto) else teacher  # read only
    manager = PassManager.from_spec(
        passes,
        target=target,
        verify=verify,  # type: ignore[arg-type]
        isolate=isolate,
        opset=opset,
        calibration=data,
        teacher=reference,
    )
    if verify != "off":
        from onnxopt.verify import Verifier

        manager.verifier = Verifier.from_model(working, inputs=inputs, input_shapes=input_shapes, precision=precision)
    result = manager.run(working)
    from onnxopt.calibration.data import RANDOM_WARNING

    data_notes = data.notes if data is not None else []
    result.report.warnings[:0] = warnings + [n for n in data_notes if n == RANDOM_WARNING]
    result.report.notes[:0] = [n for n in data_notes if n != RANDOM_WARNING]
    return result
