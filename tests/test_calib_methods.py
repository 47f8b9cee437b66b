"""Range selection methods against slow, obviously-correct references on synthetic data:
percentile vs np.percentile on the raw samples, entropy vs a pure-Python KL loop, mse vs the
actual quantize/dequantize error over a grid of clip ranges, the moving average vs a loop over
per-sample extremes, and per-channel weight mse vs a per-channel brute force. Distributions
include heavy tails (Student-t, Laplace), one-sided (ReLU), all-zero and constant tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import qcompiler
from qcompiler.calibration.methods import (RangeTarget, entropy_range, entropy_threshold, moving_average_range, mse_range,
                                     percentile_range, weight_mse_clip, weight_mse_ranges, WEIGHT_FRACTIONS)
from qcompiler.calibration.stats import Statistics

BINS = 2048


def _data(kind: str, n: int = 200_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "student_t":
        x = rng.standard_t(2.5, n)
    elif kind == "laplace":
        x = rng.laplace(0, 1, n)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(n), 0)
    elif kind == "skewed":
        x = rng.gamma(2.0, 1.0, n) - 1.0
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def _hist(x: np.ndarray, kind: str) -> tuple[np.ndarray, float, float]:
    """The engine's histogram of ``x`` (Statistics.update_hist), with the engine's range."""
    lo, hi = float(x.min()), float(x.max())
    if kind == "abs":
        lo, hi = 0.0, max(abs(lo), abs(hi))
    st = Statistics()
    st.hist_spec["t"] = (kind, lo, hi, BINS)
    for chunk in np.array_split(x, 3):
        st.update_hist("t", chunk)
    return st.hist["t"], float(x.min()), float(x.max())


# -- histogram ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["signed", "abs"])
def test_histogram_counts_match_numpy(kind: str) -> None:
    """The engine's float32 binning equals np.histogram on the same edges except for values
    within float rounding of an edge (at most 0.01% move to a neighbouring bin)."""
    x = _data("laplace")
    counts, lo, hi = _hist(x, kind)
    src = np.abs(x) if kind == "abs" else x
    a, b = (0.0, max(abs(lo), abs(hi))) if kind == "abs" else (lo, hi)
    ref, _ = np.histogram(src.astype(np.float64), bins=BINS, range=(a, b))
    assert counts.sum() == x.size
    assert np.abs(counts - ref).sum() <= 2e-4 * x.size  # each moved value counts twice


# -- percentile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["normal", "student_t", "laplace", "relu", "skewed"])
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(dist: str, p: float) -> None:
    """Signed histogram: [P(100-p), P(p)] of the raw samples within one bin width; abs
    histogram (symmetric targets): the threshold equals P(p) of |x| within one bin width."""
    x = _data(dist)
    counts, lo, hi = _hist(x, "signed")
    width = (hi - lo) / BINS
    got_lo, got_hi = percentile_range(counts, lo, hi, p, "signed")
    assert abs(got_lo - float(np.percentile(x, 100 - p))) <= width + 1e-6
    assert abs(got_hi - float(np.percentile(x, p))) <= width + 1e-6

    counts_a, _, _ = _hist(x, "abs")
    amax = max(abs(lo), abs(hi))
    t_ref = float(np.percentile(np.abs(x), p))
    a_lo, a_hi = percentile_range(counts_a, lo, hi, p, "abs")
    t = max(-a_lo, a_hi)
    assert abs(t - t_ref) <= amax / BINS + 1e-6
    assert a_lo == max(lo, -t) and a_hi == min(hi, t)


def test_percentile_degenerate() -> None:
    """All-zero or constant tensors (no histogram mass spread) keep their observed range."""
    assert percentile_range(np.zeros(BINS, np.int64), 0.0, 0.0, 99.9, "signed") == (0.0, 0.0)
    assert percentile_range(np.zeros(BINS, np.int64), 2.5, 2.5, 99.9, "signed") == (2.5, 2.5)
    assert percentile_range(np.zeros(BINS, np.int64), 0.0, 0.0, 99.9, "abs") == (0.0, 0.0)


# -- entropy ----------------------------------------------------------------------------------------


def _ref_smoothed_kl(p: list[float], q: list[float], eps: float = 1e-4) -> float:
    dists = []
    for d in (p, q):
        total = sum(d)
        if total <= 0:
            return math.inf
        d = [v / total for v in d]
        zeros = sum(1 for v in d if v == 0)
        nonzero = len(d) - zeros
        if zeros:
            d = [eps if v == 0 else v - eps * zeros / nonzero for v in d]
            if min(d) <= 0:
                return math.inf
        dists.append(d)
    return sum(a * math.log(a / b) for a, b in zip(*dists))


def _ref_kl_curve(hist: list[int], nq: int) -> dict[int, float]:
    """Brute force, one threshold at a time, plain Python: P = the first i bins with the clipped
    tail added to the last one; Q = those bins merged into nq chunks (chunk k = bins
    k*i//nq .. (k+1)*i//nq - 1), each chunk's total spread evenly over P's non-empty bins in it."""
    curve = {}
    for i in range(nq, len(hist) + 1):
        p = [float(v) for v in hist[:i]]
        p[-1] += float(sum(hist[i:]))
        q = [0.0] * i
        for k in range(nq):
            a, b = k * i // nq, (k + 1) * i // nq
            total = float(sum(hist[a:b]))
            nonzero = [j for j in range(a, b) if p[j] > 0]
            for j in nonzero:
                q[j] = total / len(nonzero)
        curve[i] = _ref_smoothed_kl(p, q)
    return curve


@pytest.mark.parametrize("dist", ["normal", "student_t", "laplace", "relu"])
def test_entropy_threshold_matches_brute_force(dist: str) -> None:
    """On 512-bin |x| histograms (so the pure-Python reference stays fast) with 128 levels, the
    chosen bin count minimises the reference KL curve (to 1e-9 relative: sums in a different
    order)."""
    x = np.abs(_data(dist, 50_000, seed=3))
    hist, _ = np.histogram(x, bins=512, range=(0.0, float(x.max())))
    curve = _ref_kl_curve(hist.tolist(), 128)
    i = entropy_threshold(hist, 128)
    best = min(curve.values())
    assert curve[i] <= best + 1e-9 * max(abs(best), 1.0)


def test_entropy_end_to_end_within_a_bin() -> None:
    """From raw Student-t samples: the engine's threshold (its own 2048-bin histogram) lies
    within one bin width of the reference's on np.histogram counts of |x| (int8 symmetric,
    128 levels per side), and clips the heavy tail."""
    x = _data("student_t", 100_000, seed=4)
    counts, lo, hi = _hist(x, "abs")
    amax = max(abs(lo), abs(hi))
    got_lo, got_hi = entropy_range(counts, lo, hi, RangeTarget(254, True))
    t = max(-got_lo, got_hi)
    ref_hist, _ = np.histogram(np.abs(x).astype(np.float64), bins=BINS, range=(0.0, amax))
    t_ref = entropy_threshold(ref_hist, 128) * amax / BINS
    assert abs(t - t_ref) <= amax / BINS + 1e-6
    assert t < 0.5 * amax
    assert (got_lo, got_hi) == (max(lo, -t), min(hi, t))


def test_entropy_one_sided_uses_all_levels() -> None:
    """A ReLU tensor (lo >= 0) searches with levels + 1 quantized bins (every code on one side),
    a two-sided one with half: the one-sided threshold is never further clipped than the
    two-sided search on the same histogram."""
    x = _data("relu", 100_000, seed=5)
    counts, lo, hi = _hist(x, "abs")
    one = entropy_range(counts, lo, hi, RangeTarget(255, False))
    assert one[0] == lo == 0.0
    assert one[1] == entropy_threshold(counts, 256) * hi / BINS


def test_entropy_degenerate() -> None:
    assert entropy_range(np.zeros(BINS, np.int64), 0.0, 0.0, RangeTarget()) == (0.0, 0.0)
    assert entropy_range(np.zeros(BINS, np.int64), 3.0, 3.0, RangeTarget()) == (3.0, 3.0)


# -- mse --------------------------------------------------------------------------------------------


def _qdq_mse(x: np.ndarray, lo: float, hi: float, qtype: qcompiler.QType) -> float:
    qp = qcompiler.compute_qparams(lo, hi, qtype)
    return float(np.mean((qcompiler.dequantize(qcompiler.quantize(x, qp), qp).astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("dist", ["student_t", "laplace", "relu", "skewed"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_against_qdq_grid(dist: str, symmetric: bool) -> None:
    """The histogram mse range's actual QDQ error is within 2% of the best over a brute-force
    grid of clip ranges (the same 96 fractions of the extremes, scored on the raw samples), and
    never worse than minmax."""
    x = _data(dist, 50_000, seed=6)
    qtype = (qcompiler.QType("int8", True, -127, 127) if symmetric else qcompiler.QType("uint8", False, 0, 255))
    counts, lo, hi = _hist(x, "signed")
    got = mse_range(counts, lo, hi, qtype.qmax - qtype.qmin, symmetric, zeros=int(np.count_nonzero(x == 0)))
    fr = np.linspace(0.05, 1.0, 96)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        cands = [(-amax * f, amax * f) for f in fr]
    else:
        cands = [(min(lo, 0) * a, max(hi, 0) * b) for a in fr[::4] for b in fr[::4]] + [(lo, hi)]
    best = min(_qdq_mse(x, a, b, qtype) for a, b in cands)
    err = _qdq_mse(x, *got, qtype)
    assert err <= 1.02 * best
    assert err <= _qdq_mse(x, lo, hi, qtype) * 1.0001


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_degenerate(symmetric: bool) -> None:
    """A tensor that was always exactly 0 (empty histogram, lo = hi = 0) gets the range [0, 0]:
    finite, no division by the zero span, nothing widened out of thin air."""
    lo, hi = mse_range(np.zeros(BINS, np.int64), 0.0, 0.0, 255, symmetric)
    assert (lo, hi) == (0.0, 0.0) and np.isfinite([lo, hi]).all()


# -- moving average -----------------------------------------------------------------------------------


def test_moving_average_reference() -> None:
    rng = np.random.default_rng(7)
    mins, maxs = list(rng.uniform(-3, -1, 20)), list(rng.uniform(1, 3, 20))
    lo, hi = mins[0], maxs[0]
    for a, b in zip(mins[1:], maxs[1:]):
        lo, hi = 0.9 * lo + (1 - 0.9) * a, 0.9 * hi + (1 - 0.9) * b
    assert moving_average_range(mins, maxs, 0.9) == (lo, hi)
    assert moving_average_range([1.0], [2.0], 0.9) == (1.0, 2.0)


# -- weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_mse_matches_per_channel_brute_force(symmetric: bool) -> None:
    """Per channel (axis 0 of a conv weight with heavy-tailed channels), the chosen range is the
    brute-force argmin over the same fractions of the actual QDQ error (widest on ties); the
    clipped weight's error is never above minmax's."""
    rng = np.random.default_rng(8)
    w = rng.standard_t(2.0, (6, 4, 3, 3)).astype(np.float32)
    w[0] = 0.0  # an all-zero channel
    qtype = qcompiler.QType("int8", True, -127, 127) if symmetric else qcompiler.QType("uint8", False, 0, 255)
    lo, hi = weight_mse_ranges(w, qtype, 0)
    for c in range(w.shape[0]):
        row = w[c].reshape(-1)
        cl, ch = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        best, best_f = np.inf, None
        for f in WEIGHT_FRACTIONS[::-1]:
            a = float(np.float32(cl * f))
            b = float(np.float32(ch * f))
            err = _qdq_mse(row, a, b, qtype)
            if err < best:
                best, best_f = err, (a, b)
        assert (lo[c], hi[c]) == best_f
    clipped = weight_mse_clip(w, qtype, 0)
    for c in range(w.shape[0]):
        assert _qdq_mse(w[c].reshape(-1), float(clipped[c].min()), float(clipped[c].max()), qtype) <= \
            _qdq_mse(w[c].reshape(-1), float(w[c].min()), float(w[c].max()), qtype)


def test_insert_qdq_weight_range_mse() -> None:
    """insert-qdq{weight-range=mse}: the stored weights' dequantized error is no larger than
    with minmax ranges for every channel, and smaller in total on a heavy-tailed weight."""
    import onnx
    from onnx import helper, numpy_helper

    from conftest import make_model, tensor_info

    rng = np.random.default_rng(9)
    w = rng.standard_t(2.0, (8, 64, 3, 3)).astype(np.float32)  # 576 weights per channel, heavy tails
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                       [tensor_info("x", [1, 64, 8, 8])], [tensor_info("y", [1, 8, 6, 6])], [numpy_helper.from_array(w, "w")])
    data = {"x": rng.standard_normal((2, 1, 64, 8, 8)).astype(np.float32)}
    errs = {}
    for mode in ("minmax", "mse"):
        pipe = f"calibrate{{method=minmax}},insert-qdq{{rounding=nearest,bias-correction=false,weight-range={mode}}}"
        # tensorrt: int8 symmetric per-channel weights without ort-cpu's pair-sum scale limit
        r = qcompiler.compile(proto, target="tensorrt", calibration=data, pipeline=pipe, format="qdq", check=False)
        inits = {t.name: numpy_helper.to_array(t) for t in r.proto.graph.initializer}
        zp = inits.get("w_zero_point", np.zeros(8, np.int8)).astype(np.float32).reshape(-1, 1, 1, 1)
        deq = (inits["w_quantized"].astype(np.float32) - zp) * inits["w_scale"].reshape(-1, 1, 1, 1)
        errs[mode] = ((deq - w) ** 2).reshape(8, -1).sum(axis=1)
    assert (errs["mse"] <= errs["minmax"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < errs["minmax"].sum()
    with pytest.raises(qcompiler.UserError, match="weight-range"):
        qcompiler.compile(proto, calibration=data, pipeline="calibrate,insert-qdq{weight-range=best}", check=False)
    del onnx


def test_entropy_ignores_exact_zeros() -> None:
    """A ReLU6-like tensor (a spike of exact zeros, a spike at 6): the search runs on the
    histogram without the exact zeros (zero is always representable), so the threshold equals
    the brute force on that histogram, and the zero spike no longer drags it down to ~2 * nq
    bins (what the raw histogram gives)."""
    rng = np.random.default_rng(10)
    x = np.clip(rng.normal(-0.5, 2.0, 60_000), 0, 6).astype(np.float32)  # ~60% exact zeros
    counts, lo, hi = _hist(x, "abs")
    zeros = int(np.count_nonzero(x == 0))
    assert zeros > 10_000
    got = entropy_range(counts, lo, hi, RangeTarget(255, False), zeros)
    ref = counts.copy()
    ref[0] -= zeros
    assert got == (0.0, entropy_threshold(ref, 256) * hi / BINS)
    raw = entropy_range(counts, lo, hi, RangeTarget(255, False))
    assert raw[1] < 0.5 * got[1]
