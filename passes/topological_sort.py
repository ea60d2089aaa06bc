"""Topological sort of every graph, stable with respect to the original order."""

from __future__ import annotations

from onnxopt.graph import GraphScope
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.registry import register_pass
from onnxopt.toposort import sort_graph


@register_pass
class SortTopologically(Pass):
    """Order nodes so every value is produced before it is read (stable, iterative).

    Pre: an acyclic graph (a cycle raises an error naming a node on it). Post: nodes are
    in topological order; an already sorted graph is left byte-identical.
    """

    name = "sort_topologically"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Sort one graph in place."""
        result = PassResult()
        if sort_graph(scope.graph):
            result.count("graphs_sorted")
        return result
