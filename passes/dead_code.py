"""Dead-code elimination: unused nodes, initializers and value_info entries."""

from __future__ import annotations

from onnxopt.graph import GraphScope, is_standard
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.registry import register_pass


@register_pass
class EliminateDeadCode(Pass):
    """Remove nodes whose outputs nobody reads, unused initializers and stale value_info.

    Pre: a well-formed graph. Post: every remaining node output, initializer and
    value_info entry is read by a node (or a subgraph), is a graph output, or belongs to
    a node that must stay: custom-domain ops (opaque, may have side effects) are kept.
    Graph inputs and outputs are never removed.
    """

    name = "eliminate_dead_code"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Mark live values backwards from the graph outputs, then sweep."""
        graph = scope.graph
        view = ctx.view(graph)
        live: set[str] = set(view.graph_outputs)
        keep = [False] * len(view.nodes)
        for index in range(len(view.nodes) - 1, -1, -1):
            node = view.nodes[index]
            if not is_standard(node) and node.domain != "ai.onnx.ml" or any(o in live for o in node.output if o):
                keep[index] = True
                live.update(view.all_inputs(node))
        result = PassResult()
        if not all(keep):
            kept = [n for n, k in zip(view.nodes, keep) if k]
            result.count("nodes", len(view.nodes) - len(kept))
            del graph.node[:]
            graph.node.extend(kept)
        inputs = view.graph_inputs
        unused = [t for t in graph.initializer if t.name not in live and t.name not in inputs]
        if unused:
            remaining = [t for t in graph.initializer if t.name in live or t.name in inputs]
            del graph.initializer[:]
            graph.initializer.extend(remaining)
            result.count("initializers", len(unused))
        existing = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | inputs
        stale = [v for v in graph.value_info if v.name not in existing]
        if stale:
            fresh = [v for v in graph.value_info if v.name in existing]
            del graph.value_info[:]
            graph.value_info.extend(fresh)
            result.count("value_info", len(stale))
        return result
