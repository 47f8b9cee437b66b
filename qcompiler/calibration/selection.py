"""What calibration observes, and how: the tensors (from the plan), each one's method and
integer grid, the layers whose input statistics insert-qdq reads, and saturation bounds.

Why a module of its own: these are questions about the model and the plan, answered before
any model run; the engine (:mod:`.engine`) only runs what they decide, and
:func:`qcompiler.calibration.calibrate` ties the two together. Which values are quantized,
and on which ``QType``, is the plan's answer (:func:`qcompiler.plan.ranges_read`,
:func:`qcompiler.plan.value_qtypes`), never a second copy of insert-qdq's rules here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..ir import Constant, Model, const_value, is_constant
from ..plan import Plan, quantization_walk, ranges_read, value_qtypes
from ..quant import QType
from .engine import trial_run
from .methods import RangeTarget, histogram_kind
from .stats import PatchSpec
from .subgraphs import instrument, observable_subgraph_values

__all__ = ["Observed", "MethodPlan", "method_plan", "observe_bodies", "saturation_bounds", "clamp",
           "weighted_inputs", "moment_specs", "shared_moments", "kernel_only", "wide_qtypes",
           "wide_methods"]

#: per tensor: (method, integer grid, histogram kind or None)
MethodPlan = dict[str, tuple[str, RangeTarget, "str | None"]]


def _saturation(node: Any) -> tuple[float, float] | None:
    """The input interval outside which the elementwise activation ``node`` is constant
    (its output saturates), or None: values beyond it give the same output as the bound."""
    inf = float("inf")
    if node.op == "Relu":
        return 0.0, inf
    if node.op == "HardSwish":  # x * relu6(x + 3) / 6: 0 for x <= -3, linear above
        return -3.0, inf
    if node.op == "HardSigmoid":  # max(0, min(1, alpha * x + beta))
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        if alpha <= 0:
            return None
        return -beta / alpha, (1.0 - beta) / alpha
    if node.op == "Clip":
        bounds = [-inf, inf]
        for i in (1, 2):
            if len(node.inputs) > i and node.inputs[i].name:
                if not is_constant(node.inputs[i]):
                    return None
                bounds[i - 1] = float(np.asarray(const_value(node.inputs[i])).reshape(-1)[0])
        return bounds[0], bounds[1]
    return None


def saturation_bounds(model: Model) -> dict[str, tuple[float, float]]:
    """Values of the main graph read only by saturating activations (Relu, HardSwish,
    HardSigmoid, constant Clip), with the interval beyond which every reader's output stops
    changing. Quantizing such a value on a range clamped to that interval is exact where the
    clamp bites, so its integer steps go to the values that matter (PP-OCRv4's depthwise
    outputs reach -195 before a HardSwish that maps everything below -3 to 0)."""
    outputs = {v.name for v in model.graph.outputs}
    out: dict[str, tuple[float, float]] = {}
    for node in model.graph.nodes:
        for value in node.outputs:
            if not value.name or value.name in outputs or not value.outputs:
                continue
            sats = [_saturation(c) if c.inputs and c.inputs[0] is value else None for c in value.outputs]
            if any(s is None for s in sats):
                continue
            out[value.name] = (min(s[0] for s in sats), max(s[1] for s in sats))  # type: ignore[index]
    return out


def clamp(rng: tuple[float, float], bound: tuple[float, float] | None) -> tuple[float, float]:
    """``rng`` limited to ``bound`` (kept as is where that would leave no interval)."""
    if bound is None:
        return rng
    lo, hi = max(rng[0], bound[0]), min(rng[1], bound[1])
    return (lo, hi) if lo < hi else rng


def weighted_inputs(model: Model, only: set[str] | None = None) -> dict[str, int]:
    """Activations multiplied by a constant weight (by the nodes in ``only``, if given), with
    the axis their channels lie on; their per-channel means let insert-qdq correct the bias
    shift weight rounding causes."""
    axes: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        if only is not None and node.name not in only:
            continue
        if not is_constant(node.inputs[1]) or is_constant(node.inputs[0]):
            continue
        if node.op == "Conv":
            axes[node.inputs[0].name] = 1
        elif node.op == "Gemm":
            axes[node.inputs[0].name] = 0 if int(node.attrs.get("transA", 0)) else -1
        else:
            axes[node.inputs[0].name] = -1
    return axes


def moment_specs(model: Model, max_dim: int, only: set[str] | None = None) -> dict[str, list[tuple[str, PatchSpec]]]:
    """Per activation, the (node, window) pairs whose input second moments to accumulate
    (for the nodes in ``only``, if given: GPTQ rounds only integer nodes' weights)."""
    specs: dict[str, list[tuple[str, PatchSpec]]] = {}
    for node in model.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        if only is not None and node.name not in only:
            continue
        w = node.inputs[1]
        if not is_constant(w) or is_constant(node.inputs[0]) or w.shape is None:
            continue
        shape = list(w.shape)
        if node.op == "Conv":
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                continue
            k = int(np.prod(shape[1:]))
            spec = PatchSpec(tuple(shape[2:]), tuple(node.attrs.get("pads", ())), tuple(node.attrs.get("strides", ())),
                             tuple(node.attrs.get("dilations", ())), int(node.attrs.get("group", 1)))
        else:
            if len(shape) != 2:
                continue
            trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
            k = shape[1] if trans_b else shape[0]
            spec = PatchSpec(trans=node.op == "Gemm" and bool(int(node.attrs.get("transA", 0))))
        if k > max_dim:
            continue
        specs.setdefault(node.inputs[0].name, []).append((node.name, spec))
    return specs


def shared_moments(specs: dict[str, list[tuple[str, PatchSpec]]]
                   ) -> tuple[dict[str, list[tuple[str, PatchSpec]]], dict[str, str]]:
    """Layers reading the same input through the same window (a transformer's Q, K and V
    projections) have the same input moments: accumulate them once, under the first layer's
    name; (the deduplicated specs, other layer -> that name)."""
    unique: dict[str, list[tuple[str, PatchSpec]]] = {}
    alias: dict[str, str] = {}
    for name, pairs in specs.items():
        first: dict[PatchSpec, str] = {}
        for node, spec in pairs:
            if spec in first:
                alias[node] = first[spec]
            else:
                first[spec] = node
                unique.setdefault(name, []).append((node, spec))
    return unique, alias


def kernel_only(const: Constant) -> bool:
    """Weights only onnxruntime's kernels read (a MatMul's B, a Gather's table): those can be
    handed to the session as the IR's own arrays. Graph optimizations read others (a Conv
    weight is re-laid-out for the blocked-layout kernels) from the model itself."""
    return bool(const.outputs) and all(
        (c.op == "MatMul" and len(c.inputs) > 1 and c.inputs[1] is const)
        or (c.op == "Gather" and c.inputs and c.inputs[0] is const) for c in const.outputs)


class Observed:
    """The float values of the main graph calibration could observe (``values``: node
    outputs, ``inputs``: graph inputs), the fused-inner ones it never observes (``inner``: a
    head's output read only by its activation tail, see group-activations: the group runs as
    one kernel, and not observing it skips a CNN's largest tensors and lets onnxruntime fuse
    the pair in the calibration session too), and under ``plan`` with ``observe="quantized"``
    the values insert-qdq reads a range of (``keep``), data-movement outputs that inherit
    their source's range (``inherited``) and the integer nodes (``integer``)."""

    def __init__(self, model: Model, plan: Plan, target: Any, groups: Mapping[str, str], observe: str,
                 also: Plan | None = None) -> None:
        graph = model.graph
        values: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op == "QuantizeLinear":
                continue
            for value in node.outputs:
                if not value.name or any(c.op == "QuantizeLinear" for c in value.outputs):
                    continue
                if value.dtype is None or np.dtype(value.dtype).kind == "f":
                    values[value.name] = value
        self.inner = {node.outputs[0].name for node in graph.nodes if node.name in groups and node.outputs}
        self.values = {n: v for n, v in values.items() if n not in self.inner}
        self.inputs = {v.name: v for v in graph.inputs if not is_constant(v)}
        self.graph_inputs = set(self.inputs)
        self.candidates = len(self.values) + len(self.inputs)
        self.pinnable = set(self.values) | set(self.inputs) | self.inner  # a pin of an unobserved one: accepted
        self.keep: set[str] | None = None
        self.inherited: dict[str, str] = {}
        self.integer: set[str] | None = None
        if observe == "quantized":
            self.keep, self.inherited = ranges_read(model, target, plan)
            self.integer = set(plan.nodes)
            if also is not None:  # (the plan without overrides: calibrate's full_plan)
                self.keep |= ranges_read(model, target, also)[0]
                self.integer |= set(also.nodes)
            self.values = {n: v for n, v in self.values.items() if n in self.keep}
            self.inputs = {n: v for n, v in self.inputs.items() if n in self.keep}


def _method_for(producer: Any, name: str, overrides: Mapping[str, str], method: str) -> str:
    """A value's method: an override of its producer node's name (a graph input's own name),
    else of its producer's op type, else ``method``."""
    if producer is None:
        return overrides.get(name) or method
    return overrides.get(producer.name) or overrides.get(producer.op) or method


def method_plan(model: Model, plan: Plan, target: Any, seen: Observed, overrides: Mapping[str, str],
                method: str, also: Plan | None = None) -> tuple[MethodPlan, dict[str, QType], int]:
    """Per observed value: its method, the grid the plan quantizes it on
    (:func:`qcompiler.plan.value_qtypes`; with ``also``, the plan without overrides, that plan's
    grid wins: the statistics, hence the cache key, are the plain compile's, and a value an
    int16-activations override puts on the 16-bit grid gets that grid's range from the same
    statistics, :func:`wide_methods`) and its histogram kind; also the QTypes and how many
    values the target pins with fixed qparams (those only need min/max)."""
    qtypes = {**value_qtypes(model, target, plan), **value_qtypes(model, target, also)} if also is not None \
        else value_qtypes(model, target, plan)
    out: MethodPlan = {}
    fixed = 0
    for n, value in list(seen.values.items()) + list(seen.inputs.items()):
        producer = value.inputs[0] if value.inputs else None
        m = _method_for(producer, n, overrides, method)
        if producer is not None and producer.op in target.fixed:
            m, fixed = "minmax", fixed + 1  # qparams pinned by the target: min/max is enough
        grid = RangeTarget.of(qtypes.get(n, target.activation_rule().qtype))
        out[n] = (m, grid, histogram_kind(m, grid))
    return out, qtypes, fixed


def observe_bodies(model: Model, proto: Any, data: Any, target: Any, methods: MethodPlan,
                   overrides: Mapping[str, str], method: str, shared: dict[str, np.ndarray],
                   qtypes: dict[str, QType], keep: set[str] | None = None) -> tuple[Any, dict[str, tuple[str, str]]]:
    """Float values computed inside If/Loop bodies of main-graph nodes, made observable
    (:mod:`.subgraphs`): the model to run, and exposed name -> (body value name, "If"|"Loop"),
    with their ``methods`` entries added. The first sample of ``data`` is run on the
    instrumented model; if onnxruntime refuses it (a Loop value whose shape changes between
    iterations cannot be stacked), Loop bodies are dropped, then If bodies: those values then
    stay uncalibrated and their ops float."""
    skip = {v.name for g in model.graph.walk() for n in g.nodes if n.op == "QuantizeLinear" for v in n.inputs}
    found = [ob for ob in observable_subgraph_values(proto, skip) if keep is None or ob.value in keep]
    if not found:
        return proto, {}
    body_values: dict[str, tuple[Any, Any]] = {v.name: (v, None) for g in model.graph.walk() for v in g.inputs}
    body_values.update({v.name: (v, n) for g in model.graph.walk() for n in g.nodes for v in n.outputs})
    kinds = {n.name: n.op for n in model.graph.nodes}
    first = next(iter(data), None)
    for allowed in (("If", "Loop"), ("If",)):
        chosen = [ob for ob in found if kinds.get(ob.node) in allowed]
        if not chosen or first is None:
            return proto, {}
        trial, exposed = instrument(proto, chosen, allowed)
        try:
            trial_run(trial.SerializeToString(), list(exposed), first, shared)
        except Exception:  # noqa: BLE001 - onnxruntime's refusal decides, whatever its type
            continue
        out: dict[str, tuple[str, str]] = {}
        for ob in chosen:
            value, producer = body_values[ob.value]
            m = _method_for(producer, ob.value, overrides, method)
            grid = RangeTarget.of(qtypes.get(value.name, target.activation_rule().qtype))
            methods[ob.exposed] = (m, grid, histogram_kind(m, grid))
            out[ob.exposed] = (ob.value, kinds[ob.node])
        return trial, out
    return proto, {}


def wide_qtypes(model: Model, target: Any, plan: Plan) -> dict[str, QType]:
    """The 16-bit QType of each value ``plan`` quantizes on the int16-activations grid from a
    calibrated range (empty without such overrides, :mod:`qcompiler.wide`)."""
    return {step.value.name: step.rule.qtype for step in quantization_walk(model, target, plan)
            if step.wide and step.kind in ("quantize", "requantize") and step.needs_range
            and step.value is not None and step.rule is not None and step.rule.qtype is not None}


def wide_methods(methods: MethodPlan, wide: Mapping[str, QType], inherited: Mapping[str, str]
                 ) -> tuple[MethodPlan, dict[str, str]]:
    """For the values on the 16-bit grid (``wide``): per observed value whose statistics give
    their range (a data-movement output's is its source's) its method on that grid, with the
    histogram kind its statistics were collected with (one statistics pass serves both grids);
    and each wide value -> that observed value."""
    plan: MethodPlan = {}
    source: dict[str, str] = {}
    for name, qtype in sorted(wide.items()):
        src = inherited.get(name, name)
        if src in methods:
            m, _, kind = methods[src]
            plan.setdefault(src, (m, RangeTarget.of(qtype), kind))
            source[name] = src
    return plan, source
