"""canonicalize: put a graph in the one shape later passes expect."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from qcompiler import Graph, Model, Node, Pass, PassContext, PassResult, Rewriter
from qcompiler import Constant, Value, const_value, is_constant, producer

__all__ = ["Canonicalize"]

_SCALAR_ATTRS = {
    "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64,
}


def _constant_array(node: Node) -> np.ndarray | None:
    """The tensor a Constant node produces, whichever attribute holds it."""
    for key, value in node.attrs.items():
        if key == "value" and is_constant(value):
            return const_value(value)
        if key in _SCALAR_ATTRS:
            return np.asarray(value, dtype=_SCALAR_ATTRS[key])
    return None


def _is_noop_dropout(node: Node) -> bool:
    if node.op != "Dropout":
        return False
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False  # the mask is used
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = node.inputs[2]
        return is_constant(mode) and not bool(const_value(mode))
    return True  # inference: Dropout is the identity


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Name every node; Constant nodes -> initializers; drop Identity and inference Dropout;
    merge duplicate initializers; remove dead code; sort topologically.

    Why: pattern rules and the quantization plan look for initializers, not Constant nodes,
    and for one value per distinct weight. Requires nothing; edits in place. Graph inputs and
    outputs keep their names.
    """

    name = "canonicalize"
    merge_initializers: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        for graph in list(model.graph.walk()):
            self._name_nodes(graph, rw)
            self._constants_to_initializers(graph, rw)
            self._drop_identities(graph, rw)
            if self.merge_initializers:
                self._merge_duplicates(graph, rw)
        rw.cleanup(model.graph)
        rw.toposort(model.graph)
        return PassResult(rw.modified)

    @staticmethod
    def _name_nodes(graph: Graph, rw: Rewriter) -> None:
        for node in graph.nodes:
            if not node.name:
                rw.rename_node(node, f"{node.op}_{node.outputs[0].name}" if node.outputs else node.op)

    @staticmethod
    def _constants_to_initializers(graph: Graph, rw: Rewriter) -> None:
        for node in graph.nodes:
            if node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
                continue
            out = node.outputs[0]
            if graph.is_graph_output(out):
                continue
            array = _constant_array(node)
            if array is None:
                continue  # sparse or string constants stay as nodes
            rw.erase_node(graph, node)
            rw.make_constant(out, array)

    @staticmethod
    def _drop_identities(graph: Graph, rw: Rewriter) -> None:
        for node in graph.nodes:
            if not (node.op == "Identity" or _is_noop_dropout(node)) or node.domain not in (None, "", "ai.onnx"):
                continue
            src, out = node.inputs[0], node.outputs[0]
            if graph.is_graph_output(out) and (graph.is_graph_output(src) or not _produced_here(graph, src)):
                # the output name must stay, and a value this graph does not produce (a graph
                # input, a constant, or an If/Loop body's outer-scope value) cannot take it
                continue
            rw.erase_node(graph, node)
            rw.replace_all_uses(graph, out, src)

    @staticmethod
    def _merge_duplicates(graph: Graph, rw: Rewriter) -> None:
        seen: dict[tuple[str, tuple[int, ...], str], Constant] = {}
        keys: dict[int, tuple[str, tuple[int, ...], str]] = {}  # a constant read by several nodes is hashed once
        for node in graph.nodes:
            for i, value in enumerate(node.inputs):
                if not is_constant(value):
                    continue
                key = keys.get(id(value))
                if key is None:
                    key = keys[id(value)] = _content_key(const_value(value))
                first = seen.setdefault(key, value)
                if first is not value:
                    rw.set_input(node, i, first)


def _content_key(arr: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    """dtype, shape and sha256 of the bytes, hashed in place where numpy exposes a buffer (no
    copy of a 90 MB weight set); dtypes without one (int4 from ml_dtypes) are copied."""
    flat = np.ascontiguousarray(arr)  # (at least 1-d: the key keeps the original shape)
    try:
        data: object = flat.data
        digest = hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]
    except (ValueError, TypeError):
        digest = hashlib.sha256(flat.tobytes()).hexdigest()
    return arr.dtype.str, arr.shape, digest


def _produced_here(graph: Graph, value: Value) -> bool:
    """Whether a node of ``graph`` itself (not an enclosing graph) produces ``value``."""
    prod = producer(value)
    return prod is not None and any(n is prod for n in graph.nodes)
