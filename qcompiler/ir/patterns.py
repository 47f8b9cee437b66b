"""Declarative rewrite patterns and the driver that applies them to a fixed point.

A rule is data (what to match) next to a small function (what to build), in the spirit of a
rule table: ``Rule("conv-bn", Op("BatchNormalization", inputs=(Op("Conv", single_use=True), ...)), fold)``.
Matching keeps no state between matches; the driver, not the rule, decides iteration order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Graph, Node, Value
from .model import Model
from .rewriter import Rewriter

__all__ = ["Op", "Const", "AnyValue", "Match", "Rule", "apply_rules", "match"]


@dataclass(frozen=True)
class Const:
    """An initializer input, optionally satisfying ``check(array)``."""

    bind: str | None = None
    check: Callable[[np.ndarray], bool] | None = None


@dataclass(frozen=True)
class AnyValue:
    """Any value (run-time or constant); ``bind`` names it in the match."""

    bind: str | None = None


InputPattern = "Op | Const | AnyValue | None"


@dataclass(frozen=True)
class Op:
    """A node: op type(s), domain, opset range of that domain, attribute constraints,
    input patterns (positional; fewer than the node has means "don't care"), and whether its
    first output may have only one reader (so fusing it away loses nothing)."""

    type: str | tuple[str, ...]
    inputs: tuple[Any, ...] = ()
    domain: str = ""
    opset: tuple[int, int] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    bind: str | None = None
    single_use: bool = False

    def types(self) -> tuple[str, ...]:
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)


@dataclass
class Match:
    """What a pattern bound: the root node, plus named nodes and values."""

    root: Node
    graph: Graph
    nodes: dict[str, Node] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)

    def const(self, name: str) -> np.ndarray:
        value = self.values[name]
        assert isinstance(value, gs.Constant)
        return np.asarray(value.values)


Rewrite = Callable[[Match, Rewriter], bool]


@dataclass(frozen=True)
class Rule:
    """A named rewrite: ``pattern`` to find, ``rewrite`` to apply (returns whether it changed
    anything), optional ``where`` for conditions patterns can't express."""

    name: str
    pattern: Op
    rewrite: Rewrite
    where: Callable[[Match], bool] | None = None


def _attr_ok(node: Node, key: str, want: Any) -> bool:
    have = node.attrs.get(key)
    if callable(want):
        return bool(want(have))
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return list(want) == list(have)
    return have == want


def _match_node(pat: Op, node: Node, graph: Graph, m: Match) -> bool:
    if node.op not in pat.types():
        return False
    domain = "" if node.domain in (None, "ai.onnx") else node.domain
    if domain != pat.domain:
        return False
    if pat.opset is not None:
        version = graph.model.opset(domain) or 0
        if not pat.opset[0] <= version <= pat.opset[1]:
            return False
    if any(not _attr_ok(node, k, v) for k, v in pat.attrs.items()):
        return False
    if pat.single_use:
        out = node.outputs[0]
        if len(out.outputs) != 1 or graph.is_graph_output(out):
            return False
    if len(pat.inputs) > len(node.inputs):
        return False
    for sub, value in zip(pat.inputs, node.inputs):
        if sub is None:
            continue
        if isinstance(sub, AnyValue):
            if sub.bind:
                m.values[sub.bind] = value
        elif isinstance(sub, Const):
            if not isinstance(value, gs.Constant):
                return False
            if sub.check is not None and not sub.check(np.asarray(value.values)):
                return False
            if sub.bind:
                m.values[sub.bind] = value
        elif isinstance(sub, Op):
            producer = value.inputs[0] if value.inputs else None
            if producer is None or not _match_node(sub, producer, graph, m):
                return False
    if pat.bind:
        m.nodes[pat.bind] = node
    return True


def match(pattern: Op, node: Node, graph: Graph) -> Match | None:
    """Match ``pattern`` rooted at ``node``; None if it does not match."""
    m = Match(root=node, graph=graph)
    return m if _match_node(pattern, node, graph, m) else None


def apply_rules(model: Model, rules: Sequence[Rule], rewriter: Rewriter, *,
                max_sweeps: int = 50, graphs: Iterable[Graph] | None = None) -> int:
    """Apply ``rules`` over every graph (subgraphs included) until nothing matches.

    Returns the number of rewrites applied. Deterministic: nodes are visited in graph order
    and rules in the order given.
    """
    by_type: dict[str, list[Rule]] = {}
    for rule in rules:
        for t in rule.pattern.types():
            by_type.setdefault(t, []).append(rule)
    applied = 0
    for _ in range(max_sweeps):
        changed = False
        for graph in list(graphs) if graphs is not None else list(model.graph.walk()):
            for node in graph.nodes:
                if not node.outputs:  # erased earlier in this sweep
                    continue
                for rule in by_type.get(node.op, ()):
                    m = match(rule.pattern, node, graph)
                    if m is None or (rule.where is not None and not rule.where(m)):
                        continue
                    if rule.rewrite(m, rewriter):
                        applied += 1
                        changed = True
                        break
        if not changed:
            break
        rewriter.toposort(model.graph)
    return applied
