"""Symbolic values of small integer tensors (shape computations) and the pass that folds them.

Exporters compute shapes at run time: Shape -> Gather/Slice -> Unsqueeze -> Concat -> Reshape,
often with Equal/Where guards. :func:`analyze` gives each small int64/int32/bool tensor of rank
0 or 1 a tuple of elements, each one of:

  * a Python int (or bool): a value known now;
  * ``("p", name)``: a dim with symbolic name ``name``; shape inference gives one name only to
    dims it proved equal (the convention of :func:`~onnxopt.passes.noop_rules.same_shape`);
  * ``("d", tensor, axis)``: the unnamed unknown dim ``axis`` of ``tensor``;
  * ``("v", tensor, index)``: element ``index`` of ``tensor``, nothing else known.

Dims (the first three kinds) are never negative. Two equal elements are equal at run time; the
transfer functions are exact for the ops they know (Shape, Gather, Slice, Concat, Squeeze,
Unsqueeze, Reshape, Identity, Cast between int32/int64/bool, Add/Sub/Mul/Div/Max/Min, Equal,
Where) and give ``("v", ...)`` elements for anything else of known small size.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, numpy_helper

from onnxopt.graph import GraphScope, GraphView, is_standard, names_defined_below, opset_version, rename_inputs, subgraphs
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.passes.noop_rules import NoMatch, constant_array, get_attr, require
from onnxopt.registry import register_pass

MAX_LENGTH = 64  # longest 1-D tensor tracked
INT_TYPES = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}
TRACKED = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL})
Element = int | bool | tuple


@dataclass(frozen=True)
class SymValue:
    """A tracked tensor: element type, rank (0 or 1) and its elements (one for a scalar)."""

    elem: int
    rank: int
    elems: tuple

    @property
    def known(self) -> bool:
        """Whether every element is a value known now."""
        return all(not isinstance(e, tuple) for e in self.elems)

    def array(self) -> np.ndarray:
        """The known value as numpy (only when :attr:`known`)."""
        dtype = np.bool_ if self.elem == TensorProto.BOOL else INT_TYPES[self.elem]
        values = np.array(self.elems, dtype=dtype)
        return values.reshape(()) if self.rank == 0 else values


def is_dim(element: Element) -> bool:
    """Whether an element is a tensor dim (hence >= 0)."""
    return isinstance(element, tuple) and element[0] in ("p", "d")


def nonnegative(element: Element) -> bool:
    """Whether an element is provably >= 0."""
    return is_dim(element) or (isinstance(element, int) and not isinstance(element, bool) and element >= 0)


def dim_element(type_proto, name: str, axis: int) -> Element | None:
    """The element standing for dim ``axis`` of ``name`` (of inferred type ``type_proto``), or None."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if not 0 <= axis < len(dims):
        return None
    dim = dims[axis]
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return ("p", dim.dim_param)
    return ("d", name, axis)


def _rank_of(type_proto) -> int | None:
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    return len(type_proto.tensor_type.shape.dim)


def _fallback(name: str, type_proto) -> SymValue | None:
    """Opaque elements for a small tracked tensor of static shape, or None."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
        return None
    tensor_type = type_proto.tensor_type
    if tensor_type.elem_type not in TRACKED or not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if len(dims) == 0:
        return SymValue(tensor_type.elem_type, 0, (("v", name, 0),))
    if len(dims) == 1 and dims[0].HasField("dim_value") and 0 <= dims[0].dim_value <= MAX_LENGTH:
        return SymValue(tensor_type.elem_type, 1, tuple(("v", name, i) for i in range(dims[0].dim_value)))
    return None


def _from_array(array: np.ndarray) -> SymValue | None:
    if array.ndim > 1 or array.size > MAX_LENGTH or (array.ndim == 0 and array.size != 1):
        return None
    if array.dtype == np.bool_:
        return SymValue(TensorProto.BOOL, array.ndim, tuple(bool(v) for v in array.reshape(-1)))
    for elem, dtype in INT_TYPES.items():
        if array.dtype == dtype:
            return SymValue(elem, array.ndim, tuple(int(v) for v in array.reshape(-1)))
    return None


class ShapeValues:
    """Symbolic values of one graph's small integer tensors (see the module docstring)."""

    def __init__(self, view: GraphView, ctx: PassContext) -> None:
        self.view, self.ctx = view, ctx
        self.opset = opset_version(ctx.model) or 1
        self.values: dict[str, SymValue] = {}
        self.order: list[NodeProto] = topological(view)
        for node in self.order:
            self._visit(node)

    def value(self, name: str) -> SymValue | None:
        """The symbolic value of ``name`` (constants and typed values included), or None."""
        if not name:
            return None
        found = self.values.get(name)
        if found is not None:
            return found
        array = constant_array(self.view, name)
        found = _from_array(array) if array is not None else _fallback(name, self.ctx.types.get(name))
        if found is not None:
            self.values[name] = found
        return found

    def dim(self, name: str, axis: int) -> Element | None:
        """The element standing for dim ``axis`` of ``name``: a number when inference or a Slice's untouched axis proves one."""
        element = dim_element(self.ctx.types.get(name), name, axis)
        current = name
        for _ in range(len(self.view.nodes)):
            if element is None or isinstance(element, int):
                return element
            node = self.view.producer.get(current)
            if node is None or node.op_type != "Slice" or not is_standard(node) or not node.input:
                return element
            rank = _rank_of(self.ctx.types.get(node.input[0]))
            axes = self._slice_axes(node, rank)
            if rank is None or axes is None or axis in axes:
                return element
            current = node.input[0]
            found = dim_element(self.ctx.types.get(current), current, axis)
            if isinstance(found, int):
                return found
        return element

    def _slice_axes(self, node: NodeProto, rank: int | None) -> list[int] | None:
        """The axes a Slice cuts (normalized), or None when unknown."""
        if rank is None:
            return None
        if self.opset >= 10:
            if len(node.input) > 3 and node.input[3]:
                axes = self.ints(node.input[3])
            else:
                starts = self.value(node.input[1]) if len(node.input) > 1 else None
                axes = None if starts is None else list(range(len(starts.elems)))
        else:
            given = get_attr(node, "axes")
            starts = get_attr(node, "starts")
            axes = [int(a) for a in given] if given is not None else (None if starts is None else list(range(len(starts))))  # type: ignore[union-attr, arg-type]
        if axes is None or any(not -rank <= a < rank for a in axes):
            return None
        return [a + rank if a < 0 else a for a in axes]

    def ints(self, name: str) -> list[int] | None:
        """The known int elements of ``name``, or None."""
        value = self.value(name)
        if value is None or value.elem == TensorProto.BOOL or not value.known:
            return None
        return list(value.elems)

    def _visit(self, node: NodeProto) -> None:
        if len(node.output) != 1 or not node.output[0]:
            return
        out = node.output[0]
        value = None
        if is_standard(node) and not subgraphs(node):
            try:
                value = self._transfer(node)
            except NoMatch:
                value = None
        if value is not None and not self._consistent(out, value):
            value = None
        if value is None:
            value = _fallback(out, self.ctx.types.get(out))
        if value is not None:
            self.values[out] = value

    def _consistent(self, name: str, value: SymValue) -> bool:
        """A computed value must agree with what inference says of ``name``."""
        type_proto = self.ctx.types.get(name)
        if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
            return True
        tensor_type = type_proto.tensor_type
        if tensor_type.elem_type and tensor_type.elem_type != value.elem:
            return False
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if len(dims) != value.rank:
                return False
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value != len(value.elems):
                return False
        return True

    # -- transfer functions: NoMatch (or None) means "not derived" -----------------------------

    def _transfer(self, node: NodeProto) -> SymValue | None:
        op = node.op_type
        method = getattr(self, f"_op_{op.lower()}", None)
        if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            return self._arith(node)
        return None if method is None else method(node)

    def _input(self, node: NodeProto, index: int) -> SymValue:
        require(len(node.input) > index and bool(node.input[index]), f"input {index} is absent")
        value = self.value(node.input[index])
        require(value is not None, f"input {index} is not tracked")
        return value  # type: ignore[return-value]

    def _const_ints(self, node: NodeProto, index: int) -> list[int] | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        values = self.ints(node.input[index])
        require(values is not None, f"input {index} is not known")
        return values

    def _axes(self, node: NodeProto, index: int) -> list[int] | None:
        if self.opset >= 13:
            return self._const_ints(node, index)
        axes = get_attr(node, "axes")
        return None if axes is None else [int(a) for a in axes]  # type: ignore[union-attr]

    def _op_shape(self, node: NodeProto) -> SymValue:
        rank = _rank_of(self.ctx.types.get(node.input[0]))
        require(rank is not None, "rank unknown")
        start = int(get_attr(node, "start", 0))  # type: ignore[call-overload]
        end = int(get_attr(node, "end", rank))  # type: ignore[call-overload]
        start = min(max(start + rank if start < 0 else start, 0), rank)  # type: ignore[operator]
        end = min(max(end + rank if end < 0 else end, 0), rank)  # type: ignore[operator]
        elems = [self.dim(node.input[0], axis) for axis in range(start, end)]
        require(None not in elems and len(elems) <= MAX_LENGTH, "dims unknown")
        return SymValue(TensorProto.INT64, 1, tuple(elems))

    def _op_identity(self, node: NodeProto) -> SymValue:
        return self._input(node, 0)

    def _op_cast(self, node: NodeProto) -> SymValue | None:
        source = self._input(node, 0)
        to = int(get_attr(node, "to", 0))  # type: ignore[call-overload]
        if to not in TRACKED:
            return None
        if to == source.elem:
            return source
        if source.known:
            return _from_array(source.array().astype(np.bool_ if to == TensorProto.BOOL else INT_TYPES[to]))
        if to == TensorProto.INT64 and source.elem == TensorProto.INT32:
            return SymValue(to, source.rank, source.elems)  # widening keeps every value
        return None

    def _op_gather(self, node: NodeProto) -> SymValue | None:
        data = self._input(node, 0)
        require(data.rank == 1, "data is not 1-D")
        require(int(get_attr(node, "axis", 0)) in (0, -1), "axis is not 0")  # type: ignore[call-overload]
        indices = self._input(node, 1)
        require(indices.known and indices.elem != TensorProto.BOOL, "indices unknown")
        size = len(data.elems)
        picked = []
        for index in indices.elems:
            require(-size <= index < size, "index out of range")
            picked.append(data.elems[index])
        return SymValue(data.elem, indices.rank, tuple(picked))

    def _op_slice(self, node: NodeProto) -> SymValue | None:
        data = self._input(node, 0)
        require(data.rank == 1, "data is not 1-D")
        if self.opset >= 10:
            starts, ends = self._const_ints(node, 1), self._const_ints(node, 2)
            axes, steps = self._const_ints(node, 3), self._const_ints(node, 4)
        else:
            starts, ends = get_attr(node, "starts"), get_attr(node, "ends")
            axes, steps = get_attr(node, "axes"), None
        require(starts is not None and ends is not None and len(starts) == len(ends) == 1, "not one sliced axis")  # type: ignore[arg-type]
        require(axes is None or list(axes) in ([0], [-1]), "axes other than 0")  # type: ignore[arg-type]
        step = 1 if steps is None else int(steps[0])
        require(step > 0, "a step that is not positive")  # ONNX clamps negative steps unlike Python
        indices = range(*slice(int(starts[0]), int(ends[0]), step).indices(len(data.elems)))  # type: ignore[index]
        return SymValue(data.elem, 1, tuple(data.elems[i] for i in indices))

    def _op_concat(self, node: NodeProto) -> SymValue:
        require(int(get_attr(node, "axis", 0)) in (0, -1), "axis is not 0")  # type: ignore[call-overload]
        parts = [self._input(node, i) for i in range(len(node.input))]
        require(all(p.rank == 1 and p.elem == parts[0].elem for p in parts), "inputs are not 1-D of one type")
        elems = tuple(e for p in parts for e in p.elems)
        require(len(elems) <= MAX_LENGTH, "too long")
        return SymValue(parts[0].elem, 1, elems)

    def _op_unsqueeze(self, node: NodeProto) -> SymValue:
        source = self._input(node, 0)
        require(source.rank == 0 and self._axes(node, 1) in ([0], [-1]), "not a scalar made 1-D")
        return SymValue(source.elem, 1, source.elems)

    def _op_squeeze(self, node: NodeProto) -> SymValue:
        source = self._input(node, 0)
        axes = self._axes(node, 1)
        require(source.rank == 1 and len(source.elems) == 1 and axes in (None, [0], [-1]), "not a 1-element 1-D made scalar")
        return SymValue(source.elem, 0, source.elems)

    def _op_reshape(self, node: NodeProto) -> SymValue:
        source = self._input(node, 0)
        target = self._const_ints(node, 1) if self.opset >= 5 else get_attr(node, "shape")
        require(target is not None, "target unknown")
        count = len(source.elems)
        if list(target) == [] and count == 1:  # type: ignore[arg-type]
            return SymValue(source.elem, 0, source.elems)
        copy = source.rank == 1 and not int(get_attr(node, "allowzero", 0))  # type: ignore[call-overload]
        require(len(target) == 1 and (target[0] in (-1, count) or (target[0] == 0 and copy)), "not a 1-D reshape")  # type: ignore[arg-type, index]
        return SymValue(source.elem, 1, source.elems)

    def _op_equal(self, node: NodeProto) -> SymValue:
        a, b = self._input(node, 0), self._input(node, 1)
        require(a.elem == b.elem and a.elem != TensorProto.BOOL, "not two int inputs")
        pairs, rank = broadcast(a, b)
        out = [_equal(x, y) for x, y in pairs]
        return SymValue(TensorProto.BOOL, rank, tuple(("v", node.output[0], i) if e is None else e for i, e in enumerate(out)))

    def _op_where(self, node: NodeProto) -> SymValue:
        cond, x, y = self._input(node, 0), self._input(node, 1), self._input(node, 2)
        require(cond.elem == TensorProto.BOOL and x.elem == y.elem, "types")
        rank = max(cond.rank, x.rank, y.rank)
        length = _broadcast_length([cond, x, y])
        out = []
        for i in range(length):
            c = _at(cond, i)
            out.append(("v", node.output[0], i) if isinstance(c, tuple) else (_at(x, i) if c else _at(y, i)))
        return SymValue(x.elem, rank, tuple(out))

    def _arith(self, node: NodeProto) -> SymValue:
        require(len(node.input) == 2, "not two inputs")
        a, b = self._input(node, 0), self._input(node, 1)
        require(a.elem == b.elem and a.elem in INT_TYPES, "not two int inputs of one type")
        pairs, rank = broadcast(a, b)
        dtype = INT_TYPES[a.elem]
        out = []
        for i, (x, y) in enumerate(pairs):
            result = _arith_element(node.op_type, x, y, dtype)
            out.append(("v", node.output[0], i) if result is None else result)
        return SymValue(a.elem, rank, tuple(out))


def _at(value: SymValue, index: int) -> Element:
    return value.elems[0] if len(value.elems) == 1 else value.elems[index]


def _broadcast_length(values: Sequence[SymValue]) -> int:
    lengths = {len(v.elems) for v in values if v.rank == 1 and len(v.elems) != 1}
    require(len(lengths) <= 1, "lengths do not broadcast")
    return lengths.pop() if lengths else 1


def broadcast(a: SymValue, b: SymValue) -> tuple[list[tuple[Element, Element]], int]:
    """Element pairs of two rank <= 1 values under numpy broadcasting, and the result's rank."""
    length = _broadcast_length([a, b])
    return [(_at(a, i), _at(b, i)) for i in range(length)], max(a.rank, b.rank)


def _equal(x: Element, y: Element) -> bool | None:
    if not isinstance(x, tuple) and not isinstance(y, tuple):
        return bool(x == y)
    if x == y:
        return True
    for p, q in ((x, y), (y, x)):
        if nonnegative(p) and isinstance(q, int) and q < 0:
            return False
    return None


def _arith_element(op: str, x: Element, y: Element, dtype: type) -> Element | None:
    """``x op y`` of two int elements of ``dtype``: a known value, a forwarded element, or None."""
    if not isinstance(x, tuple) and not isinstance(y, tuple):
        a, b = np.array(x, dtype=dtype), np.array(y, dtype=dtype)
        with np.errstate(over="ignore"):
            if op == "Add":
                return int(a + b)
            if op == "Sub":
                return int(a - b)
            if op == "Mul":
                return int(a * b)
            if op == "Max":
                return int(max(a, b))
            if op == "Min":
                return int(min(a, b))
        if b == 0:
            return None
        quotient = abs(int(x)) // abs(int(y))  # integer Div truncates toward zero
        quotient = quotient if (x >= 0) == (y >= 0) else -quotient
        info = np.iinfo(dtype)
        return quotient if info.min <= quotient <= info.max else None
    if (op in ("Add", "Sub") and y == 0) or (op in ("Mul", "Div") and y == 1):
        return x
    if (op == "Add" and x == 0) or (op == "Mul" and x == 1):
        return y
    if op in ("Max", "Min") and x == y:
        return x
    if op == "Sub" and x == y:
        return 0
    return None


def topological(view: GraphView) -> list[NodeProto]:
    """The graph's nodes in a topological order (graph order where it already is one)."""
    produced = {id(n): n for n in view.nodes}
    pending = {id(n): sum(1 for name in view.all_inputs(n) if name in view.producer) for n in view.nodes}
    ready = [n for n in view.nodes if pending[id(n)] == 0]
    order: list[NodeProto] = []
    position = {id(n): i for i, n in enumerate(view.nodes)}
    heap = [(position[id(n)], id(n)) for n in ready]
    heapq.heapify(heap)
    while heap:
        _, key = heapq.heappop(heap)
        node = produced[key]
        order.append(node)
        for out in node.output:
            for reader in view.consumers.get(out, []) if out else []:
                pending[id(reader)] -= 1
                if pending[id(reader)] == 0:
                    heapq.heappush(heap, (position[id(reader)], id(reader)))
    return order if len(order) == len(view.nodes) else []


@register_pass
class FoldShapeValues(Pass):
    """Fold shape computations whose value is known, and merge those proved equal to an earlier one.

    Pre: inferred types. Small int64/int32/bool tensors (rank 0, or 1-D of at most 64
    elements) get symbolic values (see :mod:`onnxopt.passes.shape_values`): Shape of partly
    dynamic tensors gives static dims as numbers and dynamic ones as symbols, and Gather, Slice,
    Concat, (Un)squeeze, Reshape, Identity, Cast, Add/Sub/Mul/Div/Max/Min, Equal and Where carry
    them. A node whose value is fully known (e.g. ``Shape(x)[-1]`` of a static last dim, or
    ``Where(Equal([d, -1], -1), 1, [d, -1])`` -> ``[d, 1]`` with d = 1) is replaced by an
    initializer; a node whose value equals that of a value computed earlier in the graph (the
    same dims of another tensor, the same elements of one shape) is removed and its readers read
    the earlier value. Graph outputs and nodes of custom domains or with subgraphs are left
    alone. Skipped for IR < 4. Post: every value read keeps its run-time value and type.
    """

    name = "fold_shape_values"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Analyze the graph, plan folds and merges, then rewrite once."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        graph = scope.graph
        view = ctx.view(graph)
        values = ShapeValues(view, ctx)
        if not values.order:
            return result
        folds, merges = plan(view, values, names_defined_below(graph))
        apply_plan(graph, view, folds, merges, result)
        return result


def plan(view: GraphView, values: ShapeValues, below: set[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Values to fold (name -> array) and values to merge (name -> earlier name with the same value)."""
    folds: dict[str, np.ndarray] = {}
    merges: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for node in values.order:
        if len(node.output) != 1 or not is_standard(node) or subgraphs(node) or node.op_type == "Constant":
            continue
        out = node.output[0]
        value = values.values.get(out)
        if value is None or out in view.graph_outputs:
            continue
        if value.known:
            folds[out] = value.array()
            continue
        if any(e[0] == "v" and e[1] == out for e in value.elems if isinstance(e, tuple)):
            continue  # nothing is known of it beyond itself
        key = (value.elem, value.rank, value.elems)
        earlier = first.get(key)
        if earlier is None:
            first[key] = out
        elif earlier not in below:
            merges[out] = earlier
    return folds, merges


def apply_plan(graph: GraphProto, view: GraphView, folds: dict[str, np.ndarray], merges: dict[str, str], result: PassResult) -> None:
    """Replace folded values by initializers (under their names) and merged ones by their earlier twin."""
    if not folds and not merges:
        return
    gone = set(folds) | set(merges)
    for name, array in folds.items():
        readers = [r for r in view.consumers.get(name, []) if not (len(r.output) == 1 and r.output[0] in gone)]
        if readers:
            graph.initializer.append(numpy_helper.from_array(array, name))
    kept = [n for n in view.nodes if not (len(n.output) == 1 and n.output[0] in gone)]
    del graph.node[:]
    graph.node.extend(kept)
    if merges:
        rename_inputs(graph, merges)
    if any(v.name in merges for v in graph.value_info):
        fresh = [v for v in graph.value_info if v.name not in merges]
        del graph.value_info[:]
        graph.value_info.extend(fresh)
    if folds:
        result.count("values_folded", len(folds))
    if merges:
        result.count("values_merged", len(merges))


def reshape_target(node: NodeProto, values: ShapeValues, ctx: PassContext) -> list[int] | None:
    """A constant target giving a Reshape the same result as its computed one, or None.

    Known entries stay; an entry proved equal to the input's dim at the same position becomes 0
    (without allowzero). One entry left unknown becomes -1 when every other entry is a positive
    number (so -1 infers exactly the value the original entry had to have).
    """
    if len(node.input) < 2 or not node.input[1]:
        return None
    value = values.value(node.input[1])
    if value is None or value.rank != 1 or value.elem != TensorProto.INT64:
        return None
    allowzero = bool(get_attr(node, "allowzero", 0))
    source = node.input[0]
    target: list[int | None] = []
    for axis, element in enumerate(value.elems):
        if not isinstance(element, tuple):
            target.append(int(element))
        elif not allowzero and element == values.dim(source, axis):
            target.append(0)
        else:
            target.append(None)
    unknown = target.count(None)
    if unknown == 0:
        return target  # type: ignore[return-value]
    if unknown == 1 and all(t is None or t > 0 for t in target):
        return [-1 if t is None else t for t in target]  # type: ignore[misc]
    return None
