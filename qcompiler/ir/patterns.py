"""Declarative rewrite patterns and the driver that applies them to a fixed point.

A rule is data (what to match) next to a small function (what to build), in the spirit of a
rule table: ``Rule("conv-bn", Op("BatchNormalization", inputs=(Op("Conv", single_use=True), ...)), fold)``.
Patterns are values built once, at import. What a pattern can say, so that a rewrite function
is left with only the arithmetic:

- a name bound twice must be the same value (``x * clip(x + 3)``: both ``AnyValue("x")``);
- ``Op(..., commutative=True)``: a two-input op matches with its inputs in either order;
- ``Const(value=0.5, tol=1e-6)``: an initializer holding that one number;
- ``Either(p, q)``: the first alternative that matches;
- ``Rule(where=...)``: a condition returning why it fails (a string) or None; failures are
  logged at debug level on the ``qcompiler`` logger (``qcompiler -v`` shows them).

Matching backtracks (a failed alternative or operand order leaves no bindings behind) and
keeps no state between matches; the driver, not the rule, decides iteration order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .graph import Graph, Node, Value, const_value, producer
from .model import Model
from .rewriter import Rewriter

__all__ = ["Op", "Const", "AnyValue", "Either", "Match", "Rule", "apply_rules", "match"]

_LOG = logging.getLogger("qcompiler")


@dataclass(frozen=True)
class Const:
    """An initializer input. ``value``: it holds one number within ``tol`` of it (relative to
    ``max(1, |value|)``); ``check``: any other condition on the array."""

    bind: str | None = None
    check: Callable[[np.ndarray], bool] | None = None
    value: float | None = None
    tol: float = 1e-6

    def accepts(self, array: np.ndarray) -> bool:
        if self.value is not None and (array.size != 1 or not abs(float(array.reshape(-1)[0]) - self.value)
                                       <= self.tol * max(1.0, abs(self.value))):
            return False
        return self.check is None or bool(self.check(array))


@dataclass(frozen=True)
class AnyValue:
    """Any value (run-time or constant); ``bind`` names it in the match."""

    bind: str | None = None


@dataclass(frozen=True)
class Op:
    """A node: op type(s), domain, opset range of that domain, attribute constraints,
    input patterns (positional; fewer than the node has means "don't care"; ``None`` is any
    value), whether a two-input op is ``commutative`` (inputs match in either order), and
    whether its first output may have only one reader (so fusing it away loses nothing)."""

    type: str | tuple[str, ...]
    inputs: tuple[Pattern, ...] = ()
    domain: str = ""
    opset: tuple[int, int] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    bind: str | None = None
    single_use: bool = False
    commutative: bool = False

    def types(self) -> tuple[str, ...]:
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)


@dataclass(frozen=True)
class Either:
    """The first of ``alternatives`` that matches the value (e.g. ``x / sqrt(2)`` or ``x * (1/sqrt(2))``)."""

    alternatives: tuple[Pattern, ...]

    def __init__(self, *alternatives: Pattern) -> None:
        object.__setattr__(self, "alternatives", tuple(alternatives))


Pattern = Union[Op, Const, AnyValue, Either, None]


@dataclass
class Match:
    """What a pattern bound: the root node, plus named nodes and values."""

    root: Node
    graph: Graph
    nodes: dict[str, Node] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)

    def const(self, name: str) -> np.ndarray:
        array = const_value(self.values[name])
        assert array is not None, f"'{name}' is not bound to an initializer"
        return array


Rewrite = Callable[[Match, Rewriter], bool]


@dataclass(frozen=True)
class Rule:
    """A named rewrite: ``pattern`` to find, ``rewrite`` to apply (returns whether it changed
    anything), optional ``where`` for conditions patterns can't express: it returns None to
    accept the match or a short reason why not (logged under ``-v``)."""

    name: str
    pattern: Op
    rewrite: Rewrite
    where: Callable[[Match], str | None] | None = None


def _attr_ok(node: Node, key: str, want: Any) -> bool:
    have = node.attrs.get(key)
    if callable(want):
        return bool(want(have))
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return list(want) == list(have)
    return have == want


def _bind(table: dict[str, Any], name: str | None, item: Any) -> bool:
    """Bind ``name`` to ``item``; a name already bound must be bound to this very item."""
    if name is None:
        return True
    if name in table:
        return table[name] is item
    table[name] = item
    return True


def _match_value(pat: Pattern, value: Value, graph: Graph, m: Match) -> bool:
    """Match one input; on failure ``m`` may hold partial bindings (callers restore)."""
    if pat is None:
        return True
    if isinstance(pat, AnyValue):
        return _bind(m.values, pat.bind, value)
    if isinstance(pat, Const):
        array = const_value(value)
        return array is not None and pat.accepts(array) and _bind(m.values, pat.bind, value)
    if isinstance(pat, Either):
        return any(_attempt(lambda alt=alt: _match_value(alt, value, graph, m), m) for alt in pat.alternatives)
    node = producer(value)
    return node is not None and _match_node(pat, node, graph, m)


def _attempt(step: Callable[[], bool], m: Match) -> bool:
    """Run ``step``; if it fails, undo the bindings it made (so the next alternative starts clean)."""
    nodes, values = dict(m.nodes), dict(m.values)
    if step():
        return True
    m.nodes, m.values = nodes, values
    return False


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
    orders = [list(node.inputs)]
    if pat.commutative and len(node.inputs) == 2:
        orders.append(orders[0][::-1])
    for values in orders:
        if _attempt(lambda values=values: all(_match_value(p, v, graph, m) for p, v in zip(pat.inputs, values))
                    and _bind(m.nodes, pat.bind, node), m):
            return True
    return False


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
                    if m is None:
                        continue
                    reason = rule.where(m) if rule.where is not None else None
                    if reason:
                        _LOG.debug("%s: '%s' matches but is left alone: %s", rule.name, node.name, reason)
                        continue
                    if rule.rewrite(m, rewriter):
                        applied += 1
                        changed = True
                        break
        if not changed:
            break
        rewriter.toposort(model.graph)
    return applied
