"""The calibration entry point: :func:`calibrate` runs the float model over the samples and
returns every range and statistic later passes need, with the report section.

Why here and not in the pass: calibration is a library (``qcompiler.compile``, the calibrate
pass and the weight-only pass's :func:`input_moments` use it); the pass only converts its
options and stores the :class:`CalibrationResult`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..ir import Model
from ..plan import Plan
from ..quant import range_fits_float32
from ..rangefile import check_pinned, read_ranges
from .cache import cache_key, data_digest, load_cached, store_cached
from .distributed import run_sharded
from .engine import Job, Progress, lane_threads, make_groups, peak_rss_mb, reuse_sessions, tensor_bytes
from .methods import RangeTarget, abs_from_signed, entropy_range, histogram_kind, moving_average_range, mse_range, \
    percentile_range, serves
from .options import CalibrationOptions, check_method, parse_memory
from .selection import (MethodPlan, Observed, clamp, kernel_only, method_plan, moment_specs, observe_bodies,
                        saturation_bounds, shared_moments, weighted_inputs, wide_methods, wide_qtypes)
from .stats import Statistics

__all__ = ["calibrate", "CalibrationResult", "input_moments", "method_range"]

Show = Callable[[str], None]


@dataclass
class CalibrationResult:
    """What calibration hands to later passes: ``ranges`` (tensor -> (lo, hi), pinned and
    inherited ones included), ``moments`` (layer -> input second moments, GPTQ rounding),
    ``channel_means`` (activation -> per-channel mean, bias correction), ``report`` (the
    report's ``calibration`` section, written as is) and ``wide_ranges`` (the ranges of the values
    an int16-activations override puts on the 16-bit grid, chosen for that grid)."""

    ranges: dict[str, tuple[float, float]]
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    channel_means: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    wide_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


def calibrate(model: Model, data: Any, plan: Plan, options: CalibrationOptions, *, target: Any,
              groups: Mapping[str, str] | None = None, progress: Show | None = None,
              full_plan: Plan | None = None) -> CalibrationResult:
    """Observe the activation ranges of ``model`` (float, after fusions) on ``data`` (a
    :class:`CalibrationData`, or None when ``options.ranges_file`` pins every tensor).

    ``plan`` (:func:`qcompiler.plan.plan_for`, planned as if every value had a range) says
    which values are quantized and on which QType; ``target`` gives the default method and
    the ops with fixed qparams; ``groups`` (head -> fused activation, group-activations) the
    values never observed; ``progress`` draws a status line (None: silent). ``full_plan``: the
    plan without the compile's plan overrides, whose values are observed too (per tensor the
    statistics are the same, and the observed set, hence the cache key, is the plain compile's:
    an accuracy-budget search's recompiles all hit the cache)."""
    method = check_method(options.method or target.calibration_method, "method")
    overrides = options.override_map
    on_ranges = options.range_override_map  # read the statistics ``overrides`` collect (_collection_plan)
    budget = parse_memory(options.memory)
    pinned = read_ranges(options.ranges_file) if options.ranges_file else {}
    seen = Observed(model, plan, target, groups or {}, options.observed, full_plan)
    if data is None and pinned:  # every tensor pinned: no data, no model runs
        return _pinned_only(seen, pinned, options.ranges_file)
    if data is None:
        raise UserError("pass 'calibrate' needs calibration data (--calibration PATH)")
    options = _bounded_parallelism(options, data)
    start = time.perf_counter()
    known = {n.name for n in model.graph.nodes} | {n.op for n in model.graph.nodes} | seen.graph_inputs
    for key in list(overrides) + list(on_ranges):
        if key not in known:
            raise UserError(f"pass 'calibrate': override key '{key}' names no node, op type or graph input "
                            f"of the model")
    names, inputs = list(seen.values), list(seen.inputs)
    merged = {**overrides, **on_ranges}
    methods, qtypes, fixed = method_plan(model, plan, target, seen, merged, method, full_plan)
    shared: dict[str, np.ndarray] = {}  # weights the sessions read from the IR, not copied
    base, exposed = observe_bodies(model, model.to_proto(shared=shared, share=kernel_only), data, target, methods,
                                   merged, method, shared, qtypes, seen.keep)
    names += list(exposed)
    collect = _collection_plan(model, plan, target, seen, method, full_plan, methods, overrides, on_ranges,
                               options.momentum)
    per_sample = frozenset(n for n, (m, _, _) in collect.items() if m == "minmax" and options.momentum > 0)
    full = options.statistics == "all"
    specs, alias = shared_moments(moment_specs(model, options.max_moment_dim, seen.integer)
                                  if options.second_moments and full else {})
    axes = weighted_inputs(model, seen.integer) if full else {}
    track = frozenset(names + inputs)
    # an integer layer's input that needs no range of its own (it inherits its producer's
    # qparams through a Reshape, say) is still observed for its channel means and moments
    graph_inputs = {v.name for v in model.graph.inputs}
    for n in dict.fromkeys(list(axes) + list(specs)):
        if n not in track:
            (inputs if n in graph_inputs else names).append(n)
    proto = base.SerializeToString()
    del base
    keyed = {"plan": {n: [m, g.levels, g.symmetric, k] for n, (m, g, k) in sorted(collect.items())},
             "percentile": options.percentile, "momentum": options.momentum, "bins": options.bins,
             "limit": options.limit, "moments": sorted(specs), "moment_samples": options.moment_samples,
             "grouped_moment_samples": options.grouped_moment_samples,
             "means": sorted(axes), "observe": options.observed}
    bounds = saturation_bounds(model) if options.saturation else {}
    if options.saturation:  # (absent when off: cache keys of earlier compiles stay valid)
        keyed["saturation"] = True
    stats: Statistics | None = None
    cache_state, key = "off", ""
    if options.cache:
        key = cache_key(proto, data_digest(data, options.limit)[0], keyed, shared)
        stats = load_cached(options.cache, key)
        cache_state = "hit" if stats is not None else "miss"
    info = {"groups": 0, "runs": 0, "model_runs": 0}
    if stats is None:
        with reuse_sessions():  # the size probe, phase 1 and phase 2 share one session
            stats = _collect(model, data, options, proto, shared, names, inputs, track, collect, per_sample, specs,
                             axes, budget, info, bounds, progress)
        if options.cache:
            store_cached(options.cache, key, stats)
    ranges, used = _choose_ranges(stats, methods, per_sample, bounds, options, progress)
    wide_plan, wide_src = wide_methods(methods, wide_qtypes(model, target, plan), seen.inherited)
    if wide_plan:  # the same statistics, each range chosen again for the 16-bit grid
        chosen = _choose_ranges(stats, wide_plan, per_sample, bounds, options, None)[0]
        wide = {n: pinned.get(n, pinned.get(src, chosen[src])) for n, src in wide_src.items() if src in chosen}
    else:
        wide = {}
    ranges = {exposed.get(n, (n, ""))[0]: r for n, r in ranges.items()}  # body values by their own names
    moments = dict(stats.moments)
    moments.update({node: moments[first] for node, first in alias.items() if first in moments})
    if pinned:  # imported ranges override calibrated ones
        check_pinned(pinned, set(ranges) | set(seen.inherited) | seen.pinnable, options.ranges_file)
        ranges.update(pinned)
    for out, src in seen.inherited.items():  # data movement shares its source's qparams, so its range
        if src in ranges and out not in pinned:
            ranges[out] = ranges[src]
    _require_finite(ranges, model.source)
    report = {
        "method": method, "overrides": dict(sorted(overrides.items())), "tensors_per_method": dict(sorted(used.items())),
        "percentile": options.percentile if "percentile" in used else None,
        "momentum": options.momentum or None, "samples": stats.samples, "tensors": len(ranges),
        "fixed_qparams_tensors": fixed, "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": peak_rss_mb(children=True) if options.workers > 1 else None,
        "memory_budget_bytes": budget, "groups": info["groups"], "runs": info["runs"],
        "model_runs": info["model_runs"], "cache": cache_state, **({"cache_key": key} if key else {}),
        "workers": options.workers,
        "scheduler": options.scheduler or None, "real_data": bool(getattr(data, "real_data", True)),
        "subgraph_values": len(exposed), "fused_inner_tensors": len(seen.inner), "observe": options.observed,
        "statistics": options.statistics,
        **({"range_overrides": dict(sorted(on_ranges.items()))} if on_ranges else {}),
        "unobserved_tensors": seen.candidates - len(seen.values) - len(seen.inputs), "lanes": options.lanes,
    }
    return CalibrationResult(ranges, moments, stats.means(), report, wide)


def _collection_plan(model: Model, plan: Plan, target: Any, seen: Observed, method: str, full_plan: Plan | None,
                     methods: MethodPlan, overrides: Mapping[str, str], on_ranges: Mapping[str, str],
                     momentum: float) -> MethodPlan:
    """What is collected per tensor, as the method plan the statistics are keyed by: with
    ``range_overrides`` (``on_ranges``), a tensor whose method they change collects (and is
    keyed) as under ``overrides`` alone wherever those statistics serve its new method
    (:func:`.methods.serves`), so a per-tensor method change (the accuracy budget's method
    trial) hits the statistics cache; elsewhere it collects for its own method. Without them
    this is ``methods`` itself."""
    if not on_ranges:
        return methods
    plain, _, _ = method_plan(model, plan, target, seen, overrides, method, full_plan)
    out: MethodPlan = {}
    for n, (m, grid, kind) in methods.items():
        m0, grid0, kind0 = plain.get(n, (m, grid, kind))
        moving = m == "minmax" and momentum > 0  # per-sample extremes: its own collection
        out[n] = (m0, grid0, kind0) if m != m0 and not moving and serves(kind0, m, grid) else (m, grid, kind)
    return out


def method_range(stats: Statistics, name: str, method: str, grid: RangeTarget, lo: float, hi: float,
                 options: CalibrationOptions, kind: str | None = None) -> tuple[float, float]:
    """``name``'s range by ``method`` on ``grid`` from its statistics, starting from its
    (clamped) min/max ``lo, hi``: what calibration chooses, and what the accuracy budget's
    method trial compares. It reads the histogram of ``kind`` (default: the one ``method``
    reads on ``grid``); an abs histogram is derived from a collected signed one when that is
    what the statistics hold (:func:`.methods.abs_from_signed`)."""
    if method == "minmax" or name not in stats.hist:
        return lo, hi
    have = stats.hist_spec[name][0]
    need = kind or histogram_kind(method, grid) or have
    counts = stats.hist[name]
    if need == "abs" and have == "signed":
        counts = abs_from_signed(counts, lo, hi, stats.zeros.get(name, 0))
    if method == "mse":
        return mse_range(counts, lo, hi, grid.levels, grid.symmetric, options.clip_weight, stats.zeros.get(name, 0))
    if method == "percentile":
        return percentile_range(counts, lo, hi, options.percentile, need)
    return entropy_range(counts, lo, hi, grid, stats.zeros.get(name, 0))


def _choose_ranges(stats: Statistics, methods: MethodPlan, per_sample: frozenset[str],
                   bounds: dict[str, tuple[float, float]], options: CalibrationOptions,
                   progress: Show | None) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Each observed tensor's range by its method, and how many tensors each method ranged."""
    ranges = {n: clamp(r, bounds.get(n)) for n, r in stats.ranges().items()}
    for i, (n, (m, grid, kind)) in enumerate(methods.items()):
        if progress is not None:
            progress(f"choosing ranges {i}/{len(methods)}")
        if n not in ranges:
            continue
        if n in stats.hist:
            ranges[n] = method_range(stats, n, m, grid, *ranges[n], options, kind)
        elif n in per_sample and stats.per_sample.get(n):
            ranges[n] = moving_average_range(*stats.sample_extremes(n), options.momentum)
    used: dict[str, int] = {}
    for n in ranges:
        if n in methods:
            used[methods[n][0]] = used.get(methods[n][0], 0) + 1
    return ranges, used


def _pinned_only(seen: Observed, pinned: dict[str, tuple[float, float]], path: str) -> CalibrationResult:
    """No calibration data but a range file: accept it only if it pins every float tensor
    calibrate would observe (then no model run is needed)."""
    wanted = list(seen.inputs) + list(seen.values)
    check_pinned(pinned, seen.pinnable | set(seen.inherited), path)  # some unused
    known = [n for n in wanted if n not in pinned]
    if known:
        raise UserError(f"pass 'calibrate' needs calibration data (--calibration PATH): range file {path} "
                        f"does not pin tensor '{known[0]}' ({len(known)} tensors unpinned)")
    ranges = {n: pinned[n] for n in sorted(set(wanted))}
    for out, src in seen.inherited.items():
        if src in ranges:
            ranges[out] = pinned.get(out, ranges[src])
    report = {"method": "pinned", "samples": 0, "tensors": len(set(wanted)), "seconds": 0.0}
    return CalibrationResult(dict(sorted(ranges.items())), report=report)


def _collect(model: Model, data: Any, options: CalibrationOptions, proto: bytes, shared: dict[str, np.ndarray],
             names: list[str], inputs: list[str], track: frozenset[str], methods: MethodPlan,
             per_sample: frozenset[str], specs: dict[str, Any], axes: dict[str, int], budget: int,
             info: dict[str, int], bounds: dict[str, tuple[float, float]], show: Show | None) -> Statistics:
    """Phase 1 (min/max, per-sample extremes, channel means, input moments) and phase 2
    (histograms over the phase-1 ranges, for the methods that need them)."""
    first = next(iter(data), None)
    if first is None:
        raise UserError("pass 'calibrate': the calibration set is empty")
    lanes, workers, scheduler, limit = options.lanes, options.workers, options.scheduler, options.limit
    sizes, probe = tensor_bytes(model, names, first, lane_threads(lanes), serialized=proto,
                                initializers=shared, exposed=list(dict.fromkeys(names)))  # phase 1's session
    groups1 = make_groups(names, sizes, max(1, budget // lanes))  # a run per lane in flight
    has_phase2 = any(k is not None for _, _, k in methods.values())
    progress = Progress(show is not None and workers <= 1 and not scheduler,
                        len(groups1) * (2 if has_phase2 else 1), show=show)
    # input second moments need no ranges: collected in the first pass, so minmax runs once
    job1 = Job(proto, groups1, inputs, initializers=shared, track=track, per_sample=per_sample,
               channel_axes=axes, moment_specs=specs, moment_limit=options.moment_samples,
               grouped_moment_limit=min(options.grouped_moment_samples,
                                        options.moment_samples or options.grouped_moment_samples),
               limit=limit, lanes=lanes)
    stats, runs = run_sharded(job1, data, workers=workers, scheduler=scheduler, progress=progress)
    info["groups"], info["runs"], info["model_runs"] = len(groups1), len(groups1), runs + probe
    ranges = stats.ranges()
    hist_spec: dict[str, tuple[str, float, float, int]] = {}
    for n, (_, _, kind) in methods.items():
        if kind is None or n not in ranges:
            continue
        lo, hi = clamp(ranges[n], bounds.get(n))  # histogram only where the readers' output moves
        lo, hi = (0.0, max(abs(lo), abs(hi))) if kind == "abs" else (lo, hi)
        if hi > lo and range_fits_float32(lo, hi):  # else refused after pinning (_require_finite)
            hist_spec[n] = (kind, lo, hi, options.bins)
    if hist_spec:
        names2 = [n for n in names if n in hist_spec]
        inputs2 = [n for n in inputs if n in hist_spec]
        groups2 = make_groups(names2, sizes, max(1, budget // lanes))
        job2 = Job(proto, groups2, inputs2, initializers=shared, hist_spec=hist_spec, limit=limit,
                   session_outputs=names, lanes=lanes)  # phase 1's model: the same fused graph, the same values
        stats2, runs2 = run_sharded(job2, data, workers=workers, scheduler=scheduler, progress=progress)
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


def _bounded_parallelism(options: CalibrationOptions, data: Any) -> CalibrationOptions:
    """``options`` with ``lanes`` and ``workers`` clamped to the cores and to the samples: more
    lanes or processes than either only costs memory and start-up (``lanes=100000`` would
    build that many onnxruntime threads). Counts at most ``cores`` samples, so a large
    calibration folder is not read here."""
    cores = os.cpu_count() or 1
    samples = sum(1 for _ in itertools.islice(iter(data), max(options.lanes, options.workers, cores)))
    lanes = max(1, min(options.lanes, cores, samples))
    workers = max(1, min(options.workers, cores, samples))
    if (lanes, workers) == (options.lanes, options.workers):
        return options
    return dataclasses.replace(options, lanes=lanes, workers=workers)


def input_moments(model: Model, data: Any, nodes: set[str], *, samples: int = 16, max_dim: int = 8192,
                  lanes: int = 2) -> dict[str, np.ndarray]:
    """The input second moments (sum of x x^T, [1, K, K]) of the MatMul/Gemm/Conv ``nodes``
    over the first ``samples`` samples of ``data``: the statistics GPTQ rounding reads, for a
    pass that needs them without ranges (weight-only quantization). Node name -> moments."""
    if data is None:
        raise UserError("input statistics need calibration data (--calibration PATH)")
    specs, alias = shared_moments(moment_specs(model, max_dim, nodes))
    if not specs:
        return {}
    shared: dict[str, np.ndarray] = {}
    proto = model.to_proto(shared=shared, share=kernel_only).SerializeToString()
    graph_inputs = {v.name for v in model.graph.inputs}
    names = [n for n in specs if n not in graph_inputs]
    inputs = [n for n in specs if n in graph_inputs]
    job = Job(proto, [names] if names else [], inputs, initializers=shared, moment_specs=specs,
              moment_limit=samples, grouped_moment_limit=samples, moments_only=True, lanes=lanes)
    stats, _ = run_sharded(job, data)
    moments = dict(stats.moments)
    moments.update({node: moments[first] for node, first in alias.items() if first in moments})
    return moments
