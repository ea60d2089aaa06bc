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
    "int8+fp16": ("default,qdq,fp16", {"target": "trt", "calibration": "random"}),
}
EXPECTED = {"fp32": "float32", "fp16": "float16", "int8": "int8 (Q/DQ)", "int8+fp16": "int8 (Q/DQ)"}


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
    shapes = real.REAL_MODELS[name].input_shapes
    model = onnxopt.optimize(str(path), passes, input_shapes=shapes, **kwargs).model
    report = build_engine(model, backend=rtx, shapes=dict(shapes)).report
    assert report.engine_bytes > 0
    compute = report.network["compute_layers"]
    assert compute.get(EXPECTED[variant], 0) >= max(1, sum(compute.values()) // 2), compute


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """ResNet-50 and a BERT encoder (tiny sizes of models/exports.py), exported by torch 2.13."""
    pytest.importorskip("torch", reason="the export extra (torch==2.13.0) is not installed: pip install -e '.[export]'")
    pytest.importorskip("transformers", reason="the export extra (transformers) is not installed: pip install -e '.[export]'")
    from models.exports import export

    folder = tmp_path_factory.mktemp("engine_exports")
    return {variant: export(variant, folder, "tiny") for variant in ("resnet50-legacy", "legacy-eager")}


EXPORT_SHAPES = {
    "resnet50-legacy": {"pixel_values": (1, 3, 64, 64)},
    "legacy-eager": {"input_ids": (1, 16), "attention_mask": (1, 16)},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("export", sorted(EXPORT_SHAPES))
def test_exported_model_builds(rtx, tiny_exports, export, variant):
    passes, kwargs = VARIANTS[variant]
    shapes = EXPORT_SHAPES[export]
    model = onnxopt.optimize(str(tiny_exports[export]), passes, input_shapes=shapes, **kwargs).model
    report = build_engine(model, backend=rtx, shapes=dict(shapes)).report
    assert report.engine_bytes > 0
    compute = report.network["compute_layers"]
    assert compute.get(EXPECTED[variant], 0) >= 1, compute
