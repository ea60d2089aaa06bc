"""pytest configuration: markers and shared fixtures."""

from __future__ import annotations

import onnxruntime  # noqa: F401  (a missing onnxruntime must fail the suite, not skip it)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running suites (conformance, real models); CI runs them")
    config.addinivalue_line("markers", "network: needs the package registry to fetch real models")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason elsewhere")
