"""Observing values inside If and Loop bodies during calibration.

onnxruntime returns only graph outputs, and a value defined inside a control-flow body is not
one. The calibration copy of the model (never the compiled model) is therefore instrumented:

* If: the value becomes an extra output of its branch, the other branch outputs an empty
  tensor of the same element type in that position, and the If node gains an output
  ``<value>__qc_observe``. Runs that take the other branch contribute nothing (statistics skip
  empty tensors), so the range covers exactly the samples that computed the value.
* Loop: the value becomes an extra scan output of the body (loop-carried inputs through an
  Identity copy); the Loop node gains an output that stacks it over the iterations (axis 0). Ranges, histograms and zero counts of the stack are
  those of all iterations together.

Only bodies of main-graph nodes are instrumented (one level); Scan bodies and deeper nesting
stay uncalibrated (their ops stay float, reported by insert-qdq). A Loop whose instrumented value
changes shape between iterations cannot be stacked; the caller tries a run first and drops the
Loop instrumentation if it fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper

__all__ = ["SUFFIX", "Observation", "observable_subgraph_values", "instrument"]

SUFFIX = "__qc_observe"
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class Observation:
    """One body value to observe: which node and body it lives in, and its element type."""

    value: str      # the value's name inside the body
    node: str       # the main-graph If/Loop node
    attr: str       # then_branch, else_branch or body
    elem_type: int

    @property
    def exposed(self) -> str:
        return self.value + SUFFIX


def _types(graph: onnx.GraphProto) -> dict[str, int]:
    out = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def observable_subgraph_values(proto: onnx.ModelProto, skip: Iterable[str] = ()) -> list[Observation]:
    """Float values computed by nodes of If/Loop bodies directly under the main graph, in graph
    order, and a Loop body's loop-carried float inputs. A value's type must be known (shape
    inference annotates bodies' value_info); ``skip`` names values not worth observing (e.g.
    inputs of QuantizeLinear)."""
    skipped = set(skip)
    found: list[Observation] = []
    for node in proto.graph.node:
        if node.op_type not in ("If", "Loop") or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            body = attr.g
            types = _types(body)
            if node.op_type == "Loop":  # loop-carried float state: observed through a copy
                for vi in list(body.input)[2:]:
                    if vi.name not in skipped and vi.type.tensor_type.elem_type in _FLOAT:
                        found.append(Observation(vi.name, node.name, attr.name, vi.type.tensor_type.elem_type))
            for inner in body.node:
                if inner.op_type in ("If", "Loop", "Scan", "QuantizeLinear"):
                    continue
                for name in inner.output:
                    if name and name not in skipped and types.get(name) in _FLOAT:
                        found.append(Observation(name, node.name, attr.name, types[name]))
    return found


def _source(body: onnx.GraphProto, ob: Observation) -> str:
    """The name to list as the body's new output: the value itself, or an Identity copy of it
    when it is already a body input or output (a name is listed once per graph)."""
    taken = {i.name for i in body.input} | {o.name for o in body.output}
    if ob.value not in taken:
        return ob.value
    copy = ob.value + SUFFIX + "_copy"
    body.node.append(helper.make_node("Identity", [ob.value], [copy], name=copy))
    return copy


def _empty(name: str, elem_type: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name + "_empty",
                            value=helper.make_tensor(name + "_value", elem_type, [0], []))


def instrument(proto: onnx.ModelProto, observations: Iterable[Observation],
               kinds: Iterable[str] = ("If", "Loop")) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``proto`` whose If/Loop nodes also output the observed body values; returns it
    with the map exposed name -> body value name (only for node kinds in ``kinds``)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_node: dict[str, list[Observation]] = {}
    for ob in observations:
        by_node.setdefault(ob.node, []).append(ob)
    allowed = set(kinds)
    exposed: dict[str, str] = {}
    for node in out.graph.node:
        obs = by_node.get(node.name)
        if not obs or node.op_type not in allowed:
            continue
        bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        for ob in obs:
            if node.op_type == "If":
                for attr, body in bodies.items():
                    if attr == ob.attr:
                        body.output.append(helper.make_tensor_value_info(_source(body, ob), ob.elem_type, None))
                    else:  # the branch not taken contributes an empty tensor
                        filler = f"{ob.value}{SUFFIX}_{attr}"
                        body.node.append(_empty(filler, ob.elem_type))
                        body.output.append(helper.make_tensor_value_info(filler, ob.elem_type, None))
            else:  # Loop: a new scan output, stacked over the iterations
                body = bodies["body"]
                body.output.append(helper.make_tensor_value_info(_source(body, ob), ob.elem_type, None))
            node.output.append(ob.exposed)
            exposed[ob.exposed] = ob.value
    return out, exposed

