"""Stable topological ordering of a graph's nodes (iterative, no recursion)."""

from __future__ import annotations

import heapq

from onnx import GraphProto

from onnxopt.errors import InvalidModelError
from onnxopt.graph import GraphView, node_label


def topological_order(graph: GraphProto, view: GraphView | None = None) -> list[int]:
    """Indices of ``graph.node`` in a topological order closest to the current one.

    Among ready nodes the one earliest in the file goes first, so an already sorted
    graph keeps its order exactly. Raises :class:`InvalidModelError` on a cycle.
    """
    view = view or GraphView.build(graph)
    nodes = view.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    pending = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        deps = {index[id(view.producer[name])] for name in view.all_inputs(node) if name in view.producer}
        for d in deps:
            users[d].append(i)
        pending[i] = len(deps)
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(pending) if count > 0)
        raise InvalidModelError(f"the graph has a cycle through node {node_label(stuck)}")
    return order


def is_sorted(graph: GraphProto, view: GraphView | None = None) -> bool:
    """Whether every value produced in ``graph`` is produced before any node reads it."""
    view = view or GraphView.build(graph)
    produced = view.producer
    seen: set[str] = set()
    for node in view.nodes:
        for name in view.all_inputs(node):
            if name in produced and name not in seen:
                return False
        seen.update(node.output)
    return True


def sort_graph(graph: GraphProto) -> bool:
    """Reorder ``graph.node`` topologically in place; return whether the order changed.

    Raises :class:`InvalidModelError` if the graph has a cycle.
    """
    view = GraphView.build(graph)
    if is_sorted(graph, view):
        return False
    order = topological_order(graph, view)
    if order == list(range(len(order))):
        return False
    reordered = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(reordered)
    return True
