"""qcompiler.quant: integer ranges, qparams, quantize() and the weight-rounding helpers.

Expected values are computed by hand from the reference formulas (scale = (rmax - rmin) /
(qmax - qmin) after widening the range to include 0, zp = round(qmin - rmin / scale)), and
quantize() is checked against onnx.reference's QuantizeLinear, ties included.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conftest import make_model, tensor_info
from qcompiler import QParams, QType, compute_qparams, dequantize, gptq_round, qrange, quantize, weight_qparams

U8 = QType("uint8", False, 0, 255)
I8 = QType("int8", False, -128, 127)
I8_SYM = QType("int8", True, -128, 127)
I8_NARROW = QType("int8", True, -127, 127)
U8_SYM = QType("uint8", True, 0, 255)
W_PAIR = QType("int8", True, -127, 127, pair_sum_max=128)


def _top2_sum(codes: np.ndarray) -> np.ndarray:
    """Per row, the sum of the two largest magnitudes (what an int16 pair accumulator adds)."""
    mag = np.abs(codes.astype(np.int64)).reshape(codes.shape[0], -1)
    return -np.partition(-mag, 1, axis=1)[:, :2].sum(axis=1)


# -- qrange -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "kwargs", "want"), [
    ("uint8", {}, (0, 255)),
    ("int8", {}, (-128, 127)),
    ("int8", {"narrow": True}, (-127, 127)),
    ("uint8", {"narrow": True}, (0, 255)),       # narrowing only drops a negative extreme
    ("int16", {}, (-32768, 32767)),
    ("uint16", {}, (0, 65535)),
    ("int32", {}, (-(2**31), 2**31 - 1)),
    ("int8", {"bits": 4}, (-8, 7)),
    ("uint8", {"bits": 4}, (0, 15)),
    ("int8", {"bits": 4, "narrow": True}, (-7, 7)),
    ("int8", {"bits": 8}, (-128, 127)),          # bits equal to the dtype's: unchanged
    ("int8", {"explicit": (-127, 127)}, (-127, 127)),
    ("uint8", {"explicit": (3, 200), "narrow": True, "bits": 4}, (3, 200)),  # explicit wins
])
def test_qrange(dtype: str, kwargs: dict, want: tuple[int, int]) -> None:
    """Integer ranges for dtypes, narrowing, reduced bit widths and explicit ranges."""
    got = qrange(dtype, **kwargs)
    assert got == want and all(type(v) is int for v in got)


# -- compute_qparams ------------------------------------------------------------------------------


@pytest.mark.parametrize(("rmin", "rmax", "qtype", "scale", "zp"), [
    # asymmetric: scale = (rmax - rmin) / 255, zp = round(0 - rmin / scale)
    (-1.0, 3.0, U8, 4.0 / 255, 64),              # 1 / (4/255) = 63.75 -> 64
    (2.0, 5.0, U8, 5.0 / 255, 0),                # range widened to [0, 5]
    (-5.0, -2.0, U8, 5.0 / 255, 255),            # range widened to [-5, 0]
    (-1.0, 3.0, I8, 4.0 / 255, -64),             # zp = round(-128 + 63.75) = -64
    # symmetric: scale = 2 * absmax / (qmax - qmin); zp 0 (signed) or the middle (unsigned)
    (-2.0, 1.0, I8_SYM, 4.0 / 255, 0),
    (-2.0, 1.0, I8_NARROW, 4.0 / 254, 0),
    (-2.0, 1.0, U8_SYM, 4.0 / 255, 128),         # round(127.5) = 128 (half to even)
])
def test_compute_qparams_hand_values(rmin: float, rmax: float, qtype: QType, scale: float, zp: int) -> None:
    """Per-tensor scale/zero point equal the reference formulas (scale stored as float32)."""
    qp = compute_qparams(rmin, rmax, qtype)
    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == qtype.np_dtype
    assert qp.scale == np.float32(scale)
    assert int(qp.zero_point) == zp
    # the represented range covers [rmin, rmax] widened to 0 (up to one step of rounding)
    lo, hi = float(qp.scale) * (qtype.qmin - zp), float(qp.scale) * (qtype.qmax - zp)
    assert lo <= min(rmin, 0.0) + float(qp.scale) and hi >= max(rmax, 0.0) - float(qp.scale)


def test_compute_qparams_per_channel_arrays() -> None:
    """Arrays of ranges give one scale/zero point per channel, each by the same formula."""
    rmin = np.array([-1.0, 0.0, 0.5, -3.0])
    rmax = np.array([3.0, 2.0, 1.0, -1.0])
    qp = compute_qparams(rmin, rmax, U8, axis=0)
    want_scale = np.array([4.0, 2.0, 1.0, 3.0]) / 255
    np.testing.assert_array_equal(qp.scale, want_scale.astype(np.float32))
    np.testing.assert_array_equal(qp.zero_point, np.array([64, 0, 0, 255], np.uint8))
    assert qp.axis == 0


@pytest.mark.parametrize("qtype", [U8, I8, I8_SYM, U8_SYM])
def test_compute_qparams_zero_range(qtype: QType) -> None:
    """An all-zero tensor gets a finite positive scale, and 0 round-trips exactly."""
    qp = compute_qparams(0.0, 0.0, qtype)
    assert np.isfinite(qp.scale) and qp.scale > 0
    zeros = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(dequantize(quantize(zeros, qp), qp), zeros)


@pytest.mark.parametrize(("rmin", "rmax", "qtype", "scale", "zp"), [
    (-1.0, 3.0, QType("uint8", False, 0, 255, power_of_two=True), 2.0**-5, 32),   # 4/255 -> 1/32
    (-3.0, 1.0, QType("int8", True, -128, 127, power_of_two=True), 2.0**-5, 0),   # 6/255 -> 1/32
    (-100.0, 100.0, QType("int8", True, -127, 127, power_of_two=True), 1.0, 0),   # 200/254 -> 1
])
def test_compute_qparams_power_of_two(rmin: float, rmax: float, qtype: QType, scale: float, zp: int) -> None:
    """Power-of-two scales round the exact scale *up* (never clip more), zp from the new scale."""
    qp = compute_qparams(rmin, rmax, qtype)
    assert float(qp.scale) == scale
    assert int(qp.zero_point) == zp


# -- quantize vs onnx.reference ------------------------------------------------------------------


def _reference_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    """onnx.reference's QuantizeLinear (opset 13) on the same inputs."""
    elem = TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.INT8
    attrs = {"axis": axis} if axis is not None else {}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    model = make_model([node], [tensor_info("x", list(x.shape))], [tensor_info("y", list(x.shape), elem)],
                       [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")], opset=13)
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def _with_ties(shape: tuple[int, ...], scale: np.ndarray, axis: int | None, seed: int) -> np.ndarray:
    """Random data where a third of the values sit exactly on x / scale = k + 0.5 (float32-exact:
    the scales used are powers of two there) and some saturate."""
    rng = np.random.default_rng(seed)
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = scale.reshape(bshape)
    x = rng.uniform(-200, 200, size=shape) * s
    ties = (rng.integers(-140, 140, size=shape) + 0.5) * s
    pick = rng.random(shape) < 0.35
    return np.where(pick, ties, x).astype(np.float32)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_quantize_per_tensor_matches_onnx_reference(dtype: str) -> None:
    """Round half to even, zero point added after rounding, saturation: like QuantizeLinear."""
    qt = U8 if dtype == "uint8" else I8
    zp = np.array(131 if dtype == "uint8" else -7, qt.np_dtype)
    for scale in (np.array(0.125, np.float32), np.array(0.0371, np.float32)):
        x = _with_ties((4, 50), scale, None, seed=3)
        want = _reference_quantize(x, scale, zp, None)
        got = quantize(x, QParams(scale, zp, qt))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # the tie cases are really there and really round to even
    assert quantize(np.array([0.0625, 0.1875, -0.0625], np.float32),
                    QParams(np.array(0.125, np.float32), np.array(0, np.int8), I8)).tolist() == [0, 2, 0]


@pytest.mark.parametrize(("axis", "dtype"), [(1, "uint8"), (0, "int8")])
def test_quantize_per_axis_matches_onnx_reference(axis: int, dtype: str) -> None:
    """Per-channel scales and zero points broadcast along ``axis`` exactly as QuantizeLinear's."""
    qt = U8 if dtype == "uint8" else I8
    shape = (3, 4, 5, 5)
    n = shape[axis]
    scale = (2.0 ** -np.arange(2, 2 + n)).astype(np.float32)
    zp = (np.arange(n) * 17 + (0 if dtype == "uint8" else -20)).astype(qt.np_dtype)
    x = _with_ties(shape, scale, axis, seed=5)
    want = _reference_quantize(x, scale, zp, axis)
    got = quantize(x, QParams(scale, zp, qt, axis))
    np.testing.assert_array_equal(got, want)
    # and with non-power-of-two scales (no exact ties, float32 division must still agree)
    scale2 = np.random.default_rng(6).uniform(0.01, 0.2, n).astype(np.float32)
    x2 = _with_ties(shape, scale2, axis, seed=7)
    np.testing.assert_array_equal(quantize(x2, QParams(scale2, zp, qt, axis)),
                                  _reference_quantize(x2, scale2, zp, axis))


# -- weight_qparams with pair_sum_max ------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_sum_bound_holds(seed: int) -> None:
    """Any two weights of a channel sum to <= 128 steps (int16 pair accumulation can't saturate)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 4, 3, 3)) * rng.uniform(0.05, 2.0, (64, 1, 1, 1))).astype(np.float32)
    qp = weight_qparams(w, W_PAIR, axis=0)
    q = quantize(w, qp)
    assert q.dtype == np.int8 and int(np.abs(q.astype(np.int64)).max()) <= 127
    assert (_top2_sum(q) <= 128).all()
    # the bound is active (scale above absmax/127) for typical channels, so this tests something
    absmax = np.abs(w).reshape(64, -1).max(axis=1)
    assert (qp.scale > (absmax / 127).astype(np.float32)).sum() > 32


def test_pair_sum_per_tensor() -> None:
    """Per-tensor weights (axis None) obey the bound over the whole tensor."""
    w = np.random.default_rng(4).standard_normal((6, 10)).astype(np.float32)
    qp = weight_qparams(w, W_PAIR, axis=None)
    assert qp.scale.size == 1
    q = np.abs(quantize(w, qp).astype(np.int64)).reshape(-1)
    assert int(np.sort(q)[-2:].sum()) <= 128


def test_pair_sum_bound_float32_rounding() -> None:
    """Two weights whose quotients sit on .5 ties: float32 scale rounding must not push them over."""
    w = np.array([[1.667074, -1.2361298]], np.float32)
    q = quantize(w, weight_qparams(w, W_PAIR, axis=0))
    assert int(_top2_sum(q)[0]) <= 128, q


def test_single_outlier_keeps_full_resolution() -> None:
    """A channel with one large weight (the rest <= one step) keeps scale absmax/127; a channel
    with two large weights gets (a + b) / 128."""
    w = np.array([[1.0, 0.005, -0.003, 0.0],
                  [0.9, -0.9, 0.1, 0.0]], np.float32)
    qp = weight_qparams(w, W_PAIR, axis=0)
    assert qp.scale[0] == np.float32(1.0 / 127)
    assert qp.scale[1] == np.float32(1.8 / 128)
    q = quantize(w, qp)
    assert q[0].tolist() == [127, 1, 0, 0]
    assert q[1].tolist() == [64, -64, 7, 0]


# -- gptq_round -----------------------------------------------------------------------------------


def _nearest(w: np.ndarray, scale: np.ndarray, lo: int = -127, hi: int = 127) -> np.ndarray:
    return np.clip(np.rint(w / scale[..., None]), lo, hi).astype(np.int64)


def test_gptq_identity_hessian_is_nearest() -> None:
    """Uncorrelated unit-variance inputs: no rounding error can be compensated, GPTQ = nearest."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 5, 16))
    scale = np.abs(w).max(axis=2) / 127
    codes = gptq_round(w, np.broadcast_to(np.eye(16), (2, 16, 16)).copy(), scale, np.zeros((2, 5)), -127, 127)
    assert codes.shape == w.shape
    np.testing.assert_array_equal(codes, _nearest(w, scale))


def test_gptq_beats_nearest_on_correlated_inputs() -> None:
    """With correlated inputs X, GPTQ's output error ||(W - Wq) X|| is no larger than nearest
    rounding's (here much smaller), and the pair-sum limit still holds when requested."""
    rng = np.random.default_rng(1)
    k, rows, p = 24, 8, 400
    x = rng.standard_normal((k, 3)) @ rng.standard_normal((3, p)) + 0.05 * rng.standard_normal((k, p))
    w = rng.standard_normal((1, rows, k)) * 0.2
    qp = weight_qparams(w[0].astype(np.float32), W_PAIR, axis=0)
    scale = qp.scale.astype(np.float64)[None]
    hessian = (x @ x.T)[None]
    near = _nearest(w, scale)
    gptq = gptq_round(w, hessian, scale, np.zeros((1, rows)), -127, 127, pair_sum_max=128)

    def out_err(codes: np.ndarray) -> float:
        return float(np.linalg.norm((w[0] - codes[0] * scale[0][:, None]) @ x))

    assert out_err(gptq) <= out_err(near)
    assert out_err(gptq) < 0.5 * out_err(near)
    assert np.abs(gptq).max() <= 127
    assert (_top2_sum(gptq[0]) <= 128).all()


def test_enforce_pair_sum_matches_a_sorted_reference() -> None:
    """The pair-sum clamp (ort-cpu's u8s8 limit without VNNI) against a sort-based reference:
    rows whose two largest magnitudes exceed the limit get their largest shrunk, ties included."""
    from qcompiler.quant import _enforce_pair_sum

    rng = np.random.default_rng(1)
    for t in range(200):
        codes = rng.integers(-127, 128, size=(int(rng.integers(1, 4)), int(rng.integers(1, 12)), int(rng.integers(2, 24))))
        if t % 3 == 0:
            codes[..., 0] = codes[..., 1]  # ties at the maximum
        zp = rng.integers(-3, 4, size=codes.shape[:-1])
        limit = int(rng.integers(100, 260))
        want = codes.copy().reshape(-1, codes.shape[-1])
        for r, z in enumerate(np.broadcast_to(zp[..., None], codes.shape).reshape(-1, codes.shape[-1])[:, 0]):
            mag = np.abs(want[r] - z)
            top = np.sort(mag)[::-1]
            if top[0] + top[1] > limit:
                j = int(np.argmax(mag))
                want[r, j] = z + (1 if want[r, j] >= z else -1) * (limit - int(top[1]))
        got = _enforce_pair_sum(codes.copy(), zp, limit)
        assert np.array_equal(got, want.reshape(codes.shape)), t
