"""The rewrite of structured pruning: slice every constant a channel group indexes, fix attributes and shape constants.

:func:`apply_pruning` takes keep masks per group (from :mod:`onnxopt.passes.channel_groups`) and
rewrites a model whose main graph has the analysed structure (the analysed model itself, or a
copy of it): constants are sliced with ``np.compress`` along each indexed axis (initializers and
Constant nodes alike, dtype kept), depthwise ``group`` attributes, Split sizes, flattening
Reshape targets and Resize sizes are recomputed, and the value_info of every tensor whose channel
count changed is dropped (inference recomputes it). Graph inputs and outputs are never touched
(the analysis blocks groups that reach them).

:class:`CostModel` recounts parameters and FLOPs of a pruned variant without rewriting it: a
Conv, ConvTranspose, Gemm or MatMul costs a fixed number of FLOPs per weight element when only
channel counts change, so FLOPs follow the sliced weights' sizes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TypeProto, helper, numpy_helper

from onnxopt.analysis import FLOP_OPS, node_flops
from onnxopt.errors import OnnxoptError
from onnxopt.graph import NameGenerator, is_standard, opset_version
from onnxopt.passes.channel_groups import AxisSlice, ChannelAnalysis, ChannelGroup, Edit

Keep = dict[int, np.ndarray]  # group index -> bool mask over the group's channels


def active(analysis: ChannelAnalysis, keep: Keep) -> Keep:
    """Only the masks of prunable groups that remove something."""
    out: Keep = {}
    for index, mask in keep.items():
        group = analysis.groups[index]
        mask = np.asarray(mask, bool)
        if mask.shape != (group.channels,):
            raise OnnxoptError(f"prune_channels: keep mask of group '{group.name}' has {mask.size} entries, not {group.channels}")
        if not group.prunable:
            raise OnnxoptError(f"prune_channels: group '{group.name}' is not prunable: {group.reasons[0]}")
        if not mask.any():
            raise OnnxoptError(f"prune_channels: group '{group.name}' would keep no channel")
        counts = mask.reshape(group.segments, -1).sum(axis=1)
        if (counts != counts[0]).any():
            raise OnnxoptError(
                f"prune_channels: keep mask of group '{group.name}' keeps {counts.tolist()} channels in its {group.segments} "
                "segments; its grouped convs need equal counts"
            )
        if not mask.all():
            out[index] = mask
    return out


def _touched(analysis: ChannelAnalysis, keep: Keep, items: Callable[[ChannelGroup], list]) -> list:
    """The slices or edits of the groups in ``keep``, deduplicated in a stable order."""
    seen: set = set()
    out = []
    for index in sorted(keep):
        for item in items(analysis.groups[index]):
            if item not in seen:
                seen.add(item)
                out.append(item)
    return out


@dataclass(frozen=True)
class Target:
    """A constant to slice: in place (``node`` None), or as a private copy of ``source`` for node ``node``."""

    constant: str
    node: int | None = None
    source: str | None = None

    @property
    def origin(self) -> str:
        """The constant whose values are sliced."""
        return self.source or self.constant


def constant_masks(analysis: ChannelAnalysis, keep: Keep) -> dict[Target, dict[int, np.ndarray]]:
    """For each constant to slice: axis -> bool mask of the entries that stay.

    A block-diagonal slice (``AxisSlice.blocks`` > 1) has a 2-D mask [blocks, n]: row j says which
    entries of the axis the constant's j-th block of axis-0 rows keeps.
    """
    masks: dict[Target, dict[int, np.ndarray]] = {}
    pieces: list[AxisSlice] = _touched(analysis, keep, lambda g: g.slices)
    for piece in pieces:
        mask = analysis.value_mask(piece.value, keep)
        if piece.blocks > 1:
            mask = mask.reshape(piece.blocks, -1)
        target = Target(piece.constant, piece.node, piece.source) if piece.private else Target(piece.constant)
        axes = masks.setdefault(target, {})
        previous = axes.get(piece.axis)
        if previous is not None and not np.array_equal(previous, mask):
            raise OnnxoptError(f"prune_channels: constant '{piece.constant}' axis {piece.axis} is indexed by two different channel sets")
        axes[piece.axis] = mask
    return masks


class ConstantStore(Mapping[str, np.ndarray]):
    """The constants of one graph (initializers and Constant nodes) as writable numpy arrays, read on demand."""

    def __init__(self, graph: GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and is_standard(n) and n.output}
        self.nodes = {k: n for k, n in self.nodes.items() if len(n.attribute) == 1 and n.attribute[0].name == "value"}
        self.aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and is_standard(n) and n.input and n.output}
        self._cache: dict[str, np.ndarray] = {}

    def source(self, name: str) -> str:
        """The constant behind ``name``, following Identity nodes (``name`` itself when it is one)."""
        for _ in range(64):
            if name in self or name not in self.aliases:
                break
            name = self.aliases[name]
        return name

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name in self.inits:
                tensor = self.inits[name]
            elif name in self.nodes:
                tensor = self.nodes[name].attribute[0].t
            else:
                raise KeyError(name)
            self._cache[name] = numpy_helper.to_array(tensor).copy()
        return self._cache[name]

    def __contains__(self, name: object) -> bool:
        return name in self.inits or name in self.nodes

    def __iter__(self) -> Iterator[str]:
        return iter([*self.inits, *self.nodes])

    def __len__(self) -> int:
        return len(self.inits) + len(self.nodes)

    def write(self, name: str, array: np.ndarray) -> None:
        """Store ``array`` as the constant ``name`` (same name; the dtype is the array's)."""
        self._cache[name] = array
        if name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(array, name))
        else:
            attr = self.nodes[name].attribute[0]
            attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))


def axis_size(mask: np.ndarray) -> int:
    """The size of an axis after slicing with ``mask`` (1-D, or 2-D block-diagonal: the count each block keeps)."""
    return int(mask.sum()) // (mask.shape[0] if mask.ndim == 2 else 1)


def slice_array(array: np.ndarray, axes: dict[int, np.ndarray]) -> np.ndarray:
    """``array`` with only the masked entries along each axis (2-D masks first: block-diagonal, on the original rows)."""
    for axis in sorted(axes, key=lambda a: (axes[a].ndim != 2, a)):
        mask = axes[axis]
        array = _block_compress(array, mask, axis) if mask.ndim == 2 else np.compress(mask, array, axis=axis)
    return np.asarray(array, order="C")


def _block_compress(array: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Rows of block j (axis 0 cut into ``len(mask)`` equal blocks) keep the entries ``mask[j]`` of ``axis``."""
    blocks, size = mask.shape
    kept = axis_size(mask)
    if axis == 0 or array.shape[axis] != size or array.shape[0] % blocks or (mask.sum(axis=1) != kept).any():
        raise OnnxoptError(f"prune_channels: a block-diagonal slice of axis {axis} does not fit a constant of shape {list(array.shape)}")
    moved = np.moveaxis(array, axis, 1)
    rows = moved.reshape(blocks, array.shape[0] // blocks, size, -1)
    columns = np.nonzero(mask)[1].reshape(blocks, 1, kept, 1)
    picked = np.take_along_axis(rows, columns, axis=2)
    return np.moveaxis(picked.reshape(array.shape[0], kept, *moved.shape[2:]), 1, axis)


def apply_pruning(model: ModelProto, analysis: ChannelAnalysis, keep: Keep, names: NameGenerator | None = None) -> set[str]:
    """Prune ``model`` in place (its main graph must have the analysed nodes, in order); returns the values whose shape changed."""
    keep = active(analysis, keep)
    if not keep:
        return set()
    graph = model.graph
    if len(graph.node) != len(analysis.nodes):
        raise OnnxoptError("prune_channels: the model to rewrite does not match the analysed graph")
    store = ConstantStore(graph)
    names = names or NameGenerator(model)
    masks = constant_masks(analysis, keep)
    private = {t: slice_array(store[t.origin], axes) for t, axes in masks.items() if t.node is not None}
    for target, axes in masks.items():
        if target.node is None:
            store.write(target.constant, slice_array(store[target.constant], axes))
    replaced: set[str] = set()
    for target, array in private.items():
        name = names.fresh(f"{target.constant}_pruned")
        graph.initializer.append(numpy_helper.from_array(array, name))
        node = graph.node[target.node]  # type: ignore[index]
        for position, current in enumerate(node.input):
            if current == target.constant:
                node.input[position] = name
        replaced.add(target.constant)
    edits: list[Edit] = _touched(analysis, keep, lambda g: g.edits)
    for edit in edits:
        replaced.update(_apply_edit(model, analysis, keep, edit, store, names))
    changed = {v for g in keep for v in analysis.groups[g].values}
    _drop_value_info(graph, changed)
    _drop_unused(graph, replaced)
    return changed


def _count(analysis: ChannelAnalysis, keep: Keep, value: str) -> int:
    return int(analysis.value_mask(value, keep).sum())


def _apply_edit(
    model: ModelProto, analysis: ChannelAnalysis, keep: Keep, edit: Edit, store: ConstantStore, names: NameGenerator
) -> list[str]:
    """Rewrite one attribute or shape constant; returns constants it stopped reading."""
    graph = model.graph
    node = graph.node[edit.node]
    if edit.kind == "group":
        _set_int(node, "group", _count(analysis, keep, edit.value))
        return []
    if edit.kind == "split":
        sizes = np.array([_count(analysis, keep, out) if out in analysis.maps else 0 for out in node.output], np.int64)
        if (opset_version(model) or 1) < 13:
            _set_ints(node, "split", sizes.tolist())
            return []
        old = node.input[1] if len(node.input) > 1 and node.input[1] else ""
        name = names.fresh(f"{node.name or node.output[0]}_split")
        graph.initializer.append(numpy_helper.from_array(sizes, name))
        if len(node.input) > 1:
            node.input[1] = name
        else:
            node.input.append(name)
        for index, attr in enumerate(node.attribute):
            if attr.name == "num_outputs":
                del node.attribute[index]
                break
        return [old] if old else []
    # reshape target / resize sizes: one entry follows the channel count
    at = 1 if edit.kind == "reshape" else 3
    old = node.input[at]
    array = store[store.source(old)].copy()
    flat = array.reshape(-1)
    flat[edit.position] = _count(analysis, keep, edit.value)
    name = names.fresh(f"{old}_pruned")
    graph.initializer.append(numpy_helper.from_array(flat.reshape(array.shape), name))
    node.input[at] = name
    return [old]


def _set_int(node: NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _set_ints(node: NodeProto, name: str, values: list[int]) -> None:
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, values))


def _drop_value_info(graph: GraphProto, stale: set[str]) -> None:
    if any(v.name in stale for v in graph.value_info):
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _drop_unused(graph: GraphProto, names: set[str]) -> None:
    """Remove initializers / Constant nodes in ``names`` that nothing reads any more."""
    if not names:
        return
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = {n for n in names if n and n not in used}
    if not dead:
        return
    kept = [t for t in graph.initializer if t.name not in dead]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in dead)]
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)


# ----------------------------------------------------------------------------- cost


def _numel(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


@dataclass
class CostModel:
    """Parameters and FLOPs of pruned variants of one analysed model, without rewriting it.

    ``flops`` is None when the shapes needed for FLOPs are unknown (``types`` not static).
    """

    analysis: ChannelAnalysis
    dims: dict[str, tuple[int, ...]]
    params: int
    flops: int | None
    per_element: dict[str, float] = field(default_factory=dict)  # weight -> FLOPs per element (all FLOP nodes reading it)
    node_flops: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ModelProto, analysis: ChannelAnalysis, types: dict[str, TypeProto] | None) -> CostModel:
        """Count the model's parameters (all graphs, like :func:`onnxopt.analysis.analyze`) and main-graph FLOPs."""
        from onnxopt.analysis import analyze

        stats = analyze(model, serialized_size=False)
        dims: dict[str, tuple[int, ...]] = {}
        for t in model.graph.initializer:
            dims[t.name] = tuple(int(d) for d in t.dims)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                dims[node.output[0]] = tuple(int(d) for d in node.attribute[0].t.dims)
        cost = cls(analysis, dims, stats.parameters, None)
        if types is None:
            return cost
        initializers = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:  # Constant-node weights: give node_flops their dims
            if node.op_type == "Constant" and node.output[0] in dims and node.output[0] not in initializers:
                initializers[node.output[0]] = node.attribute[0].t
        total = 0
        for index, node in enumerate(model.graph.node):
            if node.op_type not in FLOP_OPS:
                continue
            flops = node_flops(node, initializers, types)
            if flops is None:
                return cost
            total += flops
            cost.node_flops[index] = flops
            weight = node.input[1] if len(node.input) > 1 else ""
            if weight in dims and _numel(dims[weight]):
                cost.per_element[weight] = cost.per_element.get(weight, 0.0) + flops / _numel(dims[weight])
        cost.flops = total
        return cost

    def count(self, keep: Keep) -> tuple[int, int | None]:
        """(parameters, FLOPs) of the model pruned with ``keep``."""
        keep = active(self.analysis, keep)
        params, flops = self.params, self.flops
        for target, axes in constant_masks(self.analysis, keep).items():
            old = self.dims[target.origin]
            new = list(old)
            for axis, mask in axes.items():
                new[axis] = axis_size(mask)
            if target.node is not None:  # a private copy: the original stays for its other readers
                params += _numel(new)
                continue
            removed = _numel(old) - _numel(new)
            params -= removed
            if flops is not None and target.constant in self.per_element:
                flops -= int(round(self.per_element[target.constant] * removed))
        return params, flops

    def prunable_layers(self) -> tuple[int, int | None]:
        """(parameters, FLOPs) of the prunable layers: every constant a prunable group slices, and the FLOP nodes reading them."""
        names = {s.source or s.constant for g in self.analysis.prunable() for s in g.slices}
        params = sum(_numel(self.dims[n]) for n in names if n in self.dims)
        if self.flops is None:
            return params, None
        flops = sum(f for i, f in self.node_flops.items() if _weight(self.analysis.nodes[i]) in names)
        return params, flops


def _weight(node: NodeProto) -> str:
    return node.input[1] if len(node.input) > 1 else ""
