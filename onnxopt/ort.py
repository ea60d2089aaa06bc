"""Lazy access to onnxruntime with a clear message when it is missing."""

from __future__ import annotations

from types import ModuleType

from onnxopt.errors import OnnxoptError


def import_onnxruntime() -> ModuleType:
    """Return the onnxruntime module or raise a one-line error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OnnxoptError(f"onnxruntime is not installed: install onnxopt[cpu] (or onnxopt[gpu]) to run models ({exc})") from exc
    return onnxruntime


def make_session(
    model_bytes: bytes | str, *, optimize: bool = False, threads: int = 1, log_level: int = 4, provider: str = "CPUExecutionProvider"
):
    """Create an InferenceSession (CPU unless ``provider`` says otherwise) from serialized model bytes (or a path).

    Graph optimizations are off by default so the session computes exactly what the
    graph says; the session is single threaded unless ``threads`` says otherwise.
    ``log_level`` is onnxruntime's severity threshold (4, the default: fatal only; every caller turns a failure
    into its own one-line error, which quotes onnxruntime's message, so its own red log line would print it
    twice, even with -q; 3: errors too). Such an unoptimized session (verification,
    calibration) has no CPU memory arena: it computes every DequantizeLinear of a weight on each
    run, and the arena would keep growing blocks for them (1.1 GB for a 256 MB model's calibration).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model_bytes, options, providers=[provider])
