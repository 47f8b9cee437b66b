"""A typed facade over onnx-graphsurgeon's mutable graph.

onnx-graphsurgeon (gs) holds the nodes and tensors; this module adds what passes need to
*ask* about a graph without growing gs's own classes. Questions about one value are plain
functions (:func:`producer`, :func:`users`, :func:`is_constant`, :func:`const_value`): a value
knows its producer and readers itself, so no graph object is needed to ask, and there is one
way to ask each. Questions about a whole graph (subgraphs, ordering) are :class:`Graph`
methods. Changing the graph goes through :class:`qcompiler.ir.Rewriter`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from .model import Model

__all__ = ["Graph", "Node", "Value", "Constant", "Variable", "node_subgraphs", "producer", "users", "is_constant",
           "const_value"]

Node = gs.Node
Value = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable


def producer(value: Value) -> Node | None:
    """The node that writes ``value``; None for graph inputs, initializers and omitted inputs."""
    return value.inputs[0] if value.inputs else None


def users(value: Value) -> list[Node]:
    """The nodes that read ``value`` (in this graph and in subgraphs that capture it); a graph
    output is not a node: ask :meth:`Graph.is_graph_output` too before dropping a value."""
    return list(value.outputs)


def is_constant(value: Value) -> bool:
    """True for an initializer (a compile-time array), False for a run-time value."""
    return isinstance(value, gs.Constant)


def const_value(value: Value) -> np.ndarray | None:
    """The array of an initializer, or None for a run-time value. Loads lazily; 4-bit payloads
    come back unpacked (one ml_dtypes element per number)."""
    if isinstance(value, gs.Constant):
        return np.asarray(value.values)
    return None


def node_subgraphs(node: Node) -> list[gs.Graph]:
    """The body graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


class Graph:
    """One graph (the main graph or a subgraph) of a :class:`Model`.

    Read-only queries live here. The facade is cheap to create; it holds no caches, so it
    never goes stale while a rewriter changes the graph underneath.
    """

    def __init__(self, gs_graph: gs.Graph, model: "Model", parent: "Graph | None" = None) -> None:
        self.gs = gs_graph
        self.model = model
        self.parent = parent

    # -- structure -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.gs.name)

    @property
    def nodes(self) -> list[Node]:
        """A snapshot of the nodes in order (safe to iterate while rewriting)."""
        return list(self.gs.nodes)

    @property
    def inputs(self) -> list[Value]:
        return list(self.gs.inputs)

    @property
    def outputs(self) -> list[Value]:
        return list(self.gs.outputs)

    @property
    def is_subgraph(self) -> bool:
        return self.parent is not None

    def subgraphs(self) -> list["Graph"]:
        """Direct subgraphs (bodies of If/Loop/Scan nodes of this graph)."""
        return [Graph(sg, self.model, self) for node in self.gs.nodes for sg in node_subgraphs(node)]

    def walk(self) -> Iterator["Graph"]:
        """This graph and every nested subgraph, depth first, in node order."""
        yield self
        for sub in self.subgraphs():
            yield from sub.walk()

    def values(self) -> dict[str, Value]:
        """Every tensor of this graph (not of its subgraphs) by name."""
        return {k: v for k, v in self.gs.tensors(check_duplicates=False).items()}

    def find_node(self, name: str) -> Node | None:
        for node in self.gs.nodes:
            if node.name == name:
                return node
        return None

    # -- value queries (per value: see producer, users, is_constant, const_value) -----------
    def is_graph_output(self, value: Value) -> bool:
        return any(out is value for out in self.gs.outputs)

    def is_graph_input(self, value: Value) -> bool:
        return any(inp is value for inp in self.gs.inputs)

    def opset(self, domain: str = "") -> int | None:
        return self.model.opset(domain)

    # -- ordering ------------------------------------------------------------------------
    def _edges(self) -> list[list[int]]:
        """Successor lists by node index (a self-loop appears as ``i`` in ``succ[i]``)."""
        index = {id(n): i for i, n in enumerate(self.gs.nodes)}
        succ: list[list[int]] = [[] for _ in self.gs.nodes]
        for i, node in enumerate(self.gs.nodes):
            for value in _all_reads(node):
                for prod in value.inputs:
                    j = index.get(id(prod))
                    if j is not None:
                        succ[j].append(i)
        return succ

    def dependency_graph(self) -> nx.DiGraph:
        """Node-index dependency graph, including values a subgraph reads from this scope."""
        dg = nx.DiGraph()
        dg.add_nodes_from(range(len(self.gs.nodes)))
        dg.add_edges_from((j, i) for j, out in enumerate(self._edges()) for i in out)
        return dg

    def find_cycle(self) -> list[str] | None:
        """Names of nodes on a cycle, or None when the graph is acyclic.

        Linear in nodes + edges (Kahn's algorithm): the verifier runs this between passes,
        so a 20k-node chain must not cost more than a few walks over it.
        """
        succ = self._edges()
        indeg = [0] * len(succ)
        for out in succ:
            for i in out:
                indeg[i] += 1
        ready = [i for i, d in enumerate(indeg) if d == 0]
        seen = 0
        while ready:
            j = ready.pop()
            seen += 1
            for i in succ[j]:
                indeg[i] -= 1
                if indeg[i] == 0:
                    ready.append(i)
        if seen == len(succ):
            return None
        # every node left has a predecessor left: walk predecessors until one repeats
        pred: dict[int, int] = {}
        for j, out in enumerate(succ):
            for i in out:
                if indeg[i] > 0 and indeg[j] > 0:
                    pred.setdefault(i, j)
        start = next(i for i, d in enumerate(indeg) if d > 0)
        order: dict[int, int] = {}
        while start not in order:
            order[start] = len(order)
            start = pred[start]
        loop = [k for k, pos in sorted(order.items(), key=lambda kv: kv[1]) if pos >= order[start]]
        loop.reverse()  # predecessor walk -> data-flow order, starting at the earliest node
        first = loop.index(min(loop))
        nodes = self.gs.nodes
        return [nodes[u].name or nodes[u].op for u in loop[first:] + loop[:first]]

    def toposort(self) -> bool:
        """Stable topological sort (keeps the current order where it is already valid).

        Returns True if the order changed. Raises ValueError on a cycle.
        """
        dg = self.dependency_graph()
        try:
            order = list(nx.lexicographical_topological_sort(dg))
        except nx.NetworkXUnfeasible as exc:
            raise ValueError(f"graph '{self.name}' has a cycle through nodes {self.find_cycle()}") from exc
        changed = order != list(range(len(order)))
        if changed:
            old = list(self.gs.nodes)
            self.gs.nodes = [old[i] for i in order]
        for sub in self.subgraphs():
            changed |= sub.toposort()
        return changed

    # -- printing ------------------------------------------------------------------------
    def to_text(self, elide_above: int | None = None) -> str:
        """This graph as ONNX text syntax (for debugging and golden tests). With ``elide_above``,
        constants with more elements print as ``["elided": "N elements", "sha256": DIGEST]``
        after their type and shape (``--print-ir-after``: effnet's weights were 56 MB of text)."""
        if self.parent is None:
            graph = self.model.to_proto().graph
        else:
            sub = gs.Graph(nodes=list(self.gs.nodes), inputs=list(self.gs.inputs),
                           outputs=list(self.gs.outputs), name=self.gs.name, opset=self.gs.opset)
            graph = gs.export_onnx(sub, do_type_check=False).graph
        if elide_above is not None:
            _elide_constants(graph, elide_above)
        return onnx.printer.to_text(graph)


def _elide_constants(graph: onnx.GraphProto, limit: int) -> None:
    """Replace each tensor (initializers and tensor attributes, subgraphs included) of more than
    ``limit`` elements by a payload-less stub the printer shows as its type, shape and digest."""
    from onnx import external_data_helper, numpy_helper

    model = onnx.ModelProto(graph=graph)  # (a view for the tensor walk; the graph is ours)
    for t in external_data_helper._get_all_tensors(model):
        if int(np.prod(t.dims)) <= limit or t.data_type == onnx.TensorProto.STRING:
            continue
        try:
            payload = numpy_helper.to_array(t).tobytes()  # the values, however stored
        except Exception:  # noqa: BLE001 - an unusual encoding: the printer shows it whole
            continue
        digest = hashlib.sha256(payload).hexdigest()[:12]
        stub = onnx.TensorProto(name=t.name, dims=list(t.dims), data_type=t.data_type,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="elided", value=f"{int(np.prod(t.dims))} elements")
        stub.external_data.add(key="sha256", value=digest)
        t.CopyFrom(stub)
    graph.CopyFrom(model.graph)


def _all_reads(node: Node) -> list[Value]:
    """Values a node reads: its inputs plus outer-scope values its subgraphs use."""
    reads = [v for v in node.inputs if v.name]
    for sg in node_subgraphs(node):
        reads.extend(_outer_reads(sg))
    return reads


def _outer_reads(sg: gs.Graph) -> list[Value]:
    local: set[int] = {id(v) for v in sg.inputs}
    for node in sg.nodes:
        local.update(id(v) for v in node.outputs)
    found: list[Value] = []
    for node in sg.nodes:
        for value in _all_reads(node):
            if id(value) not in local and not isinstance(value, gs.Constant):
                found.append(value)
            elif isinstance(value, gs.Constant) and value.inputs:
                found.append(value)
    return found
