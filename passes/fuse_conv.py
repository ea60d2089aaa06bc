"""Conv fusions: BatchNormalization and per-channel Mul/Add (after a Conv, or before an unpadded one) folded into
weights, Pad into pads.

The matching and weight arithmetic live in :mod:`onnxopt.passes.fuse_conv_rules` (and, for the
affine before a Conv, :mod:`onnxopt.passes.fuse_conv_input`). Each
pass collects every match of a graph first, then rewrites; folded weights always go into
new initializers (the old ones are left for ``eliminate_dead_code``), so weights shared
with other nodes are never changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, helper, numpy_helper

from onnxopt.graph import GraphScope, node_label
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.passes.fuse_conv_input import InputFold, match_input_affine
from onnxopt.passes.fuse_conv_rules import (
    CONV_OPS,
    LoneBatchNorm,
    NoMatch,
    PadFusion,
    WeightFold,
    match_affine_chain,
    match_batchnorm_fold,
    match_lone_batchnorm,
    match_pad_fusion,
)
from onnxopt.passes.fusion_support import drop_value_info, replace_nodes
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")


def _debug(pass_name: str, node: NodeProto, exc: NoMatch) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s is kept: %s", pass_name, node_label(node), exc)


def apply_weight_folds(graph: GraphProto, folds: list[WeightFold], ctx: PassContext, replaced: dict[int, list[NodeProto]]) -> set[str]:
    """Give each folded node its new weight/bias initializers and its last reader's output name.

    The nodes folded away are added to ``replaced`` (for :func:`replace_nodes`); returns the
    value names that disappeared.
    """
    stale: set[str] = set()
    for fold in folds:
        node = fold.node
        weight_name = ctx.names.fresh(f"{node.input[1]}_folded")
        bias_base = node.input[2] if len(node.input) > 2 and node.input[2] else f"{fold.output}_bias"
        bias_name = ctx.names.fresh(f"{bias_base}_folded")
        graph.initializer.append(numpy_helper.from_array(fold.weight, weight_name))
        graph.initializer.append(numpy_helper.from_array(fold.bias, bias_name))
        node.input[1] = weight_name
        if len(node.input) > 2:
            node.input[2] = bias_name
        else:
            node.input.append(bias_name)
        if fold.kind == "gemm":
            _set_float(node, "beta", 1.0)
        stale.add(node.output[0])
        node.output[0] = fold.output
        for removed in fold.removed:
            stale.update(o for o in removed.output if o and o != fold.output)
            replaced[id(removed)] = []
    return stale


def _set_float(node: NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute(name, value))


@register_pass
class FoldBatchNorm(Pass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm before it, or make it Mul+Add.

    Pre: types inferred (``ctx.types``, used for the Mul+Add form). A standard
    BatchNormalization in inference form (opset < 7: is_test=1; opset < 9: spatial=1;
    opset >= 14: training_mode=0; before opset 14 no statistics outputs declared, from 14 on
    none used) with constant float scale/B/mean/var is folded when its input is the output of
    a standard Conv or ConvTranspose (any group, any rank, with or without bias) or Gemm
    (opset >= 7; transB 0/1, alpha/beta, C optional from opset 11) that nothing else reads,
    with constant float weights: the weights are scaled per output channel (ConvTranspose:
    axis 1 within each group; Gemm: the columns of op(B)), the bias (Gemm: C, beta becomes 1)
    absorbs the shift. Otherwise, with ``lone_to_mul_add`` and opset >= 7, a BatchNormalization
    on an input of known rank and float type becomes ``Mul(x, s) -> Add(., t)`` with
    constants of shape [C, 1, ...] (rank-aware), which later passes can fold.

    Post: the folded node writes the BatchNormalization's output (graph outputs keep their
    names); folded weights are new initializers computed in float64 and cast back (a result
    not finite in the weight dtype is not folded). Nothing is done in IR < 4 models (new
    initializers would have to be graph inputs). Custom-domain ops are never touched.
    """

    name = "fold_batchnorm"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fold_batchnorm."""

        lone_to_mul_add: bool = option(True, "rewrite a BatchNormalization that cannot be folded as Mul + Add")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every BatchNormalization, then fold or rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        graph = scope.graph
        view = ctx.view(graph)
        folds: list[WeightFold] = []
        lone: list[LoneBatchNorm] = []
        for node in view.nodes:
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            try:
                folds.append(match_batchnorm_fold(node, view, ctx))
                continue
            except NoMatch as exc:
                _debug(self.name, node, exc)
            if self.options.lone_to_mul_add:  # type: ignore[attr-defined]
                try:
                    lone.append(match_lone_batchnorm(node, view, ctx))
                except NoMatch as exc:
                    _debug(self.name, node, exc)
        if not folds and not lone:
            return result
        replaced: dict[int, list[NodeProto]] = {}
        stale = apply_weight_folds(graph, folds, ctx, replaced)
        for fold in folds:
            result.count(f"batchnorm_into_{fold.node.op_type}")
        if lone:
            stale |= self._apply_lone(graph, lone, ctx, replaced)
            result.count("batchnorm_to_mul_add", len(lone))
        replace_nodes(graph, view.nodes, replaced)
        drop_value_info(graph, stale)
        return result

    @staticmethod
    def _apply_lone(graph: GraphProto, lone: list[LoneBatchNorm], ctx: PassContext, replaced: dict[int, list[NodeProto]]) -> set[str]:
        """Plan each matched BatchNormalization's replacement by Mul + Add, adding the constants."""
        stale: set[str] = set()
        for item in lone:
            bn = item.node
            out = bn.output[0]
            scale_name, shift_name = ctx.names.fresh(f"{out}_scale"), ctx.names.fresh(f"{out}_shift")
            graph.initializer.append(numpy_helper.from_array(item.scale, scale_name))
            graph.initializer.append(numpy_helper.from_array(item.shift, shift_name))
            scaled = ctx.names.fresh(f"{out}_scaled")
            base = bn.name or out
            mul = helper.make_node("Mul", [bn.input[0], scale_name], [scaled], name=ctx.names.fresh(f"{base}_mul"))
            add = helper.make_node("Add", [scaled, shift_name], [out], name=ctx.names.fresh(f"{base}_add"))
            replaced[id(bn)] = [mul, add]
            stale.update(o for o in bn.output[1:] if o)
        return stale


@register_pass
class FoldConvAffine(Pass):
    """Fold per-output-channel Mul/Add/Sub/Div by constants after a Conv/ConvTranspose into its weights.

    Pre: none. A standard Conv or ConvTranspose (opset >= 7) with constant float weights
    (and bias, if any), followed by a run of standard Mul or Add (constant either side),
    Sub (``y - c``) or Div (``y / c``, c non-zero) whose constant operand has the weight's
    dtype, is finite, and broadcasts per output channel without changing the output shape
    (shapes [C,1,1], [1,C,1,1], [1,1,1], scalars, ...; rank no larger than the output's),
    each intermediate value read only by the next node and not a graph output.

    Post: the convolution, with new scaled weights and a new (or created) bias, writes the
    last node's output and the run's nodes are gone. Weights are computed in float64 and
    cast back; ConvTranspose weights are scaled on axis 1 within each group. Nothing is done
    in IR < 4 models. Surviving values keep their types.
    """

    name = "fold_conv_affine"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match a chain after every convolution, then fold."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        graph = scope.graph
        view = ctx.view(graph)
        folds: list[WeightFold] = []
        for node in view.nodes:
            if node.op_type in CONV_OPS and node.domain in ("", "ai.onnx"):
                try:
                    folds.append(match_affine_chain(node, view, ctx))
                except NoMatch as exc:
                    _debug(self.name, node, exc)
        if not folds:
            return result
        replaced: dict[int, list[NodeProto]] = {}
        stale = apply_weight_folds(graph, folds, ctx, replaced)
        replace_nodes(graph, view.nodes, replaced)
        drop_value_info(graph, stale)
        for fold in folds:
            for op in fold.extra["ops"]:
                result.count(f"{op}_into_{fold.node.op_type}")
        return result


@register_pass
class FusePadIntoConv(Pass):
    """Fold a constant-mode Pad of spatial axes into the pads of the Conv/AveragePool/MaxPool reading it.

    Pre: none. A standard Pad (attribute form before opset 11, input form from 11, ``axes``
    from 18) in constant mode with non-negative pads on spatial axes only, constant pads
    and value, whose output only feeds the data input of one standard Conv, AveragePool or
    MaxPool with auto_pad NOTSET or VALID. The pad value must be 0 for Conv and for
    AveragePool (which also needs count_include_pad=1, opset >= 7), and -inf for MaxPool
    (whose Indices output must be unused). Pools also need ceil_mode=0 and, after fusion,
    pads smaller than the kernel (onnxruntime's limit).

    Post: the consumer reads the Pad's input with the pads summed into its ``pads``
    attribute (auto_pad becomes NOTSET) and the Pad is gone. The consumer's output keeps its
    type and shape.
    """

    name = "fuse_pad_into_conv"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Pad, then fuse."""
        result = PassResult()
        graph = scope.graph
        view = ctx.view(graph)
        fusions: list[PadFusion] = []
        for node in view.nodes:
            if node.op_type == "Pad" and node.domain in ("", "ai.onnx"):
                try:
                    fusions.append(match_pad_fusion(node, view, ctx))
                except NoMatch as exc:
                    _debug(self.name, node, exc)
        if not fusions:
            return result
        replaced: dict[int, list[NodeProto]] = {}
        for fusion in fusions:
            consumer = fusion.consumer
            consumer.input[0] = fusion.pad.input[0]
            kept = [a for a in consumer.attribute if a.name not in ("pads", "auto_pad")]
            del consumer.attribute[:]
            consumer.attribute.extend(kept)
            consumer.attribute.append(helper.make_attribute("pads", [int(p) for p in np.asarray(fusion.pads)]))
            replaced[id(fusion.pad)] = []
            result.count(f"pad_into_{consumer.op_type}")
        replace_nodes(graph, view.nodes, replaced)
        drop_value_info(graph, {f.pad.output[0] for f in fusions})
        return result


@register_pass
class FoldConvInputAffine(Pass):
    """Fold per-input-channel Mul/Add/Sub/Div by constants before an unpadded Conv into its weights and bias.

    Pre: none. Matched: a standard Conv (opset >= 7) with constant float weights (and bias),
    no padding (pads all zero, auto_pad NOTSET or VALID), whose input is written by a run of
    standard Mul or Add (constant either side), Sub (``x - c``) or Div (``x / c``, c non-zero)
    by finite constants of the weight's dtype that broadcast per input channel (scalars,
    [C,1,1], [1,C,1,1], ...), each value of the run read only by the next step and not a graph
    output. Post: the Conv reads the run's input with new weights (input channels scaled) and
    a new (or created) bias; the run's nodes are gone; outputs equal up to float rounding.
    """

    name = "fold_conv_input_affine"
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match the run before every Conv, then fold."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        graph = scope.graph
        view = ctx.view(graph)
        folds: list[InputFold] = []
        for node in view.nodes:
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
                try:
                    folds.append(match_input_affine(node, view, ctx))
                except NoMatch as exc:
                    _debug(self.name, node, exc)
        if not folds:
            return result
        replaced: dict[int, list[NodeProto]] = {}
        for fold in folds:
            conv = fold.conv
            weight_name = ctx.names.fresh(f"{conv.input[1]}_folded")
            bias_name = ctx.names.fresh(f"{conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.output[0] + '_bias'}_folded")
            graph.initializer.append(numpy_helper.from_array(fold.weight, weight_name))
            graph.initializer.append(numpy_helper.from_array(fold.bias, bias_name))
            conv.input[0], conv.input[1] = fold.source, weight_name
            if len(conv.input) > 2:
                conv.input[2] = bias_name
            else:
                conv.input.append(bias_name)
            for node in fold.chain:
                replaced[id(node)] = []
                result.count(f"{node.op_type}_into_Conv")
        replace_nodes(graph, view.nodes, replaced)
        return result
