"""Calibration-driven fidelity repairs of the ``qdq`` pass: bias correction and a layer sensitivity ranking.

* Bias correction: the float model's and the quantized model's per-output-channel means of each
  quantized Conv/ConvTranspose/Gemm/MatMul output (one statistics run of each over the calibration
  data; axis 1 for convolutions, the last axis for Gemm/MatMul) differ by the mean error that
  rounding of weights and inputs adds; that difference is added to the layer's bias (a float bias
  on trt; the int32 bias on ort-cpu is re-derived from the corrected float bias; a MatMul's bias
  is the constant of the Add that reads it). A layer without a bias gets one.
* Sensitivity: each layer is quantized alone (the others float) and the model's output error
  (1 - cosine of all outputs) is measured on two calibration batches; the most sensitive layers
  can be kept float (``keep_float=N``, or as many as needed for ``max_error``), or those with the
  most error per multiply-accumulate up to a share of the quantized layers' MACs (``float_share``:
  a float layer's cost grows with its MACs, so many small sensitive layers such as depthwise and
  early narrow convolutions cost less than one wide pointwise layer).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.calibration import collect_stats
from onnxopt.calibration.fidelity import output_error, run_batches
from onnxopt.graph import GraphView, NameGenerator
from onnxopt.passbase import PassResult
from onnxopt.passes.noop_rules import constant_tensor

if TYPE_CHECKING:
    from onnxopt.passes.qdq import Builder, RewrittenConstants

SENSITIVITY_BATCHES = 2  # calibration batches per layer
TOP = 10  # ranking lines in the notes
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- sensitivity


def rank_layers(builder: Builder) -> tuple[list[tuple[float, int]], list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
    """(error, position) of each quantizable layer quantized alone, most sensitive first; also the feeds and float outputs used."""
    feeds = []
    for feeds_ in builder.data.batches(builder.options.batch_size):
        feeds.append(feeds_)
        if len(feeds) >= SENSITIVITY_BATCHES:
            break
    reference = run_batches(builder.float_model, feeds)
    positions = builder.candidates()
    everything = frozenset(positions)
    ranking = []
    for pos in positions:
        model, _, _ = builder.build(everything - {pos})
        ranking.append((output_error(reference, run_batches(model, feeds)), pos))
    ranking.sort(key=lambda item: (-item[0], item[1]))
    return ranking, feeds, reference


def layer_macs(model: ModelProto, positions: list[int], feeds: dict[str, np.ndarray]) -> dict[int, int]:
    """Multiply-accumulates of the layers at ``positions`` on one calibration batch (:func:`onnxopt.analysis.node_flops` / 2).

    The shapes are those the batch produces, so dynamic dimensions count at their calibration size.
    """
    from onnxopt.analysis import node_flops
    from onnxopt.calibration.capture import probe_session

    view = GraphView.build(model.graph)
    nodes = [model.graph.node[p] for p in positions]
    tensors = {n: constant_tensor(view, n) for node in nodes for n in node.input[:2]}
    shapes = {n: tuple(tensor.dims) for n, tensor in tensors.items() if tensor is not None}  # weights: no copy of their values
    names = list(dict.fromkeys(n for node in nodes for n in (node.input[0], node.output[0]) if n not in feeds and n not in shapes))
    values = dict(zip(names, probe_session(model, names, what="to count layer MACs").run(names, feeds)), **feeds)
    shapes.update((name, np.shape(value)) for name, value in values.items())
    types = {name: helper.make_tensor_type_proto(TensorProto.FLOAT, shape) for name, shape in shapes.items()}
    return {pos: (node_flops(node, {}, types) or 0) // 2 for pos, node in zip(positions, nodes)}


def within_share(ranking: list[tuple[float, int]], macs: dict[int, int], share: float) -> list[int]:
    """Positions by error per MAC, most first, whose MACs together stay within ``share`` of all (layers without error skipped)."""
    total = sum(macs.get(pos, 0) for _, pos in ranking)
    budget, used, chosen = share * total, 0, []
    for error, pos in sorted(ranking, key=lambda item: (-item[0] / max(macs.get(item[1], 0), 1), item[1])):
        cost = macs.get(pos, 0)
        if error > 0 and used + cost <= budget:
            chosen.append(pos)
            used += cost
    return chosen


def choose_float_layers(builder: Builder, result: PassResult) -> frozenset[int]:
    """Rank the layers, note the top ones, and return the positions to keep float (``keep_float`` / ``max_error`` / ``float_share``)."""
    options = builder.options
    start = time.perf_counter()
    ranking, feeds, reference = rank_layers(builder)
    nodes = builder.float_model.graph.node
    count = min(options.keep_float, len(ranking))
    keep = {pos for _, pos in ranking[:count]}
    share_note = ""
    if options.float_share and ranking:
        macs = layer_macs(builder.float_model, [pos for _, pos in ranking], feeds[0])
        keep.update(within_share(ranking, macs, options.float_share))
        total = sum(macs.values())
        kept = sum(macs[pos] for pos in keep) / total if total else 0.0
        share_note = f" ({kept:.0%} of the quantized layers' MACs)"
    full_error = None
    if options.max_error:
        rest = [pos for _, pos in ranking if pos not in keep]
        while True:
            model, _, _ = builder.build(frozenset(keep), weights=True)
            full_error = output_error(reference, run_batches(model, feeds))
            if full_error <= options.max_error or not rest:
                break
            keep.add(rest.pop(0))
    seconds = time.perf_counter() - start
    result.notes.append(
        f"qdq: sensitivity of {len(ranking)} layers ({SENSITIVITY_BATCHES} batches each, {seconds:.1f} s); "
        f"kept float: {len(keep)}{share_note}" + (f", full-model error {full_error:.3g}" if full_error is not None else "")
    )
    for rank, (error, pos) in enumerate(ranking[:TOP], 1):
        node = nodes[pos]
        mark = " [kept float]" if pos in keep else ""
        result.notes.append(f"qdq: sensitivity #{rank} '{node.name or node.output[0]}' ({node.op_type}): 1-cos {error:.3g}{mark}")
    if keep:
        result.count("layers_kept_float", len(keep))
    return frozenset(keep)


# ----------------------------------------------------------------------------- bias correction


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


class _Graph:
    """Name-keyed access to the quantized model's nodes and initializers, for in-place edits."""

    def __init__(self, model: ModelProto) -> None:
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, list[NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.names = NameGenerator(model)
        self.replaced: set[str] = set()  # initializers replaced by corrected copies

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def store(self, name: str, array: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(np.asarray(array, order="C"), name))

    def add(self, base: str, array: np.ndarray) -> str:
        name = self.names.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(array, order="C"), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = self.model.graph.initializer[-1]
        return name

    def dq_scale(self, name: str) -> np.ndarray | None:
        """The scale of the DequantizeLinear that writes ``name`` (None when it is not one)."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return self.value(node.input[1])


def _int32(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ratio = np.nan_to_num(bias.astype(np.float64) / safe, posinf=INT32_MAX, neginf=-INT32_MAX)
    return np.clip(np.rint(ratio), -INT32_MAX, INT32_MAX).astype(np.int32)


def _shift_bias(g: _Graph, node: NodeProto, delta: np.ndarray, constants: RewrittenConstants, symmetric: bool) -> bool:
    """Add ``delta`` (per output channel) to a Conv/ConvTranspose/Gemm bias; True when done."""
    channels = delta.shape[0]
    scale = 1.0
    if node.op_type == "Gemm":
        if _attr(node, "alpha", 1.0) == 0.0 or _attr(node, "beta", 1.0) == 0.0:
            return False
        scale = float(_attr(node, "beta", 1.0))
    record = constants.int32_biases.get(node.output[0])
    if record is not None:
        bias, bscale, q_name = record
        new = (bias.astype(np.float64) + delta / scale).astype(np.float32)
        g.store(q_name, _int32(new, bscale))
        constants.int32_biases[node.output[0]] = (new, bscale, q_name)
        return True
    if len(node.input) >= 3 and node.input[2]:
        bias = g.value(node.input[2])
        if bias is None or bias.dtype != np.float32 or bias.size not in (1, channels) or bias.ndim > 1:
            return False
        new = (np.broadcast_to(bias.reshape(-1), (channels,)).astype(np.float64) + delta / scale).astype(np.float32)
        g.replaced.add(node.input[2])
        node.input[2] = g.add(f"{node.input[2]}_corrected", new)
        return True
    new = (delta / scale).astype(np.float32)
    act, weight = g.dq_scale(node.input[0]), g.dq_scale(node.input[1])
    if not symmetric and node.op_type in ("Conv", "Gemm") and act is not None and weight is not None and act.ndim == 0:
        bscale = (np.float32(act) * weight.astype(np.float32)).reshape(-1).astype(np.float32)
        if bscale.size not in (1, channels):
            return False
        bscale = np.broadcast_to(bscale, (channels,)).copy()
        q_name = g.add(f"{node.output[0]}_bias_quantized", _int32(new, bscale))
        s_name = g.add(f"{node.output[0]}_bias_scale", bscale)
        dq = g.names.fresh(f"{node.output[0]}_bias_dq")
        dq_node = helper.make_node(
            "DequantizeLinear", [q_name, s_name], [dq], name=g.names.fresh(f"{node.output[0]}_bias_DequantizeLinear"), axis=0
        )
        g.model.graph.node.insert(0, dq_node)
        constants.int32_biases[node.output[0]] = (new, bscale, q_name)
    else:
        dq = g.add(f"{node.output[0]}_bias", new)
    while len(node.input) < 2:
        node.input.append("")
    if len(node.input) == 2:
        node.input.append(dq)
    else:
        node.input[2] = dq
    return True


def _bias_add(g: _Graph, out: str) -> tuple[NodeProto, int] | None:
    """The Add that adds a constant bias to a MatMul output (directly, or through its Q -> DQ) and the constant's position."""
    readers = g.readers.get(out, [])
    if len(readers) == 1 and readers[0].op_type == "QuantizeLinear":
        dqs = g.readers.get(readers[0].output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            return None
        readers = g.readers.get(dqs[0].output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].input) != 2:
        return None
    add = readers[0]
    for index, name in enumerate(add.input):
        if name in g.inits or (
            name in g.producer and g.producer[name].op_type == "DequantizeLinear" and g.producer[name].input[0] in g.inits
        ):
            return add, index
    return None


def _shift_matmul(g: _Graph, node: NodeProto, delta: np.ndarray, constants: RewrittenConstants) -> bool:
    """Add ``delta`` to the constant of a MatMul's bias Add (float, or a uint8 constant re-quantized); True when done."""
    from onnxopt.passes.qdq import activation_params

    found = _bias_add(g, node.output[0])
    if found is None:
        return False
    add, index = found
    name = add.input[index]
    channels = delta.shape[0]
    record = constants.uint8_constants.get(name)
    if record is not None:
        value, q_name, s_name, z_name = record
        if len(g.readers.get(name, [])) != 1 or value.shape[-1:] not in ((channels,), (1,)) or value.ndim < 1:
            return False
        new = (value.astype(np.float64) + delta.reshape((1,) * (value.ndim - 1) + (channels,))).astype(np.float32)
        params = activation_params(float(new.min()), float(new.max()), symmetric=False)
        q = np.clip(np.rint(new / params.scale) + params.zero_point.astype(np.int32), 0, 255).astype(np.uint8)
        g.store(q_name, q)
        g.store(s_name, params.scale)
        g.store(z_name, params.zero_point)
        constants.uint8_constants[name] = (new, q_name, s_name, z_name)
        return True
    value = g.value(name)
    if value is None or value.dtype != np.float32 or value.ndim < 1 or value.shape[-1] not in (channels, 1):
        return False
    new = (value.astype(np.float64) + delta.reshape((1,) * (value.ndim - 1) + (channels,))).astype(np.float32)
    g.replaced.add(name)
    add.input[index] = g.add(f"{name}_corrected", new)
    return True


def correct_biases(model: ModelProto, layer_outputs: set[str], constants: RewrittenConstants, builder: Builder, result: PassResult) -> None:
    """Shift the bias of each quantized layer (by output name) by the per-channel mean error of its output (see the
    module docstring); in place."""
    layers = [n.output[0] for n in builder.float_model.graph.node if n.output and n.output[0] in layer_outputs]
    if not layers:
        return
    with _float_twins(model, builder.float_model, layers) as refs:
        layers = [o for o in layers if o in refs]
        wanted = layers + [refs[o] for o in layers]
        measured = collect_stats(model, wanted, builder.data, batch_size=builder.options.batch_size, bins=8)
    reference = {o: measured[refs[o]] for o in layers}
    g = _Graph(model)
    done = skipped = 0
    for out in layers:
        node = g.producer.get(out)
        if node is None:
            continue
        axis_mean = "mean_axis1" if node.op_type in ("Conv", "ConvTranspose") else "mean_last"
        ref, got = getattr(reference[out], axis_mean), getattr(measured[out], axis_mean)
        if ref is None or got is None or ref.shape != got.shape or ref.ndim != 1:
            skipped += 1
            continue
        delta = ref.astype(np.float64) - got.astype(np.float64)
        if not np.all(np.isfinite(delta)):
            skipped += 1
            continue
        ok = (
            _shift_matmul(g, node, delta, constants)
            if node.op_type == "MatMul"
            else _shift_bias(g, node, delta, constants, builder.symmetric)
        )
        done += ok
        skipped += not ok
    _drop_dead(model, g.replaced)
    if done:
        result.count("biases_corrected", done)
    result.notes.append(f"qdq: bias correction on {done} layers" + (f" ({skipped} without a bias to correct)" if skipped else ""))


@contextlib.contextmanager
def _float_twins(model: ModelProto, float_model: ModelProto, layers: list[str]) -> Iterator[dict[str, str]]:
    """While open, ``model`` (quantized) has a float twin of each layer (float weight and bias, reading the float
    tensor its Q/DQ input quantizes), whose output is the reference the layer's mean is compared to; yields
    layer output -> twin output. The twins and the float weights they added are removed on exit (built in place:
    a copy of the model would cost its size again)."""
    graph = model.graph
    names = NameGenerator(model)
    have = {t.name for t in graph.initializer}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    float_nodes = {n.output[0]: n for n in float_model.graph.node if n.output}
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    refs: dict[str, str] = {}
    twins = []
    added = 0
    for out in layers:
        original = float_nodes[out]
        if any(name and name not in have and name not in produced and name not in float_inits for name in original.input):
            continue  # it reads a tensor of the float model that the quantized model no longer has
        for name in original.input:
            if name and name in float_inits and name not in have:
                graph.initializer.append(float_inits[name])
                have.add(name)
                added += 1
        twin = NodeProto()
        twin.CopyFrom(original)
        twin.name = names.fresh(f"{original.name or out}_float_twin")
        del twin.output[:]
        refs[out] = names.fresh(f"{out}_float_twin")
        twin.output.append(refs[out])
        twins.append(twin)
    graph.node.extend(twins)
    try:
        yield refs
    finally:
        del graph.node[len(graph.node) - len(twins) :]
        del graph.initializer[len(graph.initializer) - added :]


def _drop_dead(model: ModelProto, replaced: set[str]) -> None:
    """Remove the ``replaced`` initializers that no node reads any more."""
    from onnxopt.graph import outer_references

    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                used |= outer_references(attr.g)
            elif attr.type == attr.GRAPHS:
                for sub in attr.graphs:
                    used |= outer_references(sub)
    keep = [t for t in model.graph.initializer if t.name in used or t.name not in replaced]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
