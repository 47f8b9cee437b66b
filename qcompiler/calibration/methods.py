"""Range selection: from a tensor's statistics to the clipping range it is quantized with.

Each method reads what the engine collected (min/max, per-sample extremes, a fixed-range
histogram) and the target's integer grid for that tensor (:class:`RangeTarget`), and returns
``(lo, hi)``. They are pure functions of the statistics, so a cached or merged set of
statistics gives the same ranges as a fresh single-process run.

Histogram kinds: ``signed`` bins x over [lo, hi]; ``abs`` bins |x| over [0, max(|lo|, |hi|)].
Which kind a method needs is :func:`histogram_kind`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..quant import QType, compute_qparams, dequantize, quantize

__all__ = ["RangeTarget", "histogram_kind", "serves", "abs_from_signed",
           "percentile_range", "entropy_range", "entropy_threshold",
           "moving_average_range", "mse_range", "weight_mse_ranges", "weight_mse_clip"]

@dataclass(frozen=True)
class RangeTarget:
    """The integer grid a tensor is quantized onto: ``levels`` = qmax - qmin steps."""

    levels: int = 255
    symmetric: bool = False

    @classmethod
    def of(cls, qtype: QType | None) -> "RangeTarget":
        if qtype is None:
            return cls()
        return cls(int(qtype.qmax - qtype.qmin), bool(qtype.symmetric))


def histogram_kind(method: str, target: RangeTarget) -> str | None:
    """The histogram ``method`` reads for a tensor quantized onto ``target``: None (min/max
    only), 'signed' or 'abs'. percentile uses |x| for symmetric targets (one threshold) and x
    otherwise (two tails); entropy always searches a threshold on |x|; mse histograms x."""
    if method == "minmax":
        return None
    if method == "entropy" or (method == "percentile" and target.symmetric):
        return "abs"
    return "signed"


def serves(kind: str | None, method: str, target: RangeTarget) -> bool:
    """Whether statistics with a histogram of ``kind`` (None: min/max only) give ``method``
    its range on ``target``: its own kind, min/max (every kind), or an abs histogram derived
    from a signed one (:func:`abs_from_signed`). So a signed histogram serves all four methods."""
    need = histogram_kind(method, target)
    return need is None or need == kind or (need == "abs" and kind == "signed")


def abs_from_signed(counts: np.ndarray, lo: float, hi: float, zeros: int = 0) -> np.ndarray:
    """The |x| histogram over [0, max(|lo|, |hi|)] (as many bins as ``counts``, integer
    counts) of values histogrammed signed over [lo, hi]. Each signed bin covers an |x|
    interval (a bin across 0: two) of at most two abs bins; its count is shared among the abs
    bins it overlaps in proportion to the overlap, rounded to whole values by largest
    remainder, so a sparse tail stays as sparse as a directly binned one (entropy's divergence
    reads empty bins); the ``zeros`` exact zeros go to the first abs bin. Exact up to where the
    values lie inside a signed bin: quantiles move by at most one signed bin width,
    (hi - lo) / bins <= 2 abs bins (docs/design.md, "Accuracy budget")."""
    c = np.asarray(counts).astype(np.int64)
    bins = c.shape[0]
    amax = max(abs(lo), abs(hi))
    out = np.zeros(bins, dtype=np.int64)
    if not hi > lo or not amax > 0:
        out[0] = c.sum()
        return out
    c = c.copy()
    if zeros and lo <= 0.0 <= hi:
        z = min(int((0.0 - lo) * bins / (hi - lo)), bins - 1)
        moved = min(int(zeros), int(c[z]))
        c[z] -= moved
        out[0] += moved
    edges = lo + (hi - lo) * np.arange(bins + 1, dtype=np.float64) / bins
    a, b = edges[:-1], edges[1:]
    step = amax / bins
    idx, share = [], []  # per signed bin: up to 3 abs bins per side, and the share of its count each gets
    for s_lo, s_hi in ((np.maximum(-np.minimum(b, 0.0), 0.0), np.maximum(-a, 0.0)),  # |x| of the part below 0
                       (np.maximum(a, 0.0), np.maximum(b, 0.0))):                    # and above it
        first = np.floor(s_lo / step)
        for k in range(3):
            j = first + k
            overlap = np.clip(np.minimum(s_hi, (j + 1) * step) - np.maximum(s_lo, j * step), 0.0, None)
            idx.append(np.clip(j, 0, bins - 1).astype(np.int64))
            share.append(overlap)
    idx_a, share_a = np.stack(idx, axis=1), np.stack(share, axis=1)
    total = share_a.sum(axis=1, keepdims=True)
    share_a = np.divide(share_a, total, out=np.zeros_like(share_a), where=total > 0)
    exact = c[:, None] * share_a
    whole = np.floor(exact).astype(np.int64)
    left = c - whole.sum(axis=1)  # values still to place: to the largest remainders (ties: first)
    rank = np.argsort(-(exact - whole), axis=1, kind="stable").argsort(axis=1, kind="stable")
    whole += (rank < left[:, None]) & (share_a > 0)
    np.add.at(out, idx_a.ravel(), whole.ravel())
    return out


def _quantile(counts: np.ndarray, lo: float, hi: float, q: float) -> float:
    """The value below which a fraction ``q`` of the histogrammed values lie, interpolated
    linearly inside the bin that crosses it (error at most one bin width)."""
    c = counts.astype(np.float64)
    total = float(c.sum())
    if total <= 0 or not hi > lo:
        return lo
    width = (hi - lo) / c.shape[0]
    cum = np.cumsum(c)
    goal = q * total
    i = int(np.searchsorted(cum, goal, side="left"))
    i = min(i, c.shape[0] - 1)
    before = float(cum[i - 1]) if i else 0.0
    frac = (goal - before) / c[i] if c[i] > 0 else 1.0
    return lo + (i + min(max(frac, 0.0), 1.0)) * width


def percentile_range(counts: np.ndarray, lo: float, hi: float, percentile: float, kind: str) -> tuple[float, float]:
    """Clip at the ``percentile``-th percentile. ``abs`` histograms (symmetric targets) clip
    |x| at one threshold t: [max(lo, -t), min(hi, t)]; ``signed`` histograms clip each tail
    separately: [P(100 - p), P(p)]."""
    q = min(max(percentile / 100.0, 0.0), 1.0)
    if kind == "abs":
        amax = max(abs(lo), abs(hi))
        t = _quantile(counts, 0.0, amax, q)
        return max(lo, -t), min(hi, t)
    return _quantile(counts, lo, hi, 1.0 - q), _quantile(counts, lo, hi, q)


def _kl_one(hist: np.ndarray, i: int, nq: int) -> float:
    """KL(P || Q) for threshold bin ``i``: P = hist[:i] with the clipped tail added to its last
    bin; Q = hist[:i] merged into ``nq`` chunks (chunk k = bins k*i//nq .. (k+1)*i//nq - 1),
    each chunk's total spread evenly over P's non-empty bins in it."""
    p = hist[:i].copy()
    p[i - 1] += hist[i:].sum()
    nonzero = p > 0
    edges = (np.arange(nq + 1) * i) // nq
    starts = edges[:-1]
    sums = np.add.reduceat(hist[:i], starts)
    nz = np.add.reduceat(nonzero.astype(np.float64), starts)
    per = np.divide(sums, nz, out=np.zeros_like(sums), where=nz > 0)
    q = np.repeat(per, np.diff(edges)) * nonzero
    return _smoothed_kl(p, q)


def _smoothed_kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL divergence of two unnormalised distributions after moving ``eps`` of mass onto the
    empty bins of each (so log(p/q) stays finite); inf if either is all zero."""
    out = []
    for d in (p, q):
        total = d.sum()
        if total <= 0:
            return math.inf
        d = d / total
        zero = d == 0
        n_zero, n_nz = int(zero.sum()), int((~zero).sum())
        if n_zero:
            d = d + eps * zero - (eps * n_zero / n_nz) * (~zero)
            if (d <= 0).any():  # too few non-empty bins to give eps away: leave this threshold out
                return math.inf
        out.append(d)
    p, q = out
    return float(np.sum(p * np.log(p / q)))


def entropy_threshold(counts: np.ndarray, nq: int, step: int = 8) -> int:
    """The bin count i (threshold = upper edge of bin i-1) minimising the smoothed KL divergence
    between the clipped histogram and its ``nq``-level quantization (TensorRT-style search over
    i from nq to the number of bins). Ties go to the smallest i.

    Coarse to fine: every ``step``-th i first, then every i within ``step`` of the four best
    coarse ones (the divergence varies smoothly with i; ``step=1`` searches every i). Each
    evaluation is a few numpy passes over up to 2048 bins; all ~1900 of them took 0.18 s per
    tensor, the search as a whole more than the model runs of a histogram calibration."""
    hist = counts.astype(np.float64)
    bins = hist.shape[0]
    nq = max(1, min(nq, bins))
    seen: dict[int, float] = {}

    def kl(i: int) -> float:
        if i not in seen:
            seen[i] = _kl_one(hist, i, nq)
        return seen[i]

    step = max(1, int(step))
    coarse = sorted(set(range(nq, bins + 1, step)) | {bins})
    for i in coarse:
        kl(i)
    if step > 1:
        best = sorted(coarse, key=lambda i: (seen[i], i))[:4]
        for c in best:
            for i in range(max(nq, c - step + 1), min(bins, c + step - 1) + 1):
                kl(i)
    return min(seen, key=lambda i: (seen[i], i))


def entropy_range(counts: np.ndarray, lo: float, hi: float, target: RangeTarget,
                  zeros: int = 0) -> tuple[float, float]:
    """KL-divergence threshold on the |x| histogram over [0, max(|lo|, |hi|)], applied as
    [max(lo, -t), min(hi, t)]. Levels per side: a one-sided tensor (lo >= 0 or hi <= 0) spends
    all ``levels + 1`` codes on one side; a two-sided one half of them.

    ``zeros`` exact zeros are taken out of the first bin before the search: zero is always
    exactly representable, and a ReLU's spike at 0 would otherwise dominate the divergence
    (merging it with its neighbours looks expensive), pushing thresholds down to ~2 * nq bins
    whatever the data (measured: ReLU6 outputs of EfficientNet-Lite0 clipped from 6 to 1.5)."""
    amax = max(abs(lo), abs(hi))
    if zeros:
        counts = counts.copy()
        counts[0] = max(int(counts[0]) - int(zeros), 0)
    if not amax > 0 or counts.sum() == 0:
        return lo, hi
    one_sided = lo >= 0 or hi <= 0
    nq = target.levels + 1 if one_sided else target.levels // 2 + 1
    i = entropy_threshold(counts, nq)
    t = i * (amax / counts.shape[0])
    return max(lo, -t), min(hi, t)


def moving_average_range(mins: Sequence[float], maxs: Sequence[float], momentum: float) -> tuple[float, float]:
    """Exponential moving average of per-sample extremes in sample order:
    m <- momentum * m + (1 - momentum) * sample, starting from the first sample. Order
    dependent by definition; the engine keeps per-sample extremes by sample index so shards
    and batches still give the same result."""
    lo, hi = float(mins[0]), float(maxs[0])
    for a, b in zip(mins[1:], maxs[1:]):
        lo = momentum * lo + (1.0 - momentum) * float(a)
        hi = momentum * hi + (1.0 - momentum) * float(b)
    return lo, hi


def mse_range(counts: np.ndarray, lo: float, hi: float, levels: int, symmetric: bool,
              clip_weight: float = 1.0, zeros: int = 0) -> tuple[float, float]:
    """The clipping range [lo', hi'] within [lo, hi] that minimises the expected squared
    quantization error of the histogrammed values with ``levels`` integer steps: rounding
    noise step^2/12 inside the range, squared distance to the bound outside it (times
    ``clip_weight``: clipped outliers often matter more downstream than rounding noise).
    ``zeros`` exact zeros (ReLU outputs, padding) are always representable: no noise."""
    if counts.shape[0] > 512 and counts.shape[0] % 512 == 0:
        # search on 512 bins: 4x less work, ranges still resolved to 1/512 of the span
        group = counts.shape[0] // 512
        counts = counts.reshape(512, group).sum(axis=1)
    bins = counts.shape[0]
    centers = lo + (np.arange(bins) + 0.5) * ((hi - lo) / bins)
    c = counts.astype(np.float64)
    noisy = c.copy()
    if zeros and lo <= 0.0 <= hi:
        zbin = min(int((0.0 - lo) * bins / (hi - lo)), bins - 1) if hi > lo else 0
        noisy[zbin] = max(noisy[zbin] - zeros, 0.0)
    fractions = np.linspace(0.05, 1.0, 96)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        cand_lo, cand_hi = -amax * fractions, amax * fractions
    else:
        his = max(hi, 0.0) * fractions
        los = min(lo, 0.0) * fractions
        grid_lo, grid_hi = np.meshgrid(los, his, indexing="ij")
        cand_lo, cand_hi = grid_lo.reshape(-1), grid_hi.reshape(-1)
    # clipping error of every candidate at once from prefix sums of c, c*x, c*x^2 (values are
    # taken relative to the histogram's middle to keep the float64 cancellation small)
    mid = 0.5 * (lo + hi)
    x = centers - mid
    p0 = np.concatenate(([0.0], np.cumsum(c)))
    p1 = np.concatenate(([0.0], np.cumsum(c * x)))
    p2 = np.concatenate(([0.0], np.cumsum(c * x * x)))
    below = np.searchsorted(centers, cand_lo, side="left")    # centers < lo' are clipped up
    above = np.searchsorted(centers, cand_hi, side="right")   # centers > hi' are clipped down
    a, b = cand_lo - mid, cand_hi - mid
    low = p2[below] - 2.0 * a * p1[below] + a * a * p0[below]
    high = (p2[-1] - p2[above]) - 2.0 * b * (p1[-1] - p1[above]) + b * b * (p0[-1] - p0[above])
    step = np.maximum(cand_hi - cand_lo, 1e-12) / levels
    err = clip_weight * np.maximum(low + high, 0.0) + (step ** 2 / 12.0) * noisy.sum()
    i = int(np.argmin(err))
    return float(cand_lo[i]), float(cand_hi[i])


WEIGHT_FRACTIONS = np.round(np.arange(20, 101) / 100.0, 2)  # clip at 20%..100% of the extremes


def weight_mse_ranges(w: np.ndarray, qtype: QType, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (or per-tensor, ``axis`` None) clipping ranges of a constant weight that
    minimise its actual quantize/dequantize squared error in ``qtype``: each channel tries
    [f * min, f * max] for f in :data:`WEIGHT_FRACTIONS` (the same scale/zero point and
    rounding as the stored weight) and keeps the best; ties go to the widest range."""
    w = np.asarray(w, dtype=np.float32)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    lo = np.minimum(rows.min(axis=1).astype(np.float64), 0.0)
    hi = np.maximum(rows.max(axis=1).astype(np.float64), 0.0)
    best_err = np.full(rows.shape[0], np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    for f in WEIGHT_FRACTIONS[::-1]:  # widest first: strict improvement needed to narrow
        # bounds as float32, the values a clipped float32 weight has as its min/max
        c_lo = (lo * f).astype(np.float32).astype(np.float64)
        c_hi = (hi * f).astype(np.float32).astype(np.float64)
        qp = compute_qparams(c_lo, c_hi, qtype, axis=0)
        err = np.sum((dequantize(quantize(rows, qp), qp).astype(np.float64) - rows) ** 2, axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, c_lo, best_lo)
        best_hi = np.where(better, c_hi, best_hi)
    return best_lo, best_hi


def weight_mse_clip(w: np.ndarray, qtype: QType, axis: int | None) -> np.ndarray:
    """``w`` clipped per channel to its :func:`weight_mse_ranges` range: the min/max of the
    result are the chosen range, so ``weight_qparams`` on it gives the mse qparams."""
    w = np.asarray(w, dtype=np.float32)
    lo, hi = weight_mse_ranges(w, qtype, axis)
    if axis is None:
        return np.clip(w, np.float32(lo[0]), np.float32(hi[0]))
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(w, lo.astype(np.float32).reshape(shape), hi.astype(np.float32).reshape(shape))
