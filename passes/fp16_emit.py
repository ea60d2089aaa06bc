"""Writing the fp16 pass's node plans into the graph: value placement, float16 constants and boundary Casts.

:class:`Placement` gives every float32 value a home type (what its producer writes);
:class:`Emitter` then rewrites the node list: converted initializers and Constants (in place,
or as a float16 copy when float32 readers remain), retyped Casts and ConstantOfShape, and one
Cast per value and direction right before its first reader.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.graph import NameGenerator, is_standard, subgraphs
from onnxopt.passbase import PassResult
from onnxopt.passes.constants import constant_value
from onnxopt.passes.fp16_values import ANY, F16, F32, FP16_MAX, FREE_PRODUCERS, NodePlan, OriginalValues
from onnxopt.passes.noop_rules import get_attr


class Placement:
    """Where every float32 value lives after the pass.

    ``home``: the element type each value's producer writes. ``pinned``: names that keep
    float32 under their own name (graph outputs, values read inside subgraphs). ``wants``: the
    types the value's readers ask for (ANY readers left out).
    """

    def __init__(self, graph: GraphProto, values: OriginalValues, plans: Mapping[int, NodePlan]) -> None:
        self.values = values
        view = values.view
        self.pinned: set[str] = {o.name for o in graph.output}
        for node in view.nodes:
            if subgraphs(node):
                self.pinned.update(view.implicit.get(id(node), ()))
        self.wants: dict[str, set[int]] = {}
        for node in view.nodes:
            plan = plans[id(node)]
            for name, want in zip(node.input, plan.inputs):
                if name and want is not None and want != ANY:
                    self.wants.setdefault(name, set()).add(want)
        self.home: dict[str, int] = {}
        for value in graph.input:
            if values.is_f32(value.name):
                self.home[value.name] = F32
        for tensor in graph.initializer:
            if tensor.data_type == F32 and tensor.name not in self.home:
                external = tensor.data_location == TensorProto.EXTERNAL  # never read here: Casts instead
                self.home[tensor.name] = F32 if external else self._free_home(tensor.name)
        for node in view.nodes:
            plan = plans[id(node)]
            if node.op_type in FREE_PRODUCERS and is_standard(node) and node.output and values.is_f32(node.output[0]):
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


class Emitter:
    """Rewrites the main graph from the plans and the placement; counts Casts and converted constants into ``result``.

    After :meth:`emit`, :meth:`final_types` gives the element type of every value the
    rewritten graph's Casts and types are known for (what the cleanup step reads).
    """

    def __init__(
        self,
        graph: GraphProto,
        plans: Mapping[int, NodePlan],
        placement: Placement,
        names: NameGenerator,
        result: PassResult,
        *,
        clamp: bool,
    ) -> None:
        self.graph, self.plans, self.names, self.result, self.clamp = graph, plans, names, result, clamp
        self.values = placement.values
        self.view = self.values.view
        self.home, self.pinned, self.wants = placement.home, placement.pinned, placement.wants
        self.fp16_name: dict[str, str] = {}  # value -> the name of its float16 copy or fresh fp16 output
        self.cast_names: dict[tuple[str, int], str] = {}
        self.aliases: dict[str, int] = {}  # names this pass created -> their element type
        self.new_nodes: list[NodeProto] = []

    def emit(self) -> None:
        """Rewrite the node list with converted nodes, constants and boundary Casts."""
        graph, view, names, clamp = self.graph, self.view, self.names, self.clamp
        converted_inits = copies = 0
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
            if node.op_type in FREE_PRODUCERS and is_standard(node) and node.output and self.values.is_f32(node.output[0]):
                constants += self._retype_free(node, clamp)
        del graph.node[:]
        graph.node.extend(self.new_nodes)
        self.result.count("initializers_fp16", converted_inits)
        self.result.count("initializer_fp16_copies", copies)
        self.result.count("constants_fp16", constants)

    def final_types(self) -> dict[str, int | None]:
        """Element types in the rewritten graph: original types seen, then homes, then names the pass created, then Casts."""
        final = dict(self.values.seen)
        final.update(self.home)
        final.update(self.aliases)
        for node in self.graph.node:
            if node.op_type == "Cast" and is_standard(node) and node.output:
                final[node.output[0]] = int(get_attr(node, "to"))  # type: ignore[arg-type]
        return final

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
        return self.values.elem(name)

    def _emit_node(self, node: NodeProto, plan: NodePlan) -> None:
        """Append ``node`` with its inputs read in the planned types, and Casts back for its pinned fp16 outputs."""
        for index, (name, want) in enumerate(zip(node.input, plan.inputs)):
            if name and want is not None and name in self.home:
                node.input[index] = self.resolve(name, want)
        after: list[NodeProto] = []
        for index, name in enumerate(node.output):
            if name and self.home.get(name) == F16 and name in self.pinned:
                fresh = self.names.fresh(f"{name}_fp16")
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
            copy_name = self.names.fresh(f"{out}_fp16")
            copy = helper.make_node("Constant", [], [copy_name], name=self.names.fresh(f"{node.name or out}_fp16"))
            copy.attribute.append(helper.make_attribute("value", _fp16_tensor(tensor, "", clamp)))
            self.new_nodes.append(copy)
            self.fp16_name[out] = copy_name
            self.aliases[copy_name] = F16
            return 1
        return 0

    def _cast_once(self, key: str, source: str, to: int) -> str:
        """The name of the one Cast of ``key`` to ``to``, emitting it on first use."""
        cached = self.cast_names.get((key, to))
        if cached is None:
            cached = self.cast_names[(key, to)] = self.names.fresh(f"{key}_{'fp16' if to == F16 else 'fp32'}")
            self.aliases[cached] = to
            self.new_nodes.append(self._cast(source, cached, to))
        return cached

    def _cast(self, source: str, target: str, to: int) -> NodeProto:
        """A new Cast node (counted)."""
        self.result.count("casts_inserted", 1)
        return helper.make_node("Cast", [source], [target], name=self.names.fresh(f"{target}_cast"), to=to)


def _to_fp16(array: np.ndarray, clamp: bool) -> np.ndarray:
    """``array`` as float16; finite values beyond the range are clamped to +-65504 when asked, else become inf."""
    if clamp:
        finite = np.isfinite(array)
        array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array)
    with np.errstate(over="ignore"):
        return array.astype(np.float16)


def _fp16_tensor(tensor: TensorProto, name: str, clamp: bool) -> TensorProto:
    """A float16 copy of a float32 tensor (values beyond the range clamped when asked, else inf)."""
    return numpy_helper.from_array(_to_fp16(numpy_helper.to_array(tensor), clamp), name)


def _set_attr(node: NodeProto, attribute: onnx.AttributeProto) -> None:
    """Replace (or add) one attribute of ``node``, keeping the others in order."""
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(attribute)
