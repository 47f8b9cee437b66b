"""group-activations: find op + activation chains the target runs as one kernel."""

from __future__ import annotations

from dataclasses import dataclass


from qcompiler import Model, Pass, PassContext, PassResult
from qcompiler import is_constant

__all__ = ["GroupActivations"]


@dataclass(frozen=True)
class GroupActivations(Pass):
    """Record (in the analysis, not the graph) each node followed by an activation that the
    target's `fused` patterns run inside the same kernel, e.g. Conv+Relu, Conv+Clip, Add+Relu.

    Why: inside a group there is no Q/DQ: the group's output is quantized once, after the
    activation, whose clipping the output range then absorbs. Requires the head's output to be
    read only by the activation, Clip bounds to be constants, and (unless the target quantizes
    graph outputs) the activation's output not to be a graph output. Does not change the graph.
    """

    name = "group-activations"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups: dict[str, str] = {}
        for graph in model.graph.walk():
            for node in graph.nodes:
                if not node.outputs:
                    continue
                out = node.outputs[0]
                readers = out.outputs
                if len(readers) != 1 or graph.is_graph_output(out):
                    continue
                tail = readers[0]
                if not ctx.target.fused_with(node.op, tail.op):
                    continue
                if any(graph.is_graph_output(o) for o in tail.outputs) and not ctx.target.quantize_graph_outputs:
                    continue  # the group's output stays float: better the head's output is quantized
                if tail.op == "Clip" and not all(is_constant(v) for v in tail.inputs[1:] if v.name):
                    continue
                groups[node.name] = tail.name
        ctx.analysis["groups"] = groups
        ctx.report["fused_groups"] = len(groups)
        return PassResult(False)
