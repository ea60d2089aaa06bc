"""Constant folding with a size budget and a time budget."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.errors import OptionError, one_line
from onnxopt.graph import GraphScope, is_standard, opset_version
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, option
from onnxopt.passes.constants import constant_value
from onnxopt.passes.folding_support import (
    REFERENCE_LIMIT,
    SIZE_FROM_VALUES,
    VALUE_LOAD_LIMIT,
    ConstInfo,
    build_model,
    element_bound,
    infer_node_shapes,
    itemsize,
    never_folds,
    numel,
    output_elem_guess,
    run_onnxruntime,
    run_reference,
    shape_from_values,
    shape_op_value,
    tensor_elem,
    type_dims,
)
from onnxopt.passes.fusion_support import sole_reader_is
from onnxopt.registry import register_pass
from onnxopt.shapes import elem_type, static_shape

log = logging.getLogger("onnxopt")

_DEFER, _REJECT = "defer", "reject"


@dataclass
class FoldConstantsOptions(PassOptions):
    """Options of :class:`FoldConstants`."""

    max_small_bytes: int = option(4096, "results up to this many bytes fold even when larger than their inputs")
    max_bytes: int = option(64 << 20, "no single folded result may exceed this many bytes")
    time_budget: float = option(30.0, "seconds the pass may spend; later nodes stay unfolded")
    fold_shapes: bool = option(True, "fold Shape/Size of tensors whose dims are all known")

    def validate(self) -> None:
        """Sizes must be non-negative and the time budget a finite number of seconds >= 0."""
        for key in ("max_small_bytes", "max_bytes"):
            if getattr(self, key) < 0:
                raise OptionError(f"option '{key}' of pass 'fold_constants' must not be negative")
        if not math.isfinite(self.time_budget) or self.time_budget < 0:
            raise OptionError("option 'time_budget' of pass 'fold_constants' must be a number of seconds >= 0")


@register_pass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers.

    Constants are a graph's own initializers that are not graph inputs, values of its
    Constant nodes (which stay), and outputs of nodes folded in the same run (chains fold
    at once); in a subgraph, outer-scope values are not constant. Shape/Size of values
    whose needed dims are statically known fold too (``fold_shapes``), never on dynamic dims.

    Never folded: custom/ML domains, nodes with subgraphs, random ops, Dropout, Q/DQ and
    integer quantized ops, Constant (lift_constants' job), sequence/optional ops, nodes
    without outputs, string outputs. Sizes are estimated before computing: a node folds only
    if its outputs total at most max(``max_small_bytes``, bytes of its distinct inputs that
    nothing else reads) and none exceeds ``max_bytes`` (so a tied weight, read by a Gather and
    by a Transpose, is not stored twice); an output of unknown size folds only when its op cannot grow.
    After ``time_budget`` seconds the remaining nodes are left as they are (with a note).

    Evaluation: one onnxruntime session per graph and round; where it fails, halves of the
    batch, down to single nodes, then onnx's reference evaluator; a node failing all stays.
    Post: folded values become initializers under their original names; a folded graph
    output (or any folded value in IR < 4 models) is produced by a Constant node instead.
    Inputs left unused stay for eliminate_dead_code. Types and shapes are unchanged.
    """

    name = "fold_constants"
    Options = FoldConstantsOptions
    preserves_types = True
    _deadline: float = math.inf  # set by run(); run_graph called alone has no time limit
    _timed_out: bool = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Fold every graph, innermost first, within one shared time budget."""
        options: FoldConstantsOptions = self.options  # type: ignore[assignment]
        self._deadline = time.monotonic() + options.time_budget
        self._timed_out = False
        result = super().run(model, ctx)
        if self._timed_out:
            result.notes.append(f"fold_constants: time budget of {options.time_budget:g} s used up; some constant nodes were left unfolded")
        return result

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Plan, evaluate and accept rounds of foldable nodes, then rewrite the graph once."""
        folder = _GraphFolder(scope, ctx, self.options, self._deadline)  # type: ignore[arg-type]
        folder.fold()
        self._timed_out = self._timed_out or folder.timed_out
        return folder.apply()


class _GraphFolder:
    """The state of folding one graph: known constants, folded and rejected nodes."""

    def __init__(self, scope: GraphScope, ctx: PassContext, options: FoldConstantsOptions, deadline: float) -> None:
        self.ctx, self.options, self.deadline = ctx, options, deadline
        self.graph = scope.graph
        self.view = ctx.view(self.graph)
        self.nodes = self.view.nodes
        self.index = {id(node): i for i, node in enumerate(self.nodes)}
        self.types = ctx.types
        self.consts: dict[str, ConstInfo] = {}
        for tensor in self.graph.initializer:
            if self.view.is_constant(tensor.name) and tensor.data_location != TensorProto.EXTERNAL:
                dims = tuple(int(d) for d in tensor.dims)
                self.consts[tensor.name] = ConstInfo(dims, numel(dims), tensor.data_type, tensor=tensor)
        for node in self.nodes:  # Constant nodes stay (lift_constants' job) but their values are constants
            tensor = constant_value(node) if node.output and node.output[0] else None
            if tensor is not None and tensor.data_location != TensorProto.EXTERNAL:
                tensor.name = node.output[0]
                dims = tuple(int(d) for d in tensor.dims)
                self.consts[tensor.name] = ConstInfo(dims, numel(dims), tensor.data_type, tensor=tensor)
        self.as_nodes = ctx.model.ir_version < 4  # IR < 4: initializers must be graph inputs, so use Constant nodes
        old_constant = (opset_version(ctx.model) or 1) < 9  # Constant-1 holds only float16/float/double
        self.node_elems = frozenset({TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}) if old_constant else None
        self.folded: dict[int, str] = {}  # node index -> "node" (evaluated) or "shape" (from static dims)
        self.rejected: set[int] = set()
        self.timed_out = False

    # -- planning -------------------------------------------------------------------------

    def _out_of_time(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def fold(self) -> None:
        """Run rounds until nothing more can be folded or the time budget is spent."""
        while not self.timed_out:
            plan = self._plan()
            if not plan or self.timed_out:
                return
            progress = len(self.folded) + len(self.rejected)
            self._evaluate(plan)
            if len(self.folded) + len(self.rejected) == progress and not self.timed_out:
                return  # cannot happen (every round folds or rejects a node); never loop on it

    def _plan(self) -> list[tuple[int, int]]:
        """Nodes foldable now, in graph order, each with its output byte allowance."""
        planned: dict[str, ConstInfo] = {}
        plan: list[tuple[int, int]] = []
        for idx, node in enumerate(self.nodes):
            if idx in self.folded or idx in self.rejected:
                continue
            if not is_standard(node) or never_folds(node) or not any(node.output):
                self.rejected.add(idx)
                continue
            if self.options.fold_shapes and node.op_type in ("Shape", "Size") and node.input and self._fold_shape(idx, node):
                if self.timed_out:
                    return []
                continue
            inputs = [name for name in node.input if name]
            known = [self.consts.get(name) or planned.get(name) for name in inputs]
            if not inputs:
                self.rejected.add(idx)  # a source op (Constant, Random*, ...): nothing to fold
                continue
            if any(k is None for k in known):
                continue
            verdict = self._estimate(node, inputs, known)  # type: ignore[arg-type]
            if verdict == _REJECT:
                self.rejected.add(idx)
                continue
            if verdict == _DEFER:
                continue
            if self._out_of_time():
                return []
            outputs, allowance = verdict  # type: ignore[misc]
            planned.update(outputs)
            plan.append((idx, allowance))
        return plan

    def _fold_shape(self, idx: int, node: NodeProto) -> bool:
        """Fold a Shape/Size from its input's static dims; True if it was folded."""
        name = node.input[0]
        const = self.consts.get(name)
        dims = list(const.shape) if const is not None and const.shape is not None else type_dims(self.types.get(name))
        value = shape_op_value(node, dims)  # type: ignore[arg-type]
        if value is None or not self._storable(node.output[0], TensorProto.INT64) or self._out_of_time():
            return False
        self.consts[node.output[0]] = ConstInfo.of(value)
        self.folded[idx] = "shape"
        return True

    def _storable(self, name: str, elem: int | None) -> bool:
        """Whether a folded value can be stored: a Constant node of an old opset holds only floats."""
        if self.node_elems is None or elem in self.node_elems:
            return True
        return not (self.as_nodes or name in self.view.graph_outputs)

    def _value(self, const: ConstInfo) -> np.ndarray | None:
        """The value of a constant if known or cheap to load (small initializers)."""
        if const.value is None and const.tensor is not None and const.count <= VALUE_LOAD_LIMIT:
            const.value = numpy_helper.to_array(const.tensor)
        return const.value

    def _estimate(self, node: NodeProto, inputs: list[str], known: list[ConstInfo]) -> str | tuple[dict[str, ConstInfo], int]:
        """Output sizes and the byte allowance of a node, or _DEFER (retry next round) / _REJECT.

        An output's size comes from inferred types, else from the input values that decide
        it, else from onnx inference on the node alone; failing those, ops that cannot grow
        get a bound. A node reading values not computed yet is deferred rather than rejected
        when those values could decide its size.
        """
        if any(k.shape is None for k in known):
            return _DEFER  # an input only has a size bound until it is computed
        pending = any(k.planned for k in known)
        shapes = [k.shape for k in known]
        counts = [k.count for k in known]
        inferred: dict[str, tuple[int, ...]] | None = None
        outputs: dict[str, ConstInfo] = {}
        total, bounded = 0, False
        for name in node.output:
            if not name:
                continue
            type_proto = self.types.get(name)
            if type_proto is not None and type_proto.WhichOneof("value") != "tensor_type":
                return _REJECT
            elem = elem_type(type_proto) or output_elem_guess(node, [k.elem for k in known])
            if elem == TensorProto.STRING:
                return _REJECT
            shape = static_shape(type_proto)
            if shape is None and node.op_type in SIZE_FROM_VALUES:
                shape = shape_from_values(node, shapes, [self._value(k) for k in known])  # type: ignore[arg-type]
            if shape is None and not pending:
                if inferred is None:
                    inferred = self._infer(node, inputs, known)
                shape = inferred.get(name)
            count = numel(shape) if shape is not None else element_bound(node, shapes, counts)  # type: ignore[arg-type]
            if count is None:
                return _DEFER if pending else _REJECT
            bounded = bounded or shape is None
            size = count * (itemsize(elem) or 8)
            total += size
            if size > self.options.max_bytes:
                return _DEFER if pending and bounded else _REJECT
            outputs[name] = ConstInfo(shape, count, elem, planned=True)
        distinct = {name: k for name, k in zip(inputs, known)}
        freed = [k for name, k in distinct.items() if sole_reader_is(self.view, name, node)]  # one read elsewhere stays
        allowance = max(self.options.max_small_bytes, sum(k.nbytes for k in freed))
        if total > allowance:
            return _DEFER if pending and bounded else _REJECT
        return outputs, allowance

    def _infer(self, node: NodeProto, inputs: list[str], known: list[ConstInfo]) -> dict[str, tuple[int, ...]]:
        """Output shapes of a node whose inputs are all known, by onnx inference on the node alone."""
        described = {}
        for name, const in zip(inputs, known):
            value = self._value(const) if const.count <= VALUE_LOAD_LIMIT else None
            described[name] = (name, const.shape, const.elem, value)
        return infer_node_shapes(node, list(described.values()), self.ctx.model.opset_import)  # type: ignore[arg-type]

    # -- evaluation -----------------------------------------------------------------------

    def _read_by_others(self, name: str, members: set[int]) -> bool:
        """Whether ``name`` is a graph output or read by a node that is neither folded nor in ``members``."""
        if name in self.view.graph_outputs:
            return True
        for consumer in self.view.consumers.get(name, ()):
            idx = self.index[id(consumer)]
            if idx not in members and idx not in self.folded:
                return True
        return False

    def _feeds(self, nodes: list[NodeProto], produced: set[str]) -> list[TensorProto]:
        """Initializers for every input of ``nodes`` not produced among them."""
        feeds: dict[str, TensorProto] = {}
        for node in nodes:
            for name in node.input:
                if name and name not in produced and name not in feeds:
                    const = self.consts[name]
                    feeds[name] = const.tensor if const.tensor is not None else numpy_helper.from_array(const.value, name)  # type: ignore[arg-type]
        return list(feeds.values())

    def _model(self, nodes: list[NodeProto], outputs: list[str]) -> ModelProto:
        produced = {o for n in nodes for o in n.output if o}
        model = self.ctx.model
        return build_model(nodes, self._feeds(nodes, produced), outputs, model.opset_import, model.ir_version)

    def _evaluate(self, plan: list[tuple[int, int]]) -> None:
        """Evaluate a round: the whole plan in one session; where a session fails, halves of it, down to single nodes."""
        work = [plan]
        while work:
            chunk = self._runnable(work.pop())
            if not chunk:
                continue
            if self._out_of_time():
                return
            if len(chunk) == 1:
                self._evaluate_single(*chunk[0])
            elif not self._evaluate_batch(chunk):
                middle = len(chunk) // 2
                work.extend((chunk[middle:], chunk[:middle]))  # the first half is evaluated first

    def _runnable(self, chunk: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The nodes of ``chunk`` whose inputs are computed or come from earlier nodes of the chunk."""
        produced: set[str] = set()
        runnable = []
        for idx, allowance in chunk:
            node = self.nodes[idx]
            if all(not name or name in self.consts or name in produced for name in node.input):
                runnable.append((idx, allowance))
                produced.update(o for o in node.output if o)
        return runnable  # the others read a node that failed: they are not constant any more

    def _store(self, results: dict[str, np.ndarray]) -> None:
        """Remember computed values as constants."""
        for name, array in results.items():
            self.consts[name] = ConstInfo.of(array)

    def _evaluate_batch(self, chunk: list[tuple[int, int]]) -> bool:
        """Evaluate nodes in one onnxruntime session; False if the session fails."""
        members = {idx for idx, _ in chunk}
        nodes = [self.nodes[idx] for idx, _ in chunk]
        wanted = [o for node in nodes for o in node.output if o and self._read_by_others(o, members)]
        if not wanted:  # nothing else reads these nodes: they simply go away
            for idx, _ in chunk:
                self.folded[idx] = "node"
            return True
        try:
            arrays = run_onnxruntime(self._model(nodes, wanted), wanted)
        except Exception as exc:  # onnxruntime lacks some ops and types
            log.debug("fold_constants: a batch of %d nodes failed: %s", len(nodes), one_line(exc, 200))
            return False
        results = dict(zip(wanted, arrays))
        bad = [idx for idx, allowance in chunk if not self._check(self.nodes[idx], results, allowance, reference=False)]
        if bad:  # an estimate was wrong: reject those nodes; the others are planned again next round
            self.rejected.update(bad)
            return True
        for idx, _ in chunk:
            self.folded[idx] = "node"
        self._store(results)
        return True

    def _evaluate_single(self, idx: int, allowance: int) -> None:
        """Evaluate one node with onnxruntime, else the reference evaluator; reject it if both fail."""
        node = self.nodes[idx]
        outputs = [o for o in node.output if o]
        model = self._model([node], outputs)
        arrays, reference = None, False
        try:
            arrays = run_onnxruntime(model, outputs)
        except Exception as exc:
            log.debug("fold_constants: onnxruntime cannot evaluate %s: %s", node.op_type, one_line(exc, 200))
            if sum(self.consts[name].count for name in node.input if name) <= REFERENCE_LIMIT:
                reference = True
                try:
                    arrays = run_reference(model, outputs)
                except Exception as ref_exc:
                    log.debug("fold_constants: the reference evaluator cannot evaluate %s: %s", node.op_type, ref_exc)
        results = dict(zip(outputs, arrays)) if arrays is not None else None
        if results is None or not self._check(node, results, allowance, reference=reference):
            self.rejected.add(idx)
            return
        self.folded[idx] = "node"
        self._store(results)

    def _check(self, node: NodeProto, results: dict[str, np.ndarray], allowance: int, *, reference: bool) -> bool:
        """Whether a node's computed outputs have their inferred types and shapes and fit the budget."""
        total = 0
        for name in node.output:
            if not name or name not in results:
                continue
            array = results[name]
            type_proto = self.types.get(name)
            want, got = elem_type(type_proto), tensor_elem(array)
            if got is None or (want is not None and got != want) or (want is None and reference) or not self._storable(name, got):
                return False
            shape = static_shape(type_proto)
            if shape is not None and tuple(array.shape) != shape:
                return False
            if array.nbytes > self.options.max_bytes:
                return False
            total += array.nbytes
        return total <= allowance

    # -- rewriting ------------------------------------------------------------------------

    def apply(self) -> PassResult:
        """Replace folded nodes by initializers (Constant nodes for graph outputs and IR < 4)."""
        result = PassResult()
        if not self.folded:
            return result
        kept: list[NodeProto] = []
        created: list[TensorProto] = []
        for idx, node in enumerate(self.nodes):
            if idx not in self.folded:
                kept.append(node)
                continue
            for name in node.output:
                if not name or not self._read_by_others(name, set()):
                    continue
                tensor = numpy_helper.from_array(self.consts[name].value, name)  # type: ignore[arg-type]
                if self.as_nodes or name in self.view.graph_outputs:
                    label = self.ctx.names.fresh(node.name or name)
                    kept.append(helper.make_node("Constant", [], [name], name=label, value=tensor))
                else:
                    created.append(tensor)
        del self.graph.node[:]
        self.graph.node.extend(kept)
        self.graph.initializer.extend(created)
        kinds = list(self.folded.values())
        result.count("nodes_folded", kinds.count("node"))
        result.count("shape_ops_folded", kinds.count("shape"))
        return result
