"""Streaming a model's intermediate tensors over calibration data, and layer inputs as matrix rows.

:func:`stream_values` runs a model in onnxruntime batch by batch with the requested tensors
added as outputs and yields them, so a caller can accumulate statistics (Gram matrices, channel
norms) with memory bounded by one batch. :func:`layer_rows` turns the input of a Conv, Gemm or
MatMul into the rows ``X`` of the matrix product the layer computes (``Y = X @ W2d`` per group):
im2col for convolutions, so the same least-squares and SVD code serves every layer kind.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import ModelProto, NodeProto, ValueInfoProto

from onnxopt.calibration.data import CalibrationData, CalibrationError
from onnxopt.errors import one_line

LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})


def probe_session(model: ModelProto, names: Sequence[str], *, threads: int = 1, what: str = "for calibration"):
    """An onnxruntime session of ``model`` with the main-graph tensors ``names`` added as outputs.

    The outputs are added to the graph only while the session is created, so ``model`` is left as
    it was. Graph optimizations are off (:func:`onnxopt.verify.create_session`), so every tensor
    keeps its name. A model onnxruntime cannot load is one :class:`CalibrationError` line.
    """
    from onnxopt.verify import create_session

    graph = model.graph
    existing = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    graph.output.extend(ValueInfoProto(name=n) for n in added)
    try:
        return create_session(model, threads=threads)
    except Exception as exc:
        raise CalibrationError(f"onnxruntime cannot load the model {what}: {one_line(exc, 200)}") from exc
    finally:
        del graph.output[len(graph.output) - len(added) :]


def stream_values(
    model: ModelProto | str | os.PathLike[str],
    names: Sequence[str],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    threads: int = 1,
    limit: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: value}`` for each calibration batch: main-graph tensors and graph inputs in ``names``.

    The session runs with graph optimizations off so every tensor keeps its name; ``model`` is not
    modified (the extra outputs are added to a temporary list and removed again). ``limit`` stops
    after that many batches. ``data.progress(done, total)`` is called after each batch when set.
    """
    from onnxopt.io import load

    model = load(model) if not isinstance(model, ModelProto) else model
    data.validate(model)
    graph = model.graph
    wanted = list(dict.fromkeys(names))
    inputs = {v.name for v in graph.input}
    produced = {o for node in graph.node for o in node.output if o}
    for name in wanted:
        if name not in produced and name not in inputs:
            raise CalibrationError(f"tensor '{name}' is not computed in the model's main graph")
    run_names = [n for n in wanted if n not in inputs]
    session = probe_session(model, run_names, threads=threads, what="to collect activations")
    total = data.num_batches(batch_size)
    if limit is not None:
        total = min(total, limit)
    for done, feeds in enumerate(data.batches(batch_size), start=1):
        if limit is not None and done > limit:
            break
        try:
            values = dict(zip(run_names, session.run(run_names, feeds))) if run_names else {}
        except Exception as exc:
            raise data.failed_batch(exc) from exc
        values.update((n, np.asarray(feeds[n])) for n in wanted if n in inputs)
        yield values
        if data.progress is not None:
            data.progress(done, total)


# ----------------------------------------------------------------------------- layer geometry


@dataclass(frozen=True)
class ConvGeometry:
    """Attributes of an N-d convolution with explicit pads (``pads`` as begin..., end...)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int

    @classmethod
    def of(cls, node: NodeProto, weight_shape: Sequence[int], input_shape: Sequence[int] | None = None) -> ConvGeometry:
        """Read a Conv node's attributes; ``auto_pad`` SAME_* needs ``input_shape`` to resolve the pads."""
        attrs = {a.name: a for a in node.attribute}
        kernel = tuple(int(k) for k in weight_shape[2:])
        rank = len(kernel)
        strides = tuple(attrs["strides"].ints) if "strides" in attrs else (1,) * rank
        dilations = tuple(attrs["dilations"].ints) if "dilations" in attrs else (1,) * rank
        groups = attrs["group"].i if "group" in attrs else 1
        auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if input_shape is None:
                raise CalibrationError(f"Conv '{node.name}': auto_pad={auto_pad} needs the input shape")
            begins, ends = [], []
            for size, k, s, d in zip(input_shape[2:], kernel, strides, dilations):
                out = -(-int(size) // s)
                total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
                small, large = total // 2, total - total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else large)
                ends.append(large if auto_pad == "SAME_UPPER" else small)
            pads = (*begins, *ends)
        elif "pads" in attrs:
            pads = tuple(attrs["pads"].ints)
        else:
            pads = (0,) * (2 * rank)
        return cls(kernel, strides, dilations, pads, groups)


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """im2col: ``[groups, N * out_positions, C/groups * prod(kernel)]`` for input ``x`` of shape [N, C, *spatial].

    Row order is (n, output position); column order matches ``W[g*Cout/g:(g+1)*Cout/g].reshape(Cout/g, -1)``,
    so ``patches[g] @ W_g.reshape(Cout/g, -1).T`` equals the convolution's output of group ``g``.
    """
    rank = len(geometry.kernel)
    if x.ndim != rank + 2:
        raise CalibrationError(f"conv_patches: input of rank {x.ndim} for a {rank}-d kernel")
    pad_width = [(0, 0), (0, 0)] + [(geometry.pads[i], geometry.pads[i + rank]) for i in range(rank)]
    padded = np.pad(x, pad_width) if any(geometry.pads) else x
    span = tuple((k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations))
    windows = sliding_window_view(padded, span, axis=tuple(range(2, 2 + rank)))
    # windows: [N, C, *out_full, *span]; take strides over positions and dilations inside the window
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in geometry.strides)
    index += tuple(slice(None, None, d) for d in geometry.dilations)
    windows = windows[index]
    n, channels = windows.shape[:2]
    positions = int(np.prod(windows.shape[2 : 2 + rank]))
    per_group = channels // geometry.groups
    # -> [N, *out, C, *kernel] -> [N*out, groups, per_group*prod(kernel)]
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    rows = np.ascontiguousarray(windows.transpose(order)).reshape(n * positions, geometry.groups, per_group * int(np.prod(geometry.kernel)))
    return rows.transpose(1, 0, 2)


def layer_rows(node: NodeProto, x: np.ndarray, weight_shape: Sequence[int]) -> np.ndarray:
    """The rows ``X`` of the product a Conv, Gemm or MatMul layer computes from input ``x``: ``[groups, R, K]``.

    Gemm/MatMul have one group (``transA`` honoured); Conv rows come from :func:`conv_patches`.
    """
    if node.op_type == "Conv":
        return conv_patches(x, ConvGeometry.of(node, weight_shape, x.shape))
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return (x.T if trans_a else x)[None]
    if node.op_type == "MatMul":
        return x.reshape(1, -1, x.shape[-1])
    raise CalibrationError(f"layer_rows: '{node.op_type}' is not a Conv, Gemm or MatMul")


def output_rows(node: NodeProto, y: np.ndarray, groups: int = 1) -> np.ndarray:
    """A layer output as rows matching :func:`layer_rows`: ``[groups, R, Cout/groups]``."""
    if node.op_type == "Conv":
        channels = y.shape[1]
        moved = np.moveaxis(y, 1, -1).reshape(-1, channels)
        return moved.reshape(moved.shape[0], groups, channels // groups).transpose(1, 0, 2)
    return y.reshape(1, -1, y.shape[-1])


def gram_matrices(
    model: ModelProto,
    layers: Mapping[str, tuple[NodeProto, Sequence[int]]],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    rows_per_sample: int | None = None,
) -> dict[str, np.ndarray]:
    """``X^T X / rows`` (float64, ``[groups, K, K]``) of each layer's input rows, keyed as ``layers`` is.

    ``layers`` maps a caller's key (a layer name; layers with the same input and geometry may share
    one) to (a node reading the layer input as its input 0, the weight shape). Every input is
    streamed in one sweep; memory is one batch plus the matrices. With ``rows_per_sample``, a
    convolution's rows are built one sample at a time and at most that many kept per sample (a
    Gemm/MatMul's per batch), a fixed random subset drawn from a generator seeded by the layer's key, so a
    layer's matrix does not depend on which other layers are measured in the same sweep.
    """
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    rngs = {key: np.random.default_rng(zlib.crc32(str(key).encode())) for key in layers}
    names = [node.input[0] for node, _ in layers.values()]
    for values in stream_values(model, names, data, batch_size=batch_size, limit=limit):
        for key, (node, weight_shape) in layers.items():
            for x in _row_chunks(node, weight_shape, np.asarray(values[node.input[0]]), rows_per_sample is not None):
                if rows_per_sample is not None and x.shape[1] > rows_per_sample:
                    x = x[:, np.sort(rngs[key].choice(x.shape[1], rows_per_sample, replace=False))]
                x = x.astype(np.float64, copy=False)
                gram = np.matmul(x.transpose(0, 2, 1), x)  # batched BLAS (einsum does not use it)
                if key in sums:
                    sums[key] += gram  # in place: a [K, K] float64 matrix can be gigabytes
                else:
                    sums[key] = gram
                del gram
                rows[key] = rows.get(key, 0) + x.shape[1]
    for key, total in sums.items():
        total /= max(rows[key], 1)
    return sums


def _row_chunks(node: NodeProto, weight_shape: Sequence[int], x: np.ndarray, per_sample: bool) -> Iterator[np.ndarray]:
    """A batch's layer rows: at once, or (``per_sample``) a convolution's one sample at a time."""
    if node.op_type == "Conv" and per_sample:
        for sample in x:
            yield layer_rows(node, sample[None].astype(np.float64), weight_shape)
    elif node.op_type == "Conv":
        yield layer_rows(node, x.astype(np.float64), weight_shape)
    else:
        yield layer_rows(node, x, weight_shape)
