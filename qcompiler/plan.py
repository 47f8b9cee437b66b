"""The plan: the one decider of how each node runs under a target, and with what roles for
its inputs. Per node an :class:`Outcome`: a Q/DQ group, an integer kernel, a dynamic kernel,
or float with the reason. calibrate (what to observe), insert-qdq (what to quantize),
quantize-dynamic, lower-qoperator (which records where it deviates), ``qcompiler inspect``
and ``qcompiler check`` read it; the target decides, this module only reads the target.

:meth:`Plan.override` (or ``compile(plan_overrides=...)``, which every reader honours) sets a
node's outcome from outside: the hook for a per-node accuracy fallback. Three outcomes can be set:
``float``; ``dynamic`` in a static compile (the node's activation is quantized at run time by
the target's dynamic kernel, ``dynamic.ops.<Op>``, which quantize-dynamic builds; no calibrated
range is needed for it); ``int16-activations`` (the node stays integer with its activation rule
on the target's 16-bit grid, :mod:`qcompiler.wide`; a value whose integer readers are on two grids
gets a pair per grid, :func:`quantization_walk`). :func:`fallback_outcomes` says which of a
target's fallbacks a node can take.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .ir import Graph, Model, Node, Value
from .kernels import kernel_spec
from .partition import partitions
from .quant import QType
from .target import OpConfig, Target, TensorRule
from .wide import WIDE, wide_blocker, wide_config

__all__ = ["NodePlan", "Plan", "Outcome", "OUTCOMES", "plan_quantization", "plan_for", "plan_dynamic", "value_qtypes", "QuantStep", "quantization_walk", "ranges_read", "weight_axis",
           "reduction_axis", "is_float", "producer_op", "partitions", "OVERRIDES", "dynamic_blocker",
           "fallback_outcomes"]


@dataclass
class NodePlan:
    node: Node
    graph: Graph
    config: OpConfig
    roles: list[str]          # per input: activation | weight | bias | float
    tail: Node | None = None  # fused activation whose output is the group's output

    @property
    def output(self) -> Value:
        return (self.tail or self.node).outputs[0]


#: how a node runs: a DQ -> op -> Q group, an integer kernel the target names, a kernel that
#: quantizes its activations at run time, float, or a Q/DQ group on the 16-bit activation grid
OUTCOMES = ("qdq", "kernel", "dynamic", "float", WIDE)
#: the outcomes an override may set (the others are the plan's own decisions)
OVERRIDES = ("float", "dynamic", WIDE)


@dataclass(frozen=True)
class Outcome:
    """How one node runs (``kind`` one of :data:`OUTCOMES`), the kernel if any, and why (for
    float, and for any outcome set by an override)."""

    kind: str
    reason: str = ""
    kernel: str | None = None


@dataclass
class Plan:
    """Per node: ``nodes`` (static integer: a Q/DQ group or kernel), ``fused`` (activation tail
    -> its head), ``dynamic`` (node -> dynamic kernel), ``float_nodes`` (node -> why float);
    ``overrides`` the outcomes set from outside. Read it through :meth:`outcome`."""

    nodes: dict[str, NodePlan] = field(default_factory=dict)
    float_nodes: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)  # tail name -> head name
    dynamic: dict[str, str] = field(default_factory=dict)  # node name -> dynamic kernel
    overrides: dict[str, Outcome] = field(default_factory=dict)

    def outcome(self, name: str) -> Outcome | None:
        """How node ``name`` runs; None for nodes the plan does not decide (Q/DQ, data
        movement, which follows its input)."""
        if name in self.dynamic:
            ov = self.overrides.get(name)
            return Outcome("dynamic", ov.reason if ov is not None else "", self.dynamic[name])
        if name in self.float_nodes:  # (before the integer tables: a deviation wins)
            return Outcome("float", self.float_nodes[name])
        head = self.fused.get(name)
        np_ = self.nodes.get(name if head is None else head)
        if np_ is not None:
            reason = "" if head is None else f"fused into '{head}'"
            ov = self.overrides.get(np_.node.name)
            if ov is not None and ov.kind == WIDE:
                return Outcome(WIDE, reason or ov.reason)
            return Outcome("kernel", reason, np_.config.kernel) if np_.config.kernel else Outcome("qdq", reason)
        return None

    def override(self, node: str, outcome: str, reason: str, kernel: str | None = None,
                 target: Target | None = None) -> None:
        """Run ``node`` as ``outcome`` (one of :data:`OVERRIDES`): ``float``, ``dynamic`` as
        ``kernel`` (the target's ``dynamic.ops`` kernel; :func:`plan_quantization` checks the
        node can take it), or ``int16-activations`` (an integer node of this plan; ``target``
        gives the 16-bit grid; a fused group moves whole). Readers that plan again get it
        through ``compile(plan_overrides=...)``."""
        if outcome == WIDE:
            np_ = self.nodes.get(node)
            if np_ is None or target is None:
                raise UserError(f"plan override for node '{node}': outcome '{WIDE}' needs an integer node of the "
                                "plan and its target")
            self.overrides[node] = _override(node, outcome, reason)
            np_.config = wide_config(np_.config, target)
            return
        self.overrides[node] = _override(node, outcome, reason)
        self.nodes.pop(node, None)
        self.dynamic.pop(node, None)
        self.float_nodes.pop(node, None)
        for tail, head in list(self.fused.items()):
            if node in (tail, head):
                del self.fused[tail]
                self.float_nodes[tail] = reason if tail == node else f"fused activation of overridden node '{head}'"
        if outcome == "dynamic":
            self.dynamic[node] = kernel or ""
        else:
            self.float_nodes[node] = reason

    def deviate(self, node: str, reason: str) -> None:
        """A later pass could not run ``node`` as planned (lowering found no kernel that fits):
        it runs in float, for ``reason``. The node's roles stay as planned (its inputs were
        quantized), only its outcome changes."""
        self.float_nodes[node] = reason


def is_float(value: Value, ranges: Mapping[str, object] | None = None) -> bool:
    if isinstance(value, gs.Constant):
        return np.asarray(value.values).dtype.kind == "f"
    if value.dtype is None:
        return ranges is not None and value.name in ranges
    try:
        return np.dtype(value.dtype) == np.float32
    except TypeError:
        return False


def producer_op(value: Value) -> str | None:
    return value.inputs[0].op if value.inputs else None


def weight_axis(node: Node, weight: np.ndarray) -> int | None:
    """The output-channel axis of an op's weight (a fact of the op, not of the target)."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    return None


def reduction_axis(node: Node, weight: np.ndarray) -> int | None:
    """The weight axis the op sums over (input channels): where `blocked` weights put their
    blocks, so each output channel's dot product is split into runs with their own scale."""
    if node.op == "Conv":
        return 1 if weight.ndim >= 2 else None
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        return 1 if int(node.attrs.get("transB", 0)) else 0
    if node.op == "MatMul":
        return weight.ndim - 2 if weight.ndim >= 2 else None
    return None


def _group_tail(node: Node, graph: Graph, target: Target, groups: Mapping[str, str]) -> Node | None:
    tail_name = groups.get(node.name)
    if not tail_name:
        return None
    out = node.outputs[0]
    if len(out.outputs) != 1 or graph.is_graph_output(out):
        return None
    tail = out.outputs[0]
    return tail if tail.name == tail_name and target.fused_with(node.op, tail.op) else None


def _override(node: str, kind: str, reason: str) -> Outcome:
    """An override's outcome (module docstring: which ones the passes build)."""
    if kind not in OVERRIDES:
        raise UserError(f"plan override for node '{node}': outcome '{kind}' is not supported "
                        f"({', '.join(OVERRIDES)})")
    return Outcome(kind, reason)


def _overrides(overrides: Mapping[str, tuple[str, str]] | None) -> dict[str, Outcome]:
    return {node: _override(node, kind, reason) for node, (kind, reason) in (overrides or {}).items()}


def plan_for(model: Model, ctx: Any, *, ranges: Mapping[str, object] | None = None,
             exclude: Sequence[str] = ()) -> Plan:
    """The static plan a pass works with: ``ctx``'s target, the fused groups of
    ``group-activations`` and the compile's plan overrides."""
    return plan_quantization(model, ctx.target, ranges=ranges, groups=ctx.analysis.get("groups", {}),
                             exclude=exclude, overrides=ctx.analysis.get("plan_overrides"), fmt=ctx.format)


def plan_quantization(model: Model, target: Target, *, ranges: Mapping[str, object] | None = None,
                      groups: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                      overrides: Mapping[str, tuple[str, str]] | None = None, fmt: str | None = None) -> Plan:
    """Decide, node by node, what runs in integer under ``target`` (static mode).

    ``ranges`` (tensor name -> calibrated range) makes missing calibration a reason to stay
    float; ``groups`` (head node -> fused activation node) comes from ``group-activations``;
    ``overrides`` (node -> (outcome, reason)) sets outcomes from outside (:data:`OVERRIDES`);
    ``fmt`` the output format (default: the target's).
    """
    plan = Plan(overrides=_overrides(overrides))
    # an overridden node is no member of a fused group (a float or dynamic head's tail runs float);
    # an int16-activations head keeps its tail (the group moves whole)
    groups = {h: t for h, t in (groups or {}).items() if t not in plan.overrides
              and (h not in plan.overrides or plan.overrides[h].kind == WIDE)}
    excluded = set(exclude)
    unranged: dict[str, str] = {}  # integer but for a missing range: decided after the drop below
    for graph in model.graph.walk():
        for node in graph.gs.nodes:
            reason = _why_float(node, graph, model, target, ranges, plan, excluded, groups, unranged,
                                fmt or target.default_format)
            if reason is not None:
                plan.float_nodes[node.name] = reason
    _drop_without_integer_consumer(plan, target)
    # A node without a range for an input stays float; that is only its reason if it would
    # otherwise be integer (calibrate observes only what the plan quantizes, so a node dropped
    # above for having no integer reader also has no range).
    while any(name in plan.nodes for name in unranged):
        for name, reason in unranged.items():
            if plan.nodes.pop(name, None) is not None:
                plan.float_nodes[name] = reason
        _drop_without_integer_consumer(plan, target)
    # a fused tail stays float only if its head does
    for tail, head in list(plan.fused.items()):
        if head not in plan.nodes:
            del plan.fused[tail]
            plan.float_nodes.setdefault(tail, f"fused activation of float node '{head}'")
        else:
            plan.float_nodes.pop(tail, None)
    return plan


@dataclass(frozen=True)
class QuantStep:
    """One step of the walk that gives values their qparams (:func:`quantization_walk`).

    ``kind`` is ``quantize`` (``value`` gets qparams of its own: the target's ``fixed`` ones,
    a constant's own range, or its calibrated range, which ``needs_range`` says must exist),
    ``inherit`` (data movement: ``value``, the output of ``node``, shares ``source``'s
    qparams), ``float-move`` (data movement ``node`` on a value without qparams) or
    ``requantize`` (``value`` already has a pair on the other grid, but ``readers`` read it on
    this one: a pair of its own for them, reading the first pair's output when ``after`` (the
    value was written on that grid by its producer or data movement), else the float value).
    ``wide``: on the 16-bit grid of the int16-activations fallback (:mod:`qcompiler.wide`)."""

    kind: str
    graph: Graph
    value: Value | None = None
    rule: TensorRule | None = None
    fixed: tuple[float, int] | None = None
    needs_range: bool = False
    source: Value | None = None
    node: Node | None = None
    wide: bool = False
    readers: tuple[Node, ...] = ()
    after: bool = False


def _wide(plan: Plan, name: str) -> bool:
    ov = plan.overrides.get(name)
    return ov is not None and ov.kind == WIDE


def quantization_walk(model: Model, target: Target, plan: Plan,
                      ranges: Mapping[str, object] | None = None) -> Iterator[QuantStep]:
    """The values that get qparams under ``plan``, in graph order: the activation inputs and
    published outputs of integer nodes (values already quantized by the model, QAT, and
    values produced by a DequantizeLinear are skipped; each value once per grid), and data
    movement that shares its input's qparams. insert-qdq acts on it; calibrate observes the values
    whose step ``needs_range`` (:func:`ranges_read`). An integer node's output is quantized
    only if it has a range (given ``ranges``) or the target fixes its qparams.

    A value's first step is on the grid of whoever quantizes it first (its producer's output
    grid when an integer producer writes it); integer readers on the other grid (an
    int16-activations node reading an 8-bit value, or the reverse) get a ``requantize`` step."""
    home: dict[int, tuple[bool, bool]] = {}  # value id -> (its first pair is wide, written by its producer)
    extra: set[tuple[int, bool]] = set()

    def step(graph: Graph, value: Value, rule: TensorRule, wide: bool, fixed: tuple[float, int] | None,
             needs_range: bool, written: bool) -> QuantStep | None:
        first = home.get(id(value))
        if (first is not None and (first[0] == wide or (id(value), wide) in extra)) \
                or producer_op(value) == "DequantizeLinear":
            return None
        if any(c.op == "QuantizeLinear" for c in value.outputs):
            return None  # already quantized by the model itself (QAT)
        if first is None:
            home[id(value)] = (wide, written)
            return QuantStep("quantize", graph, value, rule, fixed, needs_range, wide=wide)
        extra.add((id(value), wide))
        readers = tuple(c for c in value.outputs if c.name in plan.nodes and plan.nodes[c.name].node is c
                        and _wide(plan, c.name) == wide)
        return QuantStep("requantize", graph, value, rule, None, needs_range, wide=wide, readers=readers,
                         after=first[1])

    for graph in model.graph.walk():
        for node in graph.gs.nodes:
            np_ = plan.nodes.get(node.name)
            if np_ is not None and np_.node is node:
                rule = np_.config.activation
                if rule.qtype is None:
                    continue
                wide = _wide(plan, node.name)
                for value, role in zip(node.inputs, np_.roles):
                    if role == "activation":
                        s = step(graph, value, rule, wide, None, not isinstance(value, gs.Constant), False)
                        if s is not None:
                            yield s
                out = np_.output
                publish = not graph.is_graph_output(out) or target.quantize_graph_outputs
                gated = node.op not in target.fixed  # the range must exist (even if fixed qparams win)
                if np_.config.output_quantized and publish and (not gated or ranges is None or out.name in ranges):
                    # (fixed qparams are on the target's own grid: a 16-bit output is calibrated)
                    fixed = None if wide else target.fixed.get((np_.tail or node).op)
                    s = step(graph, out, rule, wide, fixed, (gated or wide) and not isinstance(out, gs.Constant), True)
                    if s is not None:
                        yield s
            elif node.op in target.passthrough and node.inputs and node.name not in plan.overrides:
                src, out = node.inputs[0], node.outputs[0]
                if id(src) not in home or graph.is_graph_output(out) or len(node.outputs) != 1:
                    yield QuantStep("float-move", graph, node=node)
                    continue
                home[id(out)] = (home[id(src)][0], True)
                yield QuantStep("inherit", graph, out, source=src, node=node, wide=home[id(src)][0])


def ranges_read(model: Model, target: Target, plan: Plan) -> tuple[set[str], dict[str, str]]:
    """The activations whose calibrated range insert-qdq reads under ``plan`` (the steps of
    :func:`quantization_walk` that need one), and the outputs of data movement that share
    their input's qparams instead, mapped to the value whose range they share: their range
    is that one's (plan_quantization still asks that an integer node's inputs have one).

    calibrate observes only these: a transformer's Erf, Div and Reshape outputs, or anything
    feeding a float op, never become integer, and observing them cost a third of MiniLM's
    calibration."""
    need: set[str] = set()
    inherited: dict[str, str] = {}
    requantized: set[str] = set()
    for step in quantization_walk(model, target, plan):
        if step.kind == "quantize" and step.needs_range and step.value is not None:
            need.add(step.value.name)
        elif step.kind == "inherit" and step.value is not None and step.source is not None:
            inherited[step.value.name] = inherited.get(step.source.name, step.source.name)
        elif step.kind == "requantize" and step.needs_range and step.value is not None:
            requantized.add(step.value.name)
    need |= requantized - set(inherited)  # (a data-movement output's range is its source's)
    for out_name, src_name in list(inherited.items()):
        if src_name not in need:  # the source has no range of its own (fixed qparams, QAT): measure this one
            need.add(out_name)
            del inherited[out_name]
    return need, inherited


def _reads_in_integer(value: Value, plan: Plan, target: Target, depth: int = 0) -> bool:
    """Whether an integer node reads ``value``, directly or through integer data movement
    (passthrough ops, which take their input's qparams)."""
    for consumer in value.outputs:
        if consumer.name in plan.nodes or consumer.name in plan.fused:
            return True
        if consumer.op in target.passthrough and depth < 16:
            if any(_reads_in_integer(out, plan, target, depth + 1) for out in consumer.outputs):
                return True
    return False


def _drop_without_integer_consumer(plan: Plan, target: Target) -> None:
    """Ops the target marks ``needs_integer_consumer`` (weightless elementwise ops such as Add)
    stay float when nothing integer reads their output: an integer Add whose result goes
    straight back to float (a transformer's residual Add into LayerNormalization) buys no
    integer region and only adds the rounding of its output. Repeated until stable, since
    dropping one can leave another without an integer reader."""
    changed = True
    while changed:
        changed = False
        for name, np_ in list(plan.nodes.items()):
            if not np_.config.needs_integer_consumer or _reads_in_integer(np_.output, plan, target):
                continue
            del plan.nodes[name]  # (its fused tail, if any, follows it below)
            plan.float_nodes[name] = (f"{np_.node.op} output is read by no integer node: target '{target.name}' "
                                      f"runs it in integer only inside integer regions "
                                      f"(ops.{np_.node.op}.needs_integer_consumer)")
            changed = True


def _why_float(node: Node, graph: Graph, model: Model, target: Target,
               ranges: Mapping[str, object] | None, plan: Plan, excluded: set[str],
               groups: Mapping[str, str], unranged: dict[str, str], fmt: str) -> str | None:
    if node.op in ("QuantizeLinear", "DequantizeLinear"):
        return None
    if node.name in plan.overrides:
        ov = plan.overrides[node.name]
        if ov.kind == "dynamic":
            why = dynamic_blocker(node, target)
            if why is not None:
                raise UserError(f"plan override for node '{node.name}': outcome 'dynamic': {why}")
            plan.dynamic[node.name] = target.op(node.op, mode="dynamic").kernel or ""  # type: ignore[union-attr]
            return None
        if ov.kind != WIDE:
            return ov.reason
        why = wide_blocker(node, target)
        if why is not None:
            raise UserError(f"plan override for node '{node.name}': outcome '{WIDE}': {why}")
    domain = "" if node.domain in (None, "ai.onnx") else node.domain
    if domain:
        return f"op domain '{domain}' is not quantized by qcompiler"
    if node.name in excluded:
        return "excluded by option"
    if node.name in groups.values():
        return None  # a fused activation: decided with its head
    if node.op in target.passthrough:
        return None  # integer or float, decided by its input at insertion time
    cfg = target.op(node.op)
    if cfg is not None:
        cfg = cfg.for_node(node)
    if cfg is None:
        return f"target '{target.name}' runs {node.op} in float (no integer kernel or Q/DQ rule)"
    if _wide(plan, node.name):
        cfg = wide_config(cfg, target)
    fact = cfg.excluded_by(node)
    if fact is not None:
        return f"{node.op} node is {fact}: target '{target.name}' keeps it float (ops.{node.op}.exclude_when)"
    need = max(cfg.min_opset, cfg.activation.min_opset, cfg.weight.min_opset)
    if (model.opset(domain) or 0) < need:
        return f"{node.op} needs opset >= {need} on target '{target.name}'"
    roles: list[str] = []
    for i, value in enumerate(node.inputs):
        role = cfg.role(i)
        if role == "bias" and cfg.weight.blocked:
            role = "float"  # an int32 bias needs one weight scale per output channel
        if not value.name or role in ("float", "any"):
            roles.append("float")
            continue
        produced_by_dq = producer_op(value) == "DequantizeLinear"
        if role == "weight" and not isinstance(value, gs.Constant):
            role = "activation"
        if role == "bias":
            if cfg.bias.dtype == "float":
                roles.append("float")
                continue
            if not isinstance(value, gs.Constant) and not produced_by_dq:
                return f"bias '{value.name}' is not a constant"
        if role in ("activation", "weight") and not produced_by_dq and not is_float(value, ranges):
            return f"input '{value.name}' is not float32"
        if role in ("weight", "bias") and isinstance(value, gs.Constant) and np.asarray(value.values).size == 0:
            return f"{role} '{value.name}' has no elements (nothing to quantize)"
        if role == "weight" and isinstance(value, gs.Constant):
            w = np.asarray(value.values)
            if cfg.weight.per_channel and weight_axis(node, w) is None:
                return f"weight '{value.name}' has no per-channel axis for {node.op}"
            if cfg.weight.blocked and reduction_axis(node, w) is None:
                return f"weight '{value.name}' has no axis to block for {node.op}"
        if (role == "activation" and ranges is not None and not produced_by_dq
                and not isinstance(value, gs.Constant) and value.name not in ranges):
            unranged.setdefault(node.name, f"no calibration range for input '{value.name}'")
        roles.append(role)
    if "activation" not in roles and "weight" not in roles:
        return "no input to quantize"
    if node.op == "Gemm":
        if float(node.attrs.get("beta", 1.0)) != 1.0 and len(node.inputs) > 2:
            return "Gemm with beta != 1 has no integer kernel"
    tail = _group_tail(node, graph, target, groups)
    unwritable = None if "weight" in roles else _no_integer_output(cfg, graph, (tail or node).outputs[0], target, fmt)
    if unwritable is not None:
        return unwritable
    if tail is not None:
        plan.fused[tail.name] = node.name
    plan.nodes[node.name] = NodePlan(node, graph, cfg, roles, tail)
    return None


def _no_integer_output(cfg: OpConfig, graph: Graph, out: Value, target: Target, fmt: str) -> str | None:
    """Why a weightless node cannot run in integer because its kernel has nowhere to write: in
    QOperator format a kernel without a float output (QLinearSigmoid) writes the quantized
    output, and a graph output the target leaves float (``quantize_graph_outputs = false``) has
    none. lower-qoperator would leave the node float on dequantized inputs, so quantizing its
    inputs would only round them (PP-OCR's final Sigmoid read its logits on a uint8 grid).
    (Weight ops such as QLinearConv are still left to lowering: docs/design.md.)"""
    if fmt != "qoperator" or not cfg.output_quantized or target.quantize_graph_outputs \
            or not graph.is_graph_output(out):
        return None
    spec = kernel_spec(cfg.kernel_op) if cfg.kernel else None
    if spec is None or spec.float_output:
        return None
    return (f"its output '{out.name}' is a graph output left float (quantize_graph_outputs = false) and "
            f"{spec.name} writes only a quantized output: integer would only round its inputs")


def plan_dynamic(model: Model, target: Target, *, exclude: Sequence[str] = (), min_weight_elements: int = 0,
                 max_k: int = 0, overrides: Mapping[str, tuple[str, str]] | None = None) -> Plan:
    """Dynamic mode: which MatMuls run as the target's dynamic kernel (``dynamic.ops.MatMul``:
    weight quantized ahead of time, activation per call), and why the others stay float.
    ``max_k`` (0: no limit) keeps float the MatMuls with more input features than that."""
    plan = Plan(overrides=_overrides(overrides))
    cfg = target.op("MatMul", mode="dynamic")
    excluded = set(exclude)
    for graph in model.graph.walk():
        for node in graph.gs.nodes:
            if node.op != "MatMul" or not node.outputs:
                continue
            reason = _why_float_dynamic(node, plan, excluded, min_weight_elements, max_k)
            if reason is None and cfg is not None:
                plan.dynamic[node.name] = cfg.kernel or ""  # (quantize-dynamic rejects a missing kernel)
            else:
                plan.float_nodes[node.name] = reason or f"target '{target.name}' has no dynamic kernel for MatMul"
    return plan


def _why_float_dynamic(node: Node, plan: Plan, excluded: set[str], min_weight_elements: int, max_k: int
                       ) -> str | None:
    ov = plan.overrides.get(node.name)
    if ov is not None and ov.kind == "float":
        return ov.reason
    if ov is not None:  # dynamic whatever the size options say, if it can be built at all
        why = _dynamic_weight_blocker(node)
        if why is not None:
            raise UserError(f"plan override for node '{node.name}': outcome 'dynamic': {why}")
        return None
    if node.name in excluded:
        return "excluded by option"
    why = _dynamic_weight_blocker(node)
    if why is not None:
        return why
    w = np.asarray(node.inputs[1].values)  # type: ignore[attr-defined]
    if w.size < min_weight_elements:
        return "weight is not a large 2-D float32 matrix"
    if max_k and w.shape[0] > max_k:
        return f"{w.shape[0]} input features > max-k {max_k}"
    return None


def _dynamic_weight_blocker(node: Node) -> str | None:
    """Why a MatMul cannot run as a dynamic kernel (which quantizes its weight ahead of time):
    the weight must be a constant 2-D float32 matrix."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "MatMul of two run-time values (no constant weight)"
    w = np.asarray(node.inputs[1].values)
    if w.ndim != 2 or w.dtype != np.float32:
        return "weight is not a large 2-D float32 matrix"
    return None


def dynamic_blocker(node: Node, target: Target) -> str | None:
    """Why ``node`` cannot take the ``dynamic`` outcome in a static compile, or None: the
    target needs a dynamic kernel for its op (``dynamic.ops.<Op>``, a MatMul kernel of the
    kernel table that quantize-dynamic builds) and the weight must be a constant 2-D matrix."""
    from .kernels import kernel_spec

    cfg = target.op(node.op, mode="dynamic")
    spec = kernel_spec(cfg.kernel_op) if cfg is not None else None
    if spec is None or not spec.dynamic or spec.float_op != node.op or node.op != "MatMul":
        return f"target '{target.name}' has no dynamic kernel for {node.op} (key dynamic.ops.{node.op}.kernel)"
    return _dynamic_weight_blocker(node)


def fallback_outcomes(model: Model, target: Target, nodes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Per node of ``nodes`` (in ``model``, the graph the plan decides on): the target's
    fallbacks for its op (``[accuracy] fallbacks``) that this node can take, in order (a
    ``dynamic`` fallback needs :func:`dynamic_blocker` to find nothing, ``int16-activations``
    :func:`qcompiler.wide.wide_blocker`). Unknown names are left out."""
    wanted = set(nodes)
    out: dict[str, tuple[str, ...]] = {}
    for graph in model.graph.walk():
        for node in graph.gs.nodes:
            if node.name in wanted:
                out[node.name] = tuple(f for f in target.fallbacks(node.op)
                                       if (f != "dynamic" or dynamic_blocker(node, target) is None)
                                       and (f != WIDE or wide_blocker(node, target) is None))
    return out


def value_qtypes(model: Model, target: Target, plan: Plan) -> dict[str, QType]:
    """The activation QType of each value ``plan`` quantizes (the rule insert-qdq uses for it;
    data movement shares its source's): the grid calibrate measures ranges on."""
    out: dict[str, QType] = {}
    for step in quantization_walk(model, target, plan):
        if step.value is None:
            continue
        if step.kind == "quantize" and step.rule is not None and step.rule.qtype is not None:
            out.setdefault(step.value.name, step.rule.qtype)
        elif step.kind == "inherit" and step.source is not None and step.source.name in out:
            out.setdefault(step.value.name, out[step.source.name])
    return out
