"""Integer arithmetic of a target, in numpy: requantization, rounding, accumulator width and
the int16 pair saturation of x86 ``vpmaddubsw`` kernels.

Everything here is exact integer arithmetic (int64, or float64 where every value is an integer
below 2**53, which lets BLAS do the matrix products), so a simulated model gives the same bytes
on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = ["Arithmetic", "round_float", "round_shift", "quantize_multiplier", "requantize", "wrap_accumulator",
           "fixed_point_scale",
           "int_matmul", "pair_saturation_applies", "im2col"]

_REQUANTIZE = ("float", "fixed-point")
_ROUNDING = ("half-even", "half-up", "half-away")


@dataclass(frozen=True)
class Arithmetic:
    """How a target computes: requantization (``float``: accumulator x float32 multiplier, like
    onnxruntime; ``fixed-point``: integer multiplier of ``multiplier_bits`` bits and a right
    shift), the rounding of that step, the accumulator width (wider sums wrap around, as
    two's-complement hardware does), and whether u8 x s8 products are summed in saturating
    int16 pairs first (x86 without VNNI)."""

    requantize: str = "float"
    rounding: str = "half-even"
    multiplier_bits: int = 31
    accumulator_bits: int = 32
    pair_saturation: bool = False

    def __post_init__(self) -> None:
        if self.requantize not in _REQUANTIZE:
            raise UserError(f"arithmetic.requantize = {self.requantize!r} must be one of {', '.join(_REQUANTIZE)}")
        if self.rounding not in _ROUNDING:
            raise UserError(f"arithmetic.rounding = {self.rounding!r} must be one of {', '.join(_ROUNDING)}")
        if not 2 <= self.multiplier_bits <= 32:
            raise UserError(f"arithmetic.multiplier_bits = {self.multiplier_bits} must be in [2, 32]")
        if not 8 <= self.accumulator_bits <= 64:
            raise UserError(f"arithmetic.accumulator_bits = {self.accumulator_bits} must be in [8, 64]")

    @classmethod
    def from_target(cls, target: Any) -> "Arithmetic":
        """Read ``[arithmetic]`` and ``isa.int16_pair_saturation`` from a loaded target (raw
        data, so targets written before the ``[arithmetic]`` table still load)."""
        data = getattr(target, "data", {}) or {}
        a = data.get("arithmetic", {}) or {}
        isa = data.get("isa", {}) or {}
        return cls(requantize=str(a.get("requantize", "float")), rounding=str(a.get("rounding", "half-even")),
                   multiplier_bits=int(a.get("multiplier_bits", 31)),
                   accumulator_bits=int(a.get("accumulator_bits", 32)),
                   pair_saturation=bool(isa.get("int16_pair_saturation", False)) and not bool(isa.get("vnni", False)))


def round_float(x: np.ndarray, mode: str) -> np.ndarray:
    """Round float values to integers (as float64) with the given tie rule."""
    x = np.asarray(x, dtype=np.float64)
    if mode == "half-even":
        return np.rint(x)
    if mode == "half-up":
        return np.floor(x + 0.5)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)  # half-away


def round_shift(v: np.ndarray, shift: np.ndarray | int, mode: str) -> np.ndarray:
    """``v / 2**shift`` rounded with the tie rule, exactly in integers (shift >= 0, broadcast)."""
    v = np.asarray(v)
    s = np.asarray(shift, dtype=np.int64)
    obj = v.dtype == object
    one = 1 if obj else np.int64(1)
    s_pos = np.maximum(s, 1)
    half = np.left_shift(one, s_pos - 1) if not obj else _pow2_obj(s_pos - 1)
    if mode == "half-up":
        q = (v + half) >> s_pos if not obj else _floor_div_pow2(v + half, s_pos)
    elif mode == "half-away":
        a = np.abs(v)
        q = (a + half) >> s_pos if not obj else _floor_div_pow2(a + half, s_pos)
        q = np.where(v < 0, -q, q)
    else:  # half-even
        q = v >> s_pos if not obj else _floor_div_pow2(v, s_pos)
        r = v - (q << s_pos if not obj else q * _pow2_obj(s_pos))
        q = q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(q.dtype if not obj else np.int64)
    return np.where(s <= 0, v, q)


def _pow2_obj(s: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda k: 1 << int(k), otypes=[object])(s)


def _floor_div_pow2(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    return v // _pow2_obj(s)


def quantize_multiplier(m: np.ndarray | float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positive reals into ``m0 * 2**-shift`` with ``2**(bits-1) <= m0 < 2**bits``
    (m0 rounded half to even); 0 gives (0, 0). Shift may be negative for multipliers >= 2**bits."""
    m = np.asarray(m, dtype=np.float64)
    frac, exp = np.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    m0 = np.rint(np.ldexp(frac, bits)).astype(np.int64)
    carry = m0 == (np.int64(1) << bits)
    m0 = np.where(carry, m0 >> 1, m0)
    exp = exp.astype(np.int64) + carry
    shift = bits - exp
    zero = m == 0
    return np.where(zero, 0, m0), np.where(zero, 0, shift)


def wrap_accumulator(acc: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Two's-complement wrap of int64 sums to ``bits``; returns the values and how many overflowed."""
    if bits >= 64:
        return acc, 0
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    over = int(np.count_nonzero((acc < lo) | (acc > hi)))
    if not over:
        return acc, 0
    m = np.int64(1) << bits
    return ((acc - lo) % m) + lo, over


def requantize(acc: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qmin: int, qmax: int,
               arith: Arithmetic, *, clamp: tuple[int, int] | None = None) -> np.ndarray:
    """Integer accumulator (real value ``acc * scale``) -> output integers (int64 array).

    ``float``: float32(acc) * float32(scale), rounded, + zero point, saturated (onnxruntime's MLAS
    requantization). ``fixed-point``: ``acc * m0 >> shift`` with the target's rounding, in exact
    integers. ``clamp`` narrows the saturation range (a fused Relu/Clip)."""
    zp = np.asarray(zero_point, dtype=np.int64)
    if arith.requantize == "float":
        prod = np.asarray(acc).astype(np.float32) * np.asarray(scale, dtype=np.float32)
        out = round_float(prod, arith.rounding).astype(np.int64)
    else:
        m0, shift = quantize_multiplier(np.asarray(scale, dtype=np.float64), arith.multiplier_bits)
        out = fixed_point_scale(np.asarray(acc, dtype=np.int64), m0, shift, arith.rounding)
    out = out + zp
    lo, hi = (qmin, qmax) if clamp is None else (max(qmin, clamp[0]), min(qmax, clamp[1]))
    return np.clip(out, lo, hi)


def fixed_point_scale(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, mode: str) -> np.ndarray:
    """``acc * m0 / 2**shift`` rounded, exactly: int64 where the product fits in 62 bits, Python
    integers for the (rare) elements where it does not (wide accumulators)."""
    m0b, shb = np.broadcast_arrays(np.asarray(m0, dtype=np.int64), np.asarray(shift, dtype=np.int64))
    shape = np.broadcast_shapes(acc.shape, m0b.shape)
    acc, m0b, shb = (np.broadcast_to(v, shape) for v in (acc, m0b, shb))
    limit = np.int64(1) << np.int64(62 - max(1, int(m0b.max(initial=1)).bit_length()))
    big = np.abs(acc) >= limit
    left = np.maximum(-shb, 0)
    small_acc = np.where(big, 0, acc)
    prod = small_acc * m0b
    if np.any(left > 0):  # multipliers >= 2**bits: a left shift (values are tiny there)
        prod = prod << left
    out = round_shift(prod, np.maximum(shb, 0), mode).astype(np.int64)
    if np.any(big):
        p_obj = acc[big].astype(object) * m0b[big].astype(object) * _pow2_obj(left[big])
        out = out.copy()
        out[big] = round_shift(p_obj, np.maximum(shb[big], 0), mode).astype(np.int64)
    return out


def pair_saturation_applies(a_dtype: np.dtype, b_dtype: np.dtype, arith: Arithmetic) -> bool:
    """u8 activations x s8 weights on a target whose kernels add product pairs in int16."""
    return arith.pair_saturation and np.dtype(a_dtype) == np.uint8 and np.dtype(b_dtype) == np.int8


def int_matmul(a: np.ndarray, b: np.ndarray, *, pair_saturate: bool = False) -> np.ndarray:
    """Exact integer ``a @ b`` (int64 result) for integer-valued arrays.

    Computed in float64, which is exact while every partial sum stays below 2**53 (8- and 16-bit
    operands with any realistic depth). With ``pair_saturate`` the raw operands' products are
    added in pairs along K (k = 0,1 / 2,3 / ...) and each pair sum saturates to int16, as
    ``vpmaddubsw`` does, before the exact sum of the pairs."""
    af = np.asarray(a, dtype=np.float64)
    bf = np.asarray(b, dtype=np.float64)
    if not pair_saturate or not _may_saturate(af, bf):
        return np.matmul(af, bf).astype(np.int64)
    if bf.ndim != 2:  # batched b: one product per batch
        batch = np.broadcast_shapes(af.shape[:-2], bf.shape[:-2])
        a3 = np.broadcast_to(af, batch + af.shape[-2:]).reshape((-1,) + af.shape[-2:])
        b3 = np.broadcast_to(bf, batch + bf.shape[-2:]).reshape((-1,) + bf.shape[-2:])
        out = np.stack([int_matmul(x, y, pair_saturate=True) for x, y in zip(a3, b3)])
        return out.reshape(batch + out.shape[-2:])
    if af.shape[-1] % 2:
        af = np.concatenate([af, np.zeros(af.shape[:-1] + (1,))], axis=-1)
        bf = np.concatenate([bf, np.zeros((1, bf.shape[1]))], axis=0)
    lead = af.shape[:-1]
    a2 = af.reshape(-1, af.shape[-1])
    a_e, a_o = a2[:, 0::2].astype(np.int32), a2[:, 1::2].astype(np.int32)
    b_e, b_o = bf[0::2].astype(np.int32), bf[1::2].astype(np.int32)
    n = bf.shape[1]
    res = np.empty((a2.shape[0], n), dtype=np.int64)
    rows = max(1, (1 << 22) // max(1, a_e.shape[1] * n))
    for start in range(0, a2.shape[0], rows):
        sl = slice(start, start + rows)
        pair = a_e[sl, :, None] * b_e[None] + a_o[sl, :, None] * b_o[None]
        np.clip(pair, -32768, 32767, out=pair)
        res[sl] = pair.sum(axis=1, dtype=np.int64)
    return res.reshape(lead + (n,))


def _may_saturate(a: np.ndarray, b: np.ndarray) -> bool:
    """Cheap bound: can any pair sum of products leave the int16 range?"""
    if a.size == 0 or b.size == 0:
        return False
    amax = float(np.abs(a).max())
    bb = np.abs(b.reshape((-1,) + b.shape[-2:]))
    k = bb.shape[-2] - bb.shape[-2] % 2
    pair = bb[:, 0:k:2] + bb[:, 1:k:2] if k else np.zeros((1, 1, 1))
    top = max(float(pair.max(initial=0)), float(bb.max(initial=0)))
    return amax * top > 32767


def im2col(x: np.ndarray, kernel: tuple[int, ...], pads: tuple[int, ...], strides: tuple[int, ...],
           dilations: tuple[int, ...], pad_value: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sliding windows of ``x`` [N, C, *S]: returns [N, C, *K, *O] (a copy) and the output shape O.
    Padding uses ``pad_value`` (the zero point for quantized inputs)."""
    nd = len(kernel)
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, width, constant_values=pad_value) if any(pads) else x
    win = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel))
    view = np.lib.stride_tricks.sliding_window_view(xp, win, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    view = view[sl]  # [N, C, *O, *K]
    out_shape = view.shape[2:2 + nd]
    order = (0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd))
    return np.ascontiguousarray(view.transpose(order)), tuple(out_shape)
