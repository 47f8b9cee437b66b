"""Quantization arithmetic shared by passes: integer ranges, qparams, array quantization.

Formulas follow the ONNX QuantizeLinear definition (round half to even on ``x / scale``,
then add the zero point, then saturate) so offline-quantized weights equal what a
QuantizeLinear node would produce at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["QType", "QParams", "qrange", "range_fits_float32", "valid_scale", "compute_qparams", "weight_qparams", "gptq_round", "quantize", "dequantize",
           "DTYPES", "INT_RANGES", "MIN_OPSET", "block_expand"]

class _DtypeTable(Mapping[str, np.dtype]):
    """Storage dtype name -> numpy dtype. The 4-bit types come from ml_dtypes (a dependency of
    onnx), imported only when one is asked for: it costs 0.6 s of CPU, and `qcompiler targets`
    must not pay for it (docs/design.md, "Import time")."""

    _NAMES = ("uint8", "int8", "uint16", "int16", "int32", "int4", "uint4")

    def __getitem__(self, name: str) -> np.dtype:
        if name not in self._NAMES:
            raise KeyError(name)
        if name in ("int4", "uint4"):
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, name))
        return np.dtype(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


DTYPES: Mapping[str, np.dtype] = _DtypeTable()
# full integer range per dtype (np.iinfo does not know the ml_dtypes 4-bit types)
INT_RANGES: dict[str, tuple[int, int]] = {
    "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1), "int4": (-8, 7), "uint4": (0, 15),
}
# first default-domain opset whose QuantizeLinear/DequantizeLinear accept the dtype
MIN_OPSET: dict[str, int] = {"uint8": 10, "int8": 10, "int32": 10, "uint16": 21, "int16": 21, "int4": 21, "uint4": 21}


@dataclass(frozen=True)
class QType:
    """How one tensor is quantized: storage dtype, integer range, symmetry, scale rule."""

    dtype: str = "uint8"
    symmetric: bool = False
    qmin: int = 0
    qmax: int = 255
    power_of_two: bool = False
    pair_sum_max: int = 0  # >0: any two |q| of one channel sum to at most this (int16 pair accumulation)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


_F32 = np.finfo(np.float32)


def range_fits_float32(lo: float, hi: float) -> bool:
    """Whether a real range [lo, hi] can become a float32 scale: both ends and the width are
    finite in float32 (a width of 1e39 or a bound of 1e308 makes the scale inf)."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and abs(float(hi) - float(lo)) <= float(_F32.max)
                and max(abs(float(lo)), abs(float(hi))) <= float(_F32.max))


def valid_scale(scale: float) -> bool:
    """A scale Q/DQ can use: a positive, finite, normal float32."""
    return bool(np.isfinite(scale) and float(_F32.tiny) <= float(scale) <= float(_F32.max))


def qrange(dtype: str, *, narrow: bool = False, bits: int | None = None,
           explicit: tuple[int, int] | None = None) -> tuple[int, int]:
    """Integer range of a dtype, optionally reduced to ``bits`` or narrowed (drop the most
    negative value so the range is symmetric around zero)."""
    if explicit is not None:
        return int(explicit[0]), int(explicit[1])
    lo, hi = INT_RANGES[dtype]
    width = int(np.log2(hi - lo + 1))
    if bits is not None and bits < width:
        if lo < 0:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
    if narrow and lo < 0:
        lo = -hi
    return lo, hi


@dataclass(frozen=True)
class QParams:
    """Scale and zero point: scalars, 1-D per channel along ``axis``, or, with ``block_size``,
    arrays of the tensor's rank with ``axis`` divided into blocks (ONNX opset 21 blocked)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None
    block_size: int = 0

    def same_as(self, other: "QParams") -> bool:
        return (self.qtype.dtype == other.qtype.dtype and self.axis == other.axis
                and self.block_size == other.block_size
                and self.scale.shape == other.scale.shape
                and bool(np.all(self.scale == other.scale))
                and bool(np.all(self.zero_point == other.zero_point)))


def compute_qparams(rmin: np.ndarray | float, rmax: np.ndarray | float, qtype: QType,
                    axis: int | None = None) -> QParams:
    """Scale/zero point that represent [rmin, rmax] (widened to include 0) in ``qtype``."""
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = float(qtype.qmin), float(qtype.qmax)
    tiny = float(np.finfo(np.float32).tiny)
    if qtype.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = 2.0 * absmax / (qmax - qmin)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
    scale = np.where(scale > tiny, scale, 1.0)  # all-zero tensor: any scale is exact
    if qtype.power_of_two:
        scale = 2.0 ** np.ceil(np.log2(scale))
    scale = scale.astype(np.float32).astype(np.float64)  # zp from the scale actually stored
    if qtype.symmetric:
        zp = np.full_like(scale, 0.0 if qtype.qmin < 0 else np.round((qmin + qmax) / 2.0))
    else:
        zp = np.clip(np.round(qmin - rmin / scale), qmin, qmax)
    return QParams(np.asarray(scale, dtype=np.float32), np.asarray(zp).astype(qtype.np_dtype), qtype, axis)


def block_expand(a: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    """Repeat each block's entry ``block_size`` times along ``axis`` and cut to ``length``
    (how ONNX broadcasts a blocked scale or zero point over the tensor)."""
    return np.take(np.repeat(a, block_size, axis=axis), np.arange(length), axis=axis)


def _block_reduce(w: np.ndarray, axis: int, block_size: int, fn) -> np.ndarray:
    """``fn`` (min or max) over each block of ``block_size`` along ``axis``; the last block
    may be short (it is padded with its own edge value, which changes neither min nor max)."""
    n = w.shape[axis]
    blocks = -(-n // block_size)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, blocks * block_size - n)
    x = np.moveaxis(np.pad(w, pad, mode="edge"), axis, 0)
    x = fn(x.reshape((blocks, block_size) + x.shape[1:]), axis=1)
    return np.moveaxis(x, 0, axis)


def weight_qparams(w: np.ndarray, qtype: QType, axis: int | None, block_size: int = 0) -> QParams:
    """QParams for a constant weight, per tensor (``axis`` None), per channel, or blocked
    (``block_size`` > 0: one scale per run of ``block_size`` elements along ``axis``, every
    other dimension kept, as ONNX opset 21 defines it; ``pair_sum_max`` does not apply).

    With ``qtype.pair_sum_max`` the scale of each channel is raised just enough that its two
    largest magnitudes sum to at most that many steps: kernels that add products in int16
    pairs (x86 u8s8 without VNNI) then never saturate, whatever order they pair weights in,
    while a channel with one outlier keeps almost the full 8-bit resolution.
    """
    w = np.asarray(w, dtype=np.float32)
    if block_size and axis is not None:
        axis = axis % w.ndim
        lo = _block_reduce(w, axis, block_size, np.min)
        hi = _block_reduce(w, axis, block_size, np.max)
        qp = compute_qparams(lo, hi, qtype, axis=axis)
        return QParams(qp.scale, qp.zero_point, qtype, axis, block_size)
    if axis is None:
        qp = compute_qparams(float(w.min()), float(w.max()), qtype)
        flat = np.abs(w).reshape(1, -1)
    else:
        other = tuple(d for d in range(w.ndim) if d != axis)
        qp = compute_qparams(w.min(axis=other), w.max(axis=other), qtype, axis=axis)
        flat = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    if not qtype.pair_sum_max or not qtype.symmetric or flat.shape[1] < 2:
        return qp
    first, second = top_two(flat)
    need = (first.astype(np.float64) + second) / qtype.pair_sum_max
    scale = np.maximum(qp.scale.reshape(-1).astype(np.float64), need)
    if qtype.power_of_two:
        scale = 2.0 ** np.ceil(np.log2(np.where(scale > 0, scale, 1.0)))
    scale = scale.astype(np.float32)
    # float32 rounding of the scale can push two quotients over their .5 ties: check the
    # actual codes and nudge offending channels' scales up until the bound holds
    for _ in range(8):
        codes = np.abs(np.rint(flat.astype(np.float32) / scale.reshape(-1, 1)))  # as quantize() divides
        c1, c2 = top_two(codes)
        bad = c1 + c2 > qtype.pair_sum_max
        if not bad.any():
            break
        bigger = (scale * np.float32(2) if qtype.power_of_two  # stay a power of two
                  else np.nextafter(scale * np.float32(1 + 2**-20), np.float32(np.inf)))
        scale = np.where(bad, bigger, scale).astype(np.float32)
    return QParams(scale.reshape(qp.scale.shape), qp.zero_point, qtype, qp.axis)


def _bshape(p: QParams, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    ndim = len(shape)
    scale = p.scale.astype(np.float32)
    zp = p.zero_point.astype(np.int64)
    if p.block_size and p.axis is not None:
        return (block_expand(scale, p.axis, p.block_size, shape[p.axis]),
                block_expand(zp, p.axis, p.block_size, shape[p.axis]))
    if p.axis is not None and scale.ndim == 1:
        shape = [1] * ndim
        shape[p.axis % ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rint(x / scale) + zp), true division in float32."""
    scale, zp = _bshape(p, x.shape)
    q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zp
    return np.clip(q, p.qtype.qmin, p.qtype.qmax).astype(p.qtype.np_dtype)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    scale, zp = _bshape(p, q.shape)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def gptq_round(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
               qmin: int, qmax: int, *, damp: float = 0.01, pair_sum_max: int = 0) -> np.ndarray:
    """Choose integer weights that minimise the layer's output error, not the weight error.

    ``w`` is [G, R, K] (G independent groups of R output rows over K inputs), ``hessian`` is
    [G, K, K] = sum of x x^T over calibration inputs, ``scale``/``zero_point`` are per row
    [G, R], or per element [G, R, K] (blocked weights: a scale per block of columns). Columns
    are quantized one at a time and the rounding error of each is pushed onto
    the columns not yet quantized (the GPTQ/OBQ update), so errors cancel on the data the
    layer actually sees. Returns integer codes [G, R, K].

    GPTQ's update for column j is ``W[:, j+1:] -= e_j U[j, j+1:] / U[j, j]`` with ``U`` the
    upper Cholesky factor of H^-1 and ``e_j`` the error of the already-updated column. Summed
    up, the updated column k is ``w_k + sum_{j<k} (w_j - deq_j) M[j, k]``, where H = M D M^T
    with M unit upper triangular (M = (U / diag U)^-1): M comes from one Cholesky
    factorisation of H with rows and columns reversed, and no matrix inverse is needed. The
    sum is applied in blocks of columns (lazy batch updates): within a block column by
    column, then to all later columns in one matrix product.
    """
    g_count, rows, k = w.shape
    h = np.array(hessian, dtype=np.float64)  # a copy (damped below)
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    idx = np.arange(k)
    h[:, idx, idx] += damp * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12) + dead
    try:
        upper = np.linalg.cholesky(h[:, ::-1, ::-1])[:, ::-1, ::-1]  # H = R R^T, R upper triangular
    except np.linalg.LinAlgError:
        s3, z3 = (scale, zero_point) if scale.ndim == 3 else (scale[..., None], zero_point[..., None])
        return np.clip(np.rint(w / s3) + z3, qmin, qmax).astype(np.int64)
    m = upper / np.einsum("gkk->gk", upper)[:, None, :]  # unit diagonal: H = M D M^T
    w = w.astype(np.float64)
    work = w.copy()
    s = scale.astype(np.float64)
    z = zero_point.astype(np.float64)
    per_element = s.ndim == 3
    codes = np.empty(w.shape, dtype=np.int64)
    diff = np.empty(w.shape)  # w - dequantized code, per column
    block = 32  # measured on effnet/MiniLM: 16-32 fastest (Python per column vs in-block updates)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        # the block's columns as contiguous rows [G, columns, R]: a column read or update then
        # touches contiguous memory, not one cache line per row (2x faster on MiniLM's layers);
        # the arithmetic is elementwise and in the same order, so the codes are unchanged
        wb, w0 = (np.ascontiguousarray(a[:, :, b0:b1].transpose(0, 2, 1)) for a in (work, w))
        if per_element:
            sb, zb = (np.ascontiguousarray(a[:, :, b0:b1].transpose(0, 2, 1)) for a in (s, z))
        cb, db = np.empty_like(wb), np.empty_like(wb)
        mb = m[:, b0:b1, b0:b1]
        for i in range(b1 - b0):
            sj, zj = (sb[:, i], zb[:, i]) if per_element else (s, z)
            q = np.rint(wb[:, i] / sj)
            q += zj
            np.minimum(q, qmax, out=q)  # clip, without np.clip's Python-level dispatch
            np.maximum(q, qmin, out=q)
            cb[:, i] = q
            d = db[:, i]
            np.subtract(w0[:, i], (q - zj) * sj, out=d)
            if i + 1 < b1 - b0:
                wb[:, i + 1:] += mb[:, i, i + 1:, None] * d[:, None, :]
        codes[:, :, b0:b1] = cb.transpose(0, 2, 1)
        diff[:, :, b0:b1] = db.transpose(0, 2, 1)
        if b1 < k:
            work[:, :, b1:] += diff[:, :, b0:b1] @ m[:, b0:b1, b1:]
    if pair_sum_max:
        codes = _enforce_pair_sum(codes, zero_point.astype(np.int64), pair_sum_max)
    return codes


def top_two(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and second-largest value of each row of a non-negative [N, K] array (K >= 2;
    the maximum twice when it occurs twice). Three passes over the array instead of a partition:
    3x cheaper, and called for every weight of a pair-sum target."""
    first = rows.max(axis=1)
    at_max = rows == first[:, None]
    rest = np.where(at_max, rows.dtype.type(-1), rows).max(axis=1)
    return first, np.where(at_max.sum(axis=1) > 1, first, rest)


def _enforce_pair_sum(codes: np.ndarray, zero_point: np.ndarray, limit: int) -> np.ndarray:
    """Shrink the largest magnitude of any row whose two largest magnitudes exceed ``limit``."""
    mag = np.abs(codes - zero_point[..., None])
    if 2 * int(mag.max(initial=0)) <= limit:
        return codes  # no two magnitudes can sum past the limit (the usual case)
    flat = mag.reshape(-1, mag.shape[-1])
    cflat = codes.reshape(-1, codes.shape[-1])
    zflat = np.broadcast_to(zero_point[..., None], codes.shape).reshape(-1, codes.shape[-1])[:, 0]
    if flat.shape[1] < 2:
        return codes
    first, second = top_two(flat)
    for r in np.nonzero(first + second > limit)[0]:
        j = int(np.argmax(flat[r]))
        allowed = limit - int(second[r])
        sign = 1 if cflat[r, j] >= zflat[r] else -1
        cflat[r, j] = zflat[r] + sign * allowed
    return cflat.reshape(codes.shape)
