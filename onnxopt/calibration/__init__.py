"""Calibration data and activation statistics for the precision passes.

:class:`CalibrationData` is a source of inputs for one model: an ``.npz`` file (one array per
model input, first axis = samples), a folder of ``.npy``/``.npz`` files (each one sample or a
batch; read one file at a time, in sorted order), a folder of images with a preprocessing spec
(Pillow), in-memory arrays, or seeded random data (``.random`` is True: for testing only).
Inputs are checked against the model's graph inputs (names, dtypes, ranks, static dims) and
every mismatch is one :class:`CalibrationError` line.

:func:`collect_stats` runs the model in onnxruntime in batches with the requested tensors added
as outputs, in two sweeps (running min/max, then fixed-size histograms over the range found),
so memory is O(tensors x bins) plus one batch, never all activations. :func:`compute_range`
turns a tensor's statistics into a clipping range with the minmax, percentile, entropy (KL, as
TensorRT's entropy calibrator) or mse method.

Histograms are of x (signed) over ``[-absmax, absmax]`` with ``2 * bins`` bins, so that the
histogram of |x| (``TensorStats.abs_histogram``) has exactly ``bins`` bins over ``[0, absmax]``
and asymmetric ranges keep the sign.
"""

from onnxopt.calibration.data import RANDOM_WARNING, CalibrationData, CalibrationError, Preprocess, parse_preprocess
from onnxopt.calibration.ranges import RANGE_METHODS, compute_range
from onnxopt.calibration.stats import TensorStats, collect_stats, stats_from_array

__all__ = [
    "RANDOM_WARNING",
    "RANGE_METHODS",
    "CalibrationData",
    "CalibrationError",
    "Preprocess",
    "TensorStats",
    "collect_stats",
    "compute_range",
    "parse_preprocess",
    "stats_from_array",
]
