"""FP16: weights and compute in float16, the model's input/output types kept, risky ops left in float32.

The pass works on the main graph in four steps, reading before it writes:

1. *Decide* for every node whether it computes in float16. A node is converted when it is a
   standard ONNX op that writes a float32 tensor whose type parameter allows float16 (read from
   the op's schema at the model's opset) and no rule keeps it in float32:

   * its op type is in the block list (:data:`DEFAULT_KEEP_FP32`, extended with ``keep_fp32=``,
     shortened with ``allow_fp16=``), or its name matches ``keep_nodes=`` (names or regexes);
   * it is a reduction (ReduceSum/ReduceMean/ReduceL2/...) over more than ``max_reduce``
     elements, or over an extent that is not known statically;
   * it belongs to the variance part of an unfused LayerNorm/RMSNorm: a squaring (``Pow(d, 2)``
     or ``Mul(d, d)``) and everything after it up to the normalizing Div/Mul that follows the
     Sqrt (plus the mean and centering that feed the square);
   * it computes a small float tensor derived from a Shape/Size (shape arithmetic) or one that
     is cast to an integer type (float16 would round dimensions above 2048);
   * it reads, in a converted slot, a constant with a finite value beyond the float16 range
     (``overflow=keep``, the default; ``overflow=clamp`` clamps to +-65504 instead);
   * calibration data was given and one of its outputs or inputs reached ``calib_limit``;
   * it holds subgraphs (If/Loop/Scan stay float32 as a whole, bodies untouched: every
     outer value a body reads keeps its float32 type under its own name) or it is a custom
     or ``ai.onnx.ml`` op (opaque: float32 with Casts around);
   * it is a ScatterElements/ScatterND that accumulates (``reduction`` add/mul/max/min: the
     sum is precision-sensitive and onnxruntime's CPU EP has no float16 kernel for it);
   * onnx's own type inference of the node, fed the planned float16 inputs, disagrees with
     the planned output types (a type relation the schema's constraint lists do not show);
   * it is a Sigmoid/HardSigmoid writing a graph output (probabilities below 6e-5 are float16
     subnormals with few significant bits: a detector's probability map would lose them);
   * it is a QuantizeLinear/DequantizeLinear or reads a DequantizeLinear output (an INT8 layer
     of the ``qdq`` pass: after ``qdq`` the model is INT8 where quantized and float16 elsewhere,
     and TensorRT still sees the DQ -> layer patterns it fuses into INT8 kernels).

   Resize's ``roi``/``scales`` and GridSample's ``grid`` stay float32 even when the node converts.
2. *Place values*: every float32 value gets a home type (what its producer writes). Graph inputs
   stay float32; graph outputs and values read by subgraphs keep float32 under their own name
   (an fp16 producer writes a fresh name and one Cast restores the original). Initializers and
   Constant nodes read only by fp16 compute are converted in place; ones read by both kinds
   keep their float32 copy and get a second, float16 copy (no runtime Cast). Casts to float
   and ConstantOfShape are retyped when only fp16 compute reads them.
3. *Emit*: one Cast per value and direction, right before its first reader; a Cast(to=float)
   of a float16 value is bypassed for fp16 readers, so no fp16->fp32->fp16 chain is created.
4. *Clean up*: redundant Cast pairs (fp16->fp32->fp16) and no-op Casts that the pass created
   or found are removed, and value_info entries are retyped to float16 or dropped.

The result keeps the model's input and output types, loads in onnxruntime (whose CPU EP runs
many fp16 ops through its own Casts, slowly) and is what a strongly typed TensorRT network
needs: every precision change is an explicit Cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView, is_standard, subgraphs
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, check_patterns, matches_pattern, option
from onnxopt.passes.constants import constant_value
from onnxopt.passes.noop_rules import get_attr
from onnxopt.registry import register_pass

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
ANY = 0  # a reader that accepts either type (Cast to a float type, Shape, Size)
FP16_MAX = 65504.0
MIN_OPSET = 6  # Cast's 'to' is a string before opset 6
SMALL_ELEMENTS = 64  # float tensors up to this size that feed or come from shapes stay float32

# Ops kept in float32 by default: they overflow in fp16 (exp, powers, sums of squares) or need
# fp32 accuracy (normalization statistics, coordinates, sorting, index generation).
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DEFAULT_KEEP_FP32: tuple[str, ...] = (
    "CumSum",
    "Exp",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "LpPool",
    "MeanVarianceNormalization",
    "NonMaxSuppression",
    "Pow",
    "RMSNormalization",
    "Range",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "RoiAlign",
    "Softmax",
    "Softplus",
    "TopK",
)
# Ops kept float32 when they write a graph output: their small probabilities would be fp16 subnormals.
OUTPUT_HEADS = frozenset({"Sigmoid", "HardSigmoid"})
REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
# (op type, input index) slots that stay float32 when the node converts: coordinate math.
FP32_SLOTS = frozenset({("Resize", 1), ("Resize", 2), ("GridSample", 1), ("Upsample", 1)})
# Ops that may sit between a squaring and the Sqrt of a variance computation.
_VARIANCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Max",
        "Min",
        "Clip",
        "Sqrt",
        "Reciprocal",
        "Reshape",
        "Expand",
        "Squeeze",
        "Unsqueeze",
        "Identity",
    }
)
_FREE_PRODUCERS = frozenset({"Constant", "ConstantOfShape", "Cast"})


@register_pass
class FP16(Pass):
    """Convert weights and compute to float16, keeping I/O types and overflow-prone ops in float32.

    Options: ``keep_fp32=Op|Op`` adds op types to the float32 block list, ``allow_fp16=Op|Op``
    removes them, ``keep_nodes=name|regex`` keeps nodes by name, ``max_reduce`` bounds the extent
    of fp16 reductions, ``overflow=keep|clamp`` says what a constant beyond the fp16 range does,
    ``calib_limit`` is the calibrated |max| above which a tensor's producer stays float32.
    """

    name = "fp16"
    lossy = True
    tolerance = "fp16"
    preserves_types = False
    recurse = False

    @dataclass
    class Options(PassOptions):
        """Options of the fp16 pass."""

        keep_fp32: tuple[str, ...] = option((), "op types kept in float32 in addition to the default block list")
        allow_fp16: tuple[str, ...] = option((), "op types removed from the default float32 block list")
        keep_nodes: tuple[str, ...] = option((), "node names (or full-match regexes) kept in float32")
        max_reduce: int = option(1024, "largest reduction extent computed in fp16 (unknown extents stay float32)")
        overflow: Literal["keep", "clamp"] = option("keep", "constant beyond fp16 range: keep its reader float32, or clamp it")
        calib_limit: float = option(60000.0, "with calibration data: tensors whose |max| exceeds this keep float32 producers")

        def validate(self) -> None:
            """Reject unknown op types, bad regexes and non-positive limits."""
            for key in ("keep_fp32", "allow_fp16"):
                for op in getattr(self, key):
                    if not onnx.defs.has(op):
                        raise OptionError(f"option '{key}' of pass 'fp16': '{op}' is not an ONNX op type")
            check_patterns("fp16", "keep_nodes", self.keep_nodes)
            if self.max_reduce < 1:
                raise OptionError("option 'max_reduce' of pass 'fp16' must be at least 1")
            if not 0 < self.calib_limit <= FP16_MAX:
                raise OptionError(f"option 'calib_limit' of pass 'fp16' must be in (0, {FP16_MAX:g}]")

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Convert the main graph (subgraph holders stay float32 as a whole)."""
        options = self.options
        assert isinstance(options, FP16.Options)
        opset = _default_opset(model)
        if opset < MIN_OPSET:
            result = PassResult()
            if opset:  # no default-domain import at all: nothing standard to convert
                result.notes.append(
                    f"fp16: opset {opset} < {MIN_OPSET} (Cast's 'to' is a string there): model left in float32; upgrade_opset first"
                )
            return result
        converter = _Converter(model, ctx, options, opset)
        return converter.run()


# ----------------------------------------------------------------------------- helpers


def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _elem(types: dict[str, TypeProto], name: str) -> int | None:
    tp = types.get(name)
    if tp is None or tp.WhichOneof("value") != "tensor_type":
        return None
    return tp.tensor_type.elem_type or None


def _dims(types: dict[str, TypeProto], name: str) -> list[int | None] | None:
    tp = types.get(name)
    if tp is None or tp.WhichOneof("value") != "tensor_type" or not tp.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tp.tensor_type.shape.dim]


def _is_small(types: dict[str, TypeProto], name: str) -> bool:
    dims = _dims(types, name)
    if dims is None or len(dims) > 1 or any(d is None for d in dims):
        return False
    return int(np.prod(dims, dtype=np.int64)) <= SMALL_ELEMENTS


def _out_of_range(array: np.ndarray) -> bool:
    if array.dtype != np.float32 or array.size == 0:
        return False
    finite = array[np.isfinite(array)]
    return bool(finite.size and np.abs(finite).max() > FP16_MAX)


def _to_fp16(array: np.ndarray, clamp: bool) -> np.ndarray:
    if clamp:
        finite = np.isfinite(array)
        array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array)
    with np.errstate(over="ignore"):
        return array.astype(np.float16)


def _fp16_tensor(tensor: TensorProto, name: str, clamp: bool) -> TensorProto:
    """A float16 copy of a float32 tensor (values beyond the range clamped when asked, else inf)."""
    return numpy_helper.from_array(_to_fp16(numpy_helper.to_array(tensor), clamp), name)


@dataclass
class _Plan:
    """What one node does: whether it converts, and per input/output slot the wanted/home type."""

    convert: bool
    reason: str
    inputs: list[int | None] = field(default_factory=list)  # F16, F32, ANY, or None (not a float32 value)
    outputs: list[int | None] = field(default_factory=list)  # F16, F32, or None


def calibrated_absmax(model: ModelProto, tensors: list[str], calibration: Any) -> dict[str, float]:
    """Largest finite |value| of each tensor over the calibration data.

    A :class:`onnxopt.calibration.CalibrationData` goes through ``collect_stats`` (batched,
    bounded memory); any other object with ``batches(batch_size)`` yielding input dicts is run
    here one batch at a time with the tensors as extra outputs, keeping running maxima.
    """
    from onnxopt.calibration import CalibrationData, collect_stats

    if isinstance(calibration, CalibrationData):
        return {name: float(stat.absmax) for name, stat in collect_stats(model, tensors, calibration).items()}
    if not callable(getattr(calibration, "batches", None)):
        raise OnnxoptError(f"fp16: calibration data must have a batches(batch_size) method, not {type(calibration).__name__}")
    from onnxopt.verify import create_session

    probe = ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in known)
    session = create_session(probe)
    names = list(tensors)
    result = dict.fromkeys(names, 0.0)
    for feeds in calibration.batches(1):
        for name, value in zip(names, session.run(names, dict(feeds))):
            finite = np.asarray(value, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                result[name] = max(result[name], float(np.abs(finite).max()))
    return result


# ----------------------------------------------------------------------------- the converter


class _Converter:
    """One conversion of a model's main graph (decide, place, emit, clean up)."""

    def __init__(self, model: ModelProto, ctx: PassContext, options: FP16.Options, opset: int) -> None:
        self.model, self.ctx, self.options, self.opset = model, ctx, options, opset
        self.graph: GraphProto = model.graph
        self.types = ctx.types
        self.view = GraphView.build(self.graph)
        self.result = PassResult()
        blocked = (set(DEFAULT_KEEP_FP32) - set(options.allow_fp16)) | set(options.keep_fp32)
        self.blocked = frozenset(blocked)
        self.orig: dict[str, int | None] = {}
        self.pinned: set[str] = set()
        self.plans: dict[int, _Plan] = {}

    # -- step 1: decide
    def elem(self, name: str) -> int | None:
        """Element type of a value before the pass (initializers and inputs first, then inference)."""
        if name not in self.orig:
            tensor = self.view.initializers.get(name)
            self.orig[name] = tensor.data_type if tensor is not None else _elem(self.types, name)
        return self.orig[name]

    def is_f32(self, name: str) -> bool:
        """Whether ``name`` is a float32 tensor value."""
        return bool(name) and self.elem(name) == F32

    def constant_tensor(self, name: str) -> TensorProto | None:
        """The float tensor behind an initializer or Constant node of the main graph, or None."""
        if self.view.is_constant(name):
            tensor = self.view.initializers[name]
            return None if tensor.data_location == TensorProto.EXTERNAL else tensor
        node = self.view.producer.get(name)
        if node is not None and node.op_type == "Constant" and is_standard(node):
            return constant_value(node)
        return None

    def schema_plan(self, node: NodeProto) -> _Plan:
        """The conversion a node's schema allows (every rule but the schema still to check)."""
        n_in, n_out = len(node.input), len(node.output)
        keep = self._kept(node, "")
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except onnx.defs.SchemaError:
            keep.reason = "no schema"
            return keep
        allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
        in_groups = [_formal(schema.inputs, i) for i in range(n_in)]
        out_groups = [_formal(schema.outputs, i) for i in range(n_out)]
        input_params = {g for g in in_groups if g in allowed}
        members: dict[str, list[str]] = {}
        for names, groups in ((node.input, in_groups), (node.output, out_groups)):
            for name, group in zip(names, groups):
                if name and group in allowed:
                    members.setdefault(group, []).append(name)
        convert = {
            g
            for g, names in members.items()
            if "tensor(float16)" in allowed[g] and g in input_params and any(self.elem(n) == F32 for n in names)
        }
        for g in list(convert):
            if any(self.elem(n) != F32 for n in members[g]):
                keep.reason = "a value of the converted type has an unknown type"
                return keep
        slot_groups = {in_groups[i] for i in range(n_in) if (node.op_type, i) in FP32_SLOTS}
        if any(group in convert and group in out_groups for group in slot_groups):
            keep.reason = "a coordinate input shares the data type"
            return keep
        convert -= slot_groups
        if not any(group in convert for name, group in zip(node.output, out_groups) if name):
            keep.reason = "writes no float32 tensor it could write in float16"
            return keep
        plan = _Plan(True, "")
        for name, group in zip(node.input, in_groups):
            plan.inputs.append(F16 if name and group in convert else (F32 if self.is_f32(name) else None))
        for name, group in zip(node.output, out_groups):
            plan.outputs.append(F16 if name and group in convert else (F32 if self.is_f32(name) else None))
        if not self._inference_agrees(schema, node, plan):
            keep.reason = "onnx's type inference disagrees with the schema reading"
            return keep
        return plan

    def _inference_agrees(self, schema: onnx.defs.OpSchema, node: NodeProto, plan: _Plan) -> bool:
        """Whether onnx's inference for ``node`` with the planned input types gives the planned output types.

        Guards against type relations the constraint lists do not show; when inference cannot
        run on the node even with its original types, the schema reading stands.
        """
        original: dict[str, TypeProto] = {}
        for name in node.input:
            if name and name not in original:
                tp = self.types.get(name)
                if tp is None:
                    return True
                original[name] = tp
        planned = {}
        for name, want in zip(node.input, plan.inputs):
            if name and want == F16:
                tp = TypeProto()
                tp.CopyFrom(original[name])
                tp.tensor_type.elem_type = F16
                planned[name] = tp
        planned = {**original, **planned}
        imports = list(self.model.opset_import)
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schema, node, planned, opset_imports=imports, ir_version=self.model.ir_version
            )
        except Exception:  # noqa: BLE001  (inference of one node; fall back to the original types)
            try:
                onnx.shape_inference.infer_node_outputs(schema, node, original, opset_imports=imports, ir_version=self.model.ir_version)
            except Exception:  # noqa: BLE001
                return True
            return False
        for name, home in zip(node.output, plan.outputs):
            tp = inferred.get(name)
            if name and home is not None and tp is not None and tp.WhichOneof("value") == "tensor_type" and tp.tensor_type.elem_type:
                if tp.tensor_type.elem_type != home:
                    return False
        return True

    def _keep_want(self, node: NodeProto, index: int) -> int | None:
        """What a float32-kept node wants on input ``index``."""
        name = node.input[index]
        if not self.is_f32(name):
            return None
        if node.op_type in ("Shape", "Size") and is_standard(node):
            return ANY
        if node.op_type == "Cast" and is_standard(node) and get_attr(node, "to") in (F32, F16):
            return ANY
        return F32

    def decide(self) -> None:
        """Build every node's plan; count the reasons nodes stay float32."""
        view = self.view
        tainted = self._shape_tainted()
        variance = self._variance_nodes()
        for node in view.nodes:
            plan = self._decide_node(node, tainted, variance)
            self.plans[id(node)] = plan
        if self.ctx.calibration is not None:
            self._apply_calibration()
        plans = [self.plans[id(node)] for node in view.nodes]
        self.result.count("nodes_fp16", sum(1 for plan in plans if plan.convert))
        self.result.count("nodes_kept_fp32", sum(1 for plan in plans if not plan.convert and plan.reason != "free" and any(plan.outputs)))

    def _decide_node(self, node: NodeProto, tainted: set[str], variance: set[int]) -> _Plan:
        options = self.options
        if not is_standard(node):
            return self._kept(node, "custom-domain op")
        if subgraphs(node):
            return self._kept(node, "holds subgraphs")
        if node.op_type in _FREE_PRODUCERS:
            return self._kept(node, "free")
        if node.op_type in self.blocked:
            return self._kept(node, "blocked op type")
        if node.op_type in QDQ_OPS or any(getattr(self.view.producer.get(i), "op_type", "") == "DequantizeLinear" for i in node.input):
            return self._kept(node, "int8 layer")  # INT8 where quantized: Q/DQ and their readers stay as the qdq pass wrote them
        if options.keep_nodes and node.name and matches_pattern(node.name, options.keep_nodes):
            return self._kept(node, "keep_nodes")
        if id(node) in variance:
            return self._kept(node, "normalization statistics")
        if any(o in tainted for o in node.output if o):
            return self._kept(node, "shape arithmetic")
        if node.op_type in OUTPUT_HEADS and any(o in self.view.graph_outputs for o in node.output):
            return self._kept(node, "output head")
        if node.op_type in ("ScatterElements", "ScatterND") and get_attr(node, "reduction", b"none") not in (b"none", "none"):
            return self._kept(node, "accumulating scatter")
        if node.op_type in REDUCTIONS:
            extent = self._reduce_extent(node)
            if extent is None or extent > options.max_reduce:
                return self._kept(node, "large reduction")
        plan = self.schema_plan(node)
        if not plan.convert:
            return plan
        if options.overflow == "keep":
            for name, want in zip(node.input, plan.inputs):
                if want == F16:
                    tensor = self.constant_tensor(name)
                    if tensor is not None and _out_of_range(numpy_helper.to_array(tensor)):
                        self.result.count("kept_fp32_for_range", 1)
                        return self._kept(node, "constant beyond fp16 range")
        return plan

    def _kept(self, node: NodeProto, reason: str) -> _Plan:
        inputs = [self._keep_want(node, i) for i in range(len(node.input))]
        return _Plan(False, reason, inputs, [F32 if self.is_f32(o) else None for o in node.output])

    def _reduce_extent(self, node: NodeProto) -> int | None:
        """How many elements one output element of a reduction sums, or None if not static."""
        dims = _dims(self.types, node.input[0])
        if dims is None:
            return None
        axes = get_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            tensor = self.constant_tensor(node.input[1])
            if tensor is None:
                return None
            axes = [int(a) for a in numpy_helper.to_array(tensor).reshape(-1)]
        if not axes:
            if get_attr(node, "noop_with_empty_axes", 0):
                return 1
            axes = list(range(len(dims)))
        extent = 1
        for axis in axes:  # type: ignore[union-attr]
            axis = int(axis) + (len(dims) if int(axis) < 0 else 0)
            if not 0 <= axis < len(dims) or dims[axis] is None:
                return None
            extent *= dims[axis]  # type: ignore[operator]
        return extent

    def _shape_tainted(self) -> set[str]:
        """Small float32 values computed from shapes, or cast to integers (shape arithmetic)."""
        view, types = self.view, self.types
        tainted: set[str] = set()
        for node in view.nodes:  # forward from Shape/Size through small tensors
            if node.op_type in ("Shape", "Size") or any(i in tainted for i in node.input if i):
                tainted.update(o for o in node.output if o and _is_small(types, o))
        backward: set[str] = set()
        for node in view.nodes:
            if node.op_type == "Cast" and get_attr(node, "to") not in (F32, F16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
                if node.input and self.is_f32(node.input[0]) and _is_small(types, node.input[0]):
                    backward.add(node.input[0])
        for node in reversed(view.nodes):
            if any(o in backward for o in node.output if o):
                backward.update(i for i in node.input if i and self.is_f32(i) and _is_small(types, i))
        return {name for name in tainted | backward if self.is_f32(name)}

    def _variance_nodes(self) -> set[int]:
        """Nodes of unfused LayerNorm/RMSNorm statistics: a squaring that is reduced, up to the normalizing product.

        From each squaring whose value reaches a ReduceMean/ReduceSum (through layout ops only),
        everything reading it among :data:`_VARIANCE_OPS` is marked, through the Sqrt and a
        Reciprocal, up to and including the first Mul/Div after the Sqrt. The centering or mean
        that feeds a squaring is marked too, and so is the other square of ``E[x^2] - E[x]^2``.
        """
        view = self.view
        found: set[int] = set()
        squares = [node for node in view.nodes if is_standard(node) and self._is_square(node)]
        for node in squares:
            starts = self._reductions_after(node)
            if not starts:
                continue
            found.add(id(node))
            self._mark_mean_feeding(node.input[0], found)
            stack: list[tuple[NodeProto, bool]] = [(reduce, False) for reduce in starts]
            seen = {id(node)} | {id(reduce) for reduce in starts}
            found.update(seen)
            while stack:
                current, rooted = stack.pop()
                for out in current.output:
                    for reader in view.consumers.get(out, ()):
                        if id(reader) in seen or not is_standard(reader) or reader.op_type not in _VARIANCE_OPS:
                            continue
                        seen.add(id(reader))
                        found.add(id(reader))
                        if reader.op_type == "Sub":
                            for operand in reader.input:
                                square = view.producer.get(operand)
                                if square is not None and id(square) not in found and self._is_square(square):
                                    found.add(id(square))
                                    self._mark_mean_feeding(square.input[0], found)
                        if rooted and reader.op_type in ("Mul", "Div"):
                            continue  # the normalizing product: its output is back in range
                        stack.append((reader, rooted or reader.op_type == "Sqrt"))
        return found

    def _reductions_after(self, square: NodeProto) -> list[NodeProto]:
        """ReduceMean/ReduceSum nodes reading ``square``'s output directly or through layout ops."""
        found: list[NodeProto] = []
        stack = [square.output[0]]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for reader in self.view.consumers.get(name, ()):
                if not is_standard(reader):
                    continue
                if reader.op_type in ("ReduceMean", "ReduceSum") and reader.input[0] == name:
                    found.append(reader)
                elif reader.op_type in ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Expand"):
                    stack.append(reader.output[0])
        return found

    def _is_square(self, node: NodeProto) -> bool:
        if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1] and self.is_f32(node.input[0]):
            return True
        if node.op_type == "Pow" and len(node.input) == 2 and self.is_f32(node.input[0]):
            tensor = self.constant_tensor(node.input[1])
            if tensor is not None:
                value = numpy_helper.to_array(tensor)
                return value.size == 1 and float(value.reshape(-1)[0]) == 2.0
        return False

    def _mark_mean_feeding(self, name: str, found: set[int]) -> None:
        """Mark the centering ``x - mean(x)`` (or the mean itself) that feeds a squaring."""
        producer = self.view.producer.get(name)
        if producer is None or not is_standard(producer):
            return
        if producer.op_type == "ReduceMean":
            found.add(id(producer))
        elif producer.op_type == "Sub" and len(producer.input) == 2:
            mean = self.view.producer.get(producer.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == producer.input[0]:
                found.update((id(producer), id(mean)))
        elif producer.op_type in ("Mul", "Div"):
            for operand in producer.input:
                source = self.view.producer.get(operand)
                if source is not None and source.op_type in ("ReduceSum", "ReduceMean"):
                    found.update((id(producer), id(source)))

    def _apply_calibration(self) -> None:
        """Keep float32 the producers (and readers) of tensors whose calibrated |max| is too large."""
        candidates = sorted({o for node in self.view.nodes if self.plans[id(node)].convert for o in node.output if o and self.is_f32(o)})
        if not candidates:
            return
        absmax = calibrated_absmax(self.model, candidates, self.ctx.calibration)
        hot = {name for name in candidates if absmax.get(name, 0.0) > self.options.calib_limit}
        for name in sorted(hot):
            nodes = [self.view.producer[name], *self.view.consumers.get(name, ())]
            for node in nodes:
                if self.plans[id(node)].convert:
                    self.plans[id(node)] = self._kept(node, "calibrated range")
        self.result.count("kept_fp32_calibrated", len(hot))

    # -- step 2: place values
    def place(self) -> None:
        """Home types of every float32 value, pinned names, and constant copies."""
        view = self.view
        self.pinned = {o.name for o in self.graph.output}
        for node in view.nodes:
            if subgraphs(node):
                self.pinned.update(view.implicit.get(id(node), ()))
        self.wants: dict[str, set[int]] = {}
        for node in view.nodes:
            plan = self.plans[id(node)]
            for name, want in zip(node.input, plan.inputs):
                if name and want is not None and want != ANY:
                    self.wants.setdefault(name, set()).add(want)
        self.home: dict[str, int] = {}
        for value in self.graph.input:
            if self.is_f32(value.name):
                self.home[value.name] = F32
        for tensor in self.graph.initializer:
            if tensor.data_type == F32 and tensor.name not in self.home:
                external = tensor.data_location == TensorProto.EXTERNAL  # never read here: Casts instead
                self.home[tensor.name] = F32 if external else self._free_home(tensor.name)
        for node in view.nodes:
            plan = self.plans[id(node)]
            if node.op_type in _FREE_PRODUCERS and is_standard(node) and node.output and self.is_f32(node.output[0]):
                self.home[node.output[0]] = self._free_home(node.output[0], node)
                continue
            for name, home in zip(node.output, plan.outputs):
                if name and home is not None:
                    self.home[name] = home

    def _free_home(self, name: str, node: NodeProto | None = None) -> int:
        """Home of a value whose producer can write either type: fp16 when only fp16 compute reads it."""
        wants = self.wants.get(name, set())
        if name in self.pinned or wants != {F16}:
            return F32
        if node is not None and node.op_type == "Constant" and constant_value(node) is None:
            return F32
        if node is not None and node.op_type == "Cast" and get_attr(node, "to") != F32:
            return F32
        return F16

    # -- step 3: emit
    def emit(self) -> None:
        """Rewrite the node list with converted nodes, constants and boundary Casts."""
        graph, view, names, clamp = self.graph, self.view, self.ctx.names, self.options.overflow == "clamp"
        self.fp16_name: dict[str, str] = {}
        self.cast_names: dict[tuple[str, int], str] = {}
        self.aliases: dict[str, int] = {}  # names this pass created -> their element type
        self.new_nodes: list[NodeProto] = []
        converted_inits = copies = 0
        # initializers
        extra: list[TensorProto] = []
        for index, tensor in enumerate(graph.initializer):
            name = tensor.name
            if tensor.data_type != F32 or name in view.graph_inputs or tensor.data_location == TensorProto.EXTERNAL:
                continue
            if self.home.get(name) == F16:
                graph.initializer[index].CopyFrom(_fp16_tensor(tensor, name, clamp))
                converted_inits += 1
            elif F16 in self.wants.get(name, set()):
                copy_name = names.fresh(f"{name}_fp16")
                extra.append(_fp16_tensor(tensor, copy_name, clamp))
                self.fp16_name[name] = copy_name
                self.aliases[copy_name] = F16
                copies += 1
        graph.initializer.extend(extra)
        constants = 0
        for node in view.nodes:
            plan = self.plans[id(node)]
            self._emit_node(node, plan)
            if node.op_type in _FREE_PRODUCERS and is_standard(node) and node.output and self.is_f32(node.output[0]):
                constants += self._retype_free(node, clamp)
        del graph.node[:]
        graph.node.extend(self.new_nodes)
        self.result.count("initializers_fp16", converted_inits)
        self.result.count("initializer_fp16_copies", copies)
        self.result.count("constants_fp16", constants)

    def _emit_node(self, node: NodeProto, plan: _Plan) -> None:
        for index, (name, want) in enumerate(zip(node.input, plan.inputs)):
            if name and want is not None and name in self.home:
                node.input[index] = self.resolve(name, want)
        after: list[NodeProto] = []
        for index, name in enumerate(node.output):
            if name and self.home.get(name) == F16 and name in self.pinned:
                fresh = self.ctx.names.fresh(f"{name}_fp16")
                node.output[index] = fresh
                self.fp16_name[name] = fresh
                self.aliases[fresh] = F16
                after.append(self._cast(fresh, name, F32))
        self.new_nodes.append(node)
        self.new_nodes.extend(after)

    def _retype_free(self, node: NodeProto, clamp: bool) -> int:
        """Retype a Constant/ConstantOfShape/Cast whose output went fp16, or add an fp16 Constant copy."""
        out = node.output[0]
        home = self.home.get(out)
        if node.op_type == "Cast":
            if home == F16:
                _set_attr(node, helper.make_attribute("to", F16))
                return 1
            return 0
        if node.op_type == "ConstantOfShape":
            if home != F16:
                return 0
            value = get_attr(node, "value")
            array = numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.zeros([1], np.float32)
            _set_attr(node, helper.make_attribute("value", numpy_helper.from_array(_to_fp16(array, clamp).reshape(1), "")))
            return 1
        tensor = constant_value(node)
        if tensor is None:
            return 0
        if home == F16:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", _fp16_tensor(tensor, "", clamp)))
            return 1
        if F16 in self.wants.get(out, set()):
            copy_name = self.ctx.names.fresh(f"{out}_fp16")
            copy = helper.make_node("Constant", [], [copy_name], name=self.ctx.names.fresh(f"{node.name or out}_fp16"))
            copy.attribute.append(helper.make_attribute("value", _fp16_tensor(tensor, "", clamp)))
            self.new_nodes.append(copy)
            self.fp16_name[out] = copy_name
            self.aliases[copy_name] = F16
            return 1
        return 0

    def resolve(self, name: str, want: int) -> str:
        """The name that carries ``name`` in type ``want`` (or its home for ANY), emitting a Cast if needed."""
        home = self.home[name]
        if want in (ANY, home):
            return self.fp16_name.get(name, name) if home == F16 else name
        if want == F32:  # home is F16
            if name in self.pinned:
                return name
            return self._cast_once(name, name, F32)
        if name in self.fp16_name:  # a float16 copy exists (constant copy or pinned value)
            return self.fp16_name[name]
        producer = self.view.producer.get(name)
        if producer is not None and producer.op_type == "Cast" and is_standard(producer) and get_attr(producer, "to") == F32:
            source = producer.input[0]  # already rewritten to the name carrying its home type
            if self.current_type(source) == F16:
                return source  # fp16 -> fp32 -> fp16 is the identity: read the fp16 value
        return self._cast_once(name, name, F16)

    def current_type(self, name: str) -> int | None:
        """The element type ``name`` carries in the graph being written."""
        if name in self.aliases:
            return self.aliases[name]
        if name in self.home:
            return self.home[name]
        return self.elem(name)

    def _cast_once(self, key: str, source: str, to: int) -> str:
        cached = self.cast_names.get((key, to))
        if cached is None:
            cached = self.cast_names[(key, to)] = self.ctx.names.fresh(f"{key}_{'fp16' if to == F16 else 'fp32'}")
            self.aliases[cached] = to
            self.new_nodes.append(self._cast(source, cached, to))
        return cached

    def _cast(self, source: str, target: str, to: int) -> NodeProto:
        self.result.count("casts_inserted", 1)
        return helper.make_node("Cast", [source], [target], name=self.ctx.names.fresh(f"{target}_cast"), to=to)

    # -- step 4: clean up
    def cleanup(self) -> None:
        """Remove redundant Cast pairs and no-op Casts; retype or drop value_info entries."""
        graph = self.graph
        final = dict(self.orig)
        final.update(self.home)
        final.update(self.aliases)
        for node in graph.node:
            if node.op_type == "Cast" and is_standard(node) and node.output:
                final[node.output[0]] = int(get_attr(node, "to"))  # type: ignore[arg-type]
        removed = _remove_redundant_casts(graph, final)
        self.result.count("casts_removed", removed)
        keep = []
        present = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        retyped = 0
        for value in graph.value_info:
            if value.name not in present:
                continue
            if value.type.WhichOneof("value") == "tensor_type" and final.get(value.name) == F16 and value.type.tensor_type.elem_type == F32:
                value.type.tensor_type.elem_type = F16
                retyped += 1
            keep.append(value)
        if len(keep) != len(graph.value_info):
            self.result.count("value_info_dropped", len(graph.value_info) - len(keep))
            copies = [onnx.ValueInfoProto() for _ in keep]
            for dst, src in zip(copies, keep):
                dst.CopyFrom(src)
            del graph.value_info[:]
            graph.value_info.extend(copies)
        self.result.count("value_info_retyped", retyped)

    def run(self) -> PassResult:
        """Decide, place, emit, clean up; nothing is written when no node converts."""
        self.decide()
        if not any(plan.convert for plan in self.plans.values()):
            return PassResult()
        self.place()
        self.emit()
        self.cleanup()
        kept: dict[str, int] = {}
        for node in self.view.nodes:
            plan = self.plans[id(node)]
            if not plan.convert and plan.reason not in ("", "free") and any(plan.outputs):
                kept[node.op_type] = kept.get(node.op_type, 0) + 1
        if kept:
            self.result.notes.append("fp16: kept in float32: " + ", ".join(f"{op}={n}" for op, n in sorted(kept.items())))
        return self.result


def _formal(formals: list, index: int) -> str | None:
    """The type string of the formal parameter actual ``index`` binds to (variadic last formals repeat)."""
    if index < len(formals):
        return formals[index].type_str
    if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return formals[-1].type_str
    return None


def _set_attr(node: NodeProto, attribute: onnx.AttributeProto) -> None:
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(attribute)


def _remove_redundant_casts(graph: GraphProto, types: dict[str, int | None]) -> int:
    """Bypass Casts that change nothing: to the type they read, or fp16->fp32->fp16 round trips.

    A bypassed Cast is deleted once nothing reads it; graph outputs and values read inside
    subgraphs are never renamed.
    """
    view = GraphView.build(graph)
    outputs = {o.name for o in graph.output}
    implicit = {name for names in view.implicit.values() for name in names}
    mapping: dict[str, str] = {}
    for node in view.nodes:
        if node.op_type != "Cast" or not is_standard(node) or not node.input or not node.output:
            continue
        out, source = node.output[0], node.input[0]
        if out in outputs or out in implicit:
            continue
        source = mapping.get(source, source)
        to = get_attr(node, "to")
        if types.get(source) == to:
            mapping[out] = source
            continue
        producer = view.producer.get(source)
        if (
            to == F16
            and producer is not None
            and producer.op_type == "Cast"
            and is_standard(producer)
            and get_attr(producer, "to") == F32
            and types.get(producer.input[0]) == F16
        ):
            mapping[out] = producer.input[0]
    if not mapping:
        return 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in mapping:
                node.input[index] = mapping[name]
    return _drop_dead_casts(graph)


def _drop_dead_casts(graph: GraphProto) -> int:
    """Delete Casts whose output nothing reads (repeatedly: a bypassed pair frees its first Cast)."""
    outputs = {o.name for o in graph.output}
    removed = 0
    while True:
        view = GraphView.build(graph)
        dead = {
            id(n)
            for n in view.nodes
            if n.op_type == "Cast" and is_standard(n) and n.output and n.output[0] not in outputs and not view.consumers.get(n.output[0])
        }
        if not dead:
            return removed
        kept = [n for n in view.nodes if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(kept)
        removed += len(dead)
