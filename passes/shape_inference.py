"""Shape inference written into the model's value_info."""

from __future__ import annotations

from onnx import ModelProto, helper

from onnxopt.graph import iter_scopes
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.registry import register_pass


@register_pass
class InferShapes(Pass):
    """Record inferred types and shapes as value_info (degrades gracefully on failures).

    Uses onnx's inference on a weight-free copy; where it fails on part of the graph the
    rest is still annotated. Post: value_info holds every inferred intermediate type;
    nothing else changes.
    """

    name = "infer_shapes"

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Add a value_info entry for every intermediate value with a known type."""
        types = ctx.types
        result = PassResult()
        for scope in iter_scopes(model.graph):
            graph = scope.graph
            declared = {v.name for v in graph.value_info} | {v.name for v in graph.input} | {v.name for v in graph.output}
            declared |= {t.name for t in graph.initializer}
            for node in graph.node:
                for out in node.output:
                    if out and out not in declared and out in types:
                        value = helper.make_value_info(out, types[out])
                        graph.value_info.append(value)
                        declared.add(out)
                        result.count("value_info")
        return result
