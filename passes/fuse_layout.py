"""Layout chain merging: consecutive Transpose / Reshape / Squeeze / Unsqueeze / Flatten nodes become one or none.

Every match is a pair (first, second) where the first node's output is read only by the
second; the matchers only read the graph and raise :class:`NoMatch` with a reason. The pass
collects every non-overlapping pair of a graph, rewrites, and repeats on the result (a few
rounds) so longer chains collapse in one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, NodeProto, helper

from onnxopt.graph import GraphScope, GraphView, is_standard, names_defined_below, rename_inputs
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.passes.fuse_linear import node_attrs
from onnxopt.passes.fusion_support import check_private, debug, drop_value_info, materialize_inputs, producer, replace_nodes
from onnxopt.passes.noop_rules import NoMatch, constant_array, default_opset, dims_of, get_attr, int_list, require
from onnxopt.registry import register_pass

MAX_ROUNDS = 32
FIRST_OPS: dict[str, tuple[str, ...]] = {
    "Transpose": ("Transpose",),
    "Reshape": ("Reshape", "Squeeze", "Unsqueeze", "Flatten"),
    "Squeeze": ("Unsqueeze",),
    "Unsqueeze": ("Squeeze", "Unsqueeze"),
}


@dataclass
class LayoutMatch:
    """One pair to merge: ``nodes`` (first, second) go; ``output`` (the second's) is then written by ``op_type``.

    ``op_type`` None means the pair is the identity: readers of ``output`` read ``inputs[0]``.
    An input given as an array becomes a new initializer.
    """

    kind: str
    nodes: list[NodeProto]
    output: str
    inputs: list[str | np.ndarray]
    op_type: str | None = None
    attrs: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- matchers


def transpose_perm(node: NodeProto, ctx: PassContext) -> list[int]:
    """A Transpose's permutation (reversed axes when ``perm`` is absent, which needs the input's rank)."""
    perm = get_attr(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]  # type: ignore[union-attr]
    dims = dims_of(ctx.types.get(node.input[0]))
    require(dims is not None, "a Transpose without perm has an input of unknown rank")
    return list(range(len(dims) - 1, -1, -1))  # type: ignore[arg-type]


def squeeze_axes(node: NodeProto, view: GraphView, ctx: PassContext) -> list[int] | None:
    """The axes of a Squeeze/Unsqueeze (attribute before opset 13, constant input from 13), None when absent."""
    return int_list(node, view, name="axes", index=1, from_input=default_opset(ctx) >= 13)


def normalized(axes: list[int], rank: int | None) -> list[int]:
    """``axes`` with negatives resolved against ``rank``, sorted; NoMatch when that needs an unknown rank or repeats."""
    if any(a < 0 for a in axes):
        require(rank is not None, "negative axes on an input of unknown rank")
        axes = [a + rank if a < 0 else a for a in axes]  # type: ignore[operator]
    require(len(set(axes)) == len(axes), "repeated axes")
    return sorted(axes)


def reshape_determined(node: NodeProto, view: GraphView, ctx: PassContext) -> None:
    """NoMatch unless a Reshape's result depends only on its target and the element count (no 0 copying a dim)."""
    if default_opset(ctx) < 5:
        shape = get_attr(node, "shape")
        require(shape is not None and 0 not in shape, "the Reshape's shape attribute is absent or has a 0")  # type: ignore[operator]
        return
    if int(get_attr(node, "allowzero", 0)) == 1:  # type: ignore[call-overload]
        return
    target = constant_array(view, node.input[1]) if len(node.input) > 1 else None
    require(target is not None, "the Reshape's target is not a constant of this graph")
    require(not bool((target == 0).any()), "the Reshape's target has a 0 (copies a dim of its input)")  # type: ignore[union-attr]


def match_pair(second: NodeProto, view: GraphView, ctx: PassContext) -> LayoutMatch:
    """The merge of ``second`` with the layout node writing its data input; NoMatch when none applies."""
    require(len(second.input) >= 1 and bool(second.input[0]), "the node has no data input")
    first = producer(view, second.input[0], FIRST_OPS[second.op_type])
    middle = first.output[0]
    require(middle not in second.input[1:], "the intermediate is also read as a non-data input")
    check_private(view, [first, second], second.output[0])
    x = first.input[0]
    out = second.output[0]
    if second.op_type == "Transpose":
        p1, p2 = transpose_perm(first, ctx), transpose_perm(second, ctx)
        require(len(p1) == len(p2), "the permutations have different ranks")
        combined = [p1[p] for p in p2]
        if combined == list(range(len(combined))):
            return LayoutMatch("transpose_pair_removed", [first, second], out, [x])
        return LayoutMatch("transpose_pair_merged", [first, second], out, [x], "Transpose", {"perm": combined})
    if second.op_type == "Reshape":
        reshape_determined(second, view, ctx)
        kind = f"{first.op_type.lower()}_reshape_merged"
        return LayoutMatch(kind, [first, second], out, [x, *second.input[1:]], "Reshape", node_attrs(second))
    dims = dims_of(ctx.types.get(x))
    rank = None if dims is None else len(dims)
    if second.op_type == "Squeeze":  # Unsqueeze -> Squeeze
        added, removed = squeeze_axes(first, view, ctx), squeeze_axes(second, view, ctx)
        require(bool(added) and bool(removed), "the Unsqueeze or the Squeeze has no explicit axes")
        out_rank = None if rank is None else rank + len(added)  # type: ignore[arg-type]
        require(normalized(added, out_rank) == normalized(removed, out_rank), "the Squeeze removes other axes than were added")  # type: ignore[arg-type]
        return LayoutMatch("unsqueeze_squeeze_removed", [first, second], out, [x])
    if first.op_type == "Unsqueeze":  # Unsqueeze -> Unsqueeze
        return merge_unsqueezes(first, second, view, ctx, rank)
    # Squeeze -> Unsqueeze
    require(dims is not None, "the Squeeze input's shape is unknown")
    removed = squeeze_axes(first, view, ctx)
    if removed is None:
        require(None not in dims, "a Squeeze without axes on an input with unknown dims")  # type: ignore[operator]
        removed = [i for i, d in enumerate(dims) if d == 1]  # type: ignore[arg-type]
    removed = normalized(removed, rank)
    require(all(0 <= a < rank and dims[a] == 1 for a in removed), "a squeezed dim is not known to be 1")  # type: ignore[operator, index]
    added = squeeze_axes(second, view, ctx)
    require(bool(removed) and added is not None, "nothing is squeezed or the Unsqueeze has no axes")
    require(normalized(added, rank) == removed, "the Unsqueeze adds other axes than were squeezed")  # type: ignore[arg-type]
    return LayoutMatch("squeeze_unsqueeze_removed", [first, second], out, [x])


def merge_unsqueezes(first: NodeProto, second: NodeProto, view: GraphView, ctx: PassContext, rank: int | None) -> LayoutMatch:
    """One Unsqueeze inserting the axes of both (explicit axes; negative ones need the input's rank)."""
    inner, outer = squeeze_axes(first, view, ctx), squeeze_axes(second, view, ctx)
    require(inner is not None and outer is not None, "an Unsqueeze has no axes")
    middle_rank = None if rank is None else rank + len(inner)  # type: ignore[arg-type]
    inner = normalized(inner, middle_rank)  # type: ignore[arg-type]
    outer = normalized(outer, None if middle_rank is None else middle_rank + len(outer))  # type: ignore[arg-type]
    taken = set(outer)
    combined = set(outer)
    position, index = 0, 0
    wanted = set(inner)
    while wanted:
        if position not in taken:
            if index in wanted:
                combined.add(position)
                wanted.discard(index)
            index += 1
        position += 1
    axes = sorted(combined)
    x, out = first.input[0], second.output[0]
    if default_opset(ctx) >= 13:
        return LayoutMatch("unsqueeze_pair_merged", [first, second], out, [x, np.array(axes, dtype=np.int64)], "Unsqueeze")
    return LayoutMatch("unsqueeze_pair_merged", [first, second], out, [x], "Unsqueeze", {"axes": axes})


# ----------------------------------------------------------------------------- rewriting


def apply_matches(graph: GraphProto, view: GraphView, matches: list[LayoutMatch], below: set[str], ctx: PassContext) -> None:
    """Rewrite non-overlapping ``matches``: new nodes at the second node's place, identity pairs forwarded.

    An identity pair whose output is a graph output, or whose source is defined again inside a
    subgraph (a rename there would be shadowed), becomes an Identity node instead.
    """
    replaced: dict[int, list[NodeProto]] = {}
    forward: dict[str, str] = {}
    stale: set[str] = set()
    for match in matches:
        first, second = match.nodes
        replaced[id(first)] = []
        stale.update(o for o in first.output if o)
        op_type = match.op_type
        if op_type is None and (match.output in view.graph_outputs or match.inputs[0] in below):
            op_type = "Identity"
        if op_type is None:
            forward[match.output] = match.inputs[0]  # type: ignore[assignment]
            replaced[id(second)] = []
            stale.update(o for o in second.output if o)
            continue
        inputs = materialize_inputs(graph, match.inputs, f"{match.output}_{op_type.lower()}", ctx)
        node = helper.make_node(op_type, inputs, [match.output], name=ctx.names.fresh(f"{match.output}_{op_type}"), **match.attrs)
        replaced[id(second)] = [node]
    replace_nodes(graph, view.nodes, replaced)
    if forward:
        rename_inputs(graph, forward)
    drop_value_info(graph, stale)


@register_pass
class MergeLayoutChains(Pass):
    """Merge consecutive layout ops: Transpose pairs, Reshape after Reshape/Squeeze/Unsqueeze/Flatten, (Un)squeeze pairs.

    Pre: types inferred (``ctx.types``: ranks for a Transpose without perm and for negative
    axes, static dims for Squeeze -> Unsqueeze). Every pair is a standard first node whose
    output is read only by the standard second node (as its data input) and is not a graph
    output. Matched: Transpose -> Transpose (perms composed; the identity removes both);
    Reshape/Squeeze/Unsqueeze/Flatten -> Reshape when the second Reshape's result depends
    only on its target (allowzero=1, or a constant target without 0 entries, which would copy
    a dim of the first's output; before opset 5 the shape attribute): the first is dropped;
    Unsqueeze -> Squeeze of the same axes (both explicit) cancel; Unsqueeze -> Unsqueeze (explicit
    axes) become one Unsqueeze of the combined axes; Squeeze -> Unsqueeze of the
    same axes cancel when every squeezed dim is known to be 1 (a Squeeze without axes needs
    all dims known). Axes as attribute (opset < 13) or constant input (opset >= 13). Pairs
    are merged in rounds (at most 32 per graph) so chains collapse. Custom-domain ops are
    never touched. Models where the first node would have failed at run time (a bad Reshape
    or a Squeeze of a non-1 dim) may run after the merge.

    Post: the merged node writes the second node's output; for a cancelled pair readers
    (subgraphs included) read the first node's input instead, or an Identity keeps a graph
    output (or a name shadowed in a subgraph) produced. Surviving values keep their types.
    """

    name = "merge_layout_chains"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match pairs, rewrite, and repeat until no pair is left (or the round limit)."""
        result = PassResult()
        graph = scope.graph
        below = names_defined_below(graph)
        view = ctx.view(graph)
        for _ in range(MAX_ROUNDS):
            claimed: set[int] = set()
            matches: list[LayoutMatch] = []
            for node in view.nodes:
                if node.op_type not in FIRST_OPS or not is_standard(node):
                    continue
                try:
                    match = match_pair(node, view, ctx)
                except NoMatch as exc:
                    debug(self.name, node, exc)
                    continue
                ids = {id(n) for n in match.nodes}
                if ids & claimed:
                    continue
                claimed |= ids
                matches.append(match)
            if not matches:
                break
            apply_matches(graph, view, matches, below, ctx)
            for match in matches:
                result.count(match.kind)
            view = GraphView.build(graph)
        return result
