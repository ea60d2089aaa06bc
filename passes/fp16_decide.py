"""Per-node precision decisions of the fp16 pass: which nodes compute in float16 and, for the others, why not.

:class:`Decider` reads the original graph (schemas at the model's opset, inferred types,
constants, the patterns of :mod:`~onnxopt.passes.fp16_patterns` and optionally calibrated
ranges) and returns one :class:`~onnxopt.passes.fp16_values.NodePlan` per node; it never
writes to the graph. The rules are listed in the docstring of :mod:`onnxopt.passes.fp16`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TypeProto, numpy_helper

from onnxopt.graph import is_standard, subgraphs
from onnxopt.passbase import PassResult, matches_pattern
from onnxopt.passes.fp16_patterns import reduction_extent, shape_tainted, variance_nodes
from onnxopt.passes.fp16_values import ANY, F16, F32, FP16_MAX, FREE_PRODUCERS, NodePlan, OriginalValues
from onnxopt.passes.noop_rules import get_attr

# Ops kept in float32 by default: they overflow in fp16 (exp, powers, sums of squares) or need
# fp32 accuracy (normalization statistics, coordinates, sorting, index generation).
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
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops kept float32 when they write a graph output: their small probabilities would be fp16 subnormals.
OUTPUT_HEADS = frozenset({"Sigmoid", "HardSigmoid"})
REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
# (op type, input index) slots that stay float32 when the node converts: coordinate math.
FP32_SLOTS = frozenset({("Resize", 1), ("Resize", 2), ("GridSample", 1), ("Upsample", 1)})

AbsmaxMeasure = Callable[[list[str]], Mapping[str, float]]  # tensor names -> calibrated largest |value|


@dataclass(frozen=True)
class DecisionRules:
    """The user's choices that steer the decisions (the fp16 pass's options, resolved)."""

    blocked: frozenset[str]  # op types kept in float32
    keep_nodes: tuple[str, ...]  # node names or full-match regexes kept in float32
    max_reduce: int  # largest reduction extent computed in fp16
    keep_out_of_range: bool  # a constant beyond the fp16 range keeps its reader float32 (else it is clamped)
    calib_limit: float  # calibrated |max| above which a tensor's producer and readers stay float32

    @staticmethod
    def blocked_ops(keep_fp32: tuple[str, ...], allow_fp16: tuple[str, ...]) -> frozenset[str]:
        """The default block list without ``allow_fp16``, plus ``keep_fp32``."""
        return frozenset((set(DEFAULT_KEEP_FP32) - set(allow_fp16)) | set(keep_fp32))


class Decider:
    """Decides every main-graph node's precision; counts why nodes stay float32 into ``result``.

    ``model`` is only read (its opset imports and IR version feed onnx's per-node type inference).
    """

    def __init__(self, model: ModelProto, values: OriginalValues, rules: DecisionRules, opset: int, result: PassResult) -> None:
        self.model, self.values, self.rules, self.opset, self.result = model, values, rules, opset, result
        self.view = values.view
        self.plans: dict[int, NodePlan] = {}

    def decide(self, measure_absmax: AbsmaxMeasure | None = None) -> dict[int, NodePlan]:
        """Every node's plan by ``id(node)``; with ``measure_absmax``, calibrated ranges keep hot tensors' nodes float32."""
        view = self.view
        tainted = shape_tainted(self.values)
        variance = variance_nodes(self.values)
        for node in view.nodes:
            plan = self._decide_node(node, tainted, variance)
            self.plans[id(node)] = plan
        if measure_absmax is not None:
            self._apply_calibration(measure_absmax)
        plans = [self.plans[id(node)] for node in view.nodes]
        self.result.count("nodes_fp16", sum(1 for plan in plans if plan.convert))
        self.result.count("nodes_kept_fp32", sum(1 for plan in plans if not plan.convert and plan.reason != "free" and any(plan.outputs)))
        return self.plans

    def schema_plan(self, node: NodeProto) -> NodePlan:
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
        elem, is_f32 = self.values.elem, self.values.is_f32
        convert = {
            g
            for g, names in members.items()
            if "tensor(float16)" in allowed[g] and g in input_params and any(elem(n) == F32 for n in names)
        }
        for g in list(convert):
            if any(elem(n) != F32 for n in members[g]):
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
        plan = NodePlan(True, "")
        for name, group in zip(node.input, in_groups):
            plan.inputs.append(F16 if name and group in convert else (F32 if is_f32(name) else None))
        for name, group in zip(node.output, out_groups):
            plan.outputs.append(F16 if name and group in convert else (F32 if is_f32(name) else None))
        if not self._inference_agrees(schema, node, plan):
            keep.reason = "onnx's type inference disagrees with the schema reading"
            return keep
        return plan

    def _inference_agrees(self, schema: onnx.defs.OpSchema, node: NodeProto, plan: NodePlan) -> bool:
        """Whether onnx's inference for ``node`` with the planned input types gives the planned output types.

        Guards against type relations the constraint lists do not show; when inference cannot
        run on the node even with its original types, the schema reading stands.
        """
        original: dict[str, TypeProto] = {}
        for name in node.input:
            if name and name not in original:
                tp = self.values.types.get(name)
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

    def _decide_node(self, node: NodeProto, tainted: set[str], variance: set[int]) -> NodePlan:
        """The plan of one node: the first rule that keeps it float32, else what its schema allows."""
        rules = self.rules
        if not is_standard(node):
            return self._kept(node, "custom-domain op")
        if subgraphs(node):
            return self._kept(node, "holds subgraphs")
        if node.op_type in FREE_PRODUCERS:
            return self._kept(node, "free")
        if node.op_type in rules.blocked:
            return self._kept(node, "blocked op type")
        if node.op_type in QDQ_OPS or any(getattr(self.view.producer.get(i), "op_type", "") == "DequantizeLinear" for i in node.input):
            return self._kept(node, "int8 layer")  # INT8 where quantized: Q/DQ and their readers stay as the qdq pass wrote them
        if rules.keep_nodes and node.name and matches_pattern(node.name, rules.keep_nodes):
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
            extent = reduction_extent(node, self.values)
            if extent is None or extent > rules.max_reduce:
                return self._kept(node, "large reduction")
        plan = self.schema_plan(node)
        if not plan.convert:
            return plan
        if rules.keep_out_of_range:
            for name, want in zip(node.input, plan.inputs):
                if want == F16:
                    tensor = self.values.constant_tensor(name)
                    if tensor is not None and _out_of_range(numpy_helper.to_array(tensor)):
                        self.result.count("kept_fp32_for_range", 1)
                        return self._kept(node, "constant beyond fp16 range")
        return plan

    def _kept(self, node: NodeProto, reason: str) -> NodePlan:
        """A float32 plan for ``node``: its readers want float32 (or either type) and it writes float32."""
        inputs = [self._keep_want(node, i) for i in range(len(node.input))]
        return NodePlan(False, reason, inputs, [F32 if self.values.is_f32(o) else None for o in node.output])

    def _keep_want(self, node: NodeProto, index: int) -> int | None:
        """What a float32-kept node wants on input ``index``."""
        name = node.input[index]
        if not self.values.is_f32(name):
            return None
        if node.op_type in ("Shape", "Size") and is_standard(node):
            return ANY
        if node.op_type == "Cast" and is_standard(node) and get_attr(node, "to") in (F32, F16):
            return ANY
        return F32

    def _apply_calibration(self, measure_absmax: AbsmaxMeasure) -> None:
        """Keep float32 the producers (and readers) of tensors whose calibrated |max| is too large."""
        candidates = sorted(
            {o for node in self.view.nodes if self.plans[id(node)].convert for o in node.output if o and self.values.is_f32(o)}
        )
        if not candidates:
            return
        absmax = measure_absmax(candidates)
        hot = {name for name in candidates if absmax.get(name, 0.0) > self.rules.calib_limit}
        for name in sorted(hot):
            nodes = [self.view.producer[name], *self.view.consumers.get(name, ())]
            for node in nodes:
                if self.plans[id(node)].convert:
                    self.plans[id(node)] = self._kept(node, "calibrated range")
        self.result.count("kept_fp32_calibrated", len(hot))


def kept_summary(nodes: list[NodeProto], plans: Mapping[int, NodePlan]) -> str | None:
    """The report note counting, per op type, the nodes a rule kept in float32 (None when there are none)."""
    kept: dict[str, int] = {}
    for node in nodes:
        plan = plans[id(node)]
        if not plan.convert and plan.reason not in ("", "free") and any(plan.outputs):
            kept[node.op_type] = kept.get(node.op_type, 0) + 1
    if not kept:
        return None
    return "fp16: kept in float32: " + ", ".join(f"{op}={n}" for op, n in sorted(kept.items()))


def _formal(formals: list, index: int) -> str | None:
    """The type string of the formal parameter actual ``index`` binds to (variadic last formals repeat)."""
    if index < len(formals):
        return formals[index].type_str
    if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return formals[-1].type_str
    return None


def _out_of_range(array: np.ndarray) -> bool:
    """Whether a float32 array holds a finite value beyond the float16 range."""
    if array.dtype != np.float32 or array.size == 0:
        return False
    finite = array[np.isfinite(array)]
    return bool(finite.size and np.abs(finite).max() > FP16_MAX)
