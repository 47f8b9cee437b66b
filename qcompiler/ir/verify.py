"""The IR verifier: structural invariants checked between passes when verify-each is on.

Each problem is reported as one sentence naming the node and value, because the first one
becomes the user's error message (for input models) or the failing pass's diagnostic.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Graph, node_subgraphs
from .model import Model

__all__ = ["verify_model", "VerificationError"]


class VerificationError(Exception):
    """Raised by the pass manager when a pass leaves the IR invalid."""


def _label(node: gs.Node) -> str:
    return f"node '{node.name or '<unnamed>'}' ({node.op})"


def verify_model(model: Model, *, sorted_check: bool = True) -> list[str]:
    """All problems found, first one most useful; empty when the model is well formed."""
    problems: list[str] = []
    _verify_graph(model.graph, model, set(), problems, sorted_check)
    return problems


def _verify_graph(graph: Graph, model: Model, outer: set[int], problems: list[str],
                  sorted_check: bool) -> None:
    cycle = graph.find_cycle()
    if cycle:
        problems.append(f"graph '{graph.name}' has a cycle through nodes {' -> '.join(cycle)}")
        return
    available = set(outer)
    available.update(id(v) for v in graph.gs.inputs)
    produced_anywhere: dict[int, gs.Node] = {}
    for node in graph.gs.nodes:
        for out in node.outputs:
            if id(out) in produced_anywhere and out.name:
                problems.append(f"value '{out.name}' is produced by two nodes: "
                                f"'{produced_anywhere[id(out)].name}' and '{node.name}'")
            produced_anywhere[id(out)] = node
    for node in graph.gs.nodes:
        domain = "" if node.domain in (None, "ai.onnx") else node.domain
        if model.opset(domain) is None:
            problems.append(f"{_label(node)} uses op domain '{domain}', which the model does not import")
        for value in node.inputs:
            if not value.name or isinstance(value, gs.Constant) or id(value) in available:
                continue
            if id(value) in produced_anywhere:
                if sorted_check:
                    problems.append(f"{_label(node)} reads '{value.name}' before node "
                                    f"'{produced_anywhere[id(value)].name}' produces it (not topologically sorted)")
            else:
                problems.append(f"{_label(node)} reads '{value.name}', which no node, graph input "
                                f"or initializer provides (missing initializer?)")
        _check_types(node, problems)
        for sg in node_subgraphs(node):
            _verify_graph(Graph(sg, model, graph), model, available | set(produced_anywhere), problems,
                          sorted_check)
        available.update(id(v) for v in node.outputs)
    for out in graph.gs.outputs:
        if not isinstance(out, gs.Constant) and id(out) not in available and id(out) not in produced_anywhere:
            problems.append(f"graph output '{out.name}' is not produced by any node or input")


def _dtype(value: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(value.dtype) if value.dtype is not None else None
    except TypeError:
        return None


def _check_types(node: gs.Node, problems: list[str]) -> None:
    """Quantization-specific consistency: the types ONNX ties together for Q/DQ."""
    if node.op == "QuantizeLinear" and node.domain in ("", None, "ai.onnx"):
        if len(node.inputs) > 2 and node.inputs[2].name:
            zp = _dtype(node.inputs[2])
            out = _dtype(node.outputs[0])
            if zp is not None and out is not None and zp != out:
                problems.append(f"{_label(node)}: zero point is {zp} but output '{node.outputs[0].name}' is {out}")
    if node.op == "DequantizeLinear" and node.domain in ("", None, "ai.onnx"):
        x = _dtype(node.inputs[0])
        if x is not None and x.kind == "f":
            problems.append(f"{_label(node)}: input '{node.inputs[0].name}' is {x}, not an integer type")
        if len(node.inputs) > 2 and node.inputs[2].name:
            zp = _dtype(node.inputs[2])
            if x is not None and zp is not None and x != zp:
                problems.append(f"{_label(node)}: input is {x} but zero point is {zp}")
