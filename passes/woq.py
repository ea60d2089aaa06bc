"""Weight-only low-bit quantization: block-wise int4/int8 weights for MatMul and Gemm.

The weight of a MatMul (or of a Gemm, whose ``transB`` is honoured) is quantized in blocks of
``block_size`` consecutive elements along its input-feature axis K, one scale (and, asymmetric,
one zero point) per block and output column. Activations stay in float. Two emissions:

* ``portable`` / ``trt``: a standard ``DequantizeLinear`` with ``axis`` and ``block_size``
  (ai.onnx opset >= 21) writes the float weight the MatMul/Gemm reads as B.
* ``ort-cpu`` / ``ort-gpu``: onnxruntime's ``com.microsoft.MatMulNBits`` (packed uint8 weights
  of shape [N, k_blocks, block_size * bits / 8], low nibble first; scales [N, k_blocks]; packed
  uint8 zero points [N, ceil(k_blocks * bits / 8)] when asymmetric).

Rounding is to nearest (ties to even), or GPTQ: the closed-form error-compensating update of the
not-yet-quantized rows, driven by the damped Hessian ``X^T X`` of the layer's calibration inputs.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import ml_dtypes
import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.errors import OptionError
from onnxopt.graph import GraphScope, GraphView, drop_unread_initializers, is_standard, node_label, opset_version, with_outer_constants
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_patterns, option
from onnxopt.passes.contrib_ops import MS_DOMAIN, MS_VERSION, has_kernel, ort_target
from onnxopt.passes.fusion_support import elem, gemm_bias_vector, import_domain, replace_nodes, unique
from onnxopt.passes.gptq import check_hessian_memory, gptq_round, hessian_groups, mean_hessian
from onnxopt.passes.noop_rules import NoMatch, constant_tensor, get_attr, require
from onnxopt.registry import register_pass
from onnxopt.shapes import StaticType, register_standin

log = logging.getLogger("onnxopt")

PASS_NAME = "woq"
DQ_BLOCK_OPSET = 21  # DequantizeLinear's block_size (and int4/uint4) arrive in ai.onnx opset 21
INT4_IR_VERSION = 10  # int4/uint4 tensors (and opset 21) need IR version 10
WEIGHT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
CALIB_BATCH = 8


# ----------------------------------------------------------------------------- options


@dataclass
class WoqOptions(PassOptions):
    """Options of :class:`WeightOnlyQuantize`."""

    bits: int = option(4, "weight bits: 4 or 8")
    block_size: int = option(32, "weights per scale along the input-feature axis K (a power of two >= 16)")
    symmetric: bool = option(True, "symmetric (no zero points) or asymmetric (per-block zero points)")
    min_size: int = option(4096, "weights with fewer elements stay in float")
    exclude: tuple[str, ...] = option((), "node or weight names (exact, or a regex searched in the name) kept in float, '|'-separated")
    rounding: Literal["nearest", "gptq"] = option("nearest", "nearest, or gptq (error-compensating, needs calibration data)")
    damp: float = option(0.01, "gptq: Hessian damping as a fraction of its mean diagonal")
    accuracy_level: int = option(0, "MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)")

    def validate(self) -> None:
        """Check bits, block size, sizes and the exclusion patterns."""
        where = f"pass '{PASS_NAME}'"
        if self.bits not in (4, 8):
            raise OptionError(f"option 'bits' of {where} must be 4 or 8, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OptionError(f"option 'block_size' of {where} must be a power of two >= 16, not {self.block_size}")
        if self.min_size < 0:
            raise OptionError(f"option 'min_size' of {where} must not be negative")
        if not 0 < self.damp < 10:
            raise OptionError(f"option 'damp' of {where} must be in (0, 10), not {self.damp}")
        if self.accuracy_level not in range(5):
            raise OptionError(f"option 'accuracy_level' of {where} must be 0..4, not {self.accuracy_level}")
        check_patterns(PASS_NAME, "exclude", self.exclude)


# ----------------------------------------------------------------------------- numpy quantization


@dataclass
class BlockQuant:
    """A [K, N] weight quantized in blocks of ``block_size`` rows (along K), per output column.

    ``q`` holds the integers (signed in [-2^(bits-1), 2^(bits-1) - 1] when symmetric, unsigned in
    [0, 2^bits - 1] otherwise) as int16; ``scale`` is [k_blocks, N] in the weight's dtype;
    ``zero_point`` is [k_blocks, N] (int16) or None when symmetric.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block_size: int

    @property
    def symmetric(self) -> bool:
        """Whether there are no zero points."""
        return self.zero_point is None

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        """A [k_blocks, N] array repeated to [K, N]."""
        return np.repeat(per_block, self.block_size, axis=0)[: self.q.shape[0]]

    def dequantize(self) -> np.ndarray:
        """The float weight ``(q - zero_point) * scale`` in float32 (what DequantizeLinear computes)."""
        centred = self.q.astype(np.float32)
        if self.zero_point is not None:
            centred = centred - self.expand(self.zero_point).astype(np.float32)
        return centred * self.expand(self.scale).astype(np.float32)

    def unsigned(self) -> np.ndarray:
        """``q`` as unsigned values with MatMulNBits' default zero point 2^(bits-1) when symmetric."""
        return (self.q + (1 << (self.bits - 1)) if self.symmetric else self.q).astype(np.uint8)


# symmetric blocks: the scale is the one of absmax / qmax times these factors with the least squared rounding error
# per column (qmax / (qmax + 1) puts a negative extreme on the otherwise unused code -2^(bits-1): int4's -8)
SCALE_FACTORS = (1.0, 0.96, 0.92, 0.875, 0.84, 0.8, 0.76, 0.72)


def _symmetric_scale(block: np.ndarray, bits: int) -> np.ndarray:
    """Per-column scale of one [b, N] block: of the SCALE_FACTORS times absmax / qmax, the one whose rounding
    (integers clipped to [-2^(bits-1), 2^(bits-1) - 1]) has the least squared error (ties: the larger scale)."""
    qmax = (1 << (bits - 1)) - 1
    base = np.max(np.abs(block), axis=0) / qmax
    safe = np.where(base > 0, base, 1.0).astype(np.float32)
    best, best_err = base, None
    for factor in SCALE_FACTORS:
        scale = (safe * np.float32(factor)).astype(np.float32)
        q = np.clip(np.rint(block / scale), -qmax - 1, qmax)
        err = np.sum((q * scale - block) ** 2, axis=0)
        if best_err is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
    return np.where(base > 0, best, base)


def _block_params(block: np.ndarray, bits: int, symmetric: bool, dtype: type) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (rounded to ``dtype``, returned as float32) and zero point of each column of one [b, N] block."""
    if symmetric:
        scale = _symmetric_scale(block, bits)
        zero = None
    else:
        levels = (1 << bits) - 1
        low = np.minimum(np.min(block, axis=0), 0.0)
        high = np.maximum(np.max(block, axis=0), 0.0)
        scale = (high - low) / levels
    scale = scale.astype(dtype).astype(np.float32)
    tiny = np.finfo(dtype).tiny
    scale = np.where(np.isfinite(scale) & (scale >= tiny), scale, np.float32(1.0)).astype(np.float32)
    if not symmetric:
        zero = np.clip(np.rint(-low / scale), 0, (1 << bits) - 1).astype(np.int16)
    return scale, zero


def _round(row: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Integers of one or more rows for given per-column scale and zero point."""
    if zero is None:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return np.clip(np.rint(row / scale), low, high).astype(np.int16)
    return np.clip(np.rint(row / scale) + zero, 0, (1 << bits) - 1).astype(np.int16)


def _dequant(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    centred = q.astype(np.float32) if zero is None else q.astype(np.float32) - zero.astype(np.float32)
    return centred * scale


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuant:
    """Round-to-nearest block quantization of a [K, N] float weight (blocks along K)."""
    dtype = weight.dtype.type
    w = weight.astype(np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    q = np.empty((k, n), np.int16)
    scales = np.empty((blocks, n), np.float32)
    zeros = None if symmetric else np.empty((blocks, n), np.int16)
    for b in range(blocks):
        rows = slice(b * block_size, min(k, (b + 1) * block_size))
        scale, zero = _block_params(w[rows], bits, symmetric, dtype)
        q[rows] = _round(w[rows], scale, zero, bits)
        scales[b] = scale
        if zeros is not None:
            zeros[b] = zero
    return BlockQuant(q, scales.astype(dtype), zeros, bits, block_size)


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool, damp: float = 0.01) -> BlockQuant:
    """GPTQ block quantization of a [K, N] weight given the [K, K] Hessian ``X^T X / n`` of its inputs.

    Rows (input features) are rounded in order with the error pushed onto the rows not yet
    rounded (:func:`onnxopt.passes.gptq.gptq_round`); each block's scale is taken from the block's
    weights as updated when the block starts. Features never seen (zero Hessian diagonal) get plain rounding.
    """
    dtype = weight.dtype.type
    k, n = weight.shape
    blocks = -(-k // block_size)
    scales = np.empty((blocks, n), np.float32)
    zeros = None if symmetric else np.empty((blocks, n), np.int16)

    def make_rounder(start: int, stop: int, rows: np.ndarray):
        scale, zero = _block_params(rows.astype(np.float32), bits, symmetric, dtype)
        scales[start // block_size] = scale
        if zeros is not None:
            zeros[start // block_size] = zero

        def rounder(_: int, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = _round(row.astype(np.float32), scale, zero, bits)
            return q, _dequant(q, scale, zero)

        return rounder

    q = gptq_round(weight, hessian, make_rounder, block=block_size, damp=damp, what="woq: gptq")
    return BlockQuant(q, scales.astype(dtype), zeros, bits, block_size)


def pack_nbits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers (< 2^bits) along the last axis into bytes, low nibble first for 4 bits."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_arrays(quant: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits' B [N, k_blocks, blob], scales [N, k_blocks] and packed zero points (or None)."""
    k, n = quant.q.shape
    bs = quant.block_size
    blocks = quant.scale.shape[0]
    unsigned = quant.unsigned().T  # [N, K]
    padded = np.empty((n, blocks * bs), np.uint8)
    padded[:, :k] = unsigned
    pad_value = (1 << (quant.bits - 1)) if quant.zero_point is None else 0
    if blocks * bs > k:
        padded[:, k:] = pad_value if quant.zero_point is None else quant.zero_point[-1][:, None].astype(np.uint8)
    packed = pack_nbits(padded.reshape(n, blocks, bs), quant.bits)
    scales = np.ascontiguousarray(quant.scale.T)
    zeros = None if quant.zero_point is None else pack_nbits(quant.zero_point.T, quant.bits)
    return packed, scales, zeros


def _int_tensor(values: np.ndarray, bits: int, signed: bool, name: str) -> TensorProto:
    """An int4/uint4/int8/uint8 initializer of ``values``."""
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    return numpy_helper.from_array(values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4), name)


# ----------------------------------------------------------------------------- matching


@dataclass
class Reader:
    """One MatMul/Gemm reading the weight as B."""

    node: NodeProto
    trans: bool  # a Gemm with transB=1: the stored weight is [N, K]


@dataclass
class Candidate:
    """A weight of one graph and every node that reads it (all of them quantizable)."""

    name: str
    tensor: TensorProto
    readers: list[Reader]
    trans: bool
    constant_node: NodeProto | None = None
    rounded: BlockQuant | None = None  # rounding=gptq: the GPTQ values (computed before the rewrite)

    def canonical(self) -> np.ndarray:
        """The weight as [K, N] (input features first)."""
        array = numpy_helper.to_array(self.tensor)
        return np.ascontiguousarray(array.T) if self.trans else array


def _excluded(patterns: tuple[str, ...], names: list[str]) -> bool:
    return any(p == name or re.search(p, name) for p in patterns for name in names if name)


def _gemm_attrs(node: NodeProto) -> tuple[float, float, int, int]:
    return (
        float(get_attr(node, "alpha", 1.0)),  # type: ignore[arg-type]
        float(get_attr(node, "beta", 1.0)),  # type: ignore[arg-type]
        int(get_attr(node, "transA", 0)),  # type: ignore[call-overload]
        int(get_attr(node, "transB", 0)),  # type: ignore[call-overload]
    )


def match_weight(name: str, view: GraphView, ctx: PassContext, options: WoqOptions) -> Candidate:
    """The weight ``name`` with its readers when every reader can take a quantized B; NoMatch with the reason otherwise."""
    tensor = constant_tensor(view, name)
    require(tensor is not None, "not a constant of this graph (a graph input, outer-scope value or external data)")
    require(name not in view.graph_outputs, "the weight is a graph output")
    require(tensor.data_type in WEIGHT_TYPES, "the weight is not float or float16")  # type: ignore[union-attr]
    require(len(tensor.dims) == 2, f"the weight has rank {len(tensor.dims)}, not 2")  # type: ignore[union-attr]
    size = int(np.prod(tensor.dims))  # type: ignore[union-attr]
    require(size >= options.min_size, f"smaller than min_size={options.min_size}")
    readers: list[Reader] = []
    nodes = unique(view.consumers.get(name, []))
    require(bool(nodes), "no readers")
    for node in nodes:
        require(is_standard(node) and node.op_type in ("MatMul", "Gemm"), f"also read by a {node.op_type}")
        require(list(node.input).count(name) == 1 and node.input[1] == name, f"also read as A or C of a {node.op_type}")
        trans = False
        if node.op_type == "Gemm":
            alpha, beta, trans_a, trans_b = _gemm_attrs(node)
            trans = bool(trans_b)
        readers.append(Reader(node, trans))
    require(len({r.trans for r in readers}) == 1, "read both as B and as B^T")
    trans = readers[0].trans
    n = tensor.dims[0] if trans else tensor.dims[1]  # type: ignore[union-attr]
    if _excluded(options.exclude, [name] + [r.node.name for r in readers]):
        raise NoMatch("excluded")
    producer = view.producer.get(name)
    candidate = Candidate(name, tensor, readers, trans, producer if producer is not None and producer.op_type == "Constant" else None)  # type: ignore[arg-type]
    if ort_target(ctx):
        require(has_kernel(ctx, tensor.data_type), f"no MatMulNBits kernel for this dtype on {ctx.target}")  # type: ignore[union-attr]
        for reader in readers:
            node = reader.node
            # MatMul/Gemm type A like B (unknown is fine); MatMulNBits takes A of any rank, 1-D included (checked in onnxruntime)
            require(elem(ctx, node.input[0]) in (0, tensor.data_type), "A's dtype differs from the weight's")  # type: ignore[union-attr]
            if node.op_type == "Gemm":
                alpha, beta, trans_a, _ = _gemm_attrs(node)
                require(trans_a == 0, "a Gemm with transA=1 (MatMulNBits)")
                require(alpha == 1.0, "a Gemm with alpha != 1 (MatMulNBits)")
                if len(node.input) > 2 and node.input[2]:
                    bias = gemm_bias_vector(view, node.input[2], beta, int(n))
                    require(bias is not None or beta == 1.0, "a Gemm with beta != 1 and a C that is not a constant vector (MatMulNBits)")
    return candidate


def find_candidates(view: GraphView, ctx: PassContext, options: WoqOptions) -> tuple[list[Candidate], Counter]:
    """Quantizable weights of one graph, in order of their first reader, and why others were kept (counts by reason)."""
    seen: set[str] = set()
    found: list[Candidate] = []
    kept: Counter = Counter()
    for node in view.nodes:
        if node.op_type not in ("MatMul", "Gemm") or not is_standard(node) or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in seen:
            continue
        seen.add(name)
        if constant_tensor(view, name) is None:  # an activation (attention scores), not a weight: nothing to report
            continue
        try:
            found.append(match_weight(name, view, ctx, options))
        except NoMatch as exc:
            log.debug("%s: weight '%s' of %s kept: %s", PASS_NAME, name, node_label(node), exc)
            kept[str(exc)] += 1
    return found, kept


# ----------------------------------------------------------------------------- calibration (GPTQ)


def collect_hessians(
    model: ModelProto, readers: Mapping[str, tuple[NodeProto, tuple[int, ...]]], calibration: Any
) -> dict[str, np.ndarray]:
    """``X^T X / rows`` (float64, [K, K]) of every main-graph value in ``readers`` (name -> a node reading it as input 0,
    and that node's weight shape), from every row of every calibration batch
    (:func:`onnxopt.calibration.capture.gram_matrices`, which honours a Gemm's transA)."""
    from onnxopt.calibration.capture import gram_matrices

    return {name: matrix[0] for name, matrix in gram_matrices(model, readers, calibration, batch_size=CALIB_BATCH).items()}


# ----------------------------------------------------------------------------- rewriting


def _quantize(candidate: Candidate, options: WoqOptions) -> BlockQuant:
    if candidate.rounded is not None:
        return candidate.rounded
    return quantize_blocks(candidate.canonical(), options.bits, options.block_size, options.symmetric)


@dataclass
class Emitted:
    """What one weight's rewrite adds: initializers, nodes before its first reader, and reader replacements."""

    initializers: list[TensorProto] = field(default_factory=list)
    replaced: dict[int, list[NodeProto]] = field(default_factory=dict)


def emit_dequantize(candidate: Candidate, quant: BlockQuant, ctx: PassContext) -> Emitted:
    """A blocked DequantizeLinear writing the float weight; the readers read it as B."""
    out = Emitted()
    base = candidate.name
    q, scale, zero = quant.q, quant.scale, quant.zero_point
    axis = 0
    if candidate.trans:
        q, scale, zero, axis = q.T, scale.T, None if zero is None else zero.T, 1
    q_name, s_name = ctx.names.fresh(f"{base}_q{quant.bits}"), ctx.names.fresh(f"{base}_scale")
    out.initializers.append(_int_tensor(np.ascontiguousarray(q), quant.bits, quant.symmetric, q_name))
    out.initializers.append(numpy_helper.from_array(np.ascontiguousarray(scale), s_name))
    inputs = [q_name, s_name]
    if zero is not None:
        z_name = ctx.names.fresh(f"{base}_zero_point")
        out.initializers.append(_int_tensor(np.ascontiguousarray(zero), quant.bits, False, z_name))
        inputs.append(z_name)
    value = ctx.names.fresh(f"{base}_dequantized")
    dq = helper.make_node(
        "DequantizeLinear", inputs, [value], name=ctx.names.fresh(f"{base}_DequantizeLinear"), axis=axis, block_size=quant.block_size
    )
    for index, reader in enumerate(candidate.readers):
        node = NodeProto()
        node.CopyFrom(reader.node)
        node.input[1] = value
        out.replaced[id(reader.node)] = [dq, node] if index == 0 else [node]
    return out


def emit_matmulnbits(candidate: Candidate, quant: BlockQuant, view: GraphView, options: WoqOptions, ctx: PassContext) -> Emitted:
    """One com.microsoft.MatMulNBits per reader, sharing the packed weight, scales and zero points."""
    out = Emitted()
    base = candidate.name
    k, n = quant.q.shape
    packed, scales, zeros = matmulnbits_arrays(quant)
    b_name, s_name = ctx.names.fresh(f"{base}_q{quant.bits}_packed"), ctx.names.fresh(f"{base}_scales")
    out.initializers.append(numpy_helper.from_array(packed, b_name))
    out.initializers.append(numpy_helper.from_array(scales, s_name))
    z_name = ""
    if zeros is not None:
        z_name = ctx.names.fresh(f"{base}_zero_points")
        out.initializers.append(numpy_helper.from_array(zeros, z_name))
    attrs: dict[str, int] = {"K": int(k), "N": int(n), "bits": quant.bits, "block_size": quant.block_size}
    if options.accuracy_level:
        attrs["accuracy_level"] = options.accuracy_level
    for reader in candidate.readers:
        node = reader.node
        inputs = [node.input[0], b_name, s_name] + ([z_name] if z_name else [])
        after: list[NodeProto] = []
        target = node.output[0]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            _, beta, _, _ = _gemm_attrs(node)
            bias = gemm_bias_vector(view, node.input[2], beta, int(n))
            if bias is not None:
                bias_name = ctx.names.fresh(f"{node.output[0]}_bias")
                out.initializers.append(numpy_helper.from_array(bias.astype(scales.dtype), bias_name))
                inputs += [""] * (5 - len(inputs)) + [bias_name]
            else:  # beta == 1 (checked by the matcher): add C after the product
                target = ctx.names.fresh(f"{node.output[0]}_matmulnbits")
                after.append(helper.make_node("Add", [target, node.input[2]], [node.output[0]], name=ctx.names.fresh(f"{node.name}_bias")))
        new = helper.make_node(
            "MatMulNBits", inputs, [target], name=ctx.names.fresh(f"{node.name or base}_MatMulNBits"), domain=MS_DOMAIN, **attrs
        )
        out.replaced[id(node)] = [new, *after]
    return out


def _remove_weight(graph: GraphProto, candidate: Candidate, replaced: dict[int, list[NodeProto]]) -> None:
    """Drop the float weight (every reader was rewritten): its initializer, or its Constant node (via ``replaced``)."""
    if candidate.constant_node is not None:
        replaced[id(candidate.constant_node)] = []
        return
    for index, tensor in enumerate(graph.initializer):
        if tensor.name == candidate.name:
            del graph.initializer[index]
            return


# ----------------------------------------------------------------------------- the pass


@register_pass
class WeightOnlyQuantize(Pass):
    """Weight-only int4/int8 block quantization of MatMul/Gemm weights (DequantizeLinear, or MatMulNBits for ort-*).

    Pre: types inferred (A's dtype, for MatMulNBits). Matched: a float or float16 2-D
    constant of a graph (initializer not a graph input, or a Constant node; not a graph output)
    with at least ``min_size`` elements whose every reader is a standard MatMul or Gemm reading
    it as B only (a weight also read by another op, a subgraph, or as A stays float; a weight
    shared by several MatMuls is quantized once and shared). Gemm's ``transB`` is honoured (the
    blocks run along K either way). Names matching ``exclude`` stay float.

    Target ``portable``/``trt``: ``DequantizeLinear(q, scale[, zero_point], axis, block_size)``
    writes the weight (int4/int8 symmetric, uint4/uint8 with zero points otherwise); this needs
    ai.onnx opset >= 21: on older models nothing is done and a note says ``--opset 21`` unlocks
    it (the IR version is raised to 10 when lower). Target ``ort-cpu``/``ort-gpu``:
    ``com.microsoft.MatMulNBits`` (domain imported, version 1) replaces each reader; a Gemm needs
    transA=0 and alpha=1, its C becomes MatMulNBits' bias (beta * C, when C is a constant column
    vector) or an Add after it (beta=1); kernels: float on CPU, float/float16 on GPU.

    ``rounding=gptq`` uses ``ctx.calibration`` (``batches(batch_size)`` yielding input dicts) to
    collect ``X^T X`` of each main-graph weight's inputs and applies GPTQ's closed-form update
    (without calibration data the run stops before any pass; weights in subgraphs are rounded to
    nearest, with a note).

    Post: the float weight is gone; outputs differ by the quantization error only (judge with
    precision ``int8``). The same model and options give the same bytes.
    """

    name = PASS_NAME
    lossy = True
    tolerance = "int8"
    Options = WoqOptions
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    def required(self) -> frozenset[Requirement]:
        """Shapes; calibration data too with ``rounding=gptq``."""
        gptq = self.options.rounding == "gptq"  # type: ignore[attr-defined]
        return self.requires | {Requirement.CALIBRATION} if gptq else self.requires

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Find the weights of every graph, collect GPTQ statistics when asked, then rewrite graph by graph."""
        options: WoqOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        scopes = ctx.scopes()
        found: list[tuple[GraphScope, GraphView, list[Candidate]]] = []
        kept: Counter = Counter()
        captured: set[str] = set()  # weights of the enclosing graphs that a subgraph layer read (dropped once unread)
        for scope in reversed(scopes):
            local = ctx.view(scope.graph)
            view = with_outer_constants(local, scope)
            candidates, reasons = find_candidates(view, ctx, options)
            captured.update(c.name for c in candidates if c.name not in local.initializers and c.name in view.initializers)
            # a rewritten Gemm's C (MatMulNBits reads its own copy of the bias): dropped below once nothing reads it
            captured.update(i for c in candidates for r in c.readers for i in r.node.input[2:] if i in view.initializers)
            kept.update(reasons)
            if candidates:
                found.append((scope, view, candidates))
        total = sum(len(c) for _, _, c in found)
        if total and not ort_target(ctx) and (opset_version(model) or 1) < DQ_BLOCK_OPSET:
            result.notes.append(
                f"{PASS_NAME}: {total} MatMul/Gemm weight(s) kept in float: block-wise DequantizeLinear needs ai.onnx opset >= "
                f"{DQ_BLOCK_OPSET}, the model imports {opset_version(model) or 1} (--opset {DQ_BLOCK_OPSET} unlocks it; "
                "or --target ort-cpu for MatMulNBits)"
            )
            return result
        if total and options.rounding == "gptq":
            self._round_with_gptq(model, found, scopes[0], ctx, result)
        for scope, view, candidates in found:
            replaced: dict[int, list[NodeProto]] = {}
            for candidate in candidates:
                quant = _quantize(candidate, options)
                emitted = (
                    emit_matmulnbits(candidate, quant, view, options, ctx) if ort_target(ctx) else emit_dequantize(candidate, quant, ctx)
                )
                scope.graph.initializer.extend(emitted.initializers)
                replaced.update(emitted.replaced)
                _remove_weight(scope.graph, candidate, replaced)
                result.count(f"weights_int{options.bits}" + ("_gptq" if candidate.rounded is not None else ""))
                result.count("matmulnbits" if ort_target(ctx) else "dequantize_linear", len(candidate.readers) if ort_target(ctx) else 1)
            replace_nodes(scope.graph, view.nodes, replaced)
        if total:
            if ort_target(ctx):
                import_domain(model, MS_DOMAIN, MS_VERSION)
            elif model.ir_version < INT4_IR_VERSION:
                model.ir_version = INT4_IR_VERSION
            drop_unread_initializers(model, captured)
            ctx.invalidate()
        reasons = {r: c for r, c in kept.items() if r != "no readers"}
        if reasons:
            listed = "; ".join(f"{reason} ({count})" for reason, count in sorted(reasons.items()))
            result.notes.append(f"{PASS_NAME}: {sum(reasons.values())} MatMul/Gemm weight(s) kept in float: {listed}")
        return result

    def _round_with_gptq(
        self,
        model: ModelProto,
        found: list[tuple[GraphScope, GraphView, list[Candidate]]],
        main: GraphScope,
        ctx: PassContext,
        result: PassResult,
    ) -> None:
        """Round every main-graph candidate by GPTQ with the mean Hessian of its readers' inputs; note the fallbacks.

        Inputs go in :func:`onnxopt.passes.gptq.hessian_groups` (one calibration sweep per group), and each
        candidate is rounded as soon as its group is collected, so a large model never holds every Hessian.
        """
        options: WoqOptions = self.options  # type: ignore[assignment]
        main_candidates = [c for scope, _, cands in found if scope.graph is main.graph for c in cands]
        nested = sum(len(c) for scope, _, c in found if scope.graph is not main.graph)
        if nested:
            result.notes.append(f"{PASS_NAME}: rounding=gptq: {nested} weight(s) inside subgraphs rounded to nearest")
        inputs = [sorted({r.node.input[0] for r in c.readers}) for c in main_candidates]
        first_reader: dict[str, tuple[NodeProto, tuple[int, ...]]] = {}  # an input's Hessian: its first reader's rows
        for candidate in main_candidates:
            for reader in candidate.readers:
                first_reader.setdefault(reader.node.input[0], (reader.node, tuple(candidate.tensor.dims)))
        rows = [c.tensor.dims[1 if c.trans else 0] for c in main_candidates]  # K of the [K, N] weight
        costs = {i: 8 * rows[i] ** 2 * len(names) for i, names in enumerate(inputs)}
        for members in hessian_groups(costs):
            check_hessian_memory([costs[i] for i in members], PASS_NAME, model)
            names = sorted({n for i in members for n in inputs[i]})
            hessians = collect_hessians(model, {n: first_reader[n] for n in names}, ctx.calibration)
            for index in members:
                candidate = main_candidates[index]
                parts = [hessians.get(r.node.input[0]) for r in candidate.readers]
                if all(p is not None for p in parts):
                    hessian = mean_hessian(parts)
                    candidate.rounded = gptq_quantize(
                        candidate.canonical(), hessian, options.bits, options.block_size, options.symmetric, options.damp
                    )


# ----------------------------------------------------------------------------- shape stand-in


def _matmulnbits_standin(node: NodeProto, static: StaticType) -> tuple[list[NodeProto], list] | None:
    """MatMulNBits: ``MatMul(A, P)`` with P a typed [K, N] stand-in input of the scales' element type."""
    scales = static(node.input[2]) if len(node.input) > 2 else None
    k, n = get_attr(node, "K"), get_attr(node, "N")
    if scales is None or not isinstance(k, int) or not isinstance(n, int) or len(node.output) != 1:
        return None
    placeholder = f"{node.output[0]}__standin_weight"
    value = helper.make_tensor_value_info(placeholder, scales[0], [k, n])
    return [helper.make_node("MatMul", [node.input[0], placeholder], [node.output[0]])], [value]


register_standin(MS_DOMAIN, "MatMulNBits", _matmulnbits_standin)
