"""Fixtures of the engine-build tests: the back ends, skipped with the loader's own reason when not installed."""

from __future__ import annotations

import pytest

from onnxopt.engine import BackendUnavailableError, load_backend


@pytest.fixture(scope="session")
def rtx():
    """TensorRT-RTX (the ``trt-rtx`` extra): builds engines on a CPU-only machine."""
    try:
        return load_backend("tensorrt-rtx")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def full_trt():
    """Full TensorRT (the ``trt`` extra, NVIDIA's index): not installable from PyPI alone."""
    try:
        return load_backend("tensorrt")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
