"""How far a compressed model's outputs are from a reference model's, on a few calibration batches.

Shared by the calibration-driven passes (qdq sensitivity, pruning and low-rank sensitivity scans,
reconstruction reports): take a few batches once, run the reference once, then score variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto

from onnxopt.calibration.data import CalibrationData


def output_error(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Mean over batches of 1 - cosine between all outputs (flattened together) of two runs."""
    errors = []
    for ref, out in zip(reference, got):
        a = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(o, dtype=np.float64).ravel() for o in out])
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        cos = float(np.dot(a, b)) / norm if norm > 0 else float(np.array_equal(a, b))
        errors.append(max(0.0, 1.0 - cos))
    return float(np.mean(errors)) if errors else 0.0


def run_batches(model: ModelProto, feeds: list[dict[str, np.ndarray]], *, optimize: bool = True) -> list[list[np.ndarray]]:
    """All outputs of ``model`` on each feed dictionary (one onnxruntime session)."""
    from onnxopt.verify import create_session

    session = create_session(model, optimize=optimize)
    return [session.run(None, f) for f in feeds]


def take_batches(data: CalibrationData, count: int, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """The first ``count`` calibration batches, kept in memory for repeated scoring."""
    feeds: list[dict[str, np.ndarray]] = []
    for batch in data.batches(batch_size):
        feeds.append(batch)
        if len(feeds) >= count:
            break
    return feeds


@dataclass
class FidelityProbe:
    """A reference model's outputs on fixed batches; :meth:`error` scores a variant against them."""

    feeds: list[dict[str, np.ndarray]]
    reference: list[list[np.ndarray]] = field(default_factory=list)

    @classmethod
    def of(cls, reference_model: ModelProto, data: CalibrationData, *, batches: int = 2, batch_size: int = 8) -> FidelityProbe:
        """Take ``batches`` calibration batches and run ``reference_model`` on them once."""
        feeds = take_batches(data, batches, batch_size)
        return cls(feeds, run_batches(reference_model, feeds))

    def error(self, model: ModelProto) -> float:
        """1 - cosine of ``model``'s outputs to the reference's, averaged over the batches."""
        return output_error(self.reference, run_batches(model, self.feeds))
