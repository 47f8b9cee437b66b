"""The accuracy budget (``compile --accuracy 'cosine>=0.99'``): the fewest, cheapest layers
moved up their target's fallback list until the compiled model meets the budget.

Why this shape: the plan (``qcompiler.plan``) is the one place that decides what runs in
integer, so every move is a plan override and the compiled model is an ordinary compile with
``plan_overrides``. The search:

1. compiles the target's full-integer plan and measures the budget on the eval samples (the
   report's fidelity samples: ``eval_data`` or the held-out calibration slice);
2. if it fails, ranks the integer layers by sensitivity (``qcompiler.layer_sensitivity``: the
   output SQNR with only that layer quantized), turns each into the output noise it adds
   (``10 ** (-SQNR / 10)``, noise powers of independent layers add) divided by the estimated
   cost of its first fallback (``Target.fallback_cost``), and orders by that, ties by graph order;
3. predicts, on the analysis's fake-quant model (no recompile), the shortest prefix of that order
   that meets the budget (from the sensitivities' guess, galloping to a bisection), with the
   predicted noise scaled by how much noisier the
   real integer compile was than its fake-quant image (``_Predictor``); recompiles with that
   prefix moved and measures for real; while the real figure still fails, the scale is refit on
   that compile and the prefix predicted again (at least a quarter more steps; half more when
   nothing is predicted to meet it), until the budget holds or no layer is left (then
   ``UserError``: nothing written; a target's default budget instead keeps the best compile,
   ``met: false``, and a warning); when a grown prefix holds 3 or more steps past the last short
   one, one more compile tries the prefix halfway back and keeps it if it holds.

Deterministic: the order is a function of the measured numbers and graph order; onnxruntime
runs Q/DQ as float ops on every CPU (``qcompiler.fidelity``). Calibration statistics are reused
across the recompiles through the calibration cache (a temporary one unless the user gave one):
calibrate observes the full-integer plan's values under any overrides, so the key stays the same.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .budget_methods import methods_note, try_methods
from .errors import UserError
from .plan import OVERRIDES

__all__ = ["Budget", "parse_budget", "METRICS", "search", "SENSITIVITY_SAMPLES"]

#: the built-in metrics: worst output cosine, worst output SQNR (dB), worst classifier top-1 agreement
METRICS = ("cosine", "sqnr", "top1")
#: eval samples the sensitivity ranking and the prediction run on (the real check uses all)
SENSITIVITY_SAMPLES = 16
# a target's default budget may move at most this share of the movable layers: it keeps a
# quantized model quantized (PP-OCR's default cosine>=0.99 would otherwise move every layer to
# float); an explicit --accuracy has no cap. A half, not a quarter: PP-OCR's default compile with
# 80 calibration images reached 10.0 dB SQNR with 32 layers moved, 12.0 dB with 64 (benchmarks.md)
DEFAULT_MAX_MOVED = 0.5

Outputs = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Budget:
    """``metric >= threshold``; ``func`` is a user metric ``func(float_outputs, quant_outputs)``
    over lists of output dicts (one per run)."""

    metric: str
    threshold: float
    text: str
    func: Callable[[Outputs, Outputs], float] | None = None

    def holds(self, value: float | None) -> bool:
        return value is not None and value >= self.threshold


_FORM = re.compile(r"^\s*([A-Za-z0-9_]*)\s*>=\s*([-+0-9.eE]+)\s*$")


def parse_budget(text: Any, metric: Callable[[Outputs, Outputs], float] | None = None,
                 flag: str = "--accuracy") -> Budget:
    """``'cosine>=0.99'``, ``'sqnr>=20'``, ``'top1>=0.95'``; with ``metric`` (a callable) the
    threshold alone (a number or ``'>=V'``/``'metric>=V'``). Bad text -> one-line UserError."""
    if metric is not None:
        if not callable(metric):
            raise UserError(f"metric={metric!r}: must be a callable (float_outputs, quant_outputs) -> float")
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            value = float(text)
        else:
            m = _FORM.match(str(text)) if text is not None else None
            if m is None or m.group(1) not in ("", "metric"):
                raise UserError(f"accuracy={text!r}: with metric=callable give a threshold (0.9 or 'metric>=0.9')")
            value = _number(m.group(2), text, flag)
        return Budget("metric", value, f"metric>={value:g}", metric)
    m = _FORM.match(str(text))
    if m is None or m.group(1) not in METRICS:
        raise UserError(f"{flag} {text!r}: expected METRIC>=VALUE with METRIC one of {', '.join(METRICS)} "
                        "(e.g. 'cosine>=0.99', 'sqnr>=20', 'top1>=0.95')")
    value = _number(m.group(2), text, flag)
    if m.group(1) in ("cosine", "top1") and not -1.0 <= value <= 1.0:
        raise UserError(f"{flag} {text!r}: {m.group(1)} is at most 1")
    return Budget(m.group(1), value, f"{m.group(1)}>={value:g}")


def _number(s: str, text: Any, flag: str) -> float:
    try:
        value = float(s)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{flag} {text!r}: '{s}' is not a finite number")
    return value


def _value(budget: Budget, outputs: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The budget's figure from a fidelity result (per output: cosine, sqnr_db, top1_agreement):
    the worst output. SQNR None (exact) counts as +inf."""
    key = {"cosine": "cosine", "sqnr": "sqnr_db", "top1": "top1_agreement"}[budget.metric]
    vals = [o.get(key) for o in outputs.values() if key in o]
    if not vals:
        return None
    return min(math.inf if v is None else float(v) for v in vals)


class _Measure:
    """The budget's figure of a compiled model on the eval samples."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.float_proto: Any = None  # loaded once, for a user metric

    def compiled(self, result: Any) -> float | None:
        if self.budget.func is not None:
            from .fidelity import run_outputs

            load_float, samples, as_written = result._eval
            if self.float_proto is None:
                self.float_proto = load_float()
            return float(self.budget.func(*run_outputs(self.float_proto, result.proto, samples,
                                                       as_written=as_written)))
        value = _value(self.budget, result.report["fidelity"].get("outputs", {}))
        if value is None:
            raise UserError(f"--accuracy {self.budget.text}: the model has no classifier-shaped output ([N, C]) "
                            "for top-1 agreement; use cosine or sqnr")
        return value

    def predicted(self, setup: Any, on: set[str]) -> float | None:
        """The figure on the fake-quant model with the layers in ``on`` quantized."""
        return self.predicted_all(setup, [on])[0]

    def predicted_all(self, setup: Any, ons: Sequence[set[str]]) -> list[float | None]:
        """``predicted`` for each set of layers, side by side (``AnalysisSetup.fidelities``)."""
        if self.budget.func is None:
            return [_value(self.budget, fid.result()) for fid in setup.fidelities(ons)]
        return [float(self.budget.func(setup.reference, [setup.model.run(feed, on) for feed in setup.batches]))
                for on in ons]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else "inf" if math.isinf(v) else f"{v:.4g}"


def search(compile_with: Callable[..., Any], budget: Budget, target: Any, *,
           source: str, overrides: Mapping[str, tuple[str, str]] | None = None, cache: str | None = None,
           explicit: bool = True, calibration: Any = None) -> Any:
    """Run the search (module text). ``compile_with(plan_overrides, calibration_cache, fresh=False)``
    is one ordinary compile returning a ``CompileResult`` (``fresh``: past the whole-build
    cache). Returns the result meeting the budget, with
    ``report["accuracy"]``. ``explicit``: the user asked (an unmeasurable budget is an error);
    otherwise (the target's default) it is skipped and the report says why."""
    start = time.perf_counter()
    base = dict(overrides or {})
    with tempfile.TemporaryDirectory(prefix="qcompiler-budget-") as tmp:
        cache_dir = cache or tmp
        # the target's default budget usually holds: its first compile is the plain compile
        first = compile_with(base, cache_dir if explicit else cache)
        compiles = 1
        section: dict[str, Any] = {"budget": budget.text, "source": source}
        skip = _unmeasurable(first, explicit, budget)
        if skip:
            first.report["accuracy"] = dict(section, status=skip)
            return first
        if first._eval is None and budget.func is not None:  # a build-cache hit carries no eval samples
            first = compile_with(base, cache_dir if explicit else cache, True)
        measure = _Measure(budget)
        v0 = measure.compiled(first)
        before = first.report["fidelity"].get("outputs")
        section.update(value_before=v0, fidelity_before=before)
        if budget.holds(v0):
            first.report["accuracy"] = _finish(section, first, v0, [], compiles, start, True)
            return first
        if first._eval is None:  # a build-cache hit: recompile (from cached statistics) for the samples
            first = compile_with(base, cache_dir if explicit else cache, True)

        def order(reuse: tuple[Any, list[Any]] | None = None
                  ) -> tuple[list[dict[str, Any]], Any, list[Any], _Predictor, float]:
            ranked, setup, sens = _rank(first, target, base, reuse)
            if not explicit:
                ranked = ranked[:max(1, int(len(ranked) * DEFAULT_MAX_MOVED))]
            ranked = _moves(ranked)
            pred = _Predictor(ranked, setup, measure)
            return ranked, setup, sens, pred, pred.scale(v0, 0)  # scale: real noise / fake-quant noise

        ranked, setup, sens, pred, scale = order()
        # per-layer calibration methods before any layer leaves integer (qcompiler.budget_methods)
        tried = try_methods(compile_with, first, v0, setup, sens, measure, target, cache_dir, calibration, base,
                            pred.shortest(1, scale))
        section["methods"], section["method_trial"] = tried.rows, tried.info
        compiles += tried.compiles
        if tried.kept:
            compile_with, first, v0 = tried.compile_with, tried.result, tried.value
            if budget.holds(v0):
                first.report["accuracy"] = _finish(section, first, v0, [], compiles, start, True)
                return first
            ranked, setup, sens, pred, scale = order((tried.setup, tried.resensed(sens)))
        moved = ranked[:pred.shortest(1, scale) or len(ranked)]
        fit = _Fit(ranked, budget, v0)
        best = (v0, first, [])
        failed = 0  # the longest prefix a real compile measured short of the budget

        def build(steps: Sequence[dict[str, Any]]) -> tuple[Any, float | None]:
            ov = dict(base)
            for r in _effective(steps):
                # a fallback the plan builds as itself, else float (host-float: the same graph, costed apart)
                ov[r["node"]] = (r["to"] if r["to"] in OVERRIDES else "float", r["why"])
            res = compile_with(ov, cache_dir)
            if res._eval is None and budget.func is not None:
                res = compile_with(ov, cache_dir, True)
            return res, measure.compiled(res)

        while True:
            result, value = build(moved)
            compiles += 1
            if value is not None and (best[0] is None or value > best[0]):
                best = (value, result, moved)
            if budget.holds(value) or len(moved) >= len(ranked):
                if budget.holds(value) and failed and len(moved) - failed >= 3:
                    # one trim: the prefix halfway back to the last short one, if it holds too
                    # (a step past the need costs latency: MiniLM 16 moved at 0.60x, 13 at 0.54x)
                    mid = ranked[:(failed + len(moved)) // 2]
                    res_mid, v_mid = build(mid)
                    compiles += 1
                    if budget.holds(v_mid):
                        result, value, moved = res_mid, v_mid, mid
                break
            failed = len(moved)
            # fit the measured compiles (noise vs the sensitivity noise still in integer) and
            # take the prefix the fit says meets it: at least a quarter more steps (half more
            # when the fit says none does)
            n = len(moved)
            nxt = fit.add(n, value).shortest(n + 1)
            moved = ranked[:n + max(1, n // 2)] if nxt is None else ranked[:max(nxt, n + max(1, n // 4))]
        if not budget.holds(value) and not explicit:  # a default budget never fails a compile
            value, result, moved = best
            result.report["accuracy"] = _finish(section, result, value, _effective(moved), compiles, start, False,
                                                ranking=[r["layer"] for r in sens[:10]])
            return result
        if not budget.holds(value):
            raise UserError(f"--accuracy {budget.text}: not met; best {budget.metric} {_fmt(max(value, v0))} "
                            f"(integer plan: {_fmt(v0)}) with every one of {len(_effective(ranked))} movable layers "
                            f"on its last fallback after {compiles} compiles; nothing written")
        result.report["accuracy"] = _finish(section, result, value, _effective(moved), compiles, start, True,
                                            ranking=[r["layer"] for r in sens[:10]])
        return result


def _unmeasurable(result: Any, explicit: bool, budget: Budget) -> str | None:
    fid = result.report.get("fidelity", {})
    if "outputs" not in fid:
        why = fid.get("status", "fidelity not measured")
        if explicit:
            raise UserError(f"--accuracy {budget.text}: cannot be measured: {why} (--accuracy needs --eval-data or "
                            "10 or more real calibration samples)")
        return f"default budget not checked: {why}"
    if not explicit and result.report.get("mode") != "static":
        return f"default budget not checked: it applies to static mode (this compile: {result.report.get('mode')})"
    return None


def _rank(result: Any, target: Any, base: Mapping[str, Any], reuse: tuple[Any, list[Any]] | None = None
          ) -> tuple[list[dict[str, Any]], Any, list[Any]]:
    """The movable layers, best sensitivity gain per cost first, each with its fallback, cost
    and why; plus the analysis setup (for predictions) and the sensitivity rows (``reuse``:
    those two as given)."""
    from .analysis import layer_sensitivity, setup_analysis

    if reuse is None:
        load_float, samples, _ = result._eval
        setup = setup_analysis(load_float(), result.proto, samples, target=target, limit=SENSITIVITY_SAMPLES)
        sens = layer_sensitivity(setup=setup)
    else:
        setup, sens = reuse
    rows = []
    for worst, r in enumerate(sens):
        fallbacks = setup.fallbacks.get(r["layer"], target.fallbacks(r["op"]))
        if r["layer"] in base or not fallbacks:
            continue
        cost = target.fallback_cost(r["op"], fallbacks[0])
        noise = 0.0 if r["score"] is None else 10.0 ** (-r["score"] / 10.0)
        why = (f"accuracy budget: sensitivity rank {worst + 1} (output SQNR {_fmt(r['score'])} dB with only this "
               f"layer in integer)")
        rows.append({"node": r["layer"], "layer": r["layer"], "op": r["op"], "index": r["index"],
                     "fallbacks": fallbacks, "sensitivity_db": r["score"], "noise": noise,
                     "gain_per_cost": noise / cost, "why": why})
    rows.sort(key=lambda x: (-x["gain_per_cost"], x["index"]))
    # integer nodes that are no analysis layer (a Concat, a node on integer data), and float
    # nodes the compile still altered: no sensitivity of their own, so they move last, in order
    ops = {n.name: n.op_type for n in setup.model.proto.graph.node}
    have = {r["node"] for r in rows} | set(base) | {layer.name for layer in setup.layers}
    for i, (name, how) in enumerate(_touched(result, setup.integer).items()):
        fallbacks = setup.fallbacks.get(name, target.fallbacks(ops.get(name, "")))
        if name in have or how.startswith("fused into") or name not in ops or not fallbacks:
            continue
        rows.append({"node": name, "layer": name, "op": ops[name], "index": len(setup.layers) + i,
                     "fallbacks": fallbacks, "sensitivity_db": None, "noise": 0.0, "gain_per_cost": 0.0,
                     "why": f"accuracy budget: integer node without a sensitivity of its own ({how}), moved after "
                            f"the ranked layers"})
    for r in rows:
        r["costs"] = [target.fallback_cost(r["op"], f) for f in r["fallbacks"]]
    return rows, setup, sens


def _touched(result: Any, integer: Mapping[str, str]) -> dict[str, str]:
    """Every node the compile changed from the float model, node -> how: the analysis's integer
    layers, the other nodes the compile runs in integer (``report["lowered"]``: QLinearConcat,
    which the analysis maps to no layer), then float ops whose weight the compile stores as
    integers (compress-weights; an override keeps them float). With all of them moved the
    compile is the float model."""
    out = dict(integer)
    for name in result.report.get("lowered", []):
        out.setdefault(name, "runs in integer")
    dq = {o for n in result.proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in result.proto.graph.node:
        if n.name not in out and len(n.input) > 1 and n.input[1] in dq:
            out[n.name] = "float op on an integer-stored weight"
    return out


def _moves(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's steps in order: every ranked layer to its first fallback (rank order), then
    every layer with a second one to that, and so on (static -> dynamic int8 for all before any
    -> float). A prefix of the steps is a state: each layer at its last step in it."""
    out = []
    for level in range(max((len(r["fallbacks"]) for r in rows), default=0)):
        for r in rows:
            if level < len(r["fallbacks"]):
                to, cost = r["fallbacks"][level], r["costs"][level]
                out.append(dict(r, to=to, cost=cost, noise=r["noise"] if level == 0 else 0.0,
                                why=f"{r['why']}; fallback '{to}' (choice {level + 1} of "
                                f"{len(r['fallbacks'])}), estimated cost {cost:g}x its integer kernel"))
    return out


def _effective(moved: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each moved layer once, at its last step in ``moved`` (first-move order)."""
    last: dict[str, dict[str, Any]] = {}
    for r in moved:
        last[r["node"]] = r
    return list(last.values())


def _noise(metric: str, v: float | None) -> float | None:
    """The budget figure as an output noise power that adds across layers (cosine: 1 - cos;
    sqnr: 10^(-dB/10)); None for a metric without one (top-1, a user metric)."""
    if v is None or metric not in ("cosine", "sqnr"):
        return None
    if metric == "cosine":
        return max(1.0 - v, 0.0)
    return 0.0 if math.isinf(v) else 10.0 ** (-v / 10.0)


def _from_noise(metric: str, n: float) -> float:
    if metric == "cosine":
        return 1.0 - n
    return math.inf if n <= 0 else -10.0 * math.log10(n)


class _Predictor:
    """The fake-quant prediction of the budget figure after the first ``n`` steps (memoised).
    The fake-quant model has no dynamic int8: a layer moved anywhere counts as float
    (optimistic for a dynamic step; the real compiles correct it through ``scale``)."""

    def __init__(self, steps: Sequence[dict[str, Any]], setup: Any, measure: _Measure) -> None:
        self.steps, self.setup, self.measure = steps, setup, measure
        self.memo: dict[int, float | None] = {}

    def value(self, n: int) -> float | None:
        self.prefetch([n])
        return self.memo[n]

    def prefetch(self, ns: Sequence[int]) -> None:
        """Predict the prefixes ``ns`` not yet predicted, side by side."""
        todo = sorted({n for n in ns if 0 <= n <= len(self.steps) and n not in self.memo})
        layers = {layer.name for layer in self.setup.layers}
        ons = [layers - {r["node"] for r in self.steps[:n]} for n in todo]
        self.memo.update(zip(todo, self.measure.predicted_all(self.setup, ons)))

    def scale(self, measured: float | None, n: int) -> float:
        """measured noise / predicted noise after ``n`` steps (1 when the metric has no noise
        form), kept within [0.25, 100]."""
        metric = self.measure.budget.metric
        real, fake = _noise(metric, measured), _noise(metric, self.value(n))
        if real is None or fake is None or fake <= 0 or real <= 0:
            return 1.0
        return min(max(real / fake, 0.25), 100.0)

    def holds(self, n: int, scale: float) -> bool:
        v, metric = self.value(n), self.measure.budget.metric
        noise = _noise(metric, v)
        return self.measure.budget.holds(v if noise is None else _from_noise(metric, noise * scale))

    def shortest(self, lo: int, scale: float) -> int | None:
        """The shortest prefix of at least ``lo`` steps predicted (noise times ``scale``) to meet
        the budget (the prediction taken as monotone in the number of steps: each step moves one
        more layer off integer); None when even all steps are not. Each probe is a fake-quant
        run, so the search starts at the prefix the sensitivities say is enough (``_guess``) and
        gallops from there to a bisection: two runs (one round on two cores) when the guess is
        right, instead of a bisection's seven on 60 layers."""
        n = len(self.steps)
        if lo > n:
            return None
        g = min(max(self._guess(lo, scale), lo), n)
        if self.setup.lanes > 1:  # the guess and the step below it side by side: one round when right
            self.prefetch([g - 1, g] if g > lo else [g])
        if self.holds(g, scale):  # walk down: fail, hold = the bracket
            hold, fail, k = g, lo - 1, 1
            while hold - k > fail:
                if not self.holds(hold - k, scale):
                    fail = hold - k
                    break
                hold, k = hold - k, k * 2
        else:  # walk up
            fail, k = g, 1
            while True:
                p = min(g + k, n)
                if self.holds(p, scale):
                    hold = p
                    break
                if p == n:
                    return None
                fail, k = p, k * 2
        while hold - fail > 1:
            mid = (fail + hold) // 2
            if self.holds(mid, scale):
                hold = mid
            else:
                fail = mid
        return hold

    def _guess(self, lo: int, scale: float) -> int:
        """The first prefix whose predicted noise, the all-integer prediction times the share of
        sensitivity noise (``_left``) the prefix leaves in integer, meets the budget; the middle
        of the range for a metric without a noise form."""
        metric, n = self.measure.budget.metric, len(self.steps)
        target, fake = _noise(metric, self.measure.budget.threshold), _noise(metric, self.value(0))
        left = _left(self.steps)
        if target is None or fake is None or left[0] <= 0:
            return (lo + n) // 2
        return next((i for i in range(lo, n + 1) if fake * scale * left[i] / left[0] <= target), n)


def _left(steps: Sequence[dict[str, Any]]) -> list[float]:
    """``left[n]``: the ranked layers' sensitivity noise (``10^(-SQNR/10)``) still in integer
    after the first ``n`` steps."""
    left = [0.0] * (len(steps) + 1)
    for i in range(len(steps) - 1, -1, -1):
        left[i] = left[i + 1] + steps[i]["noise"]
    return left


class _Fit:
    """The real compiles' noise (``_noise``) as a line in the sensitivity noise the steps leave
    in integer, ``R(n)`` (the ranked layers' ``10^(-SQNR/10)`` summed after the first ``n``
    steps): ``noise = c0 + c1 R(n)`` through the last two measured compiles. ``c0`` is what the
    ranking does not see (integer nodes without a sensitivity, requantization between layers).
    Why: the fake-quant prediction undershoots more the more layers move (effnet: the real model
    2.3x then 13x noisier than predicted), and a fit costs no model run."""

    def __init__(self, steps: Sequence[dict[str, Any]], budget: Budget, v0: float | None) -> None:
        self.budget = budget
        self.left = _left(steps)
        self.points: list[tuple[float, float]] = []
        self.add(0, v0)

    def add(self, n: int, value: float | None) -> "_Fit":
        noise = _noise(self.budget.metric, value)
        if noise is not None:
            self.points.append((self.left[n], noise))
        return self

    def shortest(self, lo: int) -> int | None:
        """The first ``n >= lo`` the fit says meets the budget; None without a usable fit."""
        target = _noise(self.budget.metric, self.budget.threshold)
        if target is None or len(self.points) < 2:
            return None
        (r1, y1), (r2, y2) = self.points[-2:]
        if r1 == r2:
            return None
        c1 = (y1 - y2) / (r1 - r2)
        c0 = y2 - c1 * r2
        if c1 <= 0 or c0 >= target:
            return None
        for n in range(lo, len(self.left)):
            if c0 + c1 * self.left[n] <= target:
                return n
        return None


def _finish(section: dict[str, Any], result: Any, value: float | None, moved: Sequence[dict[str, Any]],
            compiles: int, start: float, met: bool, ranking: Sequence[str] = ()) -> dict[str, Any]:
    from .analysis.metrics import rounded

    secs = round(time.perf_counter() - start, 3)
    extra = sum(r["cost"] - 1.0 for r in moved)
    out = dict(section, met=met, value_after=rounded(value), fidelity_after=result.report["fidelity"].get("outputs"),
               moved=[{k: r[k] for k in ("node", "op", "to", "why", "cost", "sensitivity_db")} for r in moved],
               estimated_extra_cost=round(extra, 3),
               cost_note="costs are the target's [accuracy.cost] latency estimates (integer kernel = 1.0)",
               compiles=compiles, seconds=secs)
    out["value_before"] = rounded(out["value_before"])
    if ranking:
        out["sensitivity_ranking"] = list(ranking)
    before = _fmt(section["value_before"])
    verdict = "met" if met else "NOT met (warning: the target's default budget; the best model is written)"
    out["summary"] = (f"accuracy {section['budget']} {verdict}: {_name(section)} {before} -> {_fmt(value)}, "
                      f"{len(moved)} layer(s) moved" + (f" ({_counts(moved)}, est. "
                                                         f"+{extra:.3g} kernel-latency units)" if moved else "")
                      + f"{methods_note(section, moved)}, {compiles} compile(s), {secs:.1f} s")
    return out


def _counts(moved: Sequence[dict[str, Any]]) -> str:
    """'12 dynamic, 1 float': how many layers went to each fallback."""
    tos = [r["to"] for r in moved]
    return ", ".join(f"{tos.count(t)} {t}" for t in sorted(set(tos)))


def _name(section: Mapping[str, Any]) -> str:
    return str(section["budget"]).split(">=")[0]
