"""Calibration statistics: the mergeable collectors (min/max, histograms, channel means,
input second moments) that :mod:`qcompiler.calibration.engine` fills while it runs the float model.

Samples are streamed: each sample's tensors are reduced into these and dropped, so memory does
not grow with the number of samples. ``Statistics`` extends ``RangeCollector`` with per-sample
extremes, histograms and zero counts. The data sources live in :mod:`qcompiler.calibration.data`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Feed

__all__ = ["RangeCollector", "PatchSpec", "input_patches", "gram", "sample_moments", "flush_columns",
           "channel_totals", "Statistics", "run_model"]


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
    kept, and only those are gathered: large feature maps are never unfolded whole.

    The patches come from one ``np.take`` along the flattened (padded) spatial axis: each
    kept position's flat index plus each kernel tap's flat offset. Written straight into the
    [C, K, P] layout the moment GEMM reads, this is 2-4x faster than fancy-indexing a
    sliding-window view and transposing it (depthwise 5x5 layers dominated the moments)."""
    if not spec.kernel:
        x = arr.T if spec.trans else arr
        return x.reshape(-1, x.shape[-1]).T[None]
    nd = len(spec.kernel)
    n, c = arr.shape[:2]
    pads = spec.pads or (0,) * (2 * nd)
    x = np.pad(arr, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]) if any(pads) else arr
    space = x.shape[2:]
    dil = spec.dilations or (1,) * nd
    strides = spec.strides or (1,) * nd
    outs = tuple((space[i] - dil[i] * (spec.kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd))
    size = int(np.prod(space))
    flat = x.reshape(n, c, size)
    rows = flat[0] if n == 1 else np.moveaxis(flat, 0, 1).reshape(c, n * size)  # [C, N*space]
    total = n * int(np.prod(outs))
    step = -(-total // max_positions) if max_positions else 1
    where = np.unravel_index(np.arange(0, total, step), (n,) + outs)
    span = [int(np.prod(space[i + 1:])) for i in range(nd)]  # flat stride of each spatial axis
    base = where[0] * size + sum(where[i + 1] * (strides[i] * span[i]) for i in range(nd))
    taps = np.indices(spec.kernel).reshape(nd, -1)
    offset = sum(taps[i] * (dil[i] * span[i]) for i in range(nd))
    cols = np.take(rows, (offset[:, None] + base[None, :]).ravel(), axis=1)  # [C, K*P]
    return cols.reshape(spec.group, (c // spec.group) * offset.size, base.size)


def flush_columns(k: int) -> int:
    """Queued input vectors of a K-wide layer that make one moment product: K/4 (at least 128,
    at most K), so the queue takes at most a quarter of the [G, K, K] result's memory for a
    wide layer (MiniLM's 1536-wide: 2.4 MB each, not 9.4) and no more than the result."""
    return max(min(k, 128), k // 4)


def sample_moments(cols: np.ndarray) -> tuple[str, np.ndarray]:
    """One sample's share of a layer's moments: its own product (``gram``) when it has enough
    vectors to be multiplied alone, else the vectors (``columns``) to queue with later
    samples' (a wide layer on a small map). Computed where the vectors are (a lane)."""
    if cols.shape[2] >= flush_columns(cols.shape[1]):
        return "gram", gram(cols)
    return "columns", cols


def gram(cols: np.ndarray) -> np.ndarray:
    """sum over vectors of x x^T, per group: [G, K, P] -> [G, K, K] (float32).

    One group (a dense layer): numpy's BLAS product. Many small groups (a depthwise layer:
    1152 groups of 25x49): onnxruntime's batched MatMul on one thread, 1.6-2x faster than
    numpy's per-matrix BLAS calls, and it holds no lock while it runs, so two calibration
    lanes multiply at once (numpy's loop scaled 1.4x on two threads)."""
    if cols.shape[0] == 1 or cols.shape[1] * cols.shape[2] == 0:
        return np.matmul(cols, np.swapaxes(cols, 1, 2))
    return _gram_session().run(None, {"x": np.ascontiguousarray(cols, dtype=np.float32)})[0]


_GRAM: list[Any] = []
_GRAM_LOCK = threading.Lock()


def _gram_session() -> Any:
    with _GRAM_LOCK:
        if not _GRAM:
            import onnxruntime as ort
            from onnx import TensorProto, helper

            graph = helper.make_graph(
                [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "xt"], ["y"])],
                "gram", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["g", "k", "p"])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["g", "k", "k"])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1  # called from each lane: one thread apiece
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            _GRAM.append(ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]))
        return _GRAM[0]


def channel_totals(arr: np.ndarray, axis: int) -> np.ndarray | None:
    """Per-channel sums of ``arr`` along ``axis`` (float64; None for an empty array): a float32
    einsum sum (SIMD, as fast as a BLAS matrix-vector product but on the calling thread:
    concurrent lanes would contend for BLAS's own threads)."""
    if arr.size == 0 or arr.ndim == 0:
        return None
    axis %= arr.ndim
    c = arr.shape[axis]
    if axis == arr.ndim - 1:
        return np.einsum("ij->j", arr.reshape(-1, c).astype(np.float32, copy=False)).astype(np.float64)
    x = np.moveaxis(arr, axis, 0).reshape(c, -1) if axis else arr.reshape(c, -1)
    return np.einsum("ij->i", x.astype(np.float32, copy=False)).astype(np.float64)


def _widen(mins: dict[str, float], maxs: dict[str, float], name: str, arr: np.ndarray) -> tuple[float, float] | None:
    """Widen ``name``'s running [min, max] by ``arr``; returns arr's own extremes (None for an
    empty array or one holding NaN, which leave the range as it was). Called for every observed
    tensor of every sample (50k times for minilm at 256 samples): ufunc reductions directly and
    no helper calls, a third of the cost of np.min/np.max with math.isnan."""
    if arr.size == 0:
        return None
    lo = float(np.minimum.reduce(arr, axis=None))
    hi = float(np.maximum.reduce(arr, axis=None))
    if lo != lo or hi != hi:  # NaN propagates through both reductions
        return None
    old = mins.get(name)
    if old is None:
        mins[name], maxs[name] = lo, hi
    else:
        if lo < old:
            mins[name] = lo
        if hi > maxs[name]:
            maxs[name] = hi
    return lo, hi


class RangeCollector:
    """Running per-tensor min/max (the ``minmax`` method); exact under any batching or order."""

    def __init__(self) -> None:
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self._moments: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[np.ndarray]] = {}  # input vectors not yet multiplied
        self.max_positions = 2048

    @property
    def moments(self) -> dict[str, np.ndarray]:
        """Per layer, sum(x x^T) over its input vectors: [G, K, K] float32."""
        for key in list(self._pending):
            self._flush(key)
        return self._moments

    @moments.setter
    def moments(self, table: dict[str, np.ndarray]) -> None:
        self._pending = {}
        self._moments = table

    def positions_for(self, k: int, grouped: bool = False) -> int:
        """Input vectors kept per sample for a layer whose weight rows have ``k`` entries.

        The second-moment matrix has k x k entries; 8k vectors per sample (at least 64) over
        the first samples estimate it well when k is small, while a large layer needs
        more. Gathering every position of a large feature map (12544 on a 112x112 map) made
        moments cost more than the model run itself. Grouped (depthwise) layers have one small
        matrix per group (C of them a sample): half as many there."""
        return min(self.max_positions, max(32, 4 * k) if grouped else max(64, 8 * k))

    def moment_columns(self, arr: np.ndarray, spec: PatchSpec) -> np.ndarray:
        """The layer input vectors [G, K, P] of one sample whose second moments are wanted:
        evenly spaced positions, ``positions_for`` of them. Reads only ``max_positions``, so
        lanes compute these concurrently; :meth:`add_moment_columns` accumulates them."""
        if spec.kernel:
            k = arr.shape[1] // max(spec.group, 1) * int(np.prod(spec.kernel))
        else:
            k = arr.shape[0] if spec.trans else arr.shape[-1]
        return input_patches(arr.astype(np.float32, copy=False), spec, self.positions_for(k, spec.group > 1))

    def add_moment_columns(self, key: str, cols: np.ndarray) -> None:
        """Queue a sample's input vectors; they are multiplied once ``flush_columns(K)`` are
        queued (one GEMM per batch of samples, not one per sample: a 1152-wide layer sees 49
        positions per sample), then accumulated in float32."""
        pending = self._pending.setdefault(key, [])
        pending.append(cols)
        if sum(c.shape[2] for c in pending) >= flush_columns(cols.shape[1]):
            self._flush(key)

    def add_moments(self, key: str, kind: str, value: np.ndarray) -> None:
        """Add what :func:`sample_moments` made of one sample's vectors."""
        if kind == "gram":
            self.add_moment_product(key, value)
        else:
            self.add_moment_columns(key, value)

    def update_moment(self, key: str, arr: np.ndarray, spec: PatchSpec) -> None:
        self.add_moments(key, *sample_moments(self.moment_columns(arr, spec)))

    def _flush(self, key: str) -> None:
        pending = self._pending.pop(key, [])
        if not pending:
            return
        self._add_product(key, gram(pending[0] if len(pending) == 1 else np.concatenate(pending, axis=2)))

    def add_moment_product(self, key: str, product: np.ndarray) -> None:
        """Add a sample's own ``gram(columns)`` (computed where the columns were: a lane), for
        layers whose sample has at least K vectors; queued vectors of earlier samples are
        multiplied first, so the sums still follow sample order."""
        self._flush(key)
        self._add_product(key, product)

    def _add_product(self, key: str, m: np.ndarray) -> None:
        if key in self._moments:
            self._moments[key] += m
        else:
            self._moments[key] = m

    def update_mean(self, name: str, arr: np.ndarray, axis: int) -> None:
        """Accumulate the per-channel mean along ``axis`` (for bias correction)."""
        total = channel_totals(arr, axis)
        if total is not None:
            self.add_channel_totals(name, total, arr.size // total.size)

    def add_channel_totals(self, name: str, total: np.ndarray, count: int) -> None:
        """Add one sample's per-channel sums (float64) over ``count`` values per channel."""
        if name in self.sums and self.sums[name].shape == total.shape:
            self.sums[name] += total
            self.counts[name] += count
        else:
            self.sums[name] = total
            self.counts[name] = count

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
        mine = self.moments
        for k, m in other.moments.items():
            mine[k] = mine[k] + m if k in mine else m.copy()

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {k: (self.mins[k], self.maxs[k]) for k in sorted(self.mins)}


def run_model(sess: Any, feed: Feed, outputs: list[str] | None = None) -> list[Any]:
    """One onnxruntime run of the calibration model, fetching ``outputs`` (default: all);
    module level so tests can count runs."""
    return sess.run(outputs, feed)


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
        # bin index in float32 (values are float32 already), in one scratch array; the last
        # edge belongs to the last bin
        if src is not flat and src.dtype == np.float32:
            pos = src  # |x|: already a scratch array
            if lo != 0.0:
                np.subtract(pos, np.float32(lo), out=pos)
        else:
            pos = np.subtract(src, np.float32(lo), dtype=np.float32)
        np.multiply(pos, np.float32(bins / (hi - lo)), out=pos)
        np.clip(pos, 0, bins - 1, out=pos)
        counts = np.bincount(pos.astype(np.int32), minlength=bins)
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
