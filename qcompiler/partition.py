"""Integer regions of a planned model: connected components of its integer nodes and the
values where data crosses between them and the float (host) part. Why a module of its own:
insert-qdq, the analysis and ``qcompiler inspect`` read it, and it needs only the graph."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from .ir import Model, Value

__all__ = ["partitions"]


def partitions(model: Model, integer_nodes: Sequence[str]) -> list[dict[str, object]]:
    """Integer regions: connected components of the integer nodes (data edges between two
    integer nodes join them), each with its nodes in graph order and the values where data
    crosses between it and the float (host) part: ``inputs`` (read from a float node or a graph
    input) and ``outputs`` (read by a float node, or a graph output). Constants and non-float
    values (shape tensors computed on the host for a Reshape) are not listed: they carry no
    activation data.
    Only the main graph is partitioned; integer nodes inside subgraphs are left out."""
    wanted = set(integer_nodes)
    graph = model.graph
    order = {n.name: i for i, n in enumerate(graph.gs.nodes)}
    g = nx.DiGraph()
    for node in graph.gs.nodes:
        if node.name in wanted:
            g.add_node(node.name)
    for node in graph.gs.nodes:
        if node.name not in wanted:
            continue
        for value in node.inputs:
            for prod in value.inputs:
                if prod.name in wanted:
                    g.add_edge(prod.name, node.name)
    comps = sorted((sorted(c, key=order.__getitem__) for c in nx.weakly_connected_components(g)),
                   key=lambda c: order[c[0]])
    by_name = {n.name: n for n in graph.gs.nodes}
    out: list[dict[str, object]] = []
    for i, comp in enumerate(comps):
        members = set(comp)
        ins: list[str] = []
        outs: list[str] = []
        for name in comp:
            node = by_name[name]
            for v in node.inputs:
                if not v.name or isinstance(v, gs.Constant) or v.name in ins or not _floating(v):
                    continue
                if not v.inputs or v.inputs[0].name not in members:
                    ins.append(v.name)
            for v in node.outputs:
                if v.name in outs or not _floating(v):
                    continue
                if graph.is_graph_output(v) or any(c.name not in members for c in v.outputs):
                    outs.append(v.name)
        out.append({"id": i, "nodes": comp, "inputs": ins, "outputs": outs})
    return out


def _floating(value: Value) -> bool:
    """Float data, or of unknown type (assumed to be data)."""
    if value.dtype is None:
        return True
    try:
        return np.dtype(value.dtype).kind == "f"
    except TypeError:
        return True
