"""Quantization arithmetic shared by passes: integer ranges, qparams, array quantization.

Formulas follow the ONNX QuantizeLinear definition (round half to even on ``x / scale``,
then add the zero point, then saturate) so offline-quantized weights equal what a
QuantizeLinear node would produce at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QType", "QParams", "qrange", "compute_qparams", "quantize", "dequantize", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8), "int8": np.dtype(np.int8),
    "uint16": np.dtype(np.uint16), "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
}


@dataclass(frozen=True)
class QType:
    """How one tensor is quantized: storage dtype, integer range, symmetry, scale rule."""

    dtype: str = "uint8"
    symmetric: bool = False
    qmin: int = 0
    qmax: int = 255
    power_of_two: bool = False

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def qrange(dtype: str, *, narrow: bool = False, bits: int | None = None,
           explicit: tuple[int, int] | None = None) -> tuple[int, int]:
    """Integer range of a dtype, optionally reduced to ``bits`` or narrowed (drop the most
    negative value so the range is symmetric around zero)."""
    if explicit is not None:
        return int(explicit[0]), int(explicit[1])
    info = np.iinfo(DTYPES[dtype])
    lo, hi = int(info.min), int(info.max)
    if bits is not None and bits < info.bits:
        if info.min < 0:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
    if narrow and lo < 0:
        lo = -hi
    return lo, hi


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or 1-D per channel along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None = None

    def same_as(self, other: "QParams") -> bool:
        return (self.qtype.dtype == other.qtype.dtype and self.axis == other.axis
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


def _bshape(p: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale = p.scale.astype(np.float32)
    zp = p.zero_point.astype(np.int64)
    if p.axis is not None and scale.ndim == 1:
        shape = [1] * ndim
        shape[p.axis % ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rint(x / scale) + zp), true division in float32."""
    scale, zp = _bshape(p, x.ndim)
    q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zp
    return np.clip(q, p.qtype.qmin, p.qtype.qmax).astype(p.qtype.np_dtype)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    scale, zp = _bshape(p, q.ndim)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)
