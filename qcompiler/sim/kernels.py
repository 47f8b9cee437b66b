"""Integer kernels as ``onnx.reference`` operators, parameterised by a target's arithmetic.

:func:`make_kernels` returns OpRun classes (one per op type and domain) that
``onnx.reference.ReferenceEvaluator(model, new_ops=...)`` uses instead of its own float
implementations; every op without a class here runs with onnx's reference semantics.
Convolutions are im2col + one matrix product per group; nothing loops over elements.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx.helper import tensor_dtype_to_np_dtype
from onnx.reference.op_run import OpRun

from ..kernels import KERNELS
from .arith import Arithmetic, im2col, int_matmul, pair_saturation_applies, requantize, round_float, wrap_accumulator

__all__ = ["make_kernels", "SIM_DOMAIN", "IMPLEMENTATIONS", "int_range", "qgemm", "qconv"]

SIM_DOMAIN = "qcompiler.sim"
MS_DOMAIN = "com.microsoft"

_SMALL_INT = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def int_range(dtype: np.dtype) -> tuple[int, int] | None:
    """(qmin, qmax) of an integer dtype (incl. ml_dtypes' int4/uint4/int2/uint2); None if not integer."""
    dt = np.dtype(dtype)
    if dt.name in _SMALL_INT:
        return _SMALL_INT[dt.name]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return int(info.min), int(info.max)
    return None


def _i64(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.name in _SMALL_INT:
        x = x.astype(np.int8)
    return x.astype(np.int64)


def _opt(args: tuple[Any, ...], i: int) -> Any:
    return args[i] if len(args) > i and args[i] is not None else None


def qgemm(a: np.ndarray, a_zp: Any, b: np.ndarray, b_zp: Any, *, saturate: bool) -> np.ndarray:
    """Exact ``(a - a_zp) @ (b - b_zp)`` in int64. With ``saturate`` the raw operands go through
    the int16 pair-saturating product (zero points corrected afterwards, as MLAS does)."""
    a64, b64 = _i64(a), _i64(b)
    azp = 0 if a_zp is None else _i64(a_zp)
    bzp = 0 if b_zp is None else _i64(b_zp)
    if not saturate:
        return int_matmul(a64 - azp, b64 - bzp)
    k = a64.shape[-1]
    raw = int_matmul(a64, b64, pair_saturate=True)
    return raw - azp * b64.sum(axis=-2, keepdims=True) - bzp * a64.sum(axis=-1, keepdims=True) + k * azp * bzp


def qconv(x: np.ndarray, x_zp: Any, w: np.ndarray, w_zp: Any, *, group: int, pads: tuple[int, ...],
          strides: tuple[int, ...], dilations: tuple[int, ...], saturate: bool) -> np.ndarray:
    """Exact integer convolution [N, M, *O] (int64). Non-depthwise groups are one GEMM each with
    K ordered (kernel position, channel) like onnxruntime's NHWC im2col, which decides which
    products share an int16 pair when ``saturate``; depthwise accumulates exactly."""
    kernel = tuple(w.shape[2:])
    xzp = 0 if x_zp is None else int(np.asarray(x_zp).reshape(-1)[0])
    cols, out_shape = im2col(np.asarray(x), kernel, pads, strides, dilations, np.asarray(x_zp).reshape(-1)[0]
                             if x_zp is not None else 0)
    n, c = cols.shape[:2]
    m = w.shape[0]
    ksz = int(np.prod(kernel)) if kernel else 1
    p = int(np.prod(out_shape)) if out_shape else 1
    cols = cols.reshape(n, c, ksz, p)
    w64 = _i64(w)
    wzp = np.zeros(m, dtype=np.int64) if w_zp is None else np.broadcast_to(_i64(w_zp).reshape(-1), (m,))
    cg, mg = c // group, m // group
    if cg == 1 and mg == 1:  # depthwise: exact int32 accumulation in onnxruntime too
        xs = cols.astype(np.float64) - xzp  # [N, C, K, P]
        ws = (w64.reshape(m, 1, ksz) - wzp[:, None, None]).astype(np.float64)  # [C, 1, K]
        acc = np.matmul(ws[None], xs).astype(np.int64)  # [N, C, 1, P]
        return acc.reshape((n, m) + tuple(out_shape))
    outs = []
    for g in range(group):
        a = cols[:, g * cg:(g + 1) * cg]  # [N, Cg, K, P]
        a = a.transpose(0, 3, 2, 1).reshape(n * p, ksz * cg)
        wg = w64[g * mg:(g + 1) * mg].reshape(mg, cg, ksz).transpose(2, 1, 0).reshape(ksz * cg, mg)
        acc = qgemm(a, x_zp if x_zp is None else xzp, wg, wzp[g * mg:(g + 1) * mg][None, :], saturate=saturate)
        outs.append(acc.reshape(n, p, mg).transpose(0, 2, 1))
    acc = outs[0] if group == 1 else np.concatenate(outs, axis=1)
    return np.ascontiguousarray(acc).reshape((n, m) + tuple(out_shape))


def _conv_geometry(op: OpRun, x: np.ndarray, w: np.ndarray) -> tuple[tuple[int, ...], ...]:
    nd = w.ndim - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(getattr(op, "strides", None) or (1,) * nd)
    dil = tuple(getattr(op, "dilations", None) or (1,) * nd)
    pads = tuple(getattr(op, "pads", None) or (0,) * (2 * nd))
    auto_pad = getattr(op, "auto_pad", "NOTSET") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else big)
            pads_e.append(big if auto_pad == "SAME_UPPER" else small)
        pads = tuple(pads_b + pads_e)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    return pads, strides, dil


class _Kernel(OpRun):
    """Base: subclasses implement ``compute(*inputs)``; ``arith`` and ``stats`` are class attributes
    set by :func:`make_kernels` (one set of classes per simulation)."""

    arith: Arithmetic = Arithmetic()
    stats: dict[str, int] = {}

    def _run(self, *args: Any, **_: Any) -> tuple[Any, ...]:  # attributes are read from self
        out = self.compute(*args)
        return out if isinstance(out, tuple) else (out,)

    def compute(self, *args: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def attr(self, name: str, default: Any) -> Any:
        v = getattr(self, name, None)
        return default if v is None else v

    def accumulate(self, acc: np.ndarray) -> np.ndarray:
        acc, over = wrap_accumulator(acc, self.arith.accumulator_bits)
        if over:
            self.stats["accumulator_overflows"] = self.stats.get("accumulator_overflows", 0) + over
        return acc

    def clamp(self, y_scale: Any, y_zp: Any) -> tuple[int, int] | None:
        """A fused Relu/Clip (attributes ``sim_clip_min``/``sim_clip_max`` set by the QDQ grouping)
        as a range of output integers."""
        lo, hi = getattr(self, "sim_clip_min", None), getattr(self, "sim_clip_max", None)
        if lo is None and hi is None:
            return None
        s = float(np.asarray(y_scale).reshape(-1)[0])
        zp = int(np.asarray(y_zp).reshape(-1)[0]) if y_zp is not None else 0
        # Q is monotonic, so Q(clip(v, lo, hi)) = clip(Q(v), Q(lo), Q(hi))
        qlo = -(1 << 62) if lo is None else int(np.rint(np.float32(lo) / np.float32(s))) + zp
        qhi = (1 << 62) if hi is None else int(np.rint(np.float32(hi) / np.float32(s))) + zp
        return qlo, qhi

    def out(self, acc: np.ndarray, ratio: Any, y_zp: Any, like: np.ndarray, y_scale: Any = 1.0) -> np.ndarray:
        dtype = np.asarray(y_zp).dtype if y_zp is not None else np.asarray(like).dtype
        qmin, qmax = int_range(dtype) or (0, 255)
        zp = 0 if y_zp is None else _i64(y_zp)
        q = requantize(acc, ratio, zp, qmin, qmax, self.arith, clamp=self.clamp(y_scale, y_zp))
        return q.astype(dtype)


def _ratio(*scales: Any, div: Any) -> np.ndarray:
    """Requantization multiplier a*b/c in float32, in the order onnxruntime computes it."""
    r = np.float32(1.0)
    for s in scales:
        r = r * np.asarray(s, dtype=np.float32)
    return np.asarray(r / np.asarray(div, dtype=np.float32), dtype=np.float32)


class _IntConv(_Kernel):
    def compute(self, x, xs, xzp, w, ws, wzp, ys, yzp, b=None):  # type: ignore[override]
        pads, strides, dil = _conv_geometry(self, x, w)
        sat = pair_saturation_applies(x.dtype, w.dtype, self.arith)
        acc = qconv(x, xzp, w, wzp, group=int(self.attr("group", 1)), pads=pads, strides=strides, dilations=dil,
                    saturate=sat)
        nd = w.ndim - 2
        if b is not None:
            acc = acc + _i64(b).reshape((1, -1) + (1,) * nd)
        acc = self.accumulate(acc)
        ratio = _ratio(xs, ws, div=ys)
        if ratio.ndim == 1 and ratio.size > 1:
            ratio = ratio.reshape((1, -1) + (1,) * nd)
        return self.out(acc, ratio, yzp, x, ys)


class _IntConvAcc(_Kernel):
    def compute(self, x, w, xzp=None, wzp=None):  # type: ignore[override]
        pads, strides, dil = _conv_geometry(self, x, w)
        sat = pair_saturation_applies(x.dtype, w.dtype, self.arith)
        acc = qconv(x, xzp, w, wzp, group=int(self.attr("group", 1)), pads=pads, strides=strides, dilations=dil,
                    saturate=sat)
        return self.accumulate(acc).astype(np.int32)


def _mm_zp(zp: Any, role: str) -> Any:
    """MatMul zero points: per-row of a as [.., M, 1], per-column of b as [.., 1, N]."""
    if zp is None:
        return None
    z = np.asarray(zp)
    if z.ndim == 1 and z.size > 1:
        return z.reshape(-1, 1) if role == "a" else z.reshape(1, -1)
    return z


class _IntMatMul(_Kernel):
    def compute(self, a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp):  # type: ignore[override]
        sat = pair_saturation_applies(a.dtype, b.dtype, self.arith)
        acc = self.accumulate(qgemm(a, _mm_zp(a_zp, "a"), b, _mm_zp(b_zp, "b"), saturate=sat))
        ratio = _ratio(_mm_zp(a_s, "a"), _mm_zp(b_s, "b"), div=y_s)
        return self.out(acc, ratio, y_zp, a, y_s)


class _IntMatMulAcc(_Kernel):
    def compute(self, a, b, a_zp=None, b_zp=None):  # type: ignore[override]
        sat = pair_saturation_applies(a.dtype, b.dtype, self.arith)
        return self.accumulate(qgemm(a, _mm_zp(a_zp, "a"), b, _mm_zp(b_zp, "b"), saturate=sat)).astype(np.int32)


class _IntGemm(_Kernel):
    def compute(self, a, a_s, a_zp, b, b_s, b_zp, c=None, y_s=None, y_zp=None):  # type: ignore[override]
        if int(self.attr("transA", 0)):
            a = a.T
        if int(self.attr("transB", 0)):
            b = b.T
        sat = pair_saturation_applies(a.dtype, b.dtype, self.arith)
        acc = qgemm(a, a_zp, b, _mm_zp(b_zp, "b"), saturate=sat)
        if c is not None:
            acc = acc + _i64(c)
        acc = self.accumulate(acc)
        alpha = np.float32(self.attr("alpha", 1.0))
        scale = _ratio(np.float32(alpha), a_s, _mm_zp(b_s, "b"), div=np.float32(1.0))
        if y_s is None:
            return (acc.astype(np.float32) * scale).astype(np.float32)
        return self.out(acc, _ratio(alpha, a_s, _mm_zp(b_s, "b"), div=y_s), y_zp, a, y_s)


def _scaled(v: np.ndarray, ratio: Any, arith: Arithmetic) -> np.ndarray:
    """v * ratio rounded to an integer in the target's arithmetic (no zero point, no clipping)."""
    big = 1 << 62
    return requantize(v, ratio, 0, -big, big, arith)


class _IntBinary(_Kernel):
    """QLinearAdd / QLinearMul (com.microsoft): scalar qparams, numpy broadcasting."""

    mul = False

    def compute(self, a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp=None):  # type: ignore[override]
        da = _i64(a) - (0 if a_zp is None else _i64(a_zp))
        db = _i64(b) - (0 if b_zp is None else _i64(b_zp))
        if self.mul:
            return self.out(self.accumulate(da * db), _ratio(a_s, b_s, div=c_s), c_zp, a, c_s)
        if self.arith.requantize == "float":
            v = _mlas_add(a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp)
            dtype = np.asarray(c_zp if c_zp is not None else a).dtype
            qmin, qmax = int_range(dtype) or (0, 255)
            q = round_float(v, self.arith.rounding).astype(np.int64)
            lim = self.clamp(c_s, c_zp)
            lo, hi = (qmin, qmax) if lim is None else (max(qmin, lim[0]), min(qmax, lim[1]))
            return np.clip(q, lo, hi).astype(dtype)
        # fixed point: both inputs moved to a common fine scale (2*max(a_s, b_s) / 2**shift), added
        # exactly, then requantized once (the TFLite integer Add scheme)
        bits = 8 * np.asarray(a).dtype.itemsize
        shift = 20 if bits <= 8 else 15
        twice = 2.0 * max(float(a_s), float(b_s))
        sa = _scaled(da << shift, float(a_s) / twice, self.arith)
        sb = _scaled(db << shift, float(b_s) / twice, self.arith)
        acc = self.accumulate(sa + sb)
        return self.out(acc, twice / (float(c_s) * (1 << shift)), c_zp, a, c_s)


def _mlas_add(a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp) -> np.ndarray:  # type: ignore[no-untyped-def] # noqa: ANN001
    """onnxruntime's QLinearAdd before rounding, float32 in MLAS's order of operations: for 8-bit
    the x86 kernel's ``fma(b, B/C, fma(a, A/C, zc - fma(A/C, za, B/C*zb)))`` (each fused
    multiply-add emulated in float64, rounded once), for 16-bit ``(A*(a-za) + B*(b-zb)) / C``."""
    f32 = np.float32
    za, zb, zc = (f32(0 if z is None else int(np.asarray(z).reshape(-1)[0])) for z in (a_zp, b_zp, c_zp))
    if np.asarray(a).dtype.itemsize > 1:
        va = f32(a_s) * (_i64(a) - int(za)).astype(f32)
        vb = f32(b_s) * (_i64(b) - int(zb)).astype(f32)
        return np.rint((va + vb) / f32(c_s)) + np.float64(zc)  # rounded before the zero point, exact
    ra, rb = f32(a_s) / f32(c_s), f32(b_s) / f32(c_s)
    fixed = zc - (np.float64(ra) * np.float64(za) + np.float64(rb * zb)).astype(f32)  # compiled as an FMA too
    t = (_i64(a).astype(np.float64) * np.float64(ra) + np.float64(fixed)).astype(f32)
    return (_i64(b).astype(np.float64) * np.float64(rb) + t.astype(np.float64)).astype(f32)


class _IntAdd(_IntBinary):
    mul = False


class _IntMul(_IntBinary):
    mul = True


class _IntGlobalAveragePool(_Kernel):
    def compute(self, x, xs, xzp, ys, yzp):  # type: ignore[override]
        last = int(self.attr("channels_last", 0))
        axes = tuple(range(1, x.ndim - 1)) if last else tuple(range(2, x.ndim))
        count = int(np.prod([x.shape[i] for i in axes]))
        acc = self.accumulate(_i64(x).sum(axis=axes, keepdims=True) - count * (0 if xzp is None else _i64(xzp)))
        return self.out(acc, _ratio(xs, div=np.float32(ys) * np.float32(count)), yzp, x, ys)


class _IntAveragePool(_Kernel):
    def compute(self, x, xs, xzp, ys, yzp):  # type: ignore[override]
        last = int(self.attr("channels_last", 0))
        if last:
            x = np.moveaxis(x, -1, 1)
        kernel = tuple(self.attr("kernel_shape", ()))
        if int(self.attr("ceil_mode", 0)):
            raise NotImplementedError(f"{self.onnx_node.name}: {self.onnx_node.op_type} with ceil_mode=1 "
                                      "is not simulated")
        fake_w = np.zeros((1, 1) + kernel, dtype=np.int8)
        pads, strides, dil = _conv_geometry(self, x, fake_w)
        zp = 0 if xzp is None else int(np.asarray(xzp).reshape(-1)[0])
        cols, out_shape = im2col(_i64(x) - zp, kernel, pads, strides, dil, 0)
        acc = self.accumulate(cols.reshape(cols.shape[:2] + (-1,) + tuple(out_shape)).sum(axis=2))
        if int(self.attr("count_include_pad", 0)) or not any(pads):
            count = np.asarray(float(np.prod(kernel)), dtype=np.float32)
        else:
            ones = np.ones((1, 1) + x.shape[2:], dtype=np.int64)
            cnt, _ = im2col(ones, kernel, pads, strides, dil, 0)
            count = cnt.reshape((1, 1, -1) + tuple(out_shape)).sum(axis=2).astype(np.float32)
        ratio = np.asarray(np.float32(xs) / (np.float32(ys) * count), dtype=np.float32)
        y = self.out(acc, ratio, yzp, x, ys)
        return np.moveaxis(y, 1, -1) if last else y


class _Table(_Kernel):
    """Element-wise QLinear op as a lookup table over every input code (like onnxruntime)."""

    def fn(self, v: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, x, xs, xzp, ys, yzp=None):  # type: ignore[override]
        lo, hi = int_range(x.dtype) or (0, 255)
        codes = np.arange(lo, hi + 1, dtype=np.int64)
        real = ((codes - (0 if xzp is None else _i64(xzp))).astype(np.float32) * np.float32(xs)).astype(np.float32)
        f = self.fn(real).astype(np.float32)
        dtype = np.asarray(yzp if yzp is not None else x).dtype
        qmin, qmax = int_range(dtype) or (0, 255)
        q = round_float(f / np.float32(ys), "half-even").astype(np.int64) + (0 if yzp is None else _i64(yzp))
        table = np.clip(q, qmin, qmax).astype(dtype)
        return table[_i64(x) - lo]


class _IntSigmoid(_Table):
    def fn(self, v: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-v.astype(np.float64)))).astype(np.float32)


class _IntLeakyRelu(_Table):
    def fn(self, v: np.ndarray) -> np.ndarray:
        alpha = np.float32(self.attr("alpha", 0.01))
        return np.where(v < 0, v * alpha, v).astype(np.float32)


class _IntConcat(_Kernel):
    def compute(self, ys, yzp, *triples):  # type: ignore[override]
        axis = int(self.attr("axis", 1))
        dtype = np.asarray(yzp).dtype
        qmin, qmax = int_range(dtype) or (0, 255)
        parts = []
        for i in range(0, len(triples), 3):
            x, xs, xzp = triples[i:i + 3]
            if np.float32(xs) == np.float32(ys) and _i64(xzp) == _i64(yzp):
                parts.append(np.asarray(x).astype(dtype))
                continue
            d = _i64(x) - _i64(xzp)
            if self.arith.requantize == "float":  # onnxruntime: a table of quantize(dequantize(v))
                real = (d.astype(np.float32) * np.float32(xs)).astype(np.float32) / np.float32(ys)
                q = round_float(real, self.arith.rounding).astype(np.int64) + _i64(yzp)
                parts.append(np.clip(q, qmin, qmax).astype(dtype))
            else:
                parts.append(requantize(d, _ratio(xs, div=ys), _i64(yzp), qmin, qmax, self.arith).astype(dtype))
        return np.concatenate(parts, axis=axis)


def _param(p: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """Broadcast a scale or zero point to ``shape``: scalar, per-axis (1-D) or blocked (same rank)."""
    p = np.asarray(p)
    if p.ndim == 0 or (p.size == 1 and p.ndim <= 1):
        return p.reshape(())
    ax = axis % len(shape)
    if block and p.ndim == len(shape):
        return np.repeat(p, block, axis=ax)[tuple(slice(0, s) for s in shape)]
    if p.ndim == 1:
        return p.reshape(tuple(p.size if i == ax else 1 for i in range(len(shape))))
    return p


class _QuantizeLinear(_Kernel):
    """Integer outputs computed here (true division in the scale's precision, round half to even,
    + zero point, saturate); float8/float4 outputs use onnx's own implementation."""

    def compute(self, x, y_scale, y_zp=None):  # type: ignore[override]
        out_t = int(self.attr("output_dtype", 0))
        dtype = np.asarray(y_zp).dtype if y_zp is not None else (tensor_dtype_to_np_dtype(out_t) if out_t
                                                                  else np.dtype(np.uint8))
        rng = int_range(dtype)
        axis, block = int(self.attr("axis", 1)), int(self.attr("block_size", 0))
        if rng is None:
            from onnx.reference.ops.op_quantize_linear import _CommonQuantizeLinear

            return _CommonQuantizeLinear._run(self, x, y_scale, y_zp, axis=axis, saturate=bool(self.attr("saturate", 1)),
                                              block_size=block, output_dtype=out_t or None,
                                              precision=int(self.attr("precision", 0)) or None)[0]
        s = _param(y_scale, x.shape, axis, block)
        prec = int(self.attr("precision", 0))
        if prec:
            pdt = tensor_dtype_to_np_dtype(prec)
            v = x.astype(pdt) / s.astype(pdt)
        else:
            v = x / s
        q = np.rint(v)
        q = np.where(np.isnan(q), -(2.0 ** 40), q)  # NaN -> qmin, as onnx's reference and onnxruntime do
        q = np.clip(q, -(2.0 ** 40), 2.0 ** 40).astype(np.int64)
        if y_zp is not None:
            q = q + _i64(_param(y_zp, x.shape, axis, block))
        return np.clip(q, rng[0], rng[1]).astype(dtype)


class _DequantizeLinear(_Kernel):
    def compute(self, x, x_scale, x_zp=None):  # type: ignore[override]
        axis, block = int(self.attr("axis", 1)), int(self.attr("block_size", 0))
        if int_range(x.dtype) is None:
            from onnx.reference.ops.op_dequantize_linear import _CommonDequantizeLinear

            return _CommonDequantizeLinear._run(self, x, x_scale, x_zp, axis=axis, block_size=block,
                                                output_dtype=int(self.attr("output_dtype", 0)) or None)[0]
        d = _i64(x)
        if x_zp is not None:
            d = d - _i64(_param(x_zp, x.shape, axis, block))
        s = _param(x_scale, x.shape, axis, block)
        out_t = int(self.attr("output_dtype", 0))
        odt = tensor_dtype_to_np_dtype(out_t) if out_t else np.asarray(x_scale).dtype
        return (d.astype(np.float32) * s).astype(odt)


class _DynamicQuantizeLinear(_Kernel):
    def compute(self, x):  # type: ignore[override]
        hi = np.float32(max(0.0, float(np.max(x)))) if x.size else np.float32(0)
        lo = np.float32(min(0.0, float(np.min(x)))) if x.size else np.float32(0)
        scale = np.float32(1.0 if hi == lo else hi - lo) / np.float32(255)
        zp = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255))
        y = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
        return y, np.array(scale, dtype=x.dtype), np.array(zp, dtype=np.uint8)


class _FloatConv(_Kernel):
    """Float Conv by im2col + BLAS (onnx's reference Conv is far too slow for real models)."""

    def compute(self, x, w, b=None):  # type: ignore[override]
        pads, strides, dil = _conv_geometry(self, x, w)
        group = int(self.attr("group", 1))
        kernel = tuple(w.shape[2:])
        cols, out_shape = im2col(x, kernel, pads, strides, dil, 0)
        n, c = cols.shape[:2]
        m = w.shape[0]
        ksz = int(np.prod(kernel))
        cols = cols.reshape(n, group, (c // group) * ksz, -1)
        wg = w.reshape(group, m // group, -1)
        y = np.matmul(wg[None], cols).reshape((n, m) + tuple(out_shape))
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * len(kernel))
        return y.astype(x.dtype)


class _Gelu(_Kernel):
    """onnxruntime's contrib Gelu (what `fuse-gelu{domain=com.microsoft}` emits), exact form
    x * 0.5 * (1 + erf(x / sqrt 2)): erf in float64 (math.erf), rounded to the input's type."""

    def compute(self, x):  # type: ignore[override]
        erf = np.vectorize(math.erf, otypes=[np.float64])
        xd = np.asarray(x, dtype=np.float64)
        return (0.5 * xd * (1.0 + erf(xd / math.sqrt(2.0)))).astype(x.dtype)


#: the simulator's implementation of each kernel, keyed by ``KernelSpec.sim`` (qcompiler.kernels)
IMPLEMENTATIONS: dict[str, type[_Kernel]] = {
    "conv": _IntConv, "conv-integer": _IntConvAcc, "matmul": _IntMatMul, "matmul-integer": _IntMatMulAcc,
    "gemm": _IntGemm, "add": _IntAdd, "mul": _IntMul, "global-average-pool": _IntGlobalAveragePool,
    "average-pool": _IntAveragePool, "sigmoid": _IntSigmoid, "leaky-relu": _IntLeakyRelu, "concat": _IntConcat,
}
# ops that are not kernels of the table: quantizers, and float ops onnx's reference runs too slowly or lacks
_OTHER_OPS: dict[str, tuple[type[_Kernel], tuple[str, ...]]] = {
    "QuantizeLinear": (_QuantizeLinear, ("", MS_DOMAIN)),
    "DequantizeLinear": (_DequantizeLinear, ("", MS_DOMAIN)),
    "DynamicQuantizeLinear": (_DynamicQuantizeLinear, ("",)),
    "Conv": (_FloatConv, ("",)),
    "Gelu": (_Gelu, (MS_DOMAIN,)),
}


def make_kernels(arith: Arithmetic, stats: dict[str, int] | None = None) -> list[type[OpRun]]:
    """OpRun classes for every (domain, op type) simulated here, bound to ``arith``; the evaluator
    looks classes up by ``op_domain`` and class name. ``stats`` collects counters (overflows)."""
    shared = {} if stats is None else stats
    out: list[type[OpRun]] = []
    ops = dict(_OTHER_OPS)
    for spec in KERNELS.values():
        if spec.sim is not None:
            ops[spec.name] = (IMPLEMENTATIONS[spec.sim], spec.domains + (SIM_DOMAIN,))
    for op, (base, domains) in ops.items():
        for dom in domains:
            out.append(type(op, (base,), {"op_domain": dom, "arith": arith, "stats": shared,
                                          "__module__": __name__}))
    return out
