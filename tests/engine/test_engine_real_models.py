"""Engines from the FP32, FP16 and INT8 (``qdq`` for TensorRT) outputs of the pipeline on the real models (slow)."""

from __future__ import annotations

import pytest

import onnxopt
from models import real
from onnxopt.engine import build_engine

pytestmark = [pytest.mark.slow, pytest.mark.network]

VARIANTS = {
    "fp32": ("default", {}),
    "fp16": ("default,fp16", {}),
    "int8": ("default,qdq", {"target": "trt", "calibration": "random"}),
}


# (model, variant) pairs known to fail upstream of the build, with the reason.
@pytest.fixture(scope="module", params=sorted(real.REAL_MODELS))
def real_model(request):
    name = request.param
    try:
        return name, real.fetch(name)
    except real.RegistryUnavailable as exc:
        pytest.skip(f"real model '{name}' not fetched: {exc}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_real_model_builds(rtx, real_model, variant):
    name, path = real_model
    passes, kwargs = VARIANTS[variant]
    if variant == "int8" and "qdq" not in onnxopt.all_passes():
        pytest.skip("the qdq pass is not registered in this tree")
    shapes = real.REAL_MODELS[name].input_shapes
    model = onnxopt.optimize(str(path), passes, input_shapes=shapes, **kwargs).model
    report = build_engine(model, backend=rtx, shapes=dict(shapes)).report
    assert report.engine_bytes > 0
    compute = report.network["compute_layers"]
    expected = {"fp32": "float32", "fp16": "float16", "int8": "int8 (Q/DQ)"}[variant]
    assert compute.get(expected, 0) >= max(1, sum(compute.values()) // 2), compute
