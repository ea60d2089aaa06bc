"""onnxruntime's QOperator form of a Q/DQ model: the ``qoperator`` pass (``--target ort-cpu``).

A Q/DQ model spells every int8 layer as DequantizeLinear inputs -> float op -> QuantizeLinear,
and onnxruntime's CPU QDQ transformer turns each such group into one QLinear kernel when it loads
the model. This pass writes those kernels into the file instead (the rules are in
:mod:`onnxopt.passes.qoperator_rules`):

* ``QLinearConv`` (a Relu/Clip before the Q is absorbed when the Q's saturation applies it) and
  ``QLinearMatMul``, standard ops;
* with ``contrib`` (default), com.microsoft ``QLinearAdd``, ``QLinearMul``,
  ``QLinearGlobalAveragePool``, ``QLinearAveragePool``, ``QLinearSigmoid``, ``QLinearLeakyRelu`` and
  ``QLinearConcat``, and a 2-D integer MaxPool as ``NhwcMaxPool`` between two Transposes;
* MaxPool / Reshape / Transpose / Flatten / Squeeze / Unsqueeze between a DQ and a Q of the same
  scale and zero point run on the integers directly (exact).
* a nearest Resize by 2^k on H and W (same scale and zero point) as k integer Resizes by 2 and a
  no-op Reshape: the form onnxruntime copies fast and leaves NCHW (``match_resize``).

What no longer reads a DequantizeLinear goes: the weights' DequantizeLinear nodes, the bias scales
(QLinearConv derives them), per-channel zero points of 0 (one shared zero); equal constants (the
zero points of most activations) are then stored once (``dedupe_initializers``). The file shrinks by
about the Q/DQ nodes' share, and loading skips the transformer. Groups that do not qualify stay in
Q/DQ form, which onnxruntime still runs; a note gives the commonest reasons. The kernels are the
ones onnxruntime would have picked, so outputs match the Q/DQ model's (up to a rounding step where
its transformer would have left a group in float). TensorRT and other runtimes take Q/DQ, not this
form: it is for ``--target ort-cpu`` only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.errors import OnnxoptError
from onnxopt.graph import (
    GraphScope,
    GraphView,
    drop_unread_initializers,
    is_standard,
    outer_references,
    rename_inputs,
    subgraphs,
)
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, check_patterns, matches_pattern, option
from onnxopt.passes.contrib_ops import MS_DOMAIN
from onnxopt.passes.cse import DedupeInitializers
from onnxopt.passes.fusion_support import drop_value_info, import_domain, replace_nodes
from onnxopt.passes.noop_rules import NoMatch
from onnxopt.passes.qoperator_rules import RULES, ZERO, Input, NewConstant, QMatch
from onnxopt.registry import register_pass
from onnxopt.shapes import StaticType, register_standin

PASS_NAME = "qoperator"
TARGET = "ort-cpu"
FLOAT_BY_CHOICE = "float by choice"  # the misses key of layers qdq keeps float with int8 weights (not a failed match)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
ZERO_TYPES = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
NCHW_TO_NHWC, NHWC_TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


@dataclass
class QOperatorOptions(PassOptions):
    """Options of :class:`QOperatorForm`."""

    contrib: bool = option(
        True,
        "also emit com.microsoft QLinearAdd/Mul/GlobalAveragePool/AveragePool/Sigmoid/LeakyRelu/Concat and NhwcMaxPool "
        "(false: standard ops only)",
    )
    exclude: tuple[str, ...] = option(
        (), "float ops left in Q/DQ form: node names, op types or regexes matching a whole node name, '|'-separated"
    )

    def validate(self) -> None:
        """Check the exclusion patterns."""
        check_patterns(PASS_NAME, "exclude", self.exclude)


@register_pass
class QOperatorForm(Pass):
    """Rewrite Q/DQ groups into onnxruntime's QOperator kernels (QLinearConv, QLinearMatMul, QLinearAdd, ...).

    Run after ``qdq`` with ``--target ort-cpu``. Pre: a model holding Q/DQ groups (per-tensor
    activations, constant scales). Post: each group onnxruntime's CPU QDQ transformer would fuse is one
    QLinear node writing the group's quantized output; DequantizeLinear nodes and scales nothing reads
    are removed; every other group, float op and subgraph node is kept as it was.
    """

    name = PASS_NAME
    lossy = True  # a group onnxruntime would have run in float now runs in its integer kernel
    tolerance = "int8"
    Options = QOperatorOptions
    preserves_types = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Check the target, then rewrite every graph, innermost first."""
        if ctx.target != TARGET:
            raise OnnxoptError(
                f"{PASS_NAME}: the QOperator form runs in onnxruntime's CPU provider only (--target {TARGET}), not {ctx.target}: "
                "other runtimes take the Q/DQ form that qdq writes"
            )
        result = super().run(model, ctx)
        if not result.modified and not any(n.op_type in QDQ_OPS for s in ctx.scopes() for n in s.graph.node):
            result.notes.append(f"{PASS_NAME}: no Q/DQ groups in the model (run qdq first)")
        return result

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every group of the graph, then replace them all at once and remove what nothing reads."""
        options: QOperatorOptions = self.options  # type: ignore[assignment]
        view = ctx.view(scope.graph)
        matches, misses = _find(view, ctx, options)
        float_layers = misses.pop(FLOAT_BY_CHOICE, 0)
        result = PassResult()
        if float_layers:
            result.count("float_layers_kept", float_layers)
            result.notes.append(
                f"{PASS_NAME}: {float_layers} layer(s) that qdq left to compute in float with int8 weights (read as Cast x scale) "
                "kept as they are"
            )
        if matches:
            _apply(scope.graph, view, matches, ctx, result)
            ctx.invalidate()
            named = _share_zero_points(scope.graph, ctx)
            shared = DedupeInitializers().run_graph(scope, ctx)  # the other equal constants (scales): one copy each
            merged = named + shared.counts.get("initializers_merged", 0)
            if merged:
                result.count("initializers_shared", merged)
        if misses and (matches or scope.parent is None):
            shown = "; ".join(f"{reason} ({count})" for reason, count in misses.most_common(3))
            result.notes.append(f"{PASS_NAME}: {sum(misses.values())} group(s) stay in Q/DQ form: {shown}")
            result.count("groups_kept_qdq", sum(misses.values()))
        return result


def _find(view: GraphView, ctx: PassContext, options: QOperatorOptions) -> tuple[list[QMatch], Counter]:
    """The groups to rewrite, and why the others that read a DequantizeLinear are not (reason: count)."""
    found: list[QMatch] = []
    misses: Counter = Counter()
    claimed: set[int] = set()
    for node in view.nodes:
        rule = RULES.get(node.op_type)
        reads_dq = any(view.producer.get(i) is not None and view.producer[i].op_type == "DequantizeLinear" for i in node.input)
        if rule is None or node.domain not in ("", "ai.onnx") or not reads_dq:
            continue
        if matches_pattern(node.name, options.exclude) or node.op_type in options.exclude:
            misses["excluded"] += 1
            continue
        if _float_by_choice(view, node):
            misses[FLOAT_BY_CHOICE] += 1
            continue
        try:
            found_match = rule(node, view, ctx, options.contrib)
        except NoMatch as exc:
            misses[f"{node.op_type}: {exc}"] += 1
            continue
        ids = {id(n) for n in found_match.nodes}
        if ids & claimed:
            continue
        claimed |= ids
        found.append(found_match)
    return found, misses


def _float_by_choice(view: GraphView, node: NodeProto) -> bool:
    """Whether ``node`` is a layer qdq keeps in float on purpose: its weight is ``Cast(int8 constant) x scale``."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    mul = view.producer.get(node.input[1])
    if mul is None or mul.op_type != "Mul" or not is_standard(mul):
        return False
    cast = view.producer.get(mul.input[0])
    if cast is None or cast.op_type != "Cast" or not is_standard(cast):
        return False
    weight = view.initializers.get(cast.input[0])
    return weight is not None and weight.data_type == TensorProto.INT8 and view.is_constant(mul.input[1])


def _apply(graph: GraphProto, view: GraphView, matches: list[QMatch], ctx: PassContext, result: PassResult) -> None:
    """Replace each group by its node (placed where the group's Q was), then sweep what nothing reads."""
    written: dict[object, str] = {}
    replaced: dict[int, list[NodeProto]] = {}
    stale: set[str] = set()
    read_by_groups: set[str] = set()
    for found in matches:
        inputs = [_input(graph, item, written, ctx) for item in found.inputs]
        output, layout = found.output, []
        if found.channels_last:
            inputs[0], output, layout = _channels_last(inputs[0], found.output, ctx)
        node = helper.make_node(
            found.op_type, inputs, [output], name=found.anchor.name or ctx.names.fresh(f"{found.output}_{found.op_type}")
        )
        if found.domain:
            node.domain = found.domain
            import_domain(ctx.model, found.domain)
        for key, value in found.attrs.items():
            node.attribute.append(value if isinstance(value, AttributeProto) else helper.make_attribute(key, value))
        for old in found.nodes:
            replaced[id(old)] = []
            read_by_groups.update(old.input)
            stale.update(o for o in old.output if o and o != found.output)
        steps = _steps(node, found, graph, written, ctx)
        replaced[id(found.nodes[-1])] = [layout[0], *steps, layout[1]] if layout else steps
        result.count(f"{found.anchor.op_type}_to_{found.op_type}")
    replace_nodes(graph, view.nodes, replaced)
    removed = _sweep_unread(graph)
    stale |= {o for n in removed for o in n.output}
    drop_value_info(graph, stale)
    dropped = drop_unread_initializers(ctx.model, read_by_groups | {i for n in removed for i in n.input})
    if removed:
        result.count("qdq_nodes_removed", len(removed))
    if dropped:
        result.count("initializers_removed", dropped)
    kinds = Counter(f"{m.anchor.op_type} -> {m.op_type}" for m in matches)
    result.notes.append(f"{PASS_NAME}: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))


def _share_zero_points(graph: GraphProto, ctx: PassContext) -> int:
    """Store equal scalar int8/uint8 initializers named ``*_zero_point`` (the names ``qdq`` writes) once, named after
    their value.

    Most activations share a few zero points; named after the first reader (``relu_0_zero_point`` read by
    a hundred nodes) the name would mislead, so the copy is ``zp_uint8_128``. Graph inputs and outputs and
    external tensors are never merged. Returns how many initializers went.
    """
    interface = {v.name for v in graph.input} | {v.name for v in graph.output}
    groups: dict[tuple[int, int], list[TensorProto]] = {}
    for tensor in graph.initializer:
        if (
            tensor.name.endswith("_zero_point")
            and tensor.name not in interface
            and tensor.data_type in ZERO_TYPES
            and not tensor.dims
            and tensor.data_location != TensorProto.EXTERNAL
        ):
            groups.setdefault((tensor.data_type, int(numpy_helper.to_array(tensor))), []).append(tensor)
    mapping: dict[str, str] = {}
    for (dtype, value), members in groups.items():
        if len(members) > 1:
            name = ctx.names.fresh(f"zp_{ZERO_TYPES[dtype]}_{value}".replace("-", "minus"))
            mapping.update((t.name, name) for t in members)
            members[0].name = name
    if not mapping:
        return 0
    rename_inputs(graph, mapping)
    drop_value_info(graph, set(mapping))
    return drop_unread_initializers(ctx.model, set(mapping))  # the copies nothing reads after the renames


def _channels_last(x: str, y: str, ctx: PassContext) -> tuple[str, str, list[NodeProto]]:
    """Names and Transposes around an NHWC node that stands for an NCHW op reading ``x`` and writing ``y``."""
    nhwc_x, nhwc_y = ctx.names.fresh(f"{x}_nhwc"), ctx.names.fresh(f"{y}_nhwc")
    to_nhwc = helper.make_node("Transpose", [x], [nhwc_x], name=ctx.names.fresh(f"{x}_to_nhwc"), perm=NCHW_TO_NHWC)
    to_nchw = helper.make_node("Transpose", [nhwc_y], [y], name=ctx.names.fresh(f"{y}_to_nchw"), perm=NHWC_TO_NCHW)
    return nhwc_x, nhwc_y, [to_nhwc, to_nchw]


def _steps(node: NodeProto, found: QMatch, graph: GraphProto, written: dict[object, str], ctx: PassContext) -> list[NodeProto]:
    """``node`` applied ``found.repeat`` times in a row, then the no-op Reshape of ``found.keep_nchw``."""
    out = node.output[0]
    steps = [node]
    for step in range(1, found.repeat):
        steps[-1].output[0] = ctx.names.fresh(f"{out}_step{step}")
        again = NodeProto.FromString(node.SerializeToString())
        again.name = ctx.names.fresh(f"{node.name}_step{step + 1}")
        again.input[0], again.output[0] = steps[-1].output[0], out
        steps.append(again)
    if found.keep_nchw:
        steps[-1].output[0] = ctx.names.fresh(f"{out}_nchw")
        shape = _input(graph, NewConstant("same_shape_4d", np.zeros(4, np.int64)), written, ctx)
        steps.append(helper.make_node("Reshape", [steps[-1].output[0], shape], [out], name=ctx.names.fresh(f"{out}_keep_nchw")))
    return steps


def _input(graph: GraphProto, item: Input, written: dict[object, str], ctx: PassContext) -> str:
    """A value name; the shared zero point of the type for ``(ZERO, dtype)`` and the initializer of a :class:`NewConstant`,
    each written once per graph (``written`` remembers them)."""
    if isinstance(item, str):
        return item
    if isinstance(item, NewConstant):
        if item.key() not in written:
            written[item.key()] = ctx.names.fresh(item.hint)
            graph.initializer.append(numpy_helper.from_array(item.value, written[item.key()]))
        return written[item.key()]
    marker, dtype = item
    assert marker == ZERO
    if dtype not in written:
        written[dtype] = ctx.names.fresh(f"zero_{ZERO_TYPES[dtype]}")
        graph.initializer.append(helper.make_tensor(written[dtype], dtype, [], [0]))
    return written[dtype]


def _sweep_unread(graph: GraphProto) -> list[NodeProto]:
    """Remove Q/DQ nodes whose outputs nothing reads (not graph outputs), repeatedly; the removed nodes."""
    removed: list[NodeProto] = []
    while True:
        read = {o.name for o in graph.output}
        for node in graph.node:
            read.update(node.input)
            for sub in subgraphs(node):
                read |= outer_references(sub)
        unread = [n for n in graph.node if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") and not any(o in read for o in n.output)]
        if not unread:
            return removed
        ids = {id(n) for n in unread}
        kept = [n for n in graph.node if id(n) not in ids]
        removed.extend(NodeProto.FromString(n.SerializeToString()) for n in unread)
        del graph.node[:]
        graph.node.extend(kept)


# ----------------------------------------------------------------------------- shape stand-ins

# op: (float op, number of quantized inputs); Concat's inputs are counted at run time
CONTRIB_FLOAT_OPS = {
    "QLinearAdd": ("Add", 2),
    "QLinearMul": ("Mul", 2),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", 1),
    "QLinearAveragePool": ("AveragePool", 1),
    "QLinearSigmoid": ("Sigmoid", 1),
    "QLinearLeakyRelu": ("LeakyRelu", 1),
}


def _qlinear_standin(node: NodeProto, static: StaticType) -> tuple[list[NodeProto], list] | None:
    """A QLinear contrib op as the Q/DQ group it stands for: DequantizeLinear inputs -> float op -> QuantizeLinear."""
    out = node.output[0] if node.output else ""
    inputs = list(node.input)
    if not out:
        return None
    if node.op_type == "QLinearConcat":
        if len(inputs) < 5 or (len(inputs) - 2) % 3:
            return None
        float_op, triples, y = "Concat", [inputs[i : i + 3] for i in range(2, len(inputs), 3)], inputs[:2]
    else:
        float_op, count = CONTRIB_FLOAT_OPS[node.op_type]
        if len(inputs) != 3 * count + 2:
            return None
        triples, y = [inputs[3 * i : 3 * i + 3] for i in range(count)], inputs[3 * count :]
    nodes = [helper.make_node("DequantizeLinear", t, [f"{out}__standin_x{i}"]) for i, t in enumerate(triples)]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "channels_last"}
    nodes.append(helper.make_node(float_op, [f"{out}__standin_x{i}" for i in range(len(triples))], [f"{out}__standin_y"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", [f"{out}__standin_y", *y], [out]))
    return nodes, []


def _nhwc_max_pool_standin(node: NodeProto, static: StaticType) -> tuple[list[NodeProto], list] | None:
    """com.microsoft NhwcMaxPool as Transpose -> MaxPool -> Transpose."""
    if len(node.input) != 1 or len(node.output) != 1:
        return None
    x, y = node.input[0], node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes = [
        helper.make_node("Transpose", [x], [f"{y}__standin_x"], perm=NHWC_TO_NCHW),
        helper.make_node("MaxPool", [f"{y}__standin_x"], [f"{y}__standin_y"], **attrs),
        helper.make_node("Transpose", [f"{y}__standin_y"], [y], perm=NCHW_TO_NHWC),
    ]
    return nodes, []


for _op in (*CONTRIB_FLOAT_OPS, "QLinearConcat"):
    register_standin(MS_DOMAIN, _op, _qlinear_standin)
register_standin(MS_DOMAIN, "NhwcMaxPool", _nhwc_max_pool_standin)
