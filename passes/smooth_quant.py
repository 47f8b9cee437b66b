"""smooth-quant: move activation outliers into the weights of static MatMuls (SmoothQuant).

For ``Y = X @ W`` with a constant W [K, N], any positive per-input-channel vector s gives
``Y = (X / s) @ (s * W)``. Transformer activations have a few channels ~100x larger than the
rest; one per-tensor activation scale then spends its 8 bits on them. With
``s_j = max|X_j|^a / max|W_j|^(1-a)`` the outliers shrink and the weights (quantized per
output channel) absorb them. The strength ``a`` is chosen per activation on calibration data:
the one whose simulated int8 output error (activation per tensor, weights per channel, both
with the target's rules and min/max ranges) is smallest, or no migration when none beats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import (Model, Pass, PassContext, PassResult, QType, Rewriter, UserError, compute_qparams, dequantize,
                       observe_values, quantize, weight_qparams)

__all__ = ["SmoothQuant", "migration_scale", "layer_error"]


def migration_scale(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a); channels with a zero maximum keep s = 1."""
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s


def layer_error(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                act: QType, wq: QType, per_channel: bool) -> float:
    """Squared output error of ``rows @ W`` for every W when X/s is quantized per tensor over
    the range its per-channel extremes ``lo``/``hi`` imply and s*W per output channel."""
    inv = (1.0 / s).astype(np.float32)
    ap = compute_qparams(min(0.0, float((lo * inv).min())), max(0.0, float((hi * inv).max())), act)
    xq = dequantize(quantize(rows * inv, ap), ap).astype(np.float64)
    err = 0.0
    for w in weights:
        ws = (w * s[:, None]).astype(np.float32)
        wp = weight_qparams(ws, wq, 1 if per_channel else None)
        ref = rows.astype(np.float64) @ w.astype(np.float64)
        err += float(np.square(ref - xq @ dequantize(quantize(ws, wp), wp).astype(np.float64)).sum())
    return err


@dataclass
class _Site:
    """One activation read by eligible MatMuls: what is needed to choose and apply s."""

    x: Any
    matmuls: list[Any]
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    rows: list[np.ndarray] = field(default_factory=list)
    kept: int = 0


def _sites(model: Model, min_channels: int) -> list[_Site]:
    sites: dict[str, _Site] = {}
    for node in model.graph.gs.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant) or len(w.outputs) != 1:
            continue
        values = np.asarray(w.values)
        if values.ndim != 2 or values.dtype != np.float32 or values.shape[0] < min_channels:
            continue
        sites.setdefault(x.name, _Site(x, [])).matmuls.append(node)
    return list(sites.values())


def _foldable(site: _Site, graph_outputs: set[str]) -> tuple[Any, int] | None:
    """(producer, index of the constant to divide by s) when 1/s folds exactly into the
    producer: a LayerNormalization over the last axis (gamma and beta) or a Mul by a constant
    that broadcasts along the last axis only, read by nothing but the site's MatMuls."""
    x = site.x
    if not x.inputs or x.name in graph_outputs or len(x.outputs) != len(site.matmuls):
        return None
    prod, k = x.inputs[0], len(site.lo) if site.lo is not None else 0
    if prod.op == "LayerNormalization" and int(prod.attrs.get("axis", -1)) in (-1, len(x.shape or ()) - 1):
        consts = prod.inputs[1:3]
        if all(isinstance(c, gs.Constant) and np.asarray(c.values).shape == (k,) for c in consts) and len(prod.outputs) == 1:
            return prod, 1
    if prod.op == "Mul":
        for i, c in enumerate(prod.inputs):
            if isinstance(c, gs.Constant) and not isinstance(prod.inputs[1 - i], gs.Constant):
                shape = np.asarray(c.values).shape
                if all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k)):
                    return prod, i
    return None


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Per-input-channel scale migration for MatMuls with a constant 2-D float weight [K, N]
    (transformer projections): weights become ``s * W``; the activation becomes ``X / s``,
    folded exactly into the producer's constants where the producer is a LayerNormalization
    over the last axis or a Mul by a constant and the MatMuls are its only readers, otherwise
    by an inserted float ``Div(X, s)`` shared by the MatMuls reading X (`insert-div=false`: such
    activations are left alone; a Div, not a Mul by 1/s, because targets run a Mul in integer,
    which would quantize X before its outliers are divided out). The float model's outputs are unchanged up to rounding.

    `alphas`: the migration strengths tried per activation on the calibration data (the
    smallest simulated int8 output error wins; no migration if s = 1 is better); `rows`: at
    most this many activation rows (tokens) per activation kept for that search, spread over
    the samples; `samples`: calibration samples run (0: all); `min-channels`: smaller K is
    skipped. Requires calibration data; run before calibrate. report["smooth_quant"] lists
    each activation, its alpha, how 1/s was applied and the error before/after.
    """

    name = "smooth-quant"
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    rows: int = 1024
    samples: int = 0
    min_channels: int = 16
    insert_div: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise UserError(f"pass 'smooth-quant': option 'alphas={list(self.alphas)}' needs values in [0, 1]")
        if self.rows < 1:
            raise UserError(f"pass 'smooth-quant': option 'rows={self.rows}' must be at least 1")
        act, wrule = ctx.target.activation_rule(), ctx.target.weight_rule()
        sites = _sites(model, self.min_channels)
        if not sites or act.qtype is None or wrule.qtype is None:
            return PassResult(False)
        by_name = {s.x.name: s for s in sites}
        per_sample = max(1, self.rows // 16)

        def visit(name: str, arr: np.ndarray) -> None:
            site = by_name[name]
            flat = arr.reshape(-1, arr.shape[-1]).astype(np.float32)
            lo, hi = flat.min(axis=0), flat.max(axis=0)
            site.lo = lo if site.lo is None else np.minimum(site.lo, lo)
            site.hi = hi if site.hi is None else np.maximum(site.hi, hi)
            take = min(per_sample, self.rows - site.kept, len(flat))
            if take > 0:  # evenly spaced rows of every sample until the budget is spent
                site.rows.append(flat[np.linspace(0, len(flat) - 1, take).round().astype(int)])
                site.kept += take

        observe_values(model, ctx.calibration, list(by_name), visit, limit=self.samples, who=self.name)
        rw = ctx.rewriter(model)
        outputs = {v.name for v in model.graph.gs.outputs}
        report = []
        for site in sites:
            if site.lo is None or site.hi is None or not site.rows:
                continue
            entry = self._migrate(model, rw, site, act.qtype, wrule.qtype, wrule.per_channel, outputs)
            report.append(entry)
        ctx.report["smooth_quant"] = {"activations": report,
                                      "migrated": sum(1 for e in report if e["alpha"] is not None)}
        return PassResult(rw.modified)

    def _migrate(self, model: Model, rw: Rewriter, site: _Site, act: QType, wq: QType, per_channel: bool,
                 outputs: set[str]) -> dict[str, Any]:
        rows = np.concatenate(site.rows)
        weights = [np.asarray(mm.inputs[1].values) for mm in site.matmuls]
        w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_absmax = np.maximum(np.abs(site.lo), np.abs(site.hi))
        one = np.ones_like(x_absmax, dtype=np.float64)
        base = layer_error(rows, site.lo, site.hi, weights, one, act, wq, per_channel)
        best, best_err = None, base
        for a in self.alphas:
            err = layer_error(rows, site.lo, site.hi, weights, migration_scale(x_absmax, w_absmax, a), act, wq,
                              per_channel)
            if err < best_err * (1 - 1e-6):
                best, best_err = a, err
        entry: dict[str, Any] = {"activation": site.x.name, "matmuls": [m.name for m in site.matmuls],
                                 "alpha": best, "error_before": base, "error_after": best_err, "applied": None}
        if best is None:
            entry["applied"] = "skipped: no alpha lowers the simulated error"
            return entry
        s = migration_scale(x_absmax, w_absmax, best)
        fold = _foldable(site, outputs)
        if fold is None and not self.insert_div:
            entry["alpha"], entry["applied"] = None, "skipped: producer not foldable and insert-div=false"
            return entry
        for mm, w in zip(site.matmuls, weights):
            rw.set_input(mm, 1, rw.constant(mm.inputs[1].name + "_smooth", (w * s[:, None]).astype(w.dtype)))
        inv = (1.0 / s).astype(np.float32)
        if fold is not None:
            prod, idx = fold
            indices = (1, 2) if prod.op == "LayerNormalization" else (idx,)
            for i in indices:
                c = np.asarray(prod.inputs[i].values)
                rw.set_input(prod, i, rw.constant(prod.inputs[i].name + "_smooth", (c * inv).astype(c.dtype)))
            entry["applied"] = f"folded into {prod.op} '{prod.name}'"
            return entry
        scaled = rw.value(site.x.name + "_smooth", dtype=site.x.dtype, shape=site.x.shape)
        node = rw.create_node(model.graph, "Div", [site.x, rw.constant(site.x.name + "_s", s.astype(np.float32))], [scaled],
                              name=site.x.name + "_smooth", before=site.matmuls[0])
        for mm in site.matmuls:
            rw.set_input(mm, 0, scaled)
        entry["applied"] = f"inserted Div '{node.name}'"
        return entry
