"""Constant folding with a size budget and a time budget."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from onnxopt.passes.folding_support import (
    REFERENCE_LIMIT,
    SIZE_FROM_VALUES,
    VALUE_LOAD_LIMIT,
    build_model,
    element_bound,
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

from onnxopt.errors import OptionError
from onnxopt.graph import GraphScope, GraphView, is_standard
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult
from onnxopt.registry import register_pass
from onnxopt.shapes import elem_type, static_shape

log = logging.getLogger("onnxopt")

_DEFER, _REJECT = "defer", "reject"


@dataclass
class FoldConstantsOptions(PassOptions):
    """Options of :class:`FoldConstants`."""

    max_small_bytes: int = 4096
    max_bytes: int = 64 << 20
    time_budget: float = 30.0
    fold_shapes: bool = True

    def validate(self) -> None:
        """Sizes must be non-negative and the time budget a finite number of seconds >= 0."""
        for key in ("max_small_bytes", "max_bytes"):
            if getattr(self, key) < 0:
                raise OptionError(f"option '{key}' of pass 'fold_constants' must not be negative")
        if not math.isfinite(self.time_budget) or self.time_budget < 0:
            raise OptionError("option 'time_budget' of pass 'fold_constants' must be a number of seconds >= 0")


@dataclass
class _Const:
    """What is known about a constant value before or after it is computed."""

    shape: tuple[int, ...] | None  # exact shape; None when only a bound on the count is known
    count: int  # element count (exact, or an upper bound when shape is None)
    elem: int | None
    value: np.ndarray | None = None
    tensor: TensorProto | None = None  # the initializer, for constants of the original graph
    planned: bool = False  # output of a node planned in the current round, not computed yet

    @property
    def nbytes(self) -> int:
        """Bytes of the value (0 for element types without a fixed width)."""
        return self.count * (itemsize(self.elem) or 0)

    @classmethod
    def of(cls, array: np.ndarray) -> _Const:
        """A computed value."""
        return cls(tuple(array.shape), int(array.size), tensor_elem(array), value=array)


@register_pass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers.

    Constants are a graph's own initializers that are not graph inputs, plus outputs of
    nodes folded in the same run (chains fold at once); in a subgraph, outer-scope values
    are not constant. Shape/Size of values whose needed dims are statically known are
    folded too (``fold_shapes``), but never on dynamic dims.

    Never folded: custom/ML domains, nodes with subgraphs, random ops, Dropout, Q/DQ and
    integer quantized ops, Constant (lift_constants' job), sequence/optional ops, nodes
    without outputs, string outputs. Sizes are estimated before computing: a node folds only
    if its outputs total at most max(``max_small_bytes``, bytes of its distinct inputs) and
    none exceeds ``max_bytes``; ops whose size is unknown fold only when they cannot grow.
    After ``time_budget`` seconds the remaining nodes are left as they are (with a note).

    Evaluation: one onnxruntime session per graph and round, falling back to one session
    per node and then onnx's reference evaluator; a node that fails everywhere stays.
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
        self.view = GraphView.build(self.graph)
        self.nodes = self.view.nodes
        self.index = {id(node): i for i, node in enumerate(self.nodes)}
        self.types = ctx.types
        self.consts: dict[str, _Const] = {}
        for tensor in self.graph.initializer:
            if self.view.is_constant(tensor.name) and tensor.data_location != TensorProto.EXTERNAL:
                dims = tuple(int(d) for d in tensor.dims)
                self.consts[tensor.name] = _Const(dims, numel(dims), tensor.data_type, tensor=tensor)
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
            self._evaluate(plan)

    def _plan(self) -> list[tuple[int, int]]:
        """Nodes foldable now, in graph order, each with its output byte allowance."""
        planned: dict[str, _Const] = {}
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
            if not inputs or any(k is None for k in known):
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
        if value is None or self._out_of_time():
            return False
        self.consts[node.output[0]] = _Const.of(value)
        self.folded[idx] = "shape"
        return True

    def _value(self, const: _Const) -> np.ndarray | None:
        """The value of a constant if known or cheap to load (small initializers)."""
        if const.value is None and const.tensor is not None and const.count <= VALUE_LOAD_LIMIT:
            const.value = numpy_helper.to_array(const.tensor)
        return const.value

    def _estimate(self, node: NodeProto, inputs: list[str], known: list[_Const]) -> str | tuple[dict[str, _Const], int]:
        """Output sizes and the byte allowance of a node, or _DEFER / _REJECT."""
        if any(k.shape is None for k in known):
            return _DEFER  # an input only has a size bound until it is computed
        shapes = [k.shape for k in known]
        counts = [k.count for k in known]
        outputs: dict[str, _Const] = {}
        total = 0
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
                shape = shape_from_values(node, shapes, [self._value(k) for k in known])
                if shape is None:
                    return _DEFER if any(k.planned for k in known) else _REJECT
            count = numel(shape) if shape is not None else element_bound(node, shapes, counts)
            if count is None:
                return _REJECT
            size = count * (itemsize(elem) or 8)
            if size > self.options.max_bytes:
                return _REJECT
            total += size
            outputs[name] = _Const(shape, count, elem, planned=True)
        distinct = {name: k for name, k in zip(inputs, known)}
        allowance = max(self.options.max_small_bytes, sum(k.nbytes for k in distinct.values()))
        return _REJECT if total > allowance else (outputs, allowance)

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
        """Evaluate a round in one session; on failure node by node; accept what checks out."""
        members = {idx for idx, _ in plan}
        nodes = [self.nodes[idx] for idx, _ in plan]
        wanted = [o for node in nodes for o in node.output if o and self._read_by_others(o, members)]
        if not wanted:  # nothing outside reads these nodes: they simply go away
            for idx, _ in plan:
                self.folded[idx] = "node"
            return
        try:
            arrays = run_onnxruntime(self._model(nodes, wanted), wanted)
        except Exception as exc:  # onnxruntime lacks some ops and types: try node by node
            log.debug("fold_constants: batch of %d nodes failed (%s); evaluating node by node", len(nodes), exc)
            self._evaluate_each(plan)
            return
        results = dict(zip(wanted, arrays))
        bad = [idx for idx, allowance in plan if not self._check(self.nodes[idx], results, allowance, reference=False)]
        if bad:  # an estimate was wrong: reject those nodes and plan again
            self.rejected.update(bad)
            return
        for idx, _ in plan:
            self.folded[idx] = "node"
        for name, array in results.items():
            self.consts[name] = _Const.of(array)

    def _evaluate_each(self, plan: list[tuple[int, int]]) -> None:
        """Evaluate planned nodes one at a time (onnxruntime, then the reference evaluator)."""
        for idx, allowance in plan:
            node = self.nodes[idx]
            inputs = [name for name in node.input if name]
            if any(name not in self.consts for name in inputs):
                continue  # its producer failed in this round; it is not constant any more
            if self._out_of_time():
                return
            outputs = [o for o in node.output if o]
            model = self._model([node], outputs)
            arrays, reference = None, False
            try:
                arrays = run_onnxruntime(model, outputs)
            except Exception as exc:
                log.debug("fold_constants: onnxruntime cannot evaluate %s: %s", node.op_type, exc)
                if sum(self.consts[name].count for name in inputs) <= REFERENCE_LIMIT:
                    reference = True
                    try:
                        arrays = run_reference(model, outputs)
                    except Exception as ref_exc:
                        log.debug("fold_constants: reference evaluator cannot evaluate %s: %s", node.op_type, ref_exc)
            results = dict(zip(outputs, arrays)) if arrays is not None else None
            if results is None or not self._check(node, results, allowance, reference=reference):
                self.rejected.add(idx)
                continue
            self.folded[idx] = "node"
            for name, array in results.items():
                self.consts[name] = _Const.of(array)

    def _check(self, node: NodeProto, results: dict[str, np.ndarray], allowance: int, *, reference: bool) -> bool:
        """Whether a node's computed outputs have their inferred types and shapes and fit the budget."""
        total = 0
        for name in node.output:
            if not name or name not in results:
                continue
            array = results[name]
            type_proto = self.types.get(name)
            want, got = elem_type(type_proto), tensor_elem(array)
            if got is None or (want is not None and got != want) or (want is None and reference):
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
        as_nodes = self.ctx.model.ir_version < 4
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
                if as_nodes or name in self.view.graph_outputs:
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
