"""Exactness of the integer simulator (qcompiler.sim).

Three references: onnx's own quantization test vectors (bit-exact), onnxruntime's CPU kernels
(within 1 LSB where those kernels are exact: weights inside the int16 pair limit, or depthwise),
and slow pure-Python references for the arithmetic onnxruntime can't show (fixed-point
requantization, int16 pair saturation).
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompiler.sim import Arithmetic, make_kernels, quantize_multiplier, requantize, round_shift
from qcompiler.sim.kernels import qconv, qgemm

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger")
MS = "com.microsoft"


# ---------------------------------------------------------------- onnx's test vectors
@pytest.fixture(scope="module")
def onnx_cases() -> list:
    import importlib

    import onnx.backend.test.case.node as node_cases

    # importing a case module registers its cases; import only the quantization ones (all of
    # onnx's node cases take ~40 s to build), falling back to the full collection
    before = len(node_cases._NodeTestCases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in ("quantizelinear", "dequantizelinear", "dynamicquantizelinear", "qlinearconv", "qlinearmatmul",
                    "convinteger", "matmulinteger"):
            importlib.import_module(f"{node_cases.__name__}.{mod}")
        cases = list(node_cases._NodeTestCases[before:])
        if len(cases) < 45:
            cases = node_cases.collect_testcases()
    return [c for c in cases if any(n.op_type in QUANT_OPS for n in c.model.graph.node)]


def _arr(x):
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.dtype.kind in "iuf" and got.dtype.itemsize > 1 or got.dtype.kind in "iu":
        return np.array_equal(got, want)
    return got.tobytes() == want.tobytes()  # float8/float4/int4 (ml_dtypes): compare bytes


def test_onnx_quantization_cases_bit_exact(onnx_cases: list) -> None:
    """Every quantization node case shipped with onnx (45 in onnx 1.23) runs through the
    simulator's kernels and reproduces the expected outputs bit for bit. Float8/float4/int2
    Q/DQ are delegated to onnx's implementation (numpy has no such types of its own)."""
    assert len(onnx_cases) >= 45
    used: set[str] = set()
    kernels = make_kernels(Arithmetic())
    for case in onnx_cases:
        ins, outs = case.data_sets[0]
        names = [i.name for i in case.model.graph.input]
        ev = ReferenceEvaluator(case.model, new_ops=kernels)
        got = ev.run(None, dict(zip(names, [_arr(x) for x in ins])))
        for g, w in zip(got, outs):
            assert _same_bits(np.asarray(g), _arr(w)), case.name
        used.update(type(n).__name__ for n in ev.rt_nodes_ if type(n).__module__ == "qcompiler.sim.kernels")
    assert set(QUANT_OPS) <= used  # the simulator's classes ran, not onnx's


# ---------------------------------------------------------------- onnxruntime kernels
def _model(nodes, inputs, outputs, inits, ms: bool = False) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    return helper.make_model(g, opset_imports=ops, ir_version=8)


def _vi(name: str, t: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, None)


def _c(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v), name)


def _sim(model: onnx.ModelProto, feed: dict, arith: Arithmetic = Arithmetic()) -> list[np.ndarray]:
    return ReferenceEvaluator(model, new_ops=make_kernels(arith)).run(None, feed)


def _ort(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _assert_lsb(model: onnx.ModelProto, feed: dict, tol: int = 1) -> None:
    for s, o in zip(_sim(model, feed), _ort(model, feed)):
        assert s.dtype == o.dtype and s.shape == o.shape
        diff = np.abs(s.astype(np.int64) - o.astype(np.int64))
        assert diff.max() <= tol, diff.max()
        assert (diff > 0).mean() < 0.01  # off-by-one only at near-ties


def qlinearconv(c: int, m: int, k: int, *, group: int = 1, pads: int = 0, stride: int = 1, wmax: int = 64,
                signed: bool = False, seed: int = 0) -> onnx.ModelProto:
    """QLinearConv with per-channel s8 weights in [-wmax, wmax] (64: any pair <= 128, exact
    even through vpmaddubsw), an int32 bias and u8 (or s8) activations."""
    rng = np.random.default_rng(seed)
    at, adt = (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    w = rng.integers(-wmax, wmax + 1, (m, c // group, k, k)).astype(np.int8)
    inits = [_c("xs", np.float32(0.02)), _c("xz", adt(-3 if signed else 131)), _c("w", w),
             _c("ws", (rng.random(m) * 0.01 + 0.002).astype(np.float32)), _c("wz", np.zeros(m, np.int8)),
             _c("ys", np.float32(0.05 * np.sqrt(c * k * k / group))), _c("yz", adt(5 if signed else 120)),
             _c("b", rng.integers(-3000, 3000, m).astype(np.int32))]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[pads] * 4, strides=[stride] * 2, group=group)
    return _model([node], [_vi("x", at)], [_vi("y", at)], inits)


@pytest.mark.parametrize("c,m,k,group,pads,stride,wmax,signed", [
    (16, 8, 1, 1, 0, 1, 64, False),      # pointwise
    (3, 8, 3, 1, 1, 2, 64, False),       # full conv, padded, strided, odd channel count
    (8, 12, 3, 2, 1, 1, 64, False),      # grouped
    (16, 16, 3, 16, 1, 1, 127, False),   # depthwise: full 8-bit weights (exact kernel)
    (16, 16, 5, 16, 2, 2, 127, False),   # depthwise 5x5 strided
    (12, 6, 3, 1, 1, 1, 127, True),      # s8 x s8
])
def test_qlinearconv_matches_onnxruntime(c, m, k, group, pads, stride, wmax, signed) -> None:
    model = qlinearconv(c, m, k, group=group, pads=pads, stride=stride, wmax=wmax, signed=signed)
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, c, 11, 9)).astype(np.int8) if signed else \
        rng.integers(0, 256, (2, c, 11, 9)).astype(np.uint8)
    _assert_lsb(model, {"x": x})


@pytest.mark.parametrize("adt,bdt,shape_a,shape_b", [
    (np.uint8, np.int8, (5, 24), (24, 7)),
    (np.uint8, np.uint8, (2, 5, 33), (33, 6)),
    (np.int8, np.int8, (3, 4, 10), (3, 10, 9)),
])
def test_qlinearmatmul_matches_onnxruntime(adt, bdt, shape_a, shape_b) -> None:
    rng = np.random.default_rng(2)
    ai, bi = np.iinfo(adt), np.iinfo(bdt)
    a = rng.integers(ai.min, ai.max + 1, shape_a).astype(adt)
    blim = (-64, 65) if bdt == np.int8 and adt == np.uint8 else (bi.min, bi.max + 1)
    b = rng.integers(*blim, shape_b).astype(bdt)
    t = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    inits = [_c("as", np.float32(0.03)), _c("az", adt(7)), _c("b", b), _c("bs", np.float32(0.011)),
             _c("bz", bdt(0 if bdt == np.int8 else 128)), _c("ys", np.float32(0.4)), _c("yz", adt(100))]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    _assert_lsb(_model([node], [_vi("a", t[adt])], [_vi("y", t[adt])], inits), {"a": a})


@pytest.mark.parametrize("quantized_out", [True, False])
def test_qgemm_matches_onnxruntime(quantized_out: bool) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (6, 40)).astype(np.uint8)
    b = rng.integers(-64, 65, (10, 40)).astype(np.int8)  # transB
    inits = [_c("as", np.float32(0.02)), _c("az", np.uint8(120)), _c("b", b),
             _c("bs", (rng.random(10) * 0.01 + 0.001).astype(np.float32)), _c("bz", np.zeros(10, np.int8)),
             _c("c", rng.integers(-2000, 2000, 10).astype(np.int32))]
    ins = ["a", "as", "az", "b", "bs", "bz", "c"]
    out_t = TensorProto.FLOAT
    if quantized_out:
        inits += [_c("ys", np.float32(0.3)), _c("yz", np.uint8(128))]
        ins += ["ys", "yz"]
        out_t = TensorProto.UINT8
    node = helper.make_node("QGemm", ins, ["y"], domain=MS, transB=1, alpha=1.0)
    model = _model([node], [_vi("a", TensorProto.UINT8)], [_vi("y", out_t)], inits, ms=True)
    if quantized_out:
        _assert_lsb(model, {"a": a})
    else:
        s, o = _sim(model, {"a": a})[0], _ort(model, {"a": a})[0]
        np.testing.assert_allclose(s, o, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_qlinear_binary_matches_onnxruntime(op: str, dt) -> None:
    rng = np.random.default_rng(4)
    info = np.iinfo(dt)
    a = rng.integers(info.min, info.max + 1, (2, 3, 4, 5)).astype(dt)
    b = rng.integers(info.min, info.max + 1, (3, 1, 5)).astype(dt)  # broadcast
    t = TensorProto.UINT8 if dt == np.uint8 else TensorProto.INT8
    inits = [_c("as", np.float32(0.037)), _c("az", dt(9)), _c("bs", np.float32(0.021)), _c("bz", dt(-4 if dt == np.int8 else 200)),
             _c("cs", np.float32(0.05 if op == "QLinearAdd" else 0.6)), _c("cz", dt(3))]
    node = helper.make_node(op, ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["c"], domain=MS)
    _assert_lsb(_model([node], [_vi("a", t), _vi("b", t)], [_vi("c", t)], inits, ms=True), {"a": a, "b": b})


@pytest.mark.parametrize("op", ["QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
                                "QLinearLeakyRelu", "QLinearConcat"])
def test_other_qlinear_ops_match_onnxruntime(op: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (1, 8, 7, 7)).astype(np.uint8)
    feed = {"x": x}
    inits = [_c("xs", np.float32(0.05)), _c("xz", np.uint8(100)), _c("ys", np.float32(0.02)), _c("yz", np.uint8(30))]
    attrs: dict = {}
    ins = ["x", "xs", "xz", "ys", "yz"]
    if op == "QLinearAveragePool":
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    if op == "QLinearLeakyRelu":
        attrs = {"alpha": 0.1}
    if op == "QLinearGlobalAveragePool":
        attrs = {"channels_last": 0}
    if op == "QLinearConcat":
        feed["x2"] = rng.integers(0, 256, (1, 3, 7, 7)).astype(np.uint8)
        inits += [_c("x2s", np.float32(0.07)), _c("x2z", np.uint8(10))]
        ins = ["ys", "yz", "x", "xs", "xz", "x2", "x2s", "x2z"]
        attrs = {"axis": 1}
    node = helper.make_node(op, ins, ["y"], domain=MS, **attrs)
    inputs = [_vi(k, TensorProto.UINT8) for k in feed]
    _assert_lsb(_model([node], inputs, [_vi("y", TensorProto.UINT8)], inits, ms=True), feed)


def test_contrib_gelu_matches_onnxruntime() -> None:
    """The float com.microsoft Gelu that fuse-gelu emits for onnxruntime targets: the simulator
    computes it (the reference evaluator has no contrib ops) within float32 rounding of ORT."""
    x = np.linspace(-6.0, 6.0, 481, dtype=np.float32).reshape(1, 481)
    node = helper.make_node("Gelu", ["x"], ["y"], domain=MS)
    model = _model([node], [_vi("x", TensorProto.FLOAT)], [_vi("y", TensorProto.FLOAT)], [], ms=True)
    (got,), (want,) = _sim(model, {"x": x}), _ort(model, {"x": x})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert x[0, 280] == 1.0 and got[0, 280] == pytest.approx(0.8413447461, abs=1e-7)  # Gelu(1) = Phi(1)


def test_integer_ops_match_onnxruntime_exactly() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.integers(-64, 65, (5, 4, 3, 3)).astype(np.int8)
    b = rng.integers(-64, 65, (4 * 6, 7)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "s", "z"]),
             helper.make_node("ConvInteger", ["xq", "w", "z"], ["ci"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["xq", "shape"], ["xr"]),
             helper.make_node("MatMulInteger", ["xr", "b", "z"], ["mi"])]
    inits = [_c("w", w), _c("b", b), _c("shape", np.array([6, 24], np.int64))]
    outs = [_vi("xq", TensorProto.UINT8), _vi("s", TensorProto.FLOAT), _vi("z", TensorProto.UINT8),
            _vi("ci", TensorProto.INT32), _vi("mi", TensorProto.INT32)]
    model = _model(nodes, [_vi("x", TensorProto.FLOAT)], outs, inits)
    for s, o in zip(_sim(model, {"x": x}), _ort(model, {"x": x})):
        assert s.dtype == o.dtype
        np.testing.assert_array_equal(s, o)


# ---------------------------------------------------------------- int16 pair saturation
def _pair_sat_dot(a: list[int], b: list[int]) -> int:
    """vpmaddubsw + vpmaddwd: products of adjacent (even, odd) positions added and saturated to
    int16, then summed exactly."""
    total = 0
    for j in range(0, len(a), 2):
        s = a[j] * b[j] + (a[j + 1] * b[j + 1] if j + 1 < len(a) else 0)
        total += max(-32768, min(32767, s))
    return total


def test_pair_saturation_matmul_against_slow_reference() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(180, 256, (4, 13)).astype(np.uint8)  # odd K
    b = rng.integers(-128, 128, (13, 5)).astype(np.int8)
    azp, bzp = 131, 0
    want = np.array([[_pair_sat_dot([int(v) for v in a[i]], [int(v) for v in b[:, j]])
                      - azp * int(b[:, j].astype(np.int64).sum()) for j in range(5)] for i in range(4)])
    got = qgemm(a, np.uint8(azp), b, np.int8(bzp), saturate=True)
    np.testing.assert_array_equal(got, want)
    exact = (a.astype(np.int64) - azp) @ b.astype(np.int64)
    np.testing.assert_array_equal(qgemm(a, np.uint8(azp), b, np.int8(bzp), saturate=False), exact)
    assert not np.array_equal(got, exact)  # saturation did happen


def test_pair_saturation_conv_uses_nhwc_pair_order() -> None:
    """Pairs run along (kernel row, kernel column, channel), onnxruntime's NHWC im2col order;
    depthwise convolutions are exact."""
    rng = np.random.default_rng(8)
    c, m, k = 3, 4, 3
    x = rng.integers(200, 256, (1, c, 5, 5)).astype(np.uint8)
    w = rng.integers(-128, 128, (m, c, k, k)).astype(np.int8)
    got = qconv(x, np.uint8(0), w, None, group=1, pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1), saturate=True)
    xp = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    want = np.zeros((1, m, 5, 5), dtype=np.int64)
    for o in range(m):
        for i in range(5):
            for j in range(5):
                patch = xp[0, :, i:i + k, j:j + k].transpose(1, 2, 0).reshape(-1)  # (kh, kw, c)
                kern = w[o].astype(np.int64).transpose(1, 2, 0).reshape(-1)
                want[0, o, i, j] = _pair_sat_dot(patch.tolist(), kern.tolist())
    np.testing.assert_array_equal(got, want)
    dw = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    a = qconv(x, np.uint8(0), dw, None, group=c, pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1), saturate=True)
    b = qconv(x, np.uint8(0), dw, None, group=c, pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1), saturate=False)
    np.testing.assert_array_equal(a, b)


def test_pair_saturation_follows_the_target() -> None:
    """Simulated with and without the target's pair saturation, against the explicit reference:
    the u8 x s8 QLinearConv saturates only when the arithmetic says so."""
    model = qlinearconv(16, 8, 1, wmax=127, seed=9)
    x = np.random.default_rng(10).integers(200, 256, (1, 16, 4, 4)).astype(np.uint8)
    sat = _sim(model, {"x": x}, Arithmetic(pair_saturation=True))[0]
    plain = _sim(model, {"x": x}, Arithmetic(pair_saturation=False))[0]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w, xz = inits["w"], int(inits["xz"])
    for saturate, got in ((True, sat), (False, plain)):
        acc = np.zeros((8, 16), dtype=np.int64)
        for o in range(8):
            for p in range(16):
                col = x[0, :, p // 4, p % 4].astype(np.int64)
                kern = w[o, :, 0, 0].astype(np.int64)
                raw = _pair_sat_dot(col.tolist(), kern.tolist()) if saturate else int(col @ kern)
                acc[o, p] = raw - xz * int(kern.sum()) + int(inits["b"][o])
        ratio = (np.float32(inits["xs"]) * inits["ws"].astype(np.float32) / np.float32(inits["ys"])).astype(np.float32)
        real = acc.astype(np.float32) * ratio[:, None]
        want = np.clip(np.rint(real) + int(inits["yz"]), 0, 255).reshape(1, 8, 4, 4)
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(sat, plain)


# ---------------------------------------------------------------- fixed-point requantization
def _slow_fixed_point(acc: int, m: float, bits: int, mode: str) -> int:
    """acc * m with m rounded to a `bits`-bit multiplier and power-of-two shift, in Python ints."""
    f = Fraction(m)
    shift = 0
    while f * 2 ** shift >= 2 ** bits:
        shift -= 1
    while f * 2 ** shift < 2 ** (bits - 1):
        shift += 1
    v = f * 2 ** shift
    m0 = int(v)
    if v - m0 > Fraction(1, 2) or (v - m0 == Fraction(1, 2) and m0 % 2):
        m0 += 1
    if m0 == 2 ** bits:
        m0, shift = m0 // 2, shift - 1
    x = Fraction(acc * m0, 2 ** shift)
    fl = x.numerator // x.denominator
    rem = x - fl
    if rem == Fraction(1, 2):
        if mode == "half-even":
            return fl + (fl % 2)
        if mode == "half-up":
            return fl + 1
        return fl + 1 if x > 0 else fl  # half-away
    return fl + (1 if rem > Fraction(1, 2) else 0)


@pytest.mark.parametrize("mode", ["half-even", "half-up", "half-away"])
@pytest.mark.parametrize("bits", [31, 15, 8])
def test_fixed_point_requantization_against_python_ints(mode: str, bits: int) -> None:
    rng = np.random.default_rng(11)
    mult = np.exp(rng.uniform(np.log(1e-6), np.log(3.0), 64))
    mult[:4] = [0.5, 0.25, 1.0, 2.0 ** -10]  # powers of two: exact shifts with ties
    acc = rng.integers(-(2 ** 31), 2 ** 31, (40, 64))
    acc[:8] = np.arange(-4, 4)[:, None] * 512  # exact halves after the shift
    arith = Arithmetic(requantize="fixed-point", rounding=mode, multiplier_bits=bits)
    got = requantize(acc, mult, 0, -(2 ** 62), 2 ** 62, arith)
    for j in range(64):
        want = [_slow_fixed_point(int(a), float(mult[j]), bits, mode) for a in acc[:, j]]
        assert got[:, j].tolist() == want, (j, mult[j])


def test_round_shift_ties_and_quantize_multiplier() -> None:
    v = np.array([-6, -5, -3, -2, -1, 1, 2, 3, 5, 6, 7])
    assert round_shift(v, 1, "half-even").tolist() == [-3, -2, -2, -1, 0, 0, 1, 2, 2, 3, 4]
    assert round_shift(v, 1, "half-up").tolist() == [-3, -2, -1, -1, 0, 1, 1, 2, 3, 3, 4]
    assert round_shift(v, 1, "half-away").tolist() == [-3, -3, -2, -1, -1, 1, 1, 2, 3, 3, 4]
    m0, shift = quantize_multiplier(np.array([0.75, 1.0, 0.0, 3.0]), 31)
    assert m0.tolist() == [3 << 29, 1 << 30, 0, 3 << 29]
    assert shift.tolist() == [31, 30, 0, 29]


def test_accumulator_wraps_at_its_width() -> None:
    from qcompiler.sim import kernels as K

    stats: dict[str, int] = {}
    a = np.full((1, 4), 255, np.uint8)
    b = np.full((4, 1), 127, np.int8)
    kern = [k for k in make_kernels(Arithmetic(accumulator_bits=16), stats) if k.__name__ == "MatMulInteger"][0]
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    model = _model([node], [_vi("a", TensorProto.UINT8)], [_vi("y", TensorProto.INT32)], [_c("b", b)])
    y = ReferenceEvaluator(model, new_ops=[kern]).run(None, {"a": a})[0]
    assert int(y[0, 0]) == 4 * 255 * 127 - 65536 * 2  # 129540 wrapped into int16
    assert stats["accumulator_overflows"] == 1
    assert K.int_range(np.dtype(np.int8)) == (-128, 127)


def test_fixed_point_wide_accumulators_exact() -> None:
    """64-bit accumulators (uint16 x int8 targets): products beyond int64 are still exact."""
    rng = np.random.default_rng(12)
    acc = np.concatenate([rng.integers(-(2 ** 46), 2 ** 46, 50), rng.integers(-1000, 1000, 50)])
    mult = np.float64(3.7e-5)
    arith = Arithmetic(requantize="fixed-point", rounding="half-away", accumulator_bits=64)
    got = requantize(acc, mult, 0, -(2 ** 62), 2 ** 62, arith)
    assert got.tolist() == [_slow_fixed_point(int(a), float(mult), 31, "half-away") for a in acc]


def test_uint16_activations_fixed_point_conv_against_slow_reference() -> None:
    """A dsp-style kernel: uint16 activations x int8 weights, 64-bit accumulator, fixed-point
    requantization rounding half away from zero, checked element by element in Python ints."""
    rng = np.random.default_rng(13)
    c, m, k = 5, 3, 3
    x = rng.integers(0, 65536, (1, c, 6, 6)).astype(np.uint16)
    w = rng.integers(-127, 128, (m, c, k, k)).astype(np.int8)
    xs, xz, ws, ys, yz = np.float32(1e-4), np.uint16(30000), np.float32(0.003), np.float32(2e-4), np.uint16(32768)
    b = rng.integers(-10 ** 6, 10 ** 6, m).astype(np.int32)
    inits = [_c("xs", xs), _c("xz", xz), _c("w", w), _c("ws", np.full(m, ws, np.float32)), _c("wz", np.zeros(m, np.int8)),
             _c("ys", ys), _c("yz", yz), _c("b", b)]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[1, 1, 1, 1])
    model = _model([node], [_vi("x", TensorProto.UINT16)], [_vi("y", TensorProto.UINT16)], inits)
    arith = Arithmetic(requantize="fixed-point", rounding="half-away", multiplier_bits=31, accumulator_bits=64)
    got = _sim(model, {"x": x}, arith)[0]
    assert got.dtype == np.uint16
    mult = float(np.float32(xs) * np.float32(ws) / np.float32(ys))
    xp = np.pad(x.astype(np.int64) - int(xz), [(0, 0), (0, 0), (1, 1), (1, 1)])
    for o in range(m):
        for i in range(6):
            for j in range(6):
                acc = int((xp[0, :, i:i + k, j:j + k] * w[o].astype(np.int64)).sum()) + int(b[o])
                want = min(65535, max(0, _slow_fixed_point(acc, mult, 31, "half-away") + int(yz)))
                assert int(got[0, o, i, j]) == want


def test_quantize_ties_saturation_and_non_finite() -> None:
    """REFERENCE.md B.1 vectors: ties to even, zero point after rounding, saturation; NaN and
    -inf to qmin, +inf to qmax (onnxruntime's choice; onnx's reference sends +inf to qmin)."""
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 127.6, -128.6, np.nan, np.inf, -np.inf], np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    for zdt, want in ((np.int8, [-2, -2, 0, 0, 2, 2, 4, 127, -128, -128, 127, -128]),
                      (np.uint8, [126, 126, 128, 128, 130, 130, 132, 255, 0, 0, 255, 0])):
        zp = zdt(0 if zdt == np.int8 else 128)
        t = TensorProto.INT8 if zdt == np.int8 else TensorProto.UINT8
        model = _model([node], [_vi("x", TensorProto.FLOAT)], [_vi("y", t)], [_c("s", np.float32(1)), _c("z", zp)])
        with np.errstate(invalid="ignore"):
            assert _sim(model, {"x": x})[0].tolist() == want


@pytest.mark.parametrize("dt", [np.int8, np.uint16])
def test_fixed_point_add_within_one_step_of_exact(dt) -> None:
    """The integer Add (both inputs on a common fine scale, one requantization) stays within one
    output step of the exactly computed sum."""
    rng = np.random.default_rng(14)
    info = np.iinfo(dt)
    a = rng.integers(info.min, info.max + 1, 4000).astype(dt)
    b = rng.integers(info.min, info.max + 1, 4000).astype(dt)
    s = {"as": 0.0123, "bs": 0.0457, "cs": 0.0611} if dt == np.int8 else {"as": 1.1e-4, "bs": 2.9e-4, "cs": 4.1e-4}
    z = {"az": 3, "bz": -7, "cz": 1} if dt == np.int8 else {"az": 30000, "bz": 41000, "cz": 32768}
    inits = [_c(k, np.float32(v)) for k, v in s.items()] + [_c(k, dt(v)) for k, v in z.items()]
    t = TensorProto.INT8 if dt == np.int8 else TensorProto.UINT16
    node = helper.make_node("QLinearAdd", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], ["c"], domain=MS)
    model = _model([node], [_vi("a", t), _vi("b", t)], [_vi("c", t)], inits, ms=True)
    got = _sim(model, {"a": a, "b": b}, Arithmetic(requantize="fixed-point", rounding="half-away"))[0]
    f32 = {k: float(np.float32(v)) for k, v in s.items()}
    exact = (f32["as"] * (a.astype(np.float64) - z["az"]) + f32["bs"] * (b.astype(np.float64) - z["bz"])) / f32["cs"]
    want = np.clip(np.rint(exact) + z["cz"], info.min, info.max)
    diff = np.abs(got.astype(np.int64) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
