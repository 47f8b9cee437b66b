"""Calibration statistics: the mergeable collectors (min/max, histograms, channel means,
input second moments) that :mod:`qcompiler.calib_engine` fills while it runs the float model.

Samples are streamed: each sample's tensors are reduced into these and dropped, so memory does
not grow with the number of samples. ``Statistics`` extends ``RangeCollector`` with per-sample
extremes, histograms and zero counts. The data sources live in :mod:`qcompiler.calib_data`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calib_data import CalibrationData, Feed, InputSpec, input_specs, load_calibration
from .calib_methods import mse_range

__all__ = ["InputSpec", "CalibrationData", "load_calibration", "input_specs", "RangeCollector", "PatchSpec",
           "input_patches", "mse_range", "Statistics", "run_model"]


@dataclass(frozen=True)
class PatchSpec:
    """How a layer reads its input: a Conv's window (kernel, pads, strides, dilations, group)
    or a plain matrix product (``kernel`` empty). Used to form the input vectors whose second
    moments (x x^T) drive error-minimising weight rounding."""

    kernel: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1
    trans: bool = False  # Gemm transA: channels on axis 0


def input_patches(arr: np.ndarray, spec: PatchSpec, max_positions: int = 0) -> np.ndarray:
    """Input vectors [G, K, P] the layer multiplies by its weight rows (im2col for Conv), in
    the weight's flattening order (channel, then kernel positions). With ``max_positions``,
    only every ceil(P / max_positions)-th position (in (batch, output position) order) is
    kept, and only those are gathered: large feature maps are never unfolded whole."""
    if not spec.kernel:
        x = arr.T if spec.trans else arr
        return x.reshape(-1, x.shape[-1]).T[None]
    nd = len(spec.kernel)
    n, c = arr.shape[:2]
    pads = spec.pads or (0,) * (2 * nd)
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    x = np.pad(arr, width)
    dil = spec.dilations or (1,) * nd
    strides = spec.strides or (1,) * nd
    win = tuple(d * (k - 1) + 1 for d, k in zip(dil, spec.kernel))
    view = np.lib.stride_tricks.sliding_window_view(x, win, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dil)
    view = view[sl]  # [N, C, O1.., K1..]
    ksz = int(np.prod(spec.kernel))
    g = spec.group
    out_shape = (n,) + view.shape[2:2 + nd]
    total = int(np.prod(out_shape))
    step = -(-total // max_positions) if max_positions else 1
    if step > 1:
        picked = np.unravel_index(np.arange(0, total, step), out_shape)
        sub = view[(picked[0], slice(None)) + tuple(picked[1:])]  # [P', C, K1..]
        flat = np.ascontiguousarray(np.moveaxis(sub, 0, -1))     # [C, K1.., P']
        return flat.reshape(g, (c // g) * ksz, -1)
    # -> [C, K1.., N, O1..] in one copy, then [G, (C/G)*Ksz, P]
    order = (1,) + tuple(range(2 + nd, 2 + 2 * nd)) + (0,) + tuple(range(2, 2 + nd))
    flat = np.ascontiguousarray(view.transpose(order))
    return flat.reshape(g, (c // g) * ksz, -1)


def _widen(mins: dict[str, float], maxs: dict[str, float], name: str, arr: np.ndarray) -> tuple[float, float] | None:
    """Widen ``name``'s running [min, max] by ``arr``; returns arr's own extremes (None for an
    empty array or one holding NaN, which leave the range as it was)."""
    if arr.size == 0:
        return None
    lo = float(np.min(arr))
    hi = float(np.max(arr))
    if math.isnan(lo) or math.isnan(hi):
        return None
    mins[name] = min(lo, mins.get(name, lo))
    maxs[name] = max(hi, maxs.get(name, hi))
    return lo, hi


class RangeCollector:
    """Running per-tensor min/max (the ``minmax`` method); exact under any batching or order."""

    def __init__(self) -> None:
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.moments: dict[str, np.ndarray] = {}
        self.max_positions = 2048

    def update_moment(self, key: str, arr: np.ndarray, spec: PatchSpec) -> None:
        """Accumulate sum(x x^T) over the layer's input vectors (mergeable by addition)."""
        if spec.kernel and spec.group == 1 and all(k == 1 for k in spec.kernel) \
                and not any(spec.pads) and all(s == 1 for s in spec.strides or (1,)):
            n, ch = arr.shape[:2]
            flat = arr.reshape(n, ch, -1)
            total = n * flat.shape[2]
            step = -(-total // self.max_positions)
            if step > 1:  # gather only the evenly spaced positions kept, in (batch, position) order
                nb, pos = np.divmod(np.arange(0, total, step), flat.shape[2])
                x = np.ascontiguousarray(flat[nb, :, pos].T)
            else:
                x = np.moveaxis(flat, 1, 0).reshape(ch, -1)
            x = x.astype(np.float32, copy=False)
            m = (x @ x.T).astype(np.float64)[None]  # 1x1 conv: a channel covariance, one GEMM
        else:
            # large feature maps: evenly spaced positions estimate the moments well
            patches = input_patches(arr.astype(np.float32, copy=False), spec, self.max_positions)
            m = np.matmul(patches, np.swapaxes(patches, 1, 2)).astype(np.float64)
        self.moments[key] = self.moments[key] + m if key in self.moments else m

    def update_mean(self, name: str, arr: np.ndarray, axis: int) -> None:
        """Accumulate the per-channel mean along ``axis`` (for bias correction)."""
        if arr.size == 0 or arr.ndim == 0:
            return
        moved = np.moveaxis(arr.astype(np.float64), axis, -1).reshape(-1, arr.shape[axis])
        total = moved.sum(axis=0)
        if name in self.sums and self.sums[name].shape == total.shape:
            self.sums[name] += total
            self.counts[name] += moved.shape[0]
        else:
            self.sums[name] = total
            self.counts[name] = moved.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        return {k: self.sums[k] / max(self.counts[k], 1) for k in sorted(self.sums)}

    def update(self, name: str, arr: np.ndarray) -> None:
        _widen(self.mins, self.maxs, name, arr)

    def merge(self, other: "RangeCollector") -> None:
        """Add ``other``'s min/max, channel sums and moments into this collector."""
        for k, lo in other.mins.items():
            self.mins[k] = min(lo, self.mins.get(k, lo))
            self.maxs[k] = max(other.maxs[k], self.maxs.get(k, other.maxs[k]))
        for k, total in other.sums.items():
            if k in self.sums:
                self.sums[k] = self.sums[k] + total
                self.counts[k] += other.counts[k]
            else:
                self.sums[k], self.counts[k] = total.copy(), other.counts[k]
        for k, m in other.moments.items():
            self.moments[k] = self.moments[k] + m if k in self.moments else m.copy()

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {k: (self.mins[k], self.maxs[k]) for k in sorted(self.mins)}


def run_model(sess: Any, feed: Feed) -> list[Any]:
    """One onnxruntime run of the calibration model (module level so tests can count runs)."""
    return sess.run(None, feed)


_MAGIC = b"QCSTATS1"


class Statistics(RangeCollector):
    """Everything calibration observes, as one mergeable, serialisable object.

    Per tensor: min/max; per-sample extremes by sample index (for the moving-average
    method); a fixed-range histogram (``hist_spec`` = kind, lo, hi, bins) with its exact-zero
    count; per-channel sums/counts (bias correction); and per layer the input second moments
    (GPTQ). :meth:`merge` adds counts and sums, so shards, batches and groups combine to the
    same min/max, histograms and zero counts as one pass (float sums to the last bits).
    """

    def __init__(self) -> None:
        super().__init__()
        self.samples = 0
        self.per_sample: dict[str, dict[int, tuple[float, float]]] = {}
        self.hist: dict[str, np.ndarray] = {}
        self.hist_spec: dict[str, tuple[str, float, float, int]] = {}
        self.zeros: dict[str, int] = {}

    def update_range(self, name: str, arr: np.ndarray, index: int | None = None) -> None:
        """Running min/max; with ``index`` also this sample's own extremes."""
        seen = _widen(self.mins, self.maxs, name, arr)
        if seen is not None and index is not None:
            self.per_sample.setdefault(name, {})[index] = seen

    def update_hist(self, name: str, arr: np.ndarray) -> None:
        """Add ``arr`` to the tensor's fixed-range histogram (bins from its ``hist_spec``)."""
        spec = self.hist_spec.get(name)
        if spec is None or arr.size == 0:
            return
        kind, lo, hi, bins = spec
        if not hi > lo:
            return
        flat = arr.reshape(-1)
        src = np.abs(flat) if kind == "abs" else flat
        # bin index in float32 (values are float32 already); the last edge belongs to the last bin
        idx = ((src - np.float32(lo)) * np.float32(bins / (hi - lo))).astype(np.int32)
        np.minimum(idx, bins - 1, out=idx)
        np.maximum(idx, 0, out=idx)
        counts = np.bincount(idx, minlength=bins)
        self.hist[name] = self.hist[name] + counts if name in self.hist else counts
        self.zeros[name] = self.zeros.get(name, 0) + int(np.count_nonzero(flat == 0.0))

    def merge(self, other: "Statistics") -> "Statistics":  # type: ignore[override]
        """Add ``other`` into this object (in place) and return it."""
        for k in other.hist:
            if k in self.hist_spec and self.hist_spec[k] != other.hist_spec[k]:
                raise ValueError(f"histograms of '{k}' have different ranges; cannot merge")
        super().merge(other)
        self.samples += other.samples
        for k, table in other.per_sample.items():
            self.per_sample.setdefault(k, {}).update(table)
        for k, counts in other.hist.items():
            self.hist_spec[k] = other.hist_spec[k]
            self.hist[k] = self.hist[k] + counts if k in self.hist else counts.copy()
        for k, n in other.zeros.items():
            self.zeros[k] = self.zeros.get(k, 0) + n
        return self

    def sample_extremes(self, name: str) -> tuple[list[float], list[float]]:
        """Per-sample (mins, maxs) of ``name`` in sample-index order."""
        table = self.per_sample.get(name, {})
        order = sorted(table)
        return [table[i][0] for i in order], [table[i][1] for i in order]

    # -- deterministic serialization: a JSON header (sorted keys) then the raw arrays --------
    def to_bytes(self) -> bytes:
        arrays: list[list[Any]] = []
        blobs: list[bytes] = []
        offset = 0
        for section in ("hist", "sums", "moments"):
            table: dict[str, np.ndarray] = getattr(self, section)
            for name in sorted(table):
                arr = np.ascontiguousarray(table[name])
                data = arr.tobytes()
                arrays.append([section, name, arr.dtype.str, list(arr.shape), offset, len(data)])
                blobs.append(data)
                offset += len(data)
        header = {
            "samples": self.samples, "mins": self.mins, "maxs": self.maxs, "zeros": self.zeros,
            "counts": self.counts, "hist_spec": {k: list(v) for k, v in self.hist_spec.items()},
            "per_sample": {k: [[i, lo, hi] for i, (lo, hi) in sorted(t.items())] for k, t in self.per_sample.items()},
            "arrays": arrays,
        }
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return _MAGIC + len(head).to_bytes(8, "little") + head + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Statistics":
        if not data.startswith(_MAGIC):
            raise ValueError("not a qcompiler statistics file")
        n = int.from_bytes(data[8:16], "little")
        header = json.loads(data[16:16 + n])
        body = memoryview(data)[16 + n:]
        st = cls()
        st.samples = int(header["samples"])
        st.mins, st.maxs = dict(header["mins"]), dict(header["maxs"])
        st.zeros, st.counts = dict(header["zeros"]), dict(header["counts"])
        st.hist_spec = {k: (v[0], float(v[1]), float(v[2]), int(v[3])) for k, v in header["hist_spec"].items()}
        st.per_sample = {k: {int(i): (lo, hi) for i, lo, hi in rows} for k, rows in header["per_sample"].items()}
        for section, name, dtype, shape, off, size in header["arrays"]:
            arr = np.frombuffer(body[off:off + size], dtype=np.dtype(dtype)).reshape(shape).copy()
            getattr(st, section)[name] = arr
        return st
