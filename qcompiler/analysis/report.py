"""``qcompiler analyze``: where a quantized model loses accuracy, layer by layer.

Every figure comes from one :class:`~.layers.FakeQuantModel` run by onnxruntime: the float
model (all layers off), the quantized model (all on; its per-layer outputs give the
accumulated error) and one run per layer with only that layer on (its sensitivity: the
model-output fidelity when only it is quantized). Samples with equal shapes are batched.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import UserError
from .layers import FakeQuantModel, Layer, batches, find_layers
from .metrics import OutputFidelity, rounded

__all__ = ["analyze", "layer_sensitivity", "sensitivity_rows", "by_sensitivity", "error_split",
           "AnalysisSetup", "setup_analysis", "DEFAULT_LIMIT", "HISTOGRAM_LAYERS"]

#: samples analyzed when no limit is given: enough to rank layers, small enough for seconds
DEFAULT_LIMIT = 8
#: layers (worst first) whose output histogram the report carries
HISTOGRAM_LAYERS = 6
#: most fake-quant runs at once (each holds its own activations)
MAX_LANES = 4
_BINS = 48


@dataclass
class AnalysisSetup:
    """Everything the analysis runs on: reusable by an accuracy-budget search."""

    target: Any
    layers: list[Layer]
    model: FakeQuantModel
    batches: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]   # float outputs per batch
    samples: int
    real_data: bool
    integer: dict[str, str]                  # node -> kernel / how it runs in integer
    float_nodes: dict[str, str]              # node -> why it stays float
    partitions: list[dict[str, Any]]
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> fallbacks it can take
    prepared: onnx.ModelProto | None = None  # the float model as the target's pipeline prepared it
    lanes: int = 1                           # fake-quant runs at once (fidelities)

    def fidelity(self, on: Sequence[str] | set[str]) -> OutputFidelity:
        """Model-output fidelity with the layers in ``on`` quantized, the rest float."""
        fid = OutputFidelity()
        for feed, ref in zip(self.batches, self.reference):
            fid.add(ref, self.model.run(feed, set(on)))
        return fid

    def fidelities(self, configs: Sequence[Sequence[str] | set[str]]) -> list[OutputFidelity]:
        """``fidelity`` of each set of quantized layers, in order, run on ``lanes`` threads.
        Why: the fake-quant session is single-threaded (``setup_analysis``), and independent runs
        side by side beat onnxruntime's intra-op threads, which wait on each other after every
        op: badly so when other processes share the cores (effnet_lite0's sensitivity run took
        0.27-0.33 s on two intra-op threads and 0.17 s on one at load average 7). Each run is
        single-threaded, so the numbers do not depend on the lanes."""
        if self.lanes <= 1 or len(configs) <= 1:
            return [self.fidelity(c) for c in configs]
        with ThreadPoolExecutor(min(self.lanes, len(configs)), thread_name_prefix="qcompiler-analysis") as pool:
            return list(pool.map(self.fidelity, configs))


def _load_proto(model: Any, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        return onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - the user's file
        raise UserError(f"{path}: cannot read {what}: {str(exc).splitlines()[0]}") from None


def setup_analysis(float_model: Any, quant_model: Any, inputs: Any, *, target: Any = None,
                   limit: int | None = DEFAULT_LIMIT, image_spec: Any = None) -> AnalysisSetup:
    """Load both models, map the quantized model's integer layers to the float model prepared
    by the target's pipeline, and run the float model on the first ``limit`` samples."""
    from ..calibration.data import input_specs, load_calibration
    from ..inspect import integer_nodes, prepare_model
    from ..ir import load_model
    from ..plan import fallback_outcomes, partitions
    from ..target import Target, load_target

    fproto = _load_proto(float_model, "float model")
    qproto = _load_proto(quant_model, "quantized model")
    if target is None:
        meta = {p.key: p.value for p in qproto.metadata_props}
        target = meta.get("qcompiler.target", "ort-cpu")
    tgt = target if isinstance(target, Target) else load_target(target)
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1")
    prepared = load_model(fproto)
    data = load_calibration(inputs, input_specs(prepared), limit=limit, image_spec=image_spec)
    ctx = prepare_model(prepared, tgt)
    pproto = prepared.to_proto()
    layers = find_layers(qproto, tgt, pproto)
    if not layers:
        raise UserError(f"{getattr(quant_model, 'name', None) or quant_model}: no integer layer of the quantized "
                        "model maps to a node of the float model (is it compiled from this float model?)")
    watch = {g.float for layer in layers for g in [layer.output, *layer.activations.values()]
             if g is not None and not g.dynamic}
    watch |= {layer.result for layer in layers}
    fq = FakeQuantModel(pproto, layers, extra=sorted(watch), threads=1)
    feeds = batches(data)
    if not feeds:
        raise UserError(f"{inputs}: no input samples")
    reference = [fq.run(f, ()) for f in feeds]
    lowered, floats = integer_nodes(prepared, tgt, ctx)
    names = {layer.name for layer in layers}
    integer = {layer.name: layer.kernel for layer in layers}
    for head, tail in ctx.analysis.get("groups", {}).items():
        if head in names:
            integer[tail] = f"fused into '{head}'"
    for name, how in lowered.items():
        if how.endswith("on integer data"):
            integer[name] = how
    float_nodes = {}
    for node in prepared.graph.gs.nodes:
        if node.name not in integer:
            float_nodes[node.name] = floats.get(node.name, "float in the quantized model")
    parts = partitions(prepared, sorted(integer))
    samples = sum(next(iter(f.values())).shape[0] for f in feeds)
    return AnalysisSetup(tgt, layers, fq, feeds, reference, samples, bool(getattr(data, "real_data", True)),
                         dict(sorted(integer.items())), dict(sorted(float_nodes.items())), parts,
                         # every node: the budget also moves float nodes the compile touched (a float
                         # ConvTranspose on integer-stored weights can go float, not int16-activations)
                         fallback_outcomes(prepared, tgt, [n.name for g in prepared.graph.walk() for n in g.gs.nodes]),
                         pproto, lanes=_lanes())


def _lanes() -> int:
    """The cores this process may use, at most ``MAX_LANES``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_LANES))


def layer_sensitivity(float_model: Any = None, quant_model: Any = None, inputs: Any = None, *, target: Any = None,
                      limit: int | None = DEFAULT_LIMIT, setup: AnalysisSetup | None = None) -> list[dict[str, Any]]:
    """Each integer layer's sensitivity, most sensitive first: the model-output fidelity
    (per output: SQNR dB, cosine, top-1 agreement for classifiers) when only that layer is
    quantized and everything else runs float. ``score`` is the worst output SQNR (dB; None
    when exact); ties keep graph order. Pass ``setup`` to reuse loaded models and data."""
    s = setup or setup_analysis(float_model, quant_model, inputs, target=target, limit=limit)
    return by_sensitivity(sensitivity_rows(s, s.layers))


def sensitivity_rows(setup: AnalysisSetup, layers: Sequence[Layer]) -> list[dict[str, Any]]:
    """One :func:`layer_sensitivity` row per layer in ``layers`` (in their order), measured on
    ``setup``: a budget search re-measures layers whose ranges it changed."""
    rows = []
    for layer, fid in zip(layers, setup.fidelities([{layer.name} for layer in layers])):
        rows.append({"layer": layer.name, "op": layer.op, "index": layer.index, "outputs": fid.result(),
                     "score": rounded(fid.score(), 3)})
    return rows


def by_sensitivity(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sensitivity rows most sensitive first (lowest score; None = exact, last), ties in graph order."""
    return sorted(rows, key=lambda r: (math.inf if r["score"] is None else r["score"], r["index"]))


def error_split(s: AnalysisSetup) -> dict[str, Any]:
    """Model-output fidelity with every layer's weights quantized and activations float, and
    the reverse: which half of the quantization limits the model. (Errors of the two halves
    do not add exactly; each figure is what its half alone costs.)"""
    on = {layer.name for layer in s.layers}
    out: dict[str, Any] = {}
    worst: dict[str, float] = {}  # the worst output SQNR of each half (OutputFidelity.score)
    for part in ("weights", "activations"):
        model = FakeQuantModel(s.prepared, s.layers, parts=part)
        fid = OutputFidelity()
        for feed, ref in zip(s.batches, s.reference):
            fid.add(ref, model.run(feed, on))
        out[f"{part}_only"] = fid.result()
        if fid.acc:
            worst[part] = fid.score()
    if len(worst) == 2 and all(math.isfinite(x) for x in worst.values()):
        w, a = worst["weights"], worst["activations"]
        out["limited_by"] = "weights" if w < a - 1.0 else "activations" if a < w - 1.0 else "both"
    return out


def _range_tensor(layer: Layer) -> Any:
    """The tensor whose chosen range the report shows: the output, else the first input
    (none for a dynamic input: its range is chosen per run)."""
    if layer.output is not None:
        return layer.output
    g = layer.activations.get(0)
    return None if g is None or g.dynamic else g


def analyze(float_model: Any, quant_model: Any, inputs: Any, *, target: Any = None, limit: int | None = DEFAULT_LIMIT,
            html: str | os.PathLike[str] | None = None, json_path: str | os.PathLike[str] | None = None,
            image_spec: Any = None) -> dict[str, Any]:
    """Per-layer accuracy analysis of ``quant_model`` against ``float_model`` on ``inputs``
    (any calibration source). Returns the report dict; writes it as JSON and/or a
    self-contained HTML page when asked. Deterministic: same inputs, same bytes."""
    for path in (html, json_path):
        parent = os.path.dirname(os.fspath(path)) if path is not None else ""
        if parent and not os.path.isdir(parent):
            raise UserError(f"{path}: cannot write: directory '{parent}' does not exist")
    s = setup_analysis(float_model, quant_model, inputs, target=target, limit=limit, image_spec=image_spec)
    grids = {layer.name: _range_tensor(layer) for layer in s.layers}
    watched = sorted({g.float for g in grids.values() if g is not None})
    results = sorted({layer.result for layer in s.layers} - set(watched))
    out_names = s.model.outputs
    all_on = {layer.name for layer in s.layers}
    acc: dict[str, Any] = {}
    from ..sim.run import Accumulator

    stats = {name: [math.inf, -math.inf, 0, 0, 0] for name in watched}  # min, max, below, above, count
    bounds = {layer.name: g.bounds() for layer in s.layers if (g := grids[layer.name]) is not None}
    by_tensor = {g.float: bounds[name] for name, g in grids.items() if g is not None}
    outputs = OutputFidelity()
    for feed, ref in zip(s.batches, s.reference):
        f = s.model.run(feed, (), outputs=out_names + watched + results)
        q = s.model.run(feed, all_on, outputs=out_names + watched + results)
        outputs.add(ref, q)
        for layer in s.layers:
            t = layer.result
            if t in f:
                acc.setdefault(layer.name, Accumulator()).add(f[t], q[t])
        for name in watched:
            v = np.asarray(f[name])
            lo, hi = by_tensor[name]
            st = stats[name]
            if v.size:
                st[0], st[1] = min(st[0], float(v.min())), max(st[1], float(v.max()))
            st[2] += int((v < lo).sum())
            st[3] += int((v > hi).sum())
            st[4] += int(v.size)
    sens = {r["layer"]: r for r in layer_sensitivity(setup=s)}
    split = error_split(s)
    rows = []
    for layer in s.layers:
        g = grids[layer.name]
        a = acc.get(layer.name)
        r = sens[layer.name]
        row: dict[str, Any] = {
            "name": layer.name, "op": layer.op, "kernel": layer.kernel, "index": layer.index,
            "precision": layer.precision(),
            "reason": f"target '{s.target.name}' runs {layer.op} in integer as {layer.kernel} (ops.{layer.op})",
            "output": layer.result,
            "accumulated": None if a is None else {"sqnr_db": rounded(a.result().sqnr_db, 3),
                                                   "cosine": rounded(a.result().cosine, 6)},
            "sensitivity": {"score_db": r["score"], "outputs": r["outputs"]},
            "notes": list(layer.notes),
        }
        if g is not None:
            st = stats[g.float]
            lo, hi = g.bounds()
            row["range"] = {"tensor": g.float, "chosen": [rounded(lo), rounded(hi)],
                            "observed": [rounded(st[0]), rounded(st[1])],
                            "clipped_fraction": rounded((st[2] + st[3]) / st[4], 6) if st[4] else None,
                            "clipped_below": st[2], "clipped_above": st[3]}
        rows.append(row)
    ranking = [r["layer"] for r in sorted(sens.values(), key=lambda r: (
        math.inf if r["score"] is None else r["score"], r["index"]))]
    report: dict[str, Any] = {
        "float_model": _label(float_model), "quant_model": _label(quant_model), "target": s.target.name,
        "samples": s.samples, "real_data": s.real_data,
        "method": "fake quantization of the float model with the quantized model's grids, weights and biases "
                  "(onnxruntime, float ops); sensitivity = output fidelity with only that layer quantized",
        "outputs": outputs.result(), "error_split": split, "layers": rows, "ranking": ranking,
        "integer_nodes": s.integer, "float_nodes": s.float_nodes, "partitions": s.partitions,
    }
    report["histograms"] = _histograms(s, [n for n in ranking[:HISTOGRAM_LAYERS] if grids.get(n) is not None],
                                       grids, stats)
    report["summary"] = _summary(report)
    if json_path is not None:
        from ..ir.io import atomic_write_text

        atomic_write_text(Path(json_path), to_json(report))
    if html is not None:
        from ..ir.io import atomic_write_text
        from .html import render_html

        atomic_write_text(Path(html), render_html(report))
    return report


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True) + "\n"


def _label(model: Any) -> str:
    return os.path.basename(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else "model"


def _histograms(s: AnalysisSetup, names: list[str], grids: dict[str, Any], stats: dict[str, list[Any]]
                ) -> list[dict[str, Any]]:
    """Float-value histograms of the chosen layers' range tensors, over the union of the
    observed and the chosen range (a second float pass: the worst layers are known only now)."""
    edges = {}
    for n in names:
        g = grids[n]
        lo, hi = g.bounds()
        st = stats[g.float]
        a, b = min(lo, st[0]), max(hi, st[1])
        edges[n] = np.linspace(a, b if b > a else a + 1.0, _BINS + 1)
    counts = {n: np.zeros(_BINS, np.int64) for n in names}
    tensors = sorted({grids[n].float for n in names})
    for feed in s.batches:
        f = s.model.run(feed, (), outputs=tensors) if tensors else {}
        for n in names:
            counts[n] += np.histogram(np.asarray(f[grids[n].float]).reshape(-1), bins=edges[n])[0]
    out = []
    for n in names:
        lo, hi = grids[n].bounds()
        out.append({"layer": n, "tensor": grids[n].float, "lo": rounded(float(edges[n][0])),
                    "hi": rounded(float(edges[n][-1])), "counts": [int(c) for c in counts[n]],
                    "chosen": [rounded(lo), rounded(hi)]})
    return out


def _summary(r: dict[str, Any]) -> list[str]:
    lines = []
    n_int, n_float = len(r["layers"]), len(r["float_nodes"])
    lines.append(f"{n_int} integer layers, {n_float} float nodes, {len(r['partitions'])} integer partition(s); "
                 f"{r['samples']} sample(s){'' if r['real_data'] else ' of RANDOM data (not meaningful)'}.")
    for name, o in r["outputs"].items():
        top1 = f", top-1 agreement {o['top1_agreement']}" if "top1_agreement" in o else ""
        lines.append(f"Output {name}: cosine {o['cosine']}, SQNR {o['sqnr_db']} dB{top1}.")
    split = r.get("error_split") or {}
    if "limited_by" in split:
        def fig(part: str) -> str:
            return "; ".join(f"cosine {o['cosine']}, SQNR {o['sqnr_db']} dB" + (
                f", top-1 {o['top1_agreement']}" if "top1_agreement" in o else "")
                for o in split[f"{part}_only"].values())
        verdict = {"weights": "the weight grids limit the model", "activations": "the activation grids limit the model",
                   "both": "weights and activations cost about the same"}[split["limited_by"]]
        lines.append(f"Weights alone: {fig('weights')}. Activations alone: {fig('activations')}: {verdict}.")
    if r["ranking"]:
        worst = next(x for x in r["layers"] if x["name"] == r["ranking"][0])
        lines.append(f"Most sensitive layer: {worst['name']} ({worst['op']}): quantized alone, output SQNR "
                     f"{worst['sensitivity']['score_db']} dB.")
    clipped = [x for x in r["layers"] if x.get("range") and x["range"]["clipped_fraction"]]
    if clipped:
        c = max(clipped, key=lambda x: (x["range"]["clipped_fraction"], -x["index"]))
        lines.append(f"Most clipped: {c['name']} ({c['range']['clipped_fraction']:.4%} of values outside its range).")
    return lines
