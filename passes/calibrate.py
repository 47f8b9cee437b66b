"""calibrate: observe activation ranges by running the float model on real samples."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler import Model, Pass, PassContext, PassResult, PatchSpec, QType, UserError
from qcompiler import Constant, const_value, is_constant
from qcompiler.calib_cache import cache_key, data_digest, load_cached, store_cached
from qcompiler.calib_dist import run_sharded
from qcompiler.calib_engine import (DEFAULT_MEMORY, Job, Progress, lane_threads, make_groups, parse_memory, peak_rss_mb,
                                    reuse_sessions, tensor_bytes,
                                    trial_run)
from qcompiler.calib_methods import (METHODS, RangeTarget, entropy_range, histogram_kind, moving_average_range,
                                     mse_range, percentile_range)
from qcompiler.calib_subgraphs import instrument, observable_subgraph_values
from qcompiler.calibration import Statistics
from qcompiler.plan import Plan, plan_for, plan_quantization, ranges_read, value_qtypes
from qcompiler.quant import range_fits_float32
from qcompiler.rangefile import check_pinned, read_ranges

__all__ = ["collect_input_moments", "Calibrate", "saturation_bounds"]


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


def _clamp(rng: tuple[float, float], bound: tuple[float, float] | None) -> tuple[float, float]:
    """``rng`` limited to ``bound`` (kept as is where that would leave no interval)."""
    if bound is None:
        return rng
    lo, hi = max(rng[0], bound[0]), min(rng[1], bound[1])
    return (lo, hi) if lo < hi else rng


def _weighted_inputs(model: Model, only: set[str] | None = None) -> dict[str, int]:
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


def _moment_specs(model: Model, max_dim: int, only: set[str] | None = None) -> dict[str, list[tuple[str, PatchSpec]]]:
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


def _shared_moments(specs: dict[str, list[tuple[str, PatchSpec]]]
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


def _kernel_only(const: Constant) -> bool:
    """Weights only onnxruntime's kernels read (a MatMul's B, a Gather's table): those can be
    handed to the session as the IR's own arrays. Graph optimizations read others (a Conv
    weight is re-laid-out for the blocked-layout kernels) from the model itself."""
    return bool(const.outputs) and all(
        (c.op == "MatMul" and len(c.inputs) > 1 and c.inputs[1] is const)
        or (c.op == "Gather" and c.inputs and c.inputs[0] is const) for c in const.outputs)


def _fused_inner(model: Model, ctx: PassContext) -> set[str]:
    """Values inside fused groups: a head's output read only by its activation tail."""
    heads = ctx.analysis.get("groups", {})
    return {node.outputs[0].name for node in model.graph.nodes if node.name in heads and node.outputs}


def _candidates(model: Model, ctx: PassContext) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """Float values of the main graph calibrate could observe (node outputs, graph inputs),
    and the fused-inner values it never observes."""
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
    # A value inside a fused group (a head's output read only by its activation tail, see
    # group-activations) is never quantized: the group runs as one kernel. Not observing
    # it skips the largest tensors of a CNN (a Conv's output before its Relu6) and lets
    # onnxruntime fuse the pair in the calibration session too.
    inner = _fused_inner(model, ctx)
    values = {n: v for n, v in values.items() if n not in inner}
    inputs = {v.name: v for v in graph.inputs if not is_constant(v)}
    return values, inputs, inner


def _plan(model: Model, ctx: PassContext, overrides: bool = True) -> Plan:
    """The plan insert-qdq will follow, planned as if every value had a range (the plan after
    calibration is then the same one); ``overrides=False``: the same without the compile's plan
    overrides (the full-integer plan)."""
    every = {v.name for g in model.graph.walk() for v in g.inputs}
    every.update(v.name for g in model.graph.walk() for n in g.nodes for v in n.outputs)
    if not overrides:
        return plan_quantization(model, ctx.target, ranges=dict.fromkeys(every), groups=ctx.analysis.get("groups", {}))
    return plan_for(model, ctx, ranges=dict.fromkeys(every))


def _quantized(model: Model, ctx: PassContext, plan: Plan | None = None) -> tuple[set[str], dict[str, str], set[str]]:
    """(values whose range insert-qdq will read, data-movement outputs that inherit their
    source's range, integer node names) under the plan."""
    plan = plan or _plan(model, ctx)
    need, inherited = ranges_read(model, ctx.target, plan)
    return need, inherited, set(plan.nodes)


def _pinned_only(model: Model, ctx: PassContext, pinned: dict[str, tuple[float, float]], path: str,
                 observe: str) -> None:
    """No calibration data but a range file: accept it only if it pins every float tensor
    calibrate would observe (then no model run is needed)."""
    values, inputs, inner = _candidates(model, ctx)
    wanted = list(inputs) + list(values)
    inherited: dict[str, str] = {}
    if observe == "quantized":
        keep, inherited, _ = _quantized(model, ctx)
        wanted = [n for n in wanted if n in keep]
    known = [n for n in wanted if n not in pinned]
    check_pinned(pinned, list(inputs) + list(values) + sorted(inherited) + sorted(inner), path)  # some unused
    if known:
        raise UserError(f"pass 'calibrate' needs calibration data (--calibration PATH): range file {path} "
                        f"does not pin tensor '{known[0]}' ({len(known)} tensors unpinned)")
    ranges = {n: pinned[n] for n in sorted(set(wanted))}
    for out, src in inherited.items():
        if src in ranges:
            ranges[out] = pinned.get(out, ranges[src])
    ctx.analysis["input_moments"], ctx.analysis["channel_means"] = {}, {}
    ctx.analysis["ranges"] = dict(sorted(ranges.items()))
    ctx.report["calibration"] = {"method": "pinned", "samples": 0, "tensors": len(set(wanted)), "seconds": 0.0}


def _check_method(method: str, where: str) -> str:
    if method not in METHODS:
        raise UserError(f"pass 'calibrate': {where} '{method}' is not available (methods: {', '.join(METHODS)})")
    return method


def parse_overrides(items: tuple[str, ...]) -> dict[str, str]:
    """``("Softmax=minmax", "/node/name=percentile")`` -> {key: method}; the method is after
    the last '=' (node names may contain '=')."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, method = item.rpartition("=")
        if not sep or not key.strip():
            raise UserError(f"pass 'calibrate': override '{item}' must be KEY=METHOD (KEY: a node name or op type)")
        out[key.strip()] = _check_method(method.strip(), f"override '{key.strip()}': method")
    return out


def _observe_bodies(model: Model, proto: Any, ctx: PassContext, plan: dict[str, Any],
                    overrides: dict[str, str], method: str,
                    shared: dict[str, np.ndarray], qtypes: dict[str, QType],
                    keep: set[str] | None = None) -> tuple[Any, dict[str, tuple[str, str]]]:
    """Float values computed inside If/Loop bodies of main-graph nodes, made observable
    (qcompiler.calib_subgraphs): the model to run, and exposed name -> (body value name,
    "If"|"Loop"), with their plan entries added. A first sample is run on the instrumented model; if onnxruntime refuses
    it (a Loop value whose shape changes between iterations cannot be stacked), Loop bodies are
    dropped, then If bodies: those values then stay uncalibrated and their ops float."""
    skip = {v.name for g in model.graph.walk() for n in g.nodes if n.op == "QuantizeLinear" for v in n.inputs}
    found = [ob for ob in observable_subgraph_values(proto, skip) if keep is None or ob.value in keep]
    if not found:
        return proto, {}
    body_values: dict[str, tuple[Any, Any]] = {v.name: (v, None) for g in model.graph.walk() for v in g.inputs}
    body_values.update({v.name: (v, n) for g in model.graph.walk() for n in g.nodes for v in n.outputs})
    kinds = {n.name: n.op for n in model.graph.nodes}
    first = next(iter(ctx.calibration), None)
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
            m = (overrides.get(producer.name) or overrides.get(producer.op) if producer is not None
                 else overrides.get(ob.value)) or method
            grid = RangeTarget.of(qtypes.get(value.name, ctx.target.activation_rule().qtype))
            plan[ob.exposed] = (m, grid, histogram_kind(m, grid))
            out[ob.exposed] = (ob.value, kinds[ob.node])
        return trial, out
    return proto, {}


def collect_input_moments(model: Model, ctx: PassContext, nodes: set[str], *, samples: int = 16,
                          max_dim: int = 8192, lanes: int = 2) -> dict[str, np.ndarray]:
    """The input second moments (sum of x x^T, [1, K, K]) of the MatMul/Gemm/Conv ``nodes``
    over the first ``samples`` calibration samples: the statistics GPTQ rounding reads, for a
    pass that needs them without ranges (weight-only quantization). Node name -> moments."""
    if ctx.calibration is None:
        raise UserError("input statistics need calibration data (--calibration PATH)")
    specs, alias = _shared_moments(_moment_specs(model, max_dim, nodes))
    if not specs:
        return {}
    shared: dict[str, np.ndarray] = {}
    proto = model.to_proto(shared=shared, share=_kernel_only).SerializeToString()
    graph_inputs = {v.name for v in model.graph.inputs}
    names = [n for n in specs if n not in graph_inputs]
    inputs = [n for n in specs if n in graph_inputs]
    job = Job(proto, [names] if names else [], inputs, initializers=shared, moment_specs=specs,
              moment_limit=samples, grouped_moment_limit=samples, moments_only=True, lanes=lanes)
    stats, _ = run_sharded(job, ctx.calibration)
    moments = dict(stats.moments)
    moments.update({node: moments[first] for node, first in alias.items() if first in moments})
    return moments


@dataclass(frozen=True)
class Calibrate(Pass):
    """Run the current (float) model in onnxruntime over the calibration samples and record
    each float activation's clipping range in the analysis (`ranges`), for insert-qdq.

    Methods (`method`, default the target's `defaults.calibration_method`; per producer node
    name or op type with `overrides=[Softmax=minmax,/node/name=percentile]`, node names win):
    `minmax` (observed range; with `momentum` > 0 a moving average of per-sample extremes),
    `percentile` (`percentile`, default 99.99, from a histogram), `entropy` (TensorRT-style KL
    threshold on the |x| histogram) and `mse` (least expected quantization error). Each range
    is chosen for the dtype, symmetry and levels the target gives that tensor; tensors whose
    producer the target pins with fixed qparams only get min/max (no histogram).

    Engine: phase 1 streams the data for min/max, channel means and, over the first
    `moment-samples` samples (`grouped-moment-samples` for depthwise layers), the input second
    moments GPTQ rounding in insert-qdq uses; phase 2 histograms each tensor over its phase-1
    range (counts independent of batching, order and sharding). `lanes` (default 2) samples
    are in flight at once on threads sharing the session; the statistics are bit-identical
    for any number of lanes. Observed tensors are split into groups that fit `memory`
    (default 1GB, shared by the lanes) with one run per group. `cache` (a directory) stores
    the statistics keyed by graph, data and options; `workers` / `scheduler` shard samples
    over local processes or a Dask cluster. Ranges are observed on the graph after fusions:
    with `observe=quantized` (default) only the tensors insert-qdq will quantize under the
    target (a data-movement output that shares its input's qparams gets that input's range),
    with `observe=all` every float tensor; values already quantized (QAT) and values inside a
    fused group (a Conv's output read only by its fused Relu, never quantized) are never
    observed. Requires calibration data, unless `ranges-file` (a range JSON, see
    docs/calibration.md) pins every observed tensor; its ranges override calibrated ones.
    `saturation=true` clamps the range of a value read only by saturating activations to
    where their output still moves (`saturation_bounds`; off by default: on PP-OCRv4 it raised
    cosine but not SQNR, docs/benchmarks.md). Does not change the graph.
    """

    name = "calibrate"
    method: str = ""
    overrides: tuple[str, ...] = ()
    percentile: float = 99.99
    momentum: float = 0.0
    bins: int = 2048
    limit: int = 0
    second_moments: bool = True
    moment_samples: int = 16
    grouped_moment_samples: int = 8  # depthwise layers: K = 9 or 25, C matrices a sample
    clip_weight: float = 1.0
    max_moment_dim: int = 4608
    memory: str = DEFAULT_MEMORY
    cache: str = ""
    workers: int = 1
    scheduler: str = ""
    lanes: int = 2
    observe: str = "quantized"  # quantized: the tensors insert-qdq reads a range of | all: every float tensor
    statistics: str = "all"  # all: ranges + bias-correction means + GPTQ moments | ranges: ranges only
    saturation: bool = False  # clamp a range to where its readers (Relu, HardSwish, Clip...) do not saturate
    ranges_file: str = ""  # range JSON whose ranges override calibrated ones (qcompiler.rangefile; H2)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        method = _check_method(self.method or ctx.target.calibration_method, "method")
        overrides = parse_overrides(self.overrides)
        if not 0.0 < self.percentile <= 100.0:
            raise UserError(f"pass 'calibrate': option 'percentile={self.percentile}' must be in (0, 100]")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"pass 'calibrate': option 'momentum={self.momentum}' must be in [0, 1)")
        if self.bins < 16:
            raise UserError(f"pass 'calibrate': option 'bins={self.bins}' must be at least 16")
        if self.workers < 1:
            raise UserError(f"pass 'calibrate': option 'workers={self.workers}' must be at least 1")
        if self.observe not in ("quantized", "all"):
            raise UserError(f"pass 'calibrate': option 'observe={self.observe}' must be 'quantized' or 'all'")
        if self.lanes < 1:
            raise UserError(f"pass 'calibrate': option 'lanes={self.lanes}' must be at least 1")
        if self.statistics not in ("all", "ranges"):
            raise UserError(f"pass 'calibrate': option 'statistics={self.statistics}' must be 'all' or 'ranges'")
        budget = parse_memory(self.memory)
        pinned = read_ranges(self.ranges_file) if self.ranges_file else {}
        if ctx.calibration is None and pinned:  # every tensor pinned: no data, no model runs
            _pinned_only(model, ctx, pinned, self.ranges_file, self.observe)
            return PassResult(False)
        if ctx.calibration is None:
            raise UserError("pass 'calibrate' needs calibration data (--calibration PATH)")
        bounded = _bounded_parallelism(self, ctx.calibration)
        if bounded is not self:
            return bounded.run(model, ctx)
        start = time.perf_counter()
        graph = model.graph
        values, input_values, inner = _candidates(model, ctx)
        pinnable = set(values) | set(input_values) | inner  # a pin of an unobserved one is accepted, unused
        known = {n.name for n in graph.nodes} | {n.op for n in graph.nodes} | set(input_values)
        for key in overrides:
            if key not in known:
                raise UserError(f"pass 'calibrate': override key '{key}' names no node, op type or graph input "
                                f"of the model")
        candidates = len(values) + len(input_values)
        keep: set[str] | None = None
        planned: set[str] | None = None
        inherited: dict[str, str] = {}
        # the plan says each value's QType (the grid its range is measured on)
        qplan = _plan(model, ctx)
        qtypes = value_qtypes(model, ctx.target, qplan)
        # with plan overrides (an accuracy-budget recompile) the full-integer plan's values are
        # observed too: per tensor the statistics are the same, and the observed set (the cache
        # key) is the plain compile's, so every recompile of a search hits the calibration cache
        full_plan = _plan(model, ctx, overrides=False) if ctx.analysis.get("plan_overrides") else None
        if full_plan is not None:
            qtypes = {**value_qtypes(model, ctx.target, full_plan), **qtypes}
        if self.observe == "quantized":
            keep, inherited, planned = _quantized(model, ctx, qplan)
            if full_plan is not None:
                more, _, more_nodes = _quantized(model, ctx, full_plan)
                keep, planned = keep | more, planned | more_nodes
            values = {n: v for n, v in values.items() if n in keep}
            input_values = {n: v for n, v in input_values.items() if n in keep}
        names = list(values)
        inputs = list(input_values)

        # per tensor: method, grid, histogram kind
        plan: dict[str, tuple[str, RangeTarget, str | None]] = {}
        fixed = 0
        for n, value in list(values.items()) + list(input_values.items()):
            producer = value.inputs[0] if value.inputs else None
            m = overrides.get(producer.name if producer is not None else n) or (
                overrides.get(producer.op) if producer is not None else None) or method
            if producer is not None and producer.op in ctx.target.fixed:
                m, fixed = "minmax", fixed + 1  # qparams pinned by the target: min/max is enough
            grid = RangeTarget.of(qtypes.get(n, ctx.target.activation_rule().qtype))
            plan[n] = (m, grid, histogram_kind(m, grid))
        shared: dict[str, np.ndarray] = {}  # weights the sessions read from the IR, not copied
        base, exposed = _observe_bodies(model, model.to_proto(shared=shared, share=_kernel_only), ctx, plan,
                                        overrides, method, shared, qtypes, keep)
        names += list(exposed)
        per_sample = frozenset(n for n, (m, _, _) in plan.items() if m == "minmax" and self.momentum > 0)
        full = self.statistics == "all"
        specs, alias = _shared_moments(_moment_specs(model, self.max_moment_dim, planned) if self.second_moments and full else {})
        axes = _weighted_inputs(model, planned) if full else {}
        track = frozenset(names + inputs)
        # an integer layer's input that needs no range of its own (it inherits its producer's
        # qparams through a Reshape, say) is still observed for its channel means and moments
        graph_inputs = {v.name for v in graph.inputs}
        for n in dict.fromkeys(list(axes) + list(specs)):
            if n not in track:
                (inputs if n in graph_inputs else names).append(n)

        proto = base.SerializeToString()
        del base
        options = {"plan": {n: [m, g.levels, g.symmetric, k] for n, (m, g, k) in sorted(plan.items())},
                   "percentile": self.percentile, "momentum": self.momentum, "bins": self.bins,
                   "limit": self.limit, "moments": sorted(specs), "moment_samples": self.moment_samples,
                   "grouped_moment_samples": self.grouped_moment_samples,
                   "means": sorted(axes), "observe": self.observe}
        bounds = saturation_bounds(model) if self.saturation else {}
        if self.saturation:  # (absent when off: cache keys of earlier compiles stay valid)
            options["saturation"] = True
        stats: Statistics | None = None
        cache_state = "off"
        key = ""
        if self.cache:
            digest, _ = data_digest(ctx.calibration, self.limit)
            key = cache_key(proto, digest, options, shared)
            stats = load_cached(self.cache, key)
            cache_state = "hit" if stats is not None else "miss"
        info = {"groups": 0, "runs": 0, "model_runs": 0}
        if stats is None:
            with reuse_sessions():  # the size probe, phase 1 and phase 2 share one session
                stats = self._collect(model, ctx, proto, shared, names, inputs, track, plan, per_sample, specs, axes,
                                      budget, info, bounds)
            if self.cache:
                store_cached(self.cache, key, stats)

        ranges = {n: _clamp(r, bounds.get(n)) for n, r in stats.ranges().items()}
        for i, (n, (m, grid, kind)) in enumerate(plan.items()):
            ctx.progress("choosing ranges", i, len(plan))
            if n not in ranges:
                continue
            lo, hi = ranges[n]
            if n in stats.hist:
                counts = stats.hist[n]
                if m == "mse":
                    ranges[n] = mse_range(counts, lo, hi, grid.levels, grid.symmetric, self.clip_weight,
                                          stats.zeros.get(n, 0))
                elif m == "percentile":
                    ranges[n] = percentile_range(counts, lo, hi, self.percentile, kind or "signed")
                elif m == "entropy":
                    ranges[n] = entropy_range(counts, lo, hi, grid, stats.zeros.get(n, 0))
            elif n in per_sample and stats.per_sample.get(n):
                ranges[n] = moving_average_range(*stats.sample_extremes(n), self.momentum)
        used: dict[str, int] = {}
        for n in ranges:
            used[plan[n][0]] = used.get(plan[n][0], 0) + 1
        # body values observed through their If/Loop node go by their own names again
        ranges = {exposed.get(n, (n, ""))[0]: r for n, r in ranges.items()}
        moments = dict(stats.moments)
        moments.update({node: moments[first] for node, first in alias.items() if first in moments})
        ctx.analysis["input_moments"] = moments
        if self.cache:  # later passes keep their expensive results there too (insert-qdq's GPTQ codes)
            ctx.analysis["cache_dir"] = self.cache
        ctx.analysis["ranges"] = ranges
        if pinned:  # imported ranges override calibrated ones
            check_pinned(pinned, set(ranges) | set(inherited) | pinnable, self.ranges_file)
            ranges.update(pinned)
        for out, src in inherited.items():  # data movement shares its source's qparams, so its range
            if src in ranges and out not in pinned:
                ranges[out] = ranges[src]
        _require_finite(ranges, model.source)
        ctx.analysis["channel_means"] = stats.means()
        ctx.report["calibration"] = {
            "method": method, "overrides": dict(sorted(overrides.items())), "tensors_per_method": dict(sorted(used.items())),
            "percentile": self.percentile if "percentile" in used else None,
            "momentum": self.momentum or None, "samples": stats.samples, "tensors": len(ranges),
            "fixed_qparams_tensors": fixed, "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": peak_rss_mb(children=True) if self.workers > 1 else None,
            "memory_budget_bytes": budget, "groups": info["groups"], "runs": info["runs"],
            "model_runs": info["model_runs"], "cache": cache_state, "workers": self.workers,
            "scheduler": self.scheduler or None, "real_data": bool(getattr(ctx.calibration, "real_data", True)),
            "subgraph_values": len(exposed), "fused_inner_tensors": len(inner), "observe": self.observe,
            "statistics": self.statistics,
            "unobserved_tensors": candidates - len(values) - len(input_values), "lanes": self.lanes,
        }
        return PassResult(False)

    def _collect(self, model: Model, ctx: PassContext, proto: bytes, shared: dict[str, np.ndarray],
                 names: list[str], inputs: list[str], track: frozenset[str],
                 plan: dict[str, tuple[str, RangeTarget, str | None]], per_sample: frozenset[str],
                 specs: dict[str, list[tuple[str, PatchSpec]]], axes: dict[str, int], budget: int,
                 info: dict[str, int], bounds: dict[str, tuple[float, float]]) -> Statistics:
        data = ctx.calibration
        first = next(iter(data), None)
        if first is None:
            raise UserError("pass 'calibrate': the calibration set is empty")
        sizes, probe = tensor_bytes(model, names, first, lane_threads(self.lanes), serialized=proto,
                                    initializers=shared, exposed=list(dict.fromkeys(names)))  # phase 1's session
        groups1 = make_groups(names, sizes, max(1, budget // self.lanes))  # a run per lane in flight
        has_phase2 = any(k is not None for _, _, k in plan.values())
        progress = Progress(ctx.status.enabled and self.workers <= 1 and not self.scheduler,
                            len(groups1) * (2 if has_phase2 else 1), show=ctx.progress)
        # input second moments need no ranges: collected in the first pass, so minmax runs once
        job1 = Job(proto, groups1, inputs, initializers=shared, track=track, per_sample=per_sample,
                   channel_axes=axes, moment_specs=specs, moment_limit=self.moment_samples,
                   grouped_moment_limit=min(self.grouped_moment_samples, self.moment_samples or self.grouped_moment_samples),
                   limit=self.limit, lanes=self.lanes)
        stats, runs = run_sharded(job1, data, workers=self.workers, scheduler=self.scheduler, progress=progress)
        info["groups"], info["runs"], info["model_runs"] = len(groups1), len(groups1), runs + probe
        ranges = stats.ranges()
        hist_spec: dict[str, tuple[str, float, float, int]] = {}
        for n, (_, _, kind) in plan.items():
            if kind is None or n not in ranges:
                continue
            lo, hi = _clamp(ranges[n], bounds.get(n))  # histogram only where the readers' output moves
            lo, hi = (0.0, max(abs(lo), abs(hi))) if kind == "abs" else (lo, hi)
            if hi > lo and range_fits_float32(lo, hi):  # else refused after pinning (_require_finite)
                hist_spec[n] = (kind, lo, hi, self.bins)
        if hist_spec:
            names2 = [n for n in names if n in hist_spec]
            inputs2 = [n for n in inputs if n in hist_spec]
            groups2 = make_groups(names2, sizes, max(1, budget // self.lanes))
            job2 = Job(proto, groups2, inputs2, initializers=shared, hist_spec=hist_spec, limit=self.limit,
                       session_outputs=names, lanes=self.lanes)  # phase 1's model: the same fused graph, the same values
            stats2, runs2 = run_sharded(job2, data, workers=self.workers, scheduler=self.scheduler, progress=progress)
            stats2.samples = 0  # counted in phase 1
            stats.merge(stats2)
            info["groups"] = max(info["groups"], len(groups2))
            info["runs"] += len(groups2)
            info["model_runs"] += runs2
        progress.close()
        return stats


def _require_finite(ranges: dict[str, tuple[float, float]], source: str) -> None:
    """Refuse a tensor whose observed range cannot become a float32 scale (an inf activation,
    or one spanning more than float32's range): quantizing it would give inf/NaN scales, and
    clipping it silently would hide a broken model (docs/design.md, "Input validation")."""
    for name in sorted(ranges):
        lo, hi = ranges[name]
        if not range_fits_float32(lo, hi):
            raise UserError(f"{source}: tensor '{name}' reaches [{lo:.4g}, {hi:.4g}] on the calibration data, which "
                            "no float32 scale covers (an overflowing activation?); fix the model or pin the tensor's "
                            "range with --import-ranges")


def _bounded_parallelism(p: "Calibrate", data: Any) -> "Calibrate":
    """The pass with ``lanes`` and ``workers`` clamped to the cores and to the samples: more
    lanes or processes than either only costs memory and start-up (``lanes=100000`` would
    build that many onnxruntime threads). Counts at most ``cores`` samples, so a large
    calibration folder is not read here."""
    cores = os.cpu_count() or 1
    samples = sum(1 for _ in itertools.islice(iter(data), max(p.lanes, p.workers, cores)))
    lanes, workers = max(1, min(p.lanes, cores, samples)), max(1, min(p.workers, cores, samples))
    if (lanes, workers) == (p.lanes, p.workers):
        return p
    return dataclasses.replace(p, lanes=lanes, workers=workers)
