"""The Rewriter: the only way passes change a graph.

Funnelling every change through one object makes a pass's ``modified`` flag honest (it is
the rewriter's change count, not the pass's opinion) and lets instrumentation observe every
edit through listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import Graph, Node, Value, node_subgraphs
from .model import Model

__all__ = ["Rewriter", "Listener"]

Listener = Callable[[str, str], None]
"""Called as ``listener(action, description)`` after every change."""


class Rewriter:
    """Applies and counts changes to one model's graphs."""

    def __init__(self, model: Model, listeners: Iterable[Listener] = ()) -> None:
        self.model = model
        self.listeners: list[Listener] = list(listeners)
        self.changes = 0

    @property
    def modified(self) -> bool:
        return self.changes > 0

    def _note(self, action: str, what: str) -> None:
        self.changes += 1
        for listener in self.listeners:
            listener(action, what)

    # -- creating values -----------------------------------------------------------------
    def value(self, hint: str, dtype: Any = None, shape: Sequence[int | str | None] | None = None) -> gs.Variable:
        """A new run-time value with a fresh, deterministic name."""
        return gs.Variable(self.model.fresh_name(hint), dtype=dtype, shape=shape)

    def constant(self, hint: str, array: np.ndarray) -> gs.Constant:
        """A new initializer holding ``array`` (kept as given: dtype decides the stored type).

        4-bit arrays (ml_dtypes int4/uint4, one number a byte) are stored packed as ONNX
        INT4/UINT4, two numbers a byte: graphsurgeon's exporter would write them unpacked."""
        name = self.model.fresh_name(hint)
        array = np.asarray(array)
        if array.dtype.name in ("int4", "uint4"):
            return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(array), name)))
        return gs.Constant(name, np.array(array, order="C", copy=None))

    # -- nodes ---------------------------------------------------------------------------
    def create_node(self, graph: Graph, op: str, inputs: Sequence[Value], outputs: Sequence[Value],
                    attrs: dict[str, Any] | None = None, *, name: str | None = None,
                    domain: str = "", before: Node | None = None, reuse_name: bool = False) -> Node:
        """Insert a node (before ``before`` if given, else at the end; order is restored
        by the pass manager's stable topological sort). ``reuse_name`` keeps ``name`` as
        given: for a node that replaces an erased one, so reports can name it as the user knows it."""
        node = gs.Node(op=op, name=name if (reuse_name and name) else self.model.fresh_name(name or op), attrs=dict(attrs or {}),
                       inputs=list(inputs), outputs=list(outputs), domain=domain or None)
        if domain:
            self.model.require_opset(domain, 1)
        nodes = graph.gs.nodes
        if before is not None:
            idx = _index(nodes, before)
            nodes.insert(idx, node)
        else:
            nodes.append(node)
        self._note("insert", f"{node.op} '{node.name}'")
        return node

    def erase_node(self, graph: Graph, node: Node) -> None:
        """Remove a node and disconnect it from its values."""
        nodes = graph.gs.nodes
        del nodes[_index(nodes, node)]
        node.inputs.clear()
        node.outputs.clear()
        self._note("erase", f"{node.op} '{node.name}'")

    def replace_node(self, graph: Graph, old: Node, op: str, inputs: Sequence[Value],
                     attrs: dict[str, Any] | None = None, *, domain: str = "", suffix: str | None = None,
                     name: str | None = None, before: Node | None = None, erase: Sequence[Node] = ()) -> Node:
        """Replace ``old`` by a new ``op`` node reading ``inputs``, in one step.

        Every output of ``old`` gets a fresh successor value named ``<output>_<suffix>``
        (``suffix`` defaults to the op in lower case) with its type; the new node is named
        ``<name or old.name>_<suffix>`` and placed before ``before`` (default: ``old``); then
        ``old`` and ``erase`` (the rest of a fused chain, read only inside it) are erased, and
        every reader of an old output reads its successor (a graph output keeps its public
        name). Returns the new node."""
        suffix = suffix or op.lower()
        outs = list(old.outputs)
        new_outs = [self.value(f"{out.name}_{suffix}", dtype=out.dtype, shape=out.shape) for out in outs]
        node = self.create_node(graph, op, inputs, new_outs, attrs, name=f"{name or old.name}_{suffix}",
                                domain=domain, before=before if before is not None else old)
        for gone in (old, *(n for n in erase if n is not old)):
            self.erase_node(graph, gone)
        for out, new in zip(outs, new_outs):
            self.replace_all_uses(graph, out, new)
        return node

    def set_input(self, node: Node, index: int, value: Value) -> None:
        if index < len(node.inputs) and node.inputs[index] is value:
            return
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = value
        self._note("set-input", f"'{node.name}' input {index} <- '{value.name}'")

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        node.attrs[key] = value
        self._note("set-attr", f"'{node.name}'.{key}")

    def replace_all_uses(self, graph: Graph, old: Value, new: Value, *,
                         except_nodes: Sequence[Node] = ()) -> None:
        """Make every reader of ``old`` (nodes, subgraph nodes, graph outputs) read ``new``.

        A graph output keeps its public name: ``new`` takes the name and ``old`` is renamed,
        unless ``old`` is also a graph input: both names are public then, so that output keeps
        reading ``old`` (an input passed straight through stays exactly that).
        """
        skip = {id(n) for n in except_nodes}
        if any(v is old for v in graph.gs.inputs):
            outs_kept = [i for i, out in enumerate(graph.gs.outputs) if out is old]
        else:
            outs_kept = []
        for consumer in list(old.outputs):
            if id(consumer) in skip:
                continue
            for i, inp in enumerate(consumer.inputs):
                if inp is old:
                    consumer.inputs[i] = new
        outs = graph.gs.outputs
        for i, out in enumerate(outs):
            if out is old and i not in outs_kept:
                public = old.name
                old.name = self.model.fresh_name(public + "_pre")
                new.name = public
                if isinstance(new, gs.Variable):
                    new.dtype = new.dtype if new.dtype is not None else old.dtype
                    new.shape = old.shape if old.shape is not None else new.shape
                outs[i] = new
        self._note("replace-uses", f"'{old.name}' -> '{new.name}'")

    def make_constant(self, value: Value, array: np.ndarray) -> None:
        """Turn a run-time value into an initializer in place (keeps its name and readers).
        Its producer must already be erased."""
        assert not value.inputs, f"'{value.name}' still has a producer"
        value.to_constant(np.array(array, order="C", copy=None))
        self._note("make-constant", f"'{value.name}'")

    def set_value_type(self, value: Value, dtype: Any, shape: Sequence[int | str | None] | None) -> None:
        if isinstance(value, gs.Variable) and (value.dtype != dtype or value.shape != shape):
            value.dtype = dtype
            value.shape = shape
            self._note("set-type", f"'{value.name}'")

    def rename_node(self, node: Node, name: str) -> None:
        node.name = self.model.fresh_name(name)
        self._note("rename", node.name)

    def rename_value(self, value: Value, name: str) -> str:
        """Give a value a new (fresh) name; every reader follows, since nodes hold the value
        itself. Returns the name given. Graph inputs and outputs must keep theirs: callers check."""
        new = self.model.fresh_name(name)
        old, value.name = value.name, new
        self._note("rename-value", f"'{old}' -> '{new}'")
        return new

    def replace_model(self, proto: Any) -> None:
        """Replace the whole model by a converted proto (e.g. after opset conversion)."""
        self.model._replace_contents(proto)
        self._note("replace-model", self.model.source)

    def toposort(self, graph: Graph) -> None:
        if graph.toposort():
            self._note("reorder", graph.name)

    def cleanup(self, graph: Graph) -> None:
        """Drop nodes and initializers nothing reads (graph inputs and outputs stay)."""
        before = _count(graph.gs)
        graph.gs.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True,
                         remove_unused_graph_inputs=False)
        after = _count(graph.gs)
        if after != before:
            self._note("cleanup", f"{graph.name}: {before[0] - after[0]} nodes removed")


def _count(g: gs.Graph) -> tuple[int, int]:
    nodes = len(g.nodes)
    tensors = len(g.tensors(check_duplicates=False))
    for node in g.nodes:
        for sg in node_subgraphs(node):
            n, t = _count(sg)
            nodes += n
            tensors += t
    return nodes, tensors


def _index(nodes: list[Node], node: Node) -> int:
    for i, n in enumerate(nodes):
        if n is node:
            return i
    raise ValueError(f"node '{node.name}' is not in this graph")
