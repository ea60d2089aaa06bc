"""Vocabulary shared by the fp16 pass's steps: type codes, node plans and the graph's original values."""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx import TensorProto, TypeProto

from onnxopt.graph import GraphView, is_standard
from onnxopt.passes.constants import constant_value

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
ANY = 0  # a reader that accepts either type (Cast to a float type, Shape, Size)
FP16_MAX = 65504.0
# Producers that write either float type at no cost: a Constant/ConstantOfShape is retyped or copied, a Cast changes its 'to'.
FREE_PRODUCERS = frozenset({"Constant", "ConstantOfShape", "Cast"})


@dataclass
class NodePlan:
    """What one node does: whether it converts, why not, and per input/output slot the wanted/home type."""

    convert: bool
    reason: str
    inputs: list[int | None] = field(default_factory=list)  # F16, F32, ANY, or None (not a float32 value)
    outputs: list[int | None] = field(default_factory=list)  # F16, F32, or None


class OriginalValues:
    """The main graph's values as they are before the pass: element types and constant tensors.

    Element types are looked up once each and remembered in :attr:`seen`; the cleanup step
    reads that map as the types of the values the pass did not retype.
    """

    def __init__(self, view: GraphView, types: dict[str, TypeProto]) -> None:
        self.view = view
        self.types = types
        self.seen: dict[str, int | None] = {}

    def elem(self, name: str) -> int | None:
        """Element type of a value before the pass (initializers and inputs first, then inference)."""
        if name not in self.seen:
            tensor = self.view.initializers.get(name)
            self.seen[name] = tensor.data_type if tensor is not None else _inferred_elem(self.types, name)
        return self.seen[name]

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


def _inferred_elem(types: dict[str, TypeProto], name: str) -> int | None:
    tp = types.get(name)
    if tp is None or tp.WhichOneof("value") != "tensor_type":
        return None
    return tp.tensor_type.elem_type or None
