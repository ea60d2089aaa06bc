"""Where the ``qdq`` pass puts Q/DQ pairs: a plan of quantized tensors, weights and scale groups.

The plan is computed from the graph alone (no statistics), so it can be recomputed after a
statistics-driven guard forbids some tensors. Two placements:

* ``trt`` / ``portable``: Q/DQ on the activation inputs of Conv, ConvTranspose, Gemm and MatMul,
  plus the skip input of residual Adds; Concat inputs share the scale of a quantized Concat
  output; everything else (activations, LayerNorm, Softmax) stays in float.
* ``ort-cpu``: every tensor around Conv/Gemm/MatMul is quantized, and int8 is propagated through
  the ops onnxruntime's CPU QDQ transformer runs in uint8 (Add, Mul, Concat, pools, Sigmoid,
  Resize, data movement), so that its QLinear* kernels replace whole chains; a Conv's single
  Relu/Clip reader is absorbed (the Q after it has zero point 0, onnxruntime drops the Relu). A Concat's inputs
  borrow its output's scale where nothing else reads them (its QLinearConcat then copies them).
  ConvTranspose, which onnxruntime's CPU provider computes in float whatever its Q/DQ, keeps
  float activations with int8 weights (no Q/DQ pair between it and a float reader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto

from onnxopt.graph import GraphView, is_standard
from onnxopt.passbase import matches_pattern

ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# anchors onnxruntime (1.32) runs in float on the CPU whatever their Q/DQ: int8 weights, float activations on ort-cpu
FLOAT_ON_CPU = ("ConvTranspose",)
# layers an earlier pass already quantized (int8_dynamic, woq): like an anchor, they end a float tail
QUANTIZED_LAYERS = frozenset({"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "MatMulNBits", "MatMulInteger", "ConvInteger"})
# ops that onnxruntime CPU runs in uint8 between DQ and Q (QLinear* kernels, or uint8 directly)
ORT_INT8 = {"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Sigmoid", "LeakyRelu", "Resize"}
# ops whose output keeps its input's quantization (onnxruntime drops the Q/DQ around them)
ORT_SAME_SCALE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize", "Slice", "Gather"}
ABSORBED = ("Relu", "Clip")
# ort-cpu: readers that take an int8 tensor (through its DequantizeLinear) into a uint8 kernel; an int8 op none of whose
# readers is one of these stays float (a quantized Add before a Softmax would round the scores to the mask's scale)
INT8_READERS = frozenset({*ANCHORS, *ORT_INT8, *ORT_SAME_SCALE, *ABSORBED})
# constants beyond this magnitude (or not finite) are masks and sentinels, not values 8 bits can hold
MAX_QUANTIZED_MAGNITUDE = 1e30
# ort-cpu: convolutions onnxruntime's uint8 kernels run slower than its float ones (benchmarks/conv_kernels.py and its
# section in benchmarks/README.md): a spatial kernel with fewer multiply-adds per output value (its im2col GEMM is too shallow; RGB and
# grey stems), and a depthwise kernel over fewer channels (it vectorizes over channels)
SLOW_INT8_MACS = 64
SLOW_INT8_DEPTHWISE = 32
# which inputs of an op are the data (activations) that are quantized
DATA_INPUTS = {"Resize": (0,), "Reshape": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Gather": (0,), "Clip": (0,)}


@dataclass
class Plan:
    """The tensors to quantize, the anchors whose weights are quantized, and scale groups."""

    tensors: list[str] = field(default_factory=list)  # activations that get one Q/DQ pair each, in graph order
    anchors: list[NodeProto] = field(default_factory=list)  # nodes whose constant weight (input 1) is quantized
    constants: dict[str, list[NodeProto]] = field(default_factory=dict)  # ort-cpu: constant inputs of int8 ops -> readers
    groups: dict[str, str] = field(default_factory=dict)  # tensor -> representative of its scale group
    readers: dict[str, set[int]] = field(default_factory=dict)  # tensor -> ids of nodes that read its DQ output
    concats: list[NodeProto] = field(default_factory=list)  # Concats whose inputs were considered (range guard)
    folded: dict[str, tuple[str, float]] = field(default_factory=dict)  # ort-cpu: Mul(x, c > 0) output -> (root tensor, factor)
    weight_only: list[NodeProto] = field(default_factory=list)  # ort-cpu: output layers with int8 weights and float activations
    removed: set[int] = field(default_factory=set)  # ids of the Mul nodes folded into a DequantizeLinear scale
    # ort-cpu: the output of a same-scale op (MaxPool, Reshape, ...) reading a folded Mul -> (root tensor, factor): its Q
    # takes the root's parameters with the scale times factor, exactly as the folded DequantizeLinear does
    scaled: dict[str, tuple[str, float]] = field(default_factory=dict)
    layers: list[NodeProto] = field(default_factory=list)  # every quantized Conv/Gemm/MatMul (also act x act) and weight-only layer
    float_path: set[str] = field(default_factory=set)  # quantized tensors also flowing float to an output: planned readers only
    # ort-cpu: tensors that take their scale group's range without widening it (a Concat's inputs take its output's)
    borrowed: set[str] = field(default_factory=set)

    def group_of(self, name: str) -> str:
        """The representative of ``name``'s scale group."""
        root = name
        while self.groups.get(root, root) != root:
            root = self.groups[root]
        return root

    def join(self, a: str, b: str) -> None:
        """Put ``a`` and ``b`` in one scale group."""
        ra, rb = self.group_of(a), self.group_of(b)
        if ra != rb:
            self.groups[max(ra, rb)] = min(ra, rb)


def excluded(node: NodeProto, patterns: tuple[str, ...]) -> bool:
    """Whether a node is excluded: its name or op type equals a pattern, or a pattern (regex) matches its whole name."""
    return node.op_type in patterns or (bool(node.name) and matches_pattern(node.name, patterns))


class Planner:
    """Computes a :class:`Plan` for one graph (see the module docstring)."""

    def __init__(
        self,
        view: GraphView,
        is_float: dict[str, bool],
        *,
        target: str,
        exclude: tuple[str, ...],
        keep_outputs: bool,
        float_nodes: frozenset[int] = frozenset(),
        weight_only_nodes: frozenset[int] = frozenset(),
    ) -> None:
        self.view = view
        self.float_ids = {id(n) for i, n in enumerate(view.nodes) if i in float_nodes}  # anchors kept float (by position)
        self.weight_only_ids = {id(n) for i, n in enumerate(view.nodes) if i in weight_only_nodes}  # ort-cpu: float activations
        self.is_float = is_float
        self.ort = target == "ort-cpu"
        self.exclude = exclude
        self.keep_outputs = keep_outputs

    # -- helpers -------------------------------------------------------------------------------

    def activation(self, name: str) -> bool:
        """A float32 tensor computed at run time (not a constant)."""
        return (
            bool(name)
            and not self.view.is_constant(name)
            and self.is_float.get(name, False)
            and (name in self.view.producer or name in self.view.graph_inputs)
        )

    def weight_ok(self, node: NodeProto) -> bool:
        """Whether an anchor can be quantized: standard, not excluded, weights float constants where required."""
        if not is_standard(node) or excluded(node, self.exclude) or id(node) in self.float_ids:
            return False
        if node.op_type in ("Conv", "ConvTranspose"):
            return len(node.input) >= 2 and self.view.is_constant(node.input[1]) and self.activation(node.input[0])
        if node.op_type == "Gemm":
            return (
                len(node.input) >= 2
                and self.activation(node.input[0])
                and (self.view.is_constant(node.input[1]) or self.activation(node.input[1]))
            )
        if node.op_type == "MatMul":
            return (
                len(node.input) == 2
                and self.activation(node.input[0])
                and (self.view.is_constant(node.input[1]) or self.activation(node.input[1]))
            )
        return False

    def float_tail(self) -> set[str]:
        """Tensors from which a graph output is reached without passing an anchor (kept float with ``keep_outputs``)."""
        tail: set[str] = set()
        if not self.keep_outputs:
            return tail
        stack = list(self.view.graph_outputs)
        while stack:
            name = stack.pop()
            if name in tail:
                continue
            tail.add(name)
            node = self.view.producer.get(name)
            if node is None:
                continue
            if node.op_type in QUANTIZED_LAYERS:
                continue  # a layer quantized by an earlier pass: what feeds it is not output precision
            for inp in node.input:
                if node.op_type in ANCHORS:
                    continue  # the anchor itself stays float; its inputs may be quantized for other readers
                if inp and not self.view.is_constant(inp):
                    stack.append(inp)
        return tail

    def downstream(self, start: str) -> set[str]:
        """Tensors reached from ``start`` through non-anchor nodes (the output path of a guarded Concat)."""
        seen: set[str] = set()
        stack = [start]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for reader in self.view.consumers.get(name, []):
                if reader.op_type in ANCHORS:
                    continue
                stack.extend(o for o in reader.output if o)
        return seen

    # -- the plan ------------------------------------------------------------------------------

    def plan(self, forbidden: set[str] = frozenset()) -> Plan:  # type: ignore[assignment]
        """The placement for this graph; ``forbidden`` tensors (and anchors reading or writing them) stay float."""
        view = self.view
        plan = Plan()
        tail = self.float_tail()
        keep = tail | set(forbidden)
        chosen: dict[str, None] = {}

        def want(name: str, reader: NodeProto | None) -> None:
            chosen.setdefault(name, None)
            if reader is not None:
                plan.readers.setdefault(name, set()).add(id(reader))

        anchors = []
        for node in view.nodes:
            if node.op_type not in ANCHORS or not self.weight_ok(node):
                continue
            # onnxruntime's CPU provider has no integer ConvTranspose kernel: it computes a Q/DQ one in float anyway
            if id(node) in self.weight_only_ids or (self.ort and node.op_type in FLOAT_ON_CPU):
                if self.ort and view.is_constant(node.input[1]) and not any(i in forbidden for i in node.input if i):
                    plan.weight_only.append(node)
                continue
            # an input on a float path to a graph output (a residual stream) is quantized for this reader only
            if node.output[0] in keep or any(i in forbidden for i in node.input if i):
                if (
                    self.ort
                    and node.output[0] in tail
                    and view.is_constant(node.input[1])
                    and not any(i in forbidden for i in node.input if i)
                ):
                    plan.weight_only.append(node)  # feeds a graph output: float activations, int8 weight (file size)
                continue
            anchors.append(node)
        plan.anchors = [n for n in anchors if view.is_constant(n.input[1])]
        plan.layers = anchors + plan.weight_only
        anchor_ids = {id(n) for n in anchors}
        for node in anchors:
            for name in node.input[:2]:
                if self.activation(name):
                    want(name, node)
                    if name in tail:
                        plan.float_path.add(name)
        if self.ort:
            self._ort_outputs(plan, anchors, keep, want)
        else:
            self._trt_extras(plan, anchor_ids, keep, want)
        plan.tensors = [n for n in self._graph_order() if n in chosen and n not in plan.folded]
        plan.concats = [n for n in view.nodes if n.op_type == "Concat" and n.output[0] in chosen]
        return plan

    def _graph_order(self) -> list[str]:
        names = [i for i in self.view.graph_inputs if not self.view.is_constant(i)]
        names.sort()
        for node in self.view.nodes:
            names.extend(o for o in node.output if o)
        return names

    def _single_reader(self, name: str) -> NodeProto | None:
        readers = self.view.consumers.get(name, [])
        if len(readers) == 1 and name not in self.view.graph_outputs:
            return readers[0]
        return None

    def _trt_extras(self, plan: Plan, anchor_ids: set[int], keep: set[str], want) -> None:
        view = self.view
        # residual Add: the input that is not a quantized branch (Conv [+ Relu/Clip]) gets Q/DQ
        for node in view.nodes:
            if node.op_type != "Add" or not is_standard(node) or excluded(node, self.exclude) or len(node.input) != 2:
                continue
            a, b = node.input
            if not (self.activation(a) and self.activation(b)) or node.output[0] in keep or a in keep or b in keep:
                continue
            branch = [self._is_branch(x, anchor_ids) for x in (a, b)]
            if branch[0]:
                want(b, node)  # both branches: TensorRT fuses the first into the Conv, the second needs a DQ
            elif branch[1]:
                want(a, node)
        # Concat: inputs share the output's scale, so TensorRT can elide the Concat
        changed = True
        while changed:
            changed = False
            for node in view.nodes:
                if node.op_type != "Concat" or not is_standard(node) or node.output[0] not in plan.readers:
                    continue
                for name in node.input:
                    if self.activation(name) and name not in keep:
                        if node.output[0] in plan.readers and id(node) not in plan.readers.get(name, set()):
                            want(name, node)
                            changed = True
                        plan.join(name, node.output[0])

    def _is_branch(self, name: str, anchor_ids: set[int]) -> bool:
        """Whether ``name`` is written by a quantized Conv/Gemm/MatMul that TensorRT can fuse with the Add."""
        node = self.view.producer.get(name)
        return node is not None and id(node) in anchor_ids and self._single_reader(name) is not None

    def _ort_outputs(self, plan: Plan, anchors: list[NodeProto], keep: set[str], want) -> None:
        view = self.view
        quantized: set[str] = set(plan.readers)  # int8-valued tensors (with a Q/DQ pair, absorbed, or folded)
        handled: set[int] = {id(n) for n in anchors}

        def add(name: str, reader: NodeProto | None) -> None:
            quantized.add(name)
            if name not in plan.folded:
                want(name, reader)

        def output(node: NodeProto) -> None:
            """Quantize a node's output, or the output of its single Relu/Clip reader (absorbed into the Q)."""
            out = node.output[0]
            reader = self._single_reader(out)
            if (
                reader is not None
                and reader.op_type in ABSORBED
                and is_standard(reader)
                and not excluded(reader, self.exclude)
                and reader.output[0] not in keep
                and self.activation(reader.output[0])
            ):
                handled.add(id(reader))
                quantized.add(out)  # no Q/DQ between the op and its Relu/Clip: onnxruntime drops it before the Q
                add(reader.output[0], None)
            elif out not in keep and out not in view.graph_outputs:
                add(out, None)

        for node in anchors:
            output(node)
        # propagate int8 through the ops onnxruntime runs in uint8, in graph order
        for node in view.nodes:
            op = node.op_type
            if id(node) in handled or not is_standard(node) or excluded(node, self.exclude) or not node.output or node.output[0] in keep:
                continue
            if op not in ORT_INT8 and op not in ORT_SAME_SCALE and op not in ABSORBED:
                continue
            if not self.activation(node.output[0]):
                continue
            positions = DATA_INPUTS.get(op, tuple(range(len(node.input))))
            data = [node.input[i] for i in positions if i < len(node.input) and node.input[i]]
            acts = [d for d in data if self.activation(d)]
            if not acts or any(a in keep for a in acts):
                continue
            consts = [d for d in data if d not in acts]
            if consts and (op not in ("Add", "Mul", "Concat") or not all(self.bounded_constant(c) for c in consts)):
                continue
            if op == "Mul" and len(acts) == 1 and acts[0] in quantized and node.output[0] not in view.graph_outputs:
                factor = self.positive_scalar(consts[0]) if len(consts) == 1 else None
                source = acts[0]
                if factor is not None and (
                    source in plan.folded or source in plan.readers or source in view.graph_inputs or source in view.producer
                ):
                    root, base = plan.folded.get(source, (source, 1.0))
                    if root in plan.readers or root in plan.folded or self._has_pair(root, quantized):
                        handled.add(id(node))
                        add(root, None)
                        plan.folded[node.output[0]] = (root, base * factor)
                        plan.removed.add(id(node))
                        quantized.add(node.output[0])
                        continue
            if not self._feeds_int8(node.output[0]):
                continue  # nothing after it runs in int8: quantizing it only adds rounding (and a mask's range to the scores)
            if op in ("Add", "Mul"):
                if not any(a in quantized for a in acts):
                    continue
            elif not all(a in quantized for a in acts):
                continue
            handled.add(id(node))
            for a in acts:
                add(a, node)
            if op in ("Add", "Mul", "Concat"):
                for c in consts:
                    plan.constants.setdefault(c, []).append(node)
            if op in ORT_SAME_SCALE:
                source = acts[0]
                link = plan.folded.get(source) or plan.scaled.get(source)
                plan.join(node.output[0], link[0] if link else source)
                if link:
                    plan.scaled[node.output[0]] = link  # onnxruntime drops the DQ/Q around the op only if they match
            output(node)
        concats = [n for n in view.nodes if n.op_type == "Concat" and id(n) in handled and n.output[0] in quantized]
        if concats:
            members: dict[str, set[str]] = {}
            for name in quantized:
                members.setdefault(plan.group_of(name), set()).add(name)
            linked = {root for root, _ in plan.folded.values()} | {root for root, _ in plan.scaled.values()}
            special = plan.folded.keys() | plan.scaled.keys() | linked | plan.float_path | set(view.graph_outputs)
            for node in concats:
                self._share_concat_scale(plan, node, members, special)

    def _share_concat_scale(self, plan: Plan, node: NodeProto, members: dict[str, set[str]], special: set[str]) -> None:
        """ort-cpu: a Concat's inputs take its output's scale where nothing else reads them at their own.

        onnxruntime's QLinearConcat copies inputs whose scale and zero point equal the output's, and requantizes the
        others (about twice the time on PP-OCR det's FPN Concat). The output's range stays what calibration found
        (the inputs borrow it), so the Concat's values are the same; each input is rounded once instead of twice.
        An input joins with the tensors it shares a scale with (through Resize, Reshape, ...) only if each of them is
        read by nothing outside that chain and the Concat, and none is ``special`` (a graph output, on a float path,
        or carrying or lending a folded Mul's factor). ``members`` maps each scale group's representative to its
        quantized tensors (kept up to date here).
        """
        out = node.output[0]
        if out in plan.scaled or out in plan.folded or self._absorbed_input(out):
            return
        for name in dict.fromkeys(node.input):
            root, target = plan.group_of(name), plan.group_of(out)
            if name not in members.get(root, ()) or root == target:
                continue
            group = members[root]
            inside = group | members[target]
            if group & special:
                continue
            if not all(r is node or any(o in inside for o in r.output) for m in group for r in self.view.consumers.get(m, [])):
                continue
            plan.borrowed |= group
            plan.join(name, out)
            merged = members.pop(root) | members.pop(target)
            members[plan.group_of(out)] = merged

    def _feeds_int8(self, name: str) -> bool:
        """Whether some reader of ``name`` can take it in int8 (see INT8_READERS)."""
        return any(r.op_type in INT8_READERS and is_standard(r) for r in self.view.consumers.get(name, []))

    def bounded_constant(self, name: str) -> bool:
        """Whether a constant operand holds only finite values within MAX_QUANTIZED_MAGNITUDE (not a mask or sentinel)."""
        tensor = self.view.initializers.get(name)
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
            return False
        from onnx import numpy_helper

        value = numpy_helper.to_array(tensor)
        if value.dtype.kind != "f":
            return True
        return bool(np.all(np.isfinite(value)) and (value.size == 0 or np.abs(value).max() <= MAX_QUANTIZED_MAGNITUDE))

    def _has_pair(self, name: str, quantized: set[str]) -> bool:
        """Whether ``name`` is (or can be) quantized with its own Q/DQ pair (not an absorbed intermediate)."""
        return name in quantized and not self._absorbed_input(name)

    def _absorbed_input(self, name: str) -> bool:
        reader = self._single_reader(name)
        return reader is not None and reader.op_type in ABSORBED

    def positive_scalar(self, name: str) -> float | None:
        """The value of a one-element positive finite float constant, else None."""
        tensor = self.view.initializers.get(name)
        if tensor is None or not self.view.is_constant(name) or tensor.data_type != TensorProto.FLOAT:
            return None
        from onnx import numpy_helper

        value = numpy_helper.to_array(tensor)
        if value.size != 1:
            return None
        number = float(value.reshape(-1)[0])
        return number if 0 < number < float("inf") and value.ndim <= 1 else None


def slow_int8_convs(view: GraphView) -> frozenset[int]:
    """ort-cpu: positions of the Convs with a constant weight that onnxruntime runs slower in uint8 than in float.

    Those are spatial convolutions with fewer than ``SLOW_INT8_MACS`` multiply-adds per output value (Cin x kernel
    area: a 3x3 stem on RGB or grey input) and depthwise ones over fewer than ``SLOW_INT8_DEPTHWISE`` channels.
    """
    slow = set()
    for position, node in enumerate(view.nodes):
        if node.op_type != "Conv" or not is_standard(node) or len(node.input) < 2 or not view.is_constant(node.input[1]):
            continue
        dims = list(view.initializers[node.input[1]].dims)
        if len(dims) < 3:
            continue
        area = math.prod(dims[2:])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group == 1 and area > 1 and dims[1] * area < SLOW_INT8_MACS:
            slow.add(position)
        elif group > 1 and dims[1] == 1 and group < SLOW_INT8_DEPTHWISE:
            slow.add(position)
    return frozenset(slow)


def float_map(view: GraphView, types: dict) -> dict[str, bool]:
    """Whether each named value is a float32 tensor (by inferred type)."""
    result: dict[str, bool] = {}
    for name, type_proto in types.items():
        result[name] = type_proto.WhichOneof("value") == "tensor_type" and type_proto.tensor_type.elem_type == TensorProto.FLOAT
    for name, tensor in view.initializers.items():
        result[name] = tensor.data_type == TensorProto.FLOAT
    return result
