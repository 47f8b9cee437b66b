"""The accuracy budget's method trial: before any layer leaves integer, try another calibration
method (minmax, percentile, entropy, mse) for the most sensitive layers' quantized tensors.

Why here and how: a range method is a pure function of the calibration statistics
(:func:`qcompiler.calibration.method_range`), so every method's range of a tensor comes from
the statistics the search's first compile stored in its calibration cache, with no model run.
Each candidate range is tried on the analysis's fake-quant model with all layers quantized (one
onnxruntime session in which the trial tensors' scale and zero point are graph inputs, so a swap
costs one run, not a new session): screened on the first batch of the sensitivity samples, the
best candidate confirmed on all of them. A tensor keeps it (ties: the order of ``METHODS``) only
when both lower the predicted output noise to ``MARGIN`` of it. The choices are calibration
overrides keyed by the tensor's producer node, and the compile stays the only builder: one real
compile (its statistics a cache hit: the collected statistics serve every method,
``qcompiler.calibration.core._collection_plan``) measures them, and they are kept only when the
measured figure beats the integer plan's. The search then goes on with its fallbacks from there
(``qcompiler.budget``).

Bounded: the ``TRIAL_LAYERS`` most sensitive layers, their input and output tensors, up to
three other methods each (effnet: 13 tensors, 26 screening runs on 8 samples).
Deterministic: the order is the sensitivity ranking, then graph order of the tensors, then
``METHODS``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

__all__ = ["TRIAL_LAYERS", "MARGIN", "MethodTrial", "try_methods", "methods_note"]

#: the most sensitive layers whose tensors try other methods (effnet's worst 8 layers hold
#: 0.64 of the summed sensitivity noise; each adds up to 6 fake-quant runs)
TRIAL_LAYERS = 8
#: a method change must cut the predicted output noise (1 - cosine, 10^(-SQNR/10)) to this share
#: (0.46 dB): smaller predicted gains are within what the 16 sensitivity samples resolve
MARGIN = 0.9


@dataclass
class MethodTrial:
    """The trial's outcome: ``rows`` for ``report["accuracy"]["methods"]``; when ``kept``, the
    compile with the changes (``result``, its measured ``value``), the ``compile_with`` that
    keeps passing them, and the analysis ``setup`` whose fake-quant model uses them."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    kept: bool = False
    result: Any = None
    value: float | None = None
    compile_with: Callable[..., Any] | None = None
    setup: Any = None
    compiles: int = 0

    def resensed(self, sens: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The sensitivity rows (``qcompiler.layer_sensitivity``'s) with the layers the kept
        changes touch measured again on ``setup`` (their new ranges), in the same order rule
        (worst first, ties by graph order): the fallbacks then go to what still misses."""
        from .analysis.report import by_sensitivity, sensitivity_rows

        touched = {name for row in self.rows for name in row["layers"]}
        fresh = {r["layer"]: r for r in sensitivity_rows(self.setup, [x for x in self.setup.layers
                                                                       if x.name in touched])}
        return by_sensitivity([fresh.get(r["layer"], r) for r in sens])


@dataclass
class _Tensor:
    name: str                   # the float tensor
    layer: str                  # the first trial layer reading or producing it
    key: str                    # the calibration override key: its producer node (or graph input)
    method: str                 # its method in the first compile
    grid: Any                   # RangeTarget
    qtype: Any                  # QType
    clamp: Callable[[float, float], tuple[float, float]]
    lo: float
    hi: float
    tags: list[str]             # where the fake-quant model quantizes it
    base: tuple[np.ndarray, np.ndarray]  # its scale and zero point in the first compile
    layers: list[str]           # the layers quantizing it there (one per tag)


def try_methods(compile_with: Callable[..., Any], first: Any, v0: float | None, setup: Any,
                sens: Sequence[Mapping[str, Any]], measure: Any, target: Any, cache_dir: str,
                calibration: Any, base: Mapping[str, Any], guess: int | None) -> MethodTrial:
    """Run the trial (module text) after the search's first compile ``first`` (figure ``v0``,
    plan overrides ``base``) missed the budget; ``sens`` is the sensitivity ranking,
    ``measure`` the search's ``_Measure``, ``calibration`` the compile's CalibrationOptions,
    ``guess`` the fallback steps the prediction says the budget needs (None: more than all).
    Skipped when that is more than ``TRIAL_LAYERS``: the most sensitive layers, the ones the
    trial would change, are then the first to move anyway (measured: on effnet at cosine>=0.999
    and on PP-OCR every change the trial kept was on a layer the fallbacks moved). A model it
    cannot try gives no rows."""
    from .calibration.cache import load_cached
    from .calibration.options import CalibrationOptions

    start = time.perf_counter()
    out = MethodTrial(info={"layers": 0, "tensors": 0, "runs": 0, "screen_runs": 0})
    options = calibration or CalibrationOptions()
    if TRIAL_LAYERS <= 0:
        return out
    if guess is None or guess > TRIAL_LAYERS:
        out.info["skipped"] = (f"the fallbacks need {'more than all' if guess is None else guess} step(s) by the "
                               f"prediction, more than the {TRIAL_LAYERS} layers the trial would change")
        return out
    compiles = 0
    key = first.report.get("calibration", {}).get("cache_key")
    if not key and first.report.get("calibration", {}).get("cache") == "off":
        # the first compile kept no statistics (a default budget's plain compile): again, cached
        first = compile_with(dict(base), cache_dir, True)
        compiles += 1
        key = first.report.get("calibration", {}).get("cache_key")
    stats = load_cached(cache_dir, key) if key else None
    if stats is None:
        out.info["skipped"] = "no calibration statistics"
        return _done(out, start, compiles)
    tensors = _tensors(setup, sens, stats, first.report["calibration"], target, options)
    out.info.update(layers=len({t.layer for t in tensors}), tensors=len(tensors))
    if not tensors:
        return _done(out, start, compiles)
    tuned = _TunedModel(setup.model, setup.layers, tensors)
    trial = dataclasses.replace(setup, model=tuned)
    # candidates are screened on the first batch; a tensor's best one is confirmed on all
    screen = dataclasses.replace(trial, batches=trial.batches[:1], reference=trial.reference[:1])
    on = {layer.name for layer in setup.layers}
    metric = measure.budget.metric
    current, current_screen = measure.predicted(trial, on), measure.predicted(screen, on)
    runs, screens = 1, 1
    chosen: dict[str, str] = {}
    from .calibration.core import method_range
    from .calibration.methods import serves
    from .calibration.options import METHODS
    from .quant import compute_qparams

    for t in tensors:
        kind = stats.hist_spec[t.name][0]
        best: tuple[str, float | None, tuple[np.ndarray, np.ndarray]] | None = None
        tried: set[tuple[float, int]] = {(float(t.base[0]), int(t.base[1]))}
        for m in METHODS:
            if m == t.method or not serves(kind, m, t.grid) or (m == "minmax" and options.momentum > 0):
                continue
            qp = compute_qparams(*t.clamp(*method_range(stats, t.name, m, t.grid, t.lo, t.hi, options)), t.qtype)
            sig = (float(qp.scale), int(qp.zero_point))
            if sig in tried:  # the same grid as the current method or a tried one: same figure
                continue
            tried.add(sig)
            tuned.set(t, qp.scale, qp.zero_point)
            v = measure.predicted(screen, on)
            screens += 1
            if v is not None and (best is None or best[1] is None or v > best[1]):
                best = (m, v, (qp.scale, qp.zero_point))
        if best is None or not _improves(metric, current_screen, best[1]):
            tuned.set(t, *t.base)
            continue
        tuned.set(t, *best[2])
        full = measure.predicted(trial, on)
        runs += 1
        if not _improves(metric, current, full):
            tuned.set(t, *t.base)
            continue
        chosen[t.key] = best[0]
        out.rows.append({"layer": t.layer, "layers": sorted(set(t.layers)), "tensor": t.name, "node": t.key,
                         "from": t.method, "to": best[0], "predicted_before": _r(current),
                         "predicted_after": _r(full),
                         "predicted_gain": _r(None if current is None or full is None else full - current)})
        current, current_screen = full, best[1]
    out.info["screen_runs"] = screens
    out.info["runs"] = runs
    if not chosen:
        return _done(out, start, compiles)

    def with_methods(overrides: Mapping[str, Any], cache: str | None, fresh: bool = False) -> Any:
        return compile_with(overrides, cache, fresh, chosen)

    result = with_methods(dict(base), cache_dir)
    compiles += 1
    if result._eval is None and measure.budget.func is not None:
        result = with_methods(dict(base), cache_dir, True)
        compiles += 1
    value = measure.compiled(result)
    out.info["measured"] = _r(value)
    out.info["calibration_cache"] = result.report.get("calibration", {}).get("cache")
    if value is not None and (v0 is None or value > v0):
        out.kept, out.result, out.value, out.compile_with = True, result, value, with_methods
        out.setup = dataclasses.replace(setup, model=tuned)
    else:  # the real compile disagrees with the prediction: the integer plan stays
        out.info["rejected"] = f"measured {_r(value)} <= {_r(v0)} without the changes"
        for row in out.rows:
            row["kept"] = False
    return _done(out, start, compiles)


def _done(out: MethodTrial, start: float, compiles: int) -> MethodTrial:
    out.compiles = compiles
    out.info["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _r(v: float | None) -> float | None:
    from .analysis.metrics import rounded

    return rounded(v)


def _improves(metric: str, old: float | None, new: float | None) -> bool:
    """``new`` beats ``old`` by the margin: noise (1 - cosine, 10^(-SQNR/10)) down to ``MARGIN``
    of it; for top-1 and a user metric, strictly higher."""
    if new is None:
        return False
    if old is None:
        return True
    if metric == "cosine":
        return 1.0 - new <= MARGIN * (1.0 - old) and new > old
    if metric == "sqnr":
        return new >= old - 10.0 * math.log10(MARGIN) if math.isfinite(old) else False
    return new > old


def _producers(setup: Any) -> dict[str, tuple[str, str]]:
    """tensor -> (producer node name, op type) in the model calibration saw, read back from
    the fake-quant model (a layer's node is an ``If`` there, its output renamed ``__qc_pre``)."""
    ops = {layer.name: layer.op for layer in setup.layers}
    out: dict[str, tuple[str, str]] = {}
    for n in setup.model.proto.graph.node:
        if n.name.endswith("__qc_out"):
            continue
        for o in n.output:
            out[o.split("__qc_pre")[0]] = (n.name, ops.get(n.name, n.op_type))
    return out


def _tensors(setup: Any, sens: Sequence[Mapping[str, Any]], stats: Any, calib: Mapping[str, Any],
             target: Any, opts: Any) -> list[_Tensor]:
    """The trial tensors: inputs then output of the ``TRIAL_LAYERS`` most sensitive layers,
    each once, that have a histogram, a single-output producer no user override names, and
    whose first-compile grid is the one their method's range gives (a tensor sharing another's
    qparams, or clamped by a rule this trial does not repeat, is left alone)."""
    from .calibration.core import method_range
    from .calibration.methods import RangeTarget
    from .quant import compute_qparams

    rule = target.activation_rule()
    if rule.qtype is None:
        return []
    grid = RangeTarget.of(rule.qtype)
    producers = _producers(setup)
    outputs: dict[str, int] = {}
    for n in setup.model.proto.graph.node:
        if not n.name.endswith("__qc_out"):
            outputs[n.name] = len(n.output)
    where: dict[str, list[tuple[str, Any]]] = {}
    for layer in setup.layers:
        for fi, g in sorted(layer.activations.items()):
            where.setdefault(g.float, []).append((f"{layer.index}_{fi}", g))
        if layer.output is not None:
            where.setdefault(layer.output.float, []).append((f"{layer.index}_o", layer.output))
    owner = {str(layer.index): layer.name for layer in setup.layers}
    user = dict(calib.get("overrides") or {})
    method = calib.get("method", "")
    by_name = {layer.name: layer for layer in setup.layers}
    out: list[_Tensor] = []
    seen: set[str] = set()
    for row in sens[:TRIAL_LAYERS]:
        layer = by_name.get(row["layer"])
        if layer is None:
            continue
        names = [g.float for _, g in sorted(layer.activations.items())]
        names += [layer.output.float] if layer.output is not None else []
        for name in names:
            if name in seen or name not in stats.hist or name not in where or any(g.dynamic for _, g in where[name]):
                continue  # a dynamic grid (computed per run) has no range to choose
            seen.add(name)
            node, op = producers.get(name, (name, ""))
            if node in user or (op and op in target.fixed) or outputs.get(node, 1) != 1:
                continue
            m = user.get(op) or method
            kind, lo, hi, _ = stats.hist_spec[name]
            if kind != "signed":  # the range's own (clamped) min/max: a signed histogram's bounds
                lo, hi = stats.mins[name], stats.maxs[name]
            qp = compute_qparams(*rule.clamp(*method_range(stats, name, m, grid, lo, hi, opts)), rule.qtype)
            base = (np.asarray(qp.scale), np.asarray(qp.zero_point))
            if not all(_same(g, base) for _, g in where[name]):
                continue
            tags = [tag for tag, _ in where[name]]
            out.append(_Tensor(name, layer.name, node, m, grid, rule.qtype, rule.clamp, lo, hi, tags, base,
                               [owner[tag.split("_")[0]] for tag in tags]))
    return out


def _same(g: Any, qp: tuple[np.ndarray, np.ndarray]) -> bool:
    return (np.asarray(g.scale, np.float32).reshape(-1)[0] == np.asarray(qp[0], np.float32).reshape(-1)[0]
            and np.asarray(g.zero_point).dtype == np.asarray(qp[1]).dtype
            and int(np.asarray(g.zero_point).reshape(-1)[0]) == int(np.asarray(qp[1]).reshape(-1)[0]))


class _TunedModel:
    """The fake-quant model with the trial tensors' scale and zero point as graph inputs (the
    ``If`` branches read them from the outer scope): ``set`` changes a tensor's grid for the
    next runs. ``run`` is ``FakeQuantModel.run``'s."""

    def __init__(self, fq: Any, layers: Sequence[Any], tensors: Sequence[_Tensor]) -> None:
        import onnxruntime as ort

        from .analysis.layers import _QDQ_OPTIMIZERS

        self.switch, self.outputs, self.layers = fq.switch, fq.outputs, fq.layers
        m = onnx.ModelProto()
        m.CopyFrom(fq.proto)
        names: dict[str, Any] = {}
        for t in tensors:
            for tag in t.tags:
                names[f"qc_s_{tag}"], names[f"qc_z_{tag}"] = t.base[0], t.base[1]
        for g in _subgraphs(m.graph):
            keep = [i for i in g.initializer if i.name not in names]
            if len(keep) != len(g.initializer):
                del g.initializer[:]
                g.initializer.extend(keep)
        for name, arr in names.items():
            m.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype), []))
        self.values: dict[str, np.ndarray] = {k: np.asarray(v).reshape(()) for k, v in names.items()}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(_QDQ_OPTIMIZERS))
        self.proto = m

    def set(self, t: _Tensor, scale: np.ndarray, zero_point: np.ndarray) -> None:
        for tag in t.tags:
            self.values[f"qc_s_{tag}"] = np.asarray(scale, np.float32).reshape(())
            self.values[f"qc_z_{tag}"] = np.asarray(zero_point).reshape(())

    def run(self, feed: Mapping[str, np.ndarray], on: Any, outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        full = dict(feed)
        one, zero = np.ones((), np.bool_), np.zeros((), np.bool_)
        for name, sw in self.switch.items():
            full[sw] = one if name in on else zero
        full.update(self.values)
        names = list(outputs) if outputs is not None else self.outputs
        return dict(zip(names, self.session.run(names, full)))


def _subgraphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = []
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.append(a.g)
                out.extend(_subgraphs(a.g))
    return out


def methods_note(section: Mapping[str, Any], moved: Sequence[Mapping[str, Any]]) -> str:
    """The summary line's part on the method trial, ', 2 method change(s)': the kept changes
    still in effect. A change whose every quantizing layer the search then ``moved`` off
    integer gets ``in_effect: false`` (its override stays, but nothing reads that range)."""
    gone = {r["node"] for r in moved}
    live = 0
    for row in section.get("methods", []):
        row["in_effect"] = row.get("kept", True) and not set(row["layers"]) <= gone
        live += row["in_effect"]
    return f", {live} method change(s)" if live else ""
