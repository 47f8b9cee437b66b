"""equalize-layers: cross-layer equalization and bias absorption (Nagel et al., 2019).

With one scale per weight tensor (npu-int8), a layer whose output channels differ 100x in
weight range quantizes its small channels to a few levels. For ``Conv2(f(Conv1(x)))`` with f
positively homogeneous (identity, Relu), output channel c of Conv1 can be divided by s_c > 0
and input channel c of Conv2 multiplied by s_c without changing the function;
``s_c = sqrt(r1_c / r2_c)`` (r = the channel's max |w|) gives both layers the same per-channel
range ``sqrt(r1_c r2_c)``. Clip(0, 6) would need a per-channel bound 6/s_c, which no target's
integer Clip has, and HardSwish is not homogeneous: both are skipped and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler import Model, Pass, PassContext, PassResult, Rewriter, UserError, observe_values
from qcompiler import const_value, is_constant

__all__ = ["EqualizeLayers", "equalization_scale"]

_EXACT = ("", "Relu")  # f(x / s) = f(x) / s for s > 0


def equalization_scale(r1: np.ndarray, r2: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    """s_c = sqrt(r1_c / r2_c), 1 where either range is ~0 (a dead channel stays as it is)."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    ok = (r1 > floor) & (r2 > floor)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s


def _conv_weight(node: Any) -> np.ndarray | None:
    if node.op != "Conv" or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None
    if len(node.inputs) > 2 and node.inputs[2].name and not is_constant(node.inputs[2]):
        return None
    w = const_value(node.inputs[1])
    return w if w.dtype == np.float32 and w.ndim >= 3 and len(node.inputs[1].outputs) == 1 else None


def _bias(node: Any, channels: int) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2].name:
        return const_value(node.inputs[2]).astype(np.float32)
    return np.zeros(channels, np.float32)


def _clip_bounds(node: Any) -> tuple[float, float] | None:
    vals = []
    for i, key in ((1, "min"), (2, "max")):
        if len(node.inputs) > i and node.inputs[i].name:
            if not is_constant(node.inputs[i]):
                return None
            vals.append(float(const_value(node.inputs[i])))
        else:
            vals.append(float(node.attrs.get(key, -np.inf if key == "min" else np.inf)))
    return vals[0], vals[1]


@dataclass
class _Pair:
    first: Any
    act: Any | None  # the activation between them (None: Conv -> Conv)
    second: Any
    w1: np.ndarray
    w2: np.ndarray
    depthwise: bool  # second is depthwise: input channel c is its output channel c
    lower: np.ndarray | None = None  # clip=data: least total scale per channel (inf: must stay 1)
    total: np.ndarray | None = None  # clip=data: scale applied so far


def _pairs(model: Model, clip_as_relu: bool | None) -> tuple[list[_Pair], list[dict[str, str]]]:
    """Conv -> [activation] -> Conv chains whose intermediate values have one reader each
    (with ``clip_as_relu`` True, Clip(0, b) counts as a Relu: the caller drops its bound; None:
    Clip(0, b) pairs are kept, the caller bounds their scales)."""
    pairs, skipped = [], []
    outputs = {v.name for v in model.graph.outputs}
    for node in model.graph.nodes:
        w1 = _conv_weight(node)
        if w1 is None or len(node.outputs[0].outputs) != 1 or node.outputs[0].name in outputs:
            continue
        nxt, act = node.outputs[0].outputs[0], None
        if nxt.op != "Conv":
            act = nxt
            if sum(not is_constant(v) for v in act.inputs) != 1:
                continue  # a residual Add, a Concat: not an activation between two layers
            if len(act.outputs) != 1 or len(act.outputs[0].outputs) != 1 or act.outputs[0].name in outputs:
                continue
            nxt = act.outputs[0].outputs[0]
        w2 = _conv_weight(nxt)
        if w2 is None or nxt.inputs[0] is not (act or node).outputs[0]:
            continue
        c, group = w1.shape[0], int(nxt.attrs.get("group", 1))
        depthwise = group == c and w2.shape[0] == c and w2.shape[1] == 1
        if not depthwise and (group != 1 or w2.shape[1] != c):
            continue
        if act is not None and act.op not in _EXACT:
            why = ("Clip needs a per-channel bound after scaling; no integer Clip has one"
                   if act.op == "Clip" else f"{act.op} is not positively homogeneous")
            bounds = _clip_bounds(act) if act.op == "Clip" else None
            if bounds is not None and bounds[0] == 0.0 and (bounds[1] == np.inf or clip_as_relu is not False):
                why = ""  # Clip(0, inf) is a Relu; Clip(0, b) becomes one with clip=relu
            if why:
                skipped.append({"first": node.name, "activation": act.name, "second": nxt.name, "reason": why})
                continue
        pairs.append(_Pair(node, act, nxt, w1, w2, depthwise))
    return pairs, skipped


@dataclass(frozen=True)
class EqualizeLayers(Pass):
    """Cross-layer equalization of Conv -> [Relu | Clip(0, inf)] -> Conv pairs (the second may
    be depthwise) with constant float weights, each intermediate value read once: Conv1's
    output channels are divided by s and Conv2's input channels multiplied by s, so both
    weights get equal per-channel ranges; exact in float. Pairs through Clip(0, 6) or
    HardSwish are skipped and listed in report["equalize_layers"]["skipped"] with the reason.

    `iterations`: sweeps over all pairs (a chain's pairs share layers). `absorb-bias` (needs
    calibration data): after equalization, for a Conv -> Relu -> Conv pair, each channel's
    c = max(0, mean - 3 std) of Conv1's output on the calibration samples moves from Conv1's
    bias into Conv2's (``b2 += sum W2 c``), shrinking the activation range; exact wherever
    Conv1's output is >= c (by the 3-sigma rule almost everywhere) and Conv2 pads with zeros
    away from the border. `only-per-tensor` (default true): do nothing unless the target's
    weights are per tensor, where equalization pays off. `clip=relu` (inexact, as AIMET does
    for ReLU6): a Clip(0, b) between the pair becomes a Relu and the pair is equalized; the
    float model then differs wherever the pre-activation exceeded b (the report counts them).
    `clip=data` (needs calibration data) keeps Clip(0, b) and bounds each channel's scale so
    that the Clip stays exact for pre-activations up to `margin` (default 2) times their
    calibration maxima m_c: a channel with margin * m_c >= b keeps s = 1, others take
    s >= margin * m_c / b (inputs beyond that may clip where the float model did not).
    """

    name = "equalize-layers"
    clip: str = "skip"  # skip: Clip(0, b) pairs left alone | relu: bound dropped (inexact) | data: scales kept exact on calibration data
    iterations: int = 4
    margin: float = 2.0  # clip=data: headroom over the calibration maxima (see _clip_limits)
    absorb_bias: bool = False
    sigmas: float = 3.0
    only_per_tensor: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.iterations < 1:
            raise UserError(f"pass 'equalize-layers': option 'iterations={self.iterations}' must be at least 1")
        if self.only_per_tensor and ctx.target.weight_rule().per_channel:
            ctx.report["equalize_layers"] = {"pairs": 0, "skipped": [], "note": "target weights are per channel"}
            return PassResult(False)
        if self.clip not in ("skip", "relu", "data"):
            raise UserError(f"pass 'equalize-layers': option 'clip={self.clip}' must be 'skip', 'relu' or 'data'")
        if self.clip == "data" and ctx.calibration is None:
            raise UserError("pass 'equalize-layers': option 'clip=data' needs calibration data (--calibration PATH)")
        pairs, skipped = _pairs(model, {"skip": False, "relu": True, "data": None}[self.clip])
        rw = ctx.rewriter(model)
        unbounded = 0
        if self.clip == "data":
            if self.margin < 1.0:
                raise UserError(f"pass 'equalize-layers': option 'margin={self.margin}' must be at least 1")
            _clip_limits(model, ctx, [p for p in pairs if p.act is not None and p.act.op == "Clip"], self.name,
                         self.margin)
        for p in pairs:
            if self.clip == "relu" and p.act is not None and p.act.op == "Clip" and _clip_bounds(p.act) != (0.0, np.inf):
                relu = rw.value(p.act.outputs[0].name + "_relu", dtype=p.act.outputs[0].dtype,
                                shape=p.act.outputs[0].shape)
                new = rw.create_node(model.graph, "Relu", [p.act.inputs[0]], [relu], name=p.act.name + "_relu",
                                     before=p.act)
                rw.set_input(p.second, 0, relu)
                rw.erase_node(model.graph, p.act)
                p.act, unbounded = new, unbounded + 1
        before = [_spread(p) for p in pairs]
        for _ in range(self.iterations):
            for p in pairs:
                self._equalize(rw, p)
        absorbed = self._absorb(model, ctx, rw, pairs) if self.absorb_bias and pairs else 0
        ctx.report["equalize_layers"] = {
            "pairs": len(pairs), "absorbed_channels": absorbed, "skipped": skipped,
            "clips_made_relu": unbounded,
            "spread_before": round(float(np.median(before)), 3) if before else None,
            "spread_after": round(float(np.median([_spread(p) for p in pairs])), 3) if pairs else None}
        return PassResult(rw.modified)

    @staticmethod
    def _equalize(rw: Rewriter, p: _Pair) -> None:
        # a chain's middle layer is the second of one pair and the first of the next: read
        # both weights from the graph, never from an earlier copy
        p.w1, p.w2 = const_value(p.first.inputs[1]), const_value(p.second.inputs[1])
        axes1 = tuple(range(1, p.w1.ndim))
        r1 = np.abs(p.w1).max(axis=axes1)
        r2 = np.abs(p.w2).max(axis=tuple(range(1, p.w2.ndim))) if p.depthwise else \
            np.abs(p.w2).max(axis=(0,) + tuple(range(2, p.w2.ndim)))
        s = equalization_scale(r1, r2)
        if p.lower is not None and p.total is not None:  # Clip(0, b) kept exact on the calibration data
            total = np.where(np.isinf(p.lower), 1.0, np.maximum(p.total * s, p.lower))
            s, p.total = total / p.total, total
        if np.allclose(s, 1.0, rtol=1e-6):
            return
        shape1 = (-1,) + (1,) * (p.w1.ndim - 1)
        p.w1 = (p.w1 / s.reshape(shape1)).astype(np.float32)
        shape2 = shape1 if p.depthwise else (1, -1) + (1,) * (p.w2.ndim - 2)
        p.w2 = (p.w2 * s.reshape(shape2)).astype(np.float32)
        rw.set_input(p.first, 1, rw.constant(p.first.inputs[1].name + "_eq", p.w1))
        rw.set_input(p.second, 1, rw.constant(p.second.inputs[1].name + "_eq", p.w2))
        if len(p.first.inputs) > 2 and p.first.inputs[2].name:
            b1 = _bias(p.first, len(s)) / s.astype(np.float32)
            rw.set_input(p.first, 2, rw.constant(p.first.inputs[2].name + "_eq", b1.astype(np.float32)))

    def _absorb(self, model: Model, ctx: PassContext, rw: Rewriter, pairs: list[_Pair]) -> int:
        relu = [p for p in pairs if p.act is not None and p.lower is None]  # a moved bias would move b too
        sums: dict[str, list[np.ndarray]] = {}

        def visit(name: str, arr: np.ndarray) -> None:
            x = arr.astype(np.float64)
            axes = (0,) + tuple(range(2, x.ndim))
            n = x.size / x.shape[1]
            acc = sums.setdefault(name, [np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.zeros(1)])
            acc[0] += x.sum(axis=axes)
            acc[1] += np.square(x).sum(axis=axes)
            acc[2] += n

        observe_values(model, ctx.calibration, [p.first.outputs[0].name for p in relu], visit, who=self.name)
        absorbed = 0
        for p in relu:
            p.w2 = const_value(p.second.inputs[1])
            total, square, n = sums[p.first.outputs[0].name]
            mean = total / n
            std = np.sqrt(np.maximum(square / n - mean**2, 0.0))
            c = np.maximum(0.0, mean - self.sigmas * std).astype(np.float32)
            if not c.any():
                continue
            b1 = _bias(p.first, len(c)) - c
            w2 = p.w2.astype(np.float64)
            moved = (w2.sum(axis=tuple(range(2, w2.ndim))) * (c[:, None] if p.depthwise else c[None, :]))
            b2 = _bias(p.second, w2.shape[0]) + moved.sum(axis=1).astype(np.float32)
            rw.set_input(p.first, 2, rw.constant(p.first.name + "_bias_abs", b1.astype(np.float32)))
            rw.set_input(p.second, 2, rw.constant(p.second.name + "_bias_abs", b2.astype(np.float32)))
            absorbed += int((c > 0).sum())
        return absorbed


def _clip_limits(model: Model, ctx: PassContext, pairs: list[_Pair], who: str, margin: float) -> None:
    """For Conv1 -> Clip(0, b) -> Conv2 pairs: dividing Conv1's channel c by s keeps the Clip
    exact iff no value crosses b because of it. Taking inputs to reach ``margin`` times the
    calibration maximum m_c of the pre-activation: a channel with 0 < margin * m_c < b takes
    any s >= margin * m_c / b; one that may reach b (saturate), or never went above 0 (no
    bound known), keeps s = 1 (its clipped values
    would need the bound b / s)."""
    peaks: dict[str, np.ndarray] = {}

    def visit(name: str, arr: np.ndarray) -> None:
        m = arr.max(axis=(0,) + tuple(range(2, arr.ndim))).astype(np.float64)
        peaks[name] = np.maximum(peaks[name], m) if name in peaks else m

    observe_values(model, ctx.calibration, [p.first.outputs[0].name for p in pairs], visit, who=who)
    for p in pairs:
        b = _clip_bounds(p.act)[1]  # type: ignore[index]  # _pairs kept only Clip(0, b)
        m = peaks[p.first.outputs[0].name]
        lim = m * margin
        p.lower = np.where((m > 0) & (lim < b), lim / b, np.inf)  # never positive on the data: no bound known
        p.total = np.ones_like(m)


def _spread(p: _Pair) -> float:
    """max/median of Conv1's per-output-channel weight ranges (1 = perfectly equalized)."""
    r = np.abs(p.w1).max(axis=tuple(range(1, p.w1.ndim)))
    med = float(np.median(r))
    return float(r.max() / med) if med > 0 else 1.0
