"""insert-qdq on the ort-cpu target: what gets quantized, with which qparams, how weights are
rounded (pair-sum limit, GPTQ, bias correction), and that the QDQ model still computes the
float model's function.

The model is run through the ort-cpu static pipeline up to and including insert-qdq (no
lowering), so the Q/DQ placement itself is what is checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

import qcompiler
from _util import init, make_model, op_types, rand, run_ort, tensor
from conftest import tiny_calibration, tiny_model

TARGET = "ort-cpu"


def run_prefix(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | list, *, insert_options: str = "",
               calibrate_options: str = "method=minmax") -> tuple[qcompiler.Model, qcompiler.PassContext]:
    """The target's static pipeline up to insert-qdq (the passes after it removed),
    with optional pass options, run through a PassManager (verify-each on).

    Calibration defaults to minmax here: the target's mse search costs ~0.4 s per tensor and
    what is tested below does not depend on the method (test_calibrate.py covers mse)."""
    target = qcompiler.load_target(TARGET)
    specs = []
    for spec in qcompiler.parse_pipeline(target.pipeline("static")):
        if spec.name in ("lower-qoperator", "quantize-dynamic", "cleanup-qdq", "convert-float16", "compress-weights",
                         "guard-float-convs", "compact-qparams"):
            continue
        extra = {"insert-qdq": insert_options, "calibrate": calibrate_options}.get(spec.name, "")
        if extra:
            spec = qcompiler.parse_pipeline(f"{spec.name}{{{extra}}}")[0]
        specs.append(spec)
    assert [s.name for s in specs][-1] == "insert-qdq"
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=target,
                                calibration=qcompiler.load_calibration(feeds, qcompiler.input_specs(model)))
    passes = [qcompiler.default_registry().instantiate(s) for s in specs]
    qcompiler.PassManager(passes).run(model, ctx)
    return model, ctx


class Graph:
    """Read-only lookups on a compiled proto (producer of a tensor, initializers by name)."""

    def __init__(self, model: qcompiler.Model) -> None:
        self.proto = model.to_proto()
        self.inits = {t.name: numpy_helper.to_array(t) for t in self.proto.graph.initializer}
        self.producer = {o: n for n in self.proto.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.proto.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    def node(self, name: str) -> onnx.NodeProto:
        return next(n for n in self.proto.graph.node if n.name == name)

    def dq_of(self, tensor_name: str) -> tuple[onnx.NodeProto, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """The DequantizeLinear producing ``tensor_name`` and its (int data if constant, scale,
        zero point)."""
        dq = self.producer[tensor_name]
        assert dq.op_type == "DequantizeLinear", f"{tensor_name} comes from {dq.op_type}"
        zp = self.inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
        return dq, self.inits.get(dq.input[0]), self.inits[dq.input[1]], zp

    def weight(self, node_name: str, index: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Integer codes and per-channel scales of a node's weight input."""
        dq, q, scale, _ = self.dq_of(self.node(node_name).input[index])
        return q, scale

    def dequantized_weight(self, node_name: str, index: int = 1) -> np.ndarray:
        dq, q, scale, zp = self.dq_of(self.node(node_name).input[index])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        zero = 0 if zp is None else zp.astype(np.float64).reshape(shape)
        return (q.astype(np.float64) - zero) * scale.astype(np.float64).reshape(shape)


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _top2(codes: np.ndarray) -> np.ndarray:
    mag = np.abs(codes.astype(np.int64)).reshape(codes.shape[0], -1)
    return -np.partition(-mag, 1, axis=1)[:, :2].sum(axis=1)


@pytest.fixture(scope="module")
def tiny_qdq() -> tuple[qcompiler.Model, qcompiler.PassContext]:
    """The tiny model quantized once for the structural checks (default insert-qdq options)."""
    return run_prefix(tiny_model(), tiny_calibration(8))


# -- structure and qparams on the tiny model -----------------------------------------------------


def test_weights_are_int8_per_channel(tiny_qdq: tuple[qcompiler.Model, qcompiler.PassContext]) -> None:
    """Each Conv/Gemm weight is an int8 initializer behind a DQ on axis 0 with one scale per
    output channel (Gemm is transB=1, so its output channels are axis 0 too)."""
    g = Graph(tiny_qdq[0])
    for name, channels, shape in (("conv1", 4, (4, 3, 3, 3)), ("conv2", 4, (4, 4, 3, 3)), ("gemm", 5, (5, 4))):
        dq, q, scale, zp = g.dq_of(g.node(name).input[1])
        assert q.dtype == np.int8 and q.shape == shape
        assert _attr(dq, "axis") == 0
        assert scale.dtype == np.float32 and scale.shape == (channels,)
        assert zp is not None and zp.dtype == np.int8 and not zp.any()
        assert np.abs(q.astype(np.int64)).max() <= 127


def test_bias_int32_with_product_scale(tiny_qdq: tuple[qcompiler.Model, qcompiler.PassContext]) -> None:
    """Biases are int32 with scale = input scale * weight scale per channel (what QLinearConv
    and QGemm assume), exact up to float32 rounding of the product."""
    g = Graph(tiny_qdq[0])
    for name in ("conv1", "conv2", "gemm"):
        node = g.node(name)
        _, x_q, x_scale, _ = g.dq_of(node.input[0])
        _, _, w_scale, _ = g.dq_of(node.input[1])
        dq, b_q, b_scale, b_zp = g.dq_of(node.input[2])
        assert b_q.dtype == np.int32 and b_zp is None
        assert b_scale.shape == w_scale.shape
        np.testing.assert_allclose(b_scale, x_scale.astype(np.float64) * w_scale.astype(np.float64), rtol=2e-7,
                                   atol=0)


def test_bias_quantized_to_nearest_without_correction() -> None:
    """With bias correction off the stored bias is the float bias to within half a step."""
    model, _ = run_prefix(tiny_model(), tiny_calibration(8), insert_options="bias-correction=false")
    g = Graph(model)
    floats = {t.name: numpy_helper.to_array(t) for t in tiny_model().graph.initializer}
    for name, bias in (("conv1", "b1"), ("conv2", "b2"), ("gemm", "bg")):
        _, b_q, b_scale, _ = g.dq_of(g.node(name).input[2])
        err = np.abs(b_q.astype(np.float64) * b_scale - floats[bias])
        assert (err <= 0.5 * b_scale + 1e-12).all()


def test_pair_sum_rule(tiny_qdq: tuple[qcompiler.Model, qcompiler.PassContext]) -> None:
    """ort-cpu without VNNI adds weight pairs in int16: the two largest |q| of every Conv/Gemm
    output row sum to at most 128 (255 * 128 fits in int16)."""
    g = Graph(tiny_qdq[0])
    for name in ("conv1", "conv2", "gemm"):
        q, _ = g.weight(name)
        assert (_top2(q) <= 128).all(), name


def test_depthwise_conv_keeps_full_range() -> None:
    """A depthwise Conv (group == channels) runs in an int32-accumulating kernel: its weights use
    up to 127 without the pair limit (scale = absmax / 127), while the regular Conv after it
    stays within the pair limit."""
    rng = np.random.default_rng(2)
    wd = (rng.standard_normal((6, 1, 3, 3)) * 0.5).astype(np.float32)
    wp = (rng.standard_normal((4, 6, 1, 1)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wd", "bd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wp", "bp"], ["y"], name="pw")]
    proto = make_model(nodes, [tensor("x", [1, 6, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                       [init("wd", wd), init("bd", np.zeros(6, np.float32)), init("wp", wp),
                        init("bp", np.zeros(4, np.float32))])
    feeds = {"x": rng.standard_normal((6, 6, 6, 6)).astype(np.float32)}
    model, _ = run_prefix(proto, feeds, insert_options="rounding=nearest")
    g = Graph(model)
    q, scale = g.weight("dw")
    absmax = np.abs(wd).reshape(6, -1).max(axis=1)
    np.testing.assert_array_equal(scale, (absmax / 127).astype(np.float32))
    assert (np.abs(q.astype(np.int64)).reshape(6, -1).max(axis=1) == 127).all()
    assert (_top2(q) > 128).all()  # the pair limit really is off here
    q_pw, _ = g.weight("pw")
    assert (_top2(q_pw) <= 128).all()


def _expected_uint8_qparams(lo: float, hi: float) -> tuple[np.float32, int]:
    """Reference asymmetric uint8 qparams: range widened to 0, zp from the stored scale."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    return scale, int(np.clip(np.round(0.0 - lo / float(scale)), 0, 255))


def test_activations_uint8_from_calibrated_range(tiny_qdq: tuple[qcompiler.Model, qcompiler.PassContext]) -> None:
    """Every activation Q is uint8 with scale/zero point computed from its calibrated range."""
    model, ctx = tiny_qdq
    g = Graph(model)
    ranges = ctx.analysis["ranges"]
    qs = [n for n in g.proto.graph.node if n.op_type == "QuantizeLinear"]
    assert {n.input[0] for n in qs} == {"x", "r1", "c2", "a1", "p1", "f1"}
    for q in qs:
        scale, zp = g.inits[q.input[1]], g.inits[q.input[2]]
        assert zp.dtype == np.uint8 and scale.shape == () and zp.shape == ()
        want_scale, want_zp = _expected_uint8_qparams(*ranges[q.input[0]])
        if q.input[0] == "f1":  # Flatten passes its input's qparams through
            want_scale, want_zp = _expected_uint8_qparams(*ranges["p1"])
        assert scale == want_scale, q.input[0]
        assert int(zp) == want_zp, q.input[0]
    # the Relu output range starts at 0 -> zero point 0
    assert int(g.inits[g.node("r1_QuantizeLinear").input[2]]) == 0


def test_minmax_input_range_is_data_range() -> None:
    """With minmax calibration the input's qparams come from the data's exact min/max."""
    feeds = tiny_calibration(8)
    model, _ = run_prefix(tiny_model(), feeds)
    g = Graph(model)
    q = next(n for n in g.proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    want_scale, want_zp = _expected_uint8_qparams(float(feeds["x"].min()), float(feeds["x"].max()))
    assert g.inits[q.input[1]] == want_scale and int(g.inits[q.input[2]]) == want_zp


def test_relu_fused_after_conv(tiny_qdq: tuple[qcompiler.Model, qcompiler.PassContext]) -> None:
    """Conv+Relu is one kernel: Relu reads the Conv's output directly, the Q comes after Relu."""
    g = Graph(tiny_qdq[0])
    relu = g.node("relu1")
    assert g.producer[relu.input[0]].name == "conv1"
    assert [n.op_type for n in g.readers[relu.input[0]]] == ["Relu"]
    assert "QuantizeLinear" in [n.op_type for n in g.readers[relu.output[0]]]


def test_qdq_model_matches_float() -> None:
    """The QDQ model computes the float model's function on unseen inputs: cosine > 0.99 and
    max error < 5% of the output range."""
    model, _ = run_prefix(tiny_model(), tiny_calibration(16))
    xs = tiny_calibration(12, seed=7)["x"]
    want = np.concatenate([run_ort(tiny_model(), {"x": x[None]})[0] for x in xs]).reshape(-1)
    got = np.concatenate([run_ort(model, {"x": x[None]})[0] for x in xs]).reshape(-1)
    cosine = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
    assert cosine > 0.99
    assert np.abs(got - want).max() < 0.05 * (want.max() - want.min())
    assert not np.array_equal(got, want)  # it really is quantized


# -- rounding and bias correction ----------------------------------------------------------------


def _conv_np(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Unpadded stride-1 Conv in float64 (the reference the errors are measured against)."""
    kh, kw = w.shape[2:]
    win = sliding_window_view(x.astype(np.float64), (kh, kw), axis=(2, 3))  # N C OH OW KH KW
    return np.einsum("ncijkl,mckl->nmij", win, w.astype(np.float64))


def _correlated(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    """Channels driven by two shared latent factors plus a little noise (strongly correlated)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2, size, size))
    mix = rng.standard_normal((channels, 2))
    x = np.einsum("ck,nkhw->nchw", mix, z) + 0.05 * rng.standard_normal((n, channels, size, size))
    return x.astype(np.float32)


def _single_conv(channels: int, out: int, size: int, seed: int, *, relu_first: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, channels, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["xr" if relu_first else "x", "w", "b"], ["y"], name="conv")]
    if relu_first:
        nodes.insert(0, helper.make_node("Relu", ["x"], ["xr"], name="relu"))
    proto = make_model(nodes, [tensor("x", [1, channels, size, size])], [tensor("y", [1, out, size - 2, size - 2])],
                       [init("w", w), init("b", np.zeros(out, np.float32))])
    return proto, w


def _weight_error(proto: onnx.ModelProto, w: np.ndarray, x: np.ndarray, options: str,
                  calibrate_options: str = "method=minmax") -> float:
    """||conv(x, W_dequantized) - conv(x, W)|| on the calibration data itself."""
    model, _ = run_prefix(proto, {"x": x}, insert_options=options, calibrate_options=calibrate_options)
    wq = Graph(model).dequantized_weight("conv")
    return float(np.linalg.norm(_conv_np(x, wq) - _conv_np(x, w)))


def test_gptq_rounding_beats_nearest() -> None:
    """On a Conv fed with correlated inputs (after a Relu; non-negative), GPTQ rounding's output
    error on the calibration data is at most nearest rounding's (in fact far lower)."""
    proto, w = _single_conv(8, 6, 10, seed=0, relu_first=True)
    x = np.abs(_correlated(8, 8, 10, seed=1))  # Relu is the identity on it
    nearest = _weight_error(proto, w, x, "rounding=nearest,bias-correction=false")
    gptq = _weight_error(proto, w, x, "rounding=gptq,bias-correction=false")
    assert gptq <= nearest
    assert gptq < 0.5 * nearest


@pytest.mark.parametrize("method", [
    "minmax",
    "mse",
])
def test_gptq_rounding_on_graph_input_conv(method: str) -> None:
    """The same comparison when the Conv reads the graph input directly (the first layer), with
    either calibration method (mse is ort-cpu's default)."""
    proto, w = _single_conv(8, 6, 10, seed=0, relu_first=False)
    x = _correlated(8, 8, 10, seed=1)
    nearest = _weight_error(proto, w, x, "rounding=nearest,bias-correction=false", f"method={method}")
    gptq = _weight_error(proto, w, x, "rounding=gptq,bias-correction=false", f"method={method}")
    assert gptq < 0.9 * nearest


def test_bias_correction_reduces_mean_error() -> None:
    """With a nonzero-mean input, weight rounding shifts each channel's mean output; bias
    correction absorbs that shift: the per-channel mean error drops by far."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 8, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(6) * 0.1).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
                       [tensor("x", [1, 8, 10, 10])], [tensor("y", [1, 6, 8, 8])], [init("w", w), init("b", b)])
    x = (rng.standard_normal((8, 8, 10, 10)) + 2.0).astype(np.float32)
    ref = _conv_np(x, w) + b.reshape(1, -1, 1, 1)

    def mean_error(options: str) -> float:
        model, _ = run_prefix(proto, {"x": x}, insert_options=options)
        g = Graph(model)
        _, b_q, b_scale, _ = g.dq_of(g.node("conv").input[2])
        got = _conv_np(x, g.dequantized_weight("conv")) + (b_q * b_scale.astype(np.float64)).reshape(1, -1, 1, 1)
        return float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())

    without = mean_error("rounding=nearest,bias-correction=false")
    with_correction = mean_error("rounding=nearest,bias-correction=true")
    assert with_correction < 0.1 * without


# -- options and determinism ---------------------------------------------------------------------


def test_exclude_keeps_node_float() -> None:
    """`exclude` keeps the named node float (original float weight, no int32 bias) and says why."""
    model, ctx = run_prefix(tiny_model(), tiny_calibration(8), insert_options="exclude=[conv2]")
    g = Graph(model)
    conv2 = g.node("conv2")
    assert conv2.op_type == "Conv"
    assert conv2.input[1] == "w2" and g.inits["w2"].dtype == np.float32
    assert conv2.input[2] == "b2" and g.inits["b2"].dtype == np.float32
    assert ctx.analysis["float_nodes"].get("conv2") == "excluded by option"
    assert "conv2" not in ctx.analysis["lowered"]
    g.dq_of(g.node("conv1").input[1])  # the other Conv is still quantized


def test_same_inputs_identical_bytes() -> None:
    """Compiling twice, with the calibration given as a stacked dict or as a list of samples,
    gives byte-identical models (QDQ and QOperator formats)."""
    stacked = tiny_calibration(6)
    samples = [{"x": stacked["x"][i:i + 1]} for i in range(6)]
    pipeline = qcompiler.load_target(TARGET).pipeline("static").replace("calibrate", "calibrate{method=minmax}")
    for fmt in ("qdq", "qoperator"):
        a, b, c = (qcompiler.compile(tiny_model(), target=TARGET, calibration=cal, format=fmt, pipeline=pipeline).proto
                   for cal in (stacked, stacked, samples))
        assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()


# -- schema v1 rules: power-of-two scales, encoding ranges, 16/4-bit, blocked, node facts ---------

PIPE = "canonicalize,infer-shapes,group-activations,calibrate{method=minmax},insert-qdq,cleanup-qdq"
HEADER = 'schema = 1\nname = "t"\ndescription = "test"\n[defaults]\nformat = "qdq"\n'


def _target(tmp_path, body: str):
    path = tmp_path / "t.toml"
    path.write_text(HEADER + body)
    return path


def _compile(proto: onnx.ModelProto, target, feeds) -> qcompiler.CompileResult:
    return qcompiler.compile(proto, target=target, calibration=feeds, pipeline=PIPE)


def _model21(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """Opset 21 (16-bit, 4-bit and blocked Q/DQ), IR 10."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_params(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray | None]]:
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            out.append((n, inits[n.input[1]], zp))
    return out


def _is_pow2(a: np.ndarray) -> bool:
    m, _ = np.frexp(np.asarray(a, np.float64))
    return bool(np.all(m == 0.5))


def test_power_of_two_scales_everywhere(tmp_path) -> None:
    """scale = "power-of-two" on activations and weights (with a pair-sum limit, whose scale
    nudging must stay on powers of two): every stored scale, int32 bias scales included, is an
    exact power of two, and the model still computes the float function (cosine > 0.98)."""
    t = _target(tmp_path, """
[quantization.activation]
dtype = "int8"
symmetric = true
scale = "power-of-two"
[quantization.weight]
dtype = "int8"
symmetric = true
granularity = "per-channel"
scale = "power-of-two"
pair_sum_max = 128
[quantization.bias]
dtype = "int32"
[ops.Conv]
inputs = ["activation", "weight", "bias"]
[ops.Add]
inputs = ["activation", "activation"]
""")
    result = _compile(tiny_model(), t, tiny_calibration(8))
    params = _qdq_params(result.proto)
    assert len(params) > 6
    for node, scale, zp in params:
        assert _is_pow2(scale), (node.name, scale)
        assert zp is None or not zp.any()
    xs = tiny_calibration(6, seed=5)["x"]
    want = np.concatenate([run_ort(tiny_model(), {"x": x[None]})[0] for x in xs]).ravel()
    got = np.concatenate([run_ort(result.proto, {"x": x[None]})[0] for x in xs]).ravel()
    assert want @ got / (np.linalg.norm(want) * np.linalg.norm(got)) > 0.98


def test_weight_qparams_power_of_two_matches_reference() -> None:
    """Per-tensor and per-channel power-of-two weight scales are 2^ceil(log2(absmax / 127))
    (symmetric narrow int8), so the range still fits: computed here independently."""
    w = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32) * np.array([[0.1], [1], [3], [0.01]], np.float32)
    qt = qcompiler.QType("int8", True, -127, 127, power_of_two=True)
    for axis in (None, 0):
        qp = qcompiler.weight_qparams(w, qt, axis)
        absmax = np.abs(w).max() if axis is None else np.abs(w).max(axis=1)
        want = 2.0 ** np.ceil(np.log2(2 * absmax / 254))
        np.testing.assert_array_equal(qp.scale, want.astype(np.float32))
        assert np.all(np.abs(qcompiler.quantize(w, qp)) <= 127)
        assert np.all(np.abs(w) <= 127 * qp.scale.reshape(-1, 1) if axis == 0 else np.abs(w) <= 127 * qp.scale)


def _matmul_model(k: int = 8, n: int = 3, m: int = 4, opset: int = 21) -> onnx.ModelProto:
    w = np.random.default_rng(7).normal(size=(k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    ins, outs = [tensor("x", [m, k])], [tensor("y", [m, n])]
    if opset == 21:
        return _model21(nodes, ins, outs, [init("w", w)])
    return make_model(nodes, ins, outs, [init("w", w)], opset=opset)


def test_encoding_range_clamps_calibrated_range(tmp_path) -> None:
    """encoding_min/encoding_max limit the float range an activation encoding covers: the
    input observed in [-4, 4] gets uint8 qparams for [-1, 1] (scale 2/255)."""
    t = _target(tmp_path, """
[quantization.activation]
dtype = "uint8"
encoding_min = -1.0
encoding_max = 1.0
[quantization.weight]
dtype = "int8"
symmetric = true
[ops.MatMul]
inputs = ["activation", "weight"]
output = "float"
""")
    x = np.linspace(-4, 4, 32, dtype=np.float32).reshape(4, 8)
    proto = _compile(_matmul_model(opset=17), t, [{"x": x}]).proto
    q = next(p for p in _qdq_params(proto) if p[0].op_type == "QuantizeLinear" and p[0].input[0] == "x")
    scale = np.float32(2 / 255)
    assert float(q[1]) == scale and int(q[2]) == int(np.round(1.0 / np.float64(scale)))  # zp from the stored scale


def test_blocked_int4_weights_run_in_onnxruntime(tmp_path) -> None:
    """granularity = "blocked" with int4: the weight is stored as INT4, the DQ has axis 0 (the
    MatMul's reduction axis) and block_size 4, one scale per (block, column); onnxruntime's
    output equals x @ W_dq with W_dq computed here block by block (2 * absmax / 15 scales)."""
    t = _target(tmp_path, """
[quantization.activation]
dtype = "float"
[quantization.weight]
dtype = "int4"
symmetric = true
granularity = "blocked"
block_size = 4
[ops.MatMul]
inputs = ["float", "weight"]
output = "float"
""")
    result = qcompiler.compile(_matmul_model(k=10), target=t, calibration=[{"x": rand((4, 10))}], pipeline=PIPE)
    assert result.report["check"]["legal"]  # blocked weights are legal where the rule is blocked
    proto = result.proto
    onnx.checker.check_model(proto, full_check=True)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    assert _attr(dq, "axis") == 0 and _attr(dq, "block_size") == 4
    stored = next(t for t in proto.graph.initializer if t.name == dq.input[0])
    assert stored.data_type == onnx.TensorProto.INT4
    w = numpy_helper.to_array(next(t for t in _matmul_model(k=10).graph.initializer if t.name == "w"))
    ref = np.empty_like(w)
    for b0 in range(0, 10, 4):
        blk = w[b0:b0 + 4]
        s = (2 * np.abs(blk).max(axis=0) / 15).astype(np.float32)
        ref[b0:b0 + 4] = np.clip(np.rint(blk / s), -8, 7) * s
    x = rand((4, 10), seed=2)
    np.testing.assert_allclose(run_ort(proto, {"x": x})[0], x @ ref, rtol=1e-5, atol=1e-5)


def test_sixteen_bit_rule_needs_opset_21(tmp_path) -> None:
    """A uint16 activation rule on an opset-17 model keeps the op float, naming the opset."""
    t = _target(tmp_path, '[quantization.activation]\ndtype = "uint16"\n[ops.MatMul]\ninputs = ["activation", "float"]\n')
    result = _compile(_matmul_model(opset=17), t, [{"x": rand((4, 8))}])
    assert "opset >= 21" in result.report["float_nodes"]["mm"]


def test_dsp_uint16_activations_and_fixed_softmax() -> None:
    """dsp-a16w8: activations are Q/DQ'd in uint16, weights int8, and Softmax's output takes the
    fixed encoding (scale 2^-16, zero point 0) whatever the calibration saw."""
    rng = np.random.default_rng(4)
    w1, w2 = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Softmax", ["h"], ["p"], name="sm", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2")]
    proto = _model21(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 3])], [init("w1", w1), init("w2", w2)])
    feeds = [{"x": rng.normal(size=(2, 8)).astype(np.float32)} for _ in range(4)]
    out = _compile(proto, "dsp-a16w8", feeds).proto
    params = _qdq_params(out)
    acts = [(n, s, z) for n, s, z in params if n.op_type == "QuantizeLinear"]
    assert acts and all(z.dtype == np.uint16 for _, _, z in acts)
    q_sm = next(p for p in acts if p[0].input[0] == "p")
    assert float(q_sm[1]) == 2.0 ** -16 and int(q_sm[2]) == 0
    w_dqs = [z for n, s, z in params if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")]
    assert w_dqs and all(z.dtype == np.int8 for z in w_dqs)
    x = feeds[0]["x"]  # inside the calibrated range: only rounding error remains
    got, want = run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())


def test_exclude_when_gemv_keeps_matvec_float() -> None:
    """tensorrt: a MatMul whose activation has a static 1 rows is GEMV-shaped and stays float
    (the reason names the fact and the key); the same MatMul with 4 rows is quantized."""
    for rows, quantized in ((1, False), (4, True)):
        proto = _matmul_model(m=rows, opset=17)
        result = _compile(proto, "tensorrt", [{"x": rand((rows, 8))}])
        ops = op_types(result.proto)
        assert ("DequantizeLinear" in ops) is quantized
        if not quantized:
            assert "gemv" in result.report["float_nodes"]["mm"] and "exclude_when" in result.report["float_nodes"]["mm"]


def test_exclude_when_constant_input_keeps_bias_add_float() -> None:
    """tensorrt quantizes residual Adds (two computed inputs), not an Add of a constant."""
    nodes = [helper.make_node("Add", ["x", "c"], ["h"], name="bias_add"),
             helper.make_node("Add", ["h", "x"], ["y"], name="residual")]
    proto = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 4])], [init("c", rand((2, 4)))])
    result = _compile(proto, "tensorrt", [{"x": rand((2, 4))}])
    assert "constant-input" in result.report["float_nodes"]["bias_add"]
    assert "residual" in result.report["lowered"]


def test_other_inputs_quantize_every_concat_input_and_partitions() -> None:
    """npu-int8: Concat's `other_inputs = "activation"` puts a DQ on each of its inputs; a Sigmoid
    (host) splits the integer graph into two partitions whose boundaries are listed."""
    rng = np.random.default_rng(5)
    w = (rng.normal(size=(4, 3, 1, 1)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Sigmoid", ["r"], ["s"], name="sig"),
             helper.make_node("Concat", ["r", "s"], ["c"], name="cat", axis=1),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="conv2")]
    w2 = (rng.normal(size=(2, 8, 1, 1)) * 0.5).astype(np.float32)
    proto = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 4, 4])], [init("w", w), init("w2", w2)])
    feeds = [{"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)} for _ in range(4)]
    result = _compile(proto, "npu-int8", feeds)
    g = {o: n for n in result.proto.graph.node for o in n.output}
    cat = next(n for n in result.proto.graph.node if n.name == "cat")
    assert all(g[i].op_type == "DequantizeLinear" for i in cat.input)
    assert result.report["float_nodes"]["sig"].startswith("target 'npu-int8' runs Sigmoid in float")
    parts = result.report["partitions"]
    # relu -> cat joins everything into one region; data leaves it to the host (r -> Sigmoid)
    # and comes back (s -> Concat)
    assert [p["nodes"] for p in parts] == [["conv", "relu", "cat", "conv2"]]
    assert parts[0]["inputs"] == ["x", "s"] and parts[0]["outputs"] == ["r", "y"]
    for _, scale, zp in _qdq_params(result.proto):
        assert _is_pow2(scale) and (zp is None or not zp.any())


def test_dead_channel_keeps_its_bias() -> None:
    """A channel whose weights are ~1e-34 (dead after training) would get a weight scale so small
    that its int32 bias overflows (and x_scale * w_scale is a float32 subnormal): the scale is
    raised just enough, the weights still quantize to 0 and the stored bias dequantizes to the
    float bias. Found on ppocrv4_det with uint16 activations."""
    rng = np.random.default_rng(8)
    w = (rng.normal(size=(3, 2, 1, 1)) * 0.5).astype(np.float32)
    w[1] = 1e-34
    b = np.array([0.1, 0.5, -0.2], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    proto = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4])], [init("w", w), init("b", b)])
    model, _ = run_prefix(proto, [{"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)} for _ in range(3)],
                          insert_options="rounding=nearest,bias-correction=false")
    g = Graph(model)
    dq, bq, b_scale, _ = g.dq_of(g.node("conv").input[2])
    assert np.all(b_scale >= np.finfo(np.float32).tiny)
    err = np.abs(bq.astype(np.float64) * b_scale - b)
    assert np.all(err <= 0.5 * b_scale.astype(np.float64) * (1 + 1e-6)), err  # rounding only, no overflow
    codes, _ = g.weight("conv")
    assert not codes[1].any()


def test_per_op_dtype_override(tmp_path) -> None:
    """ops.<Op>.activation overrides the target-wide rule for that op: with uint8 activations
    target-wide and `activation = { dtype = "int8", symmetric = true }` on Add, the Add's inputs
    (r from a float Relu, h from a MatMul whose output stays float) are int8 with zero point 0,
    while the graph input the MatMul reads is uint8."""
    t = _target(tmp_path, """
[quantization.activation]
dtype = "uint8"
[quantization.weight]
dtype = "int8"
symmetric = true
[ops.MatMul]
inputs = ["activation", "weight"]
output = "float"
[ops.Add]
inputs = ["activation", "activation"]
output = "float"
activation = { dtype = "int8", symmetric = true }
""")
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "h"], ["y"], name="add")]
    proto = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3])], [init("w", rng.normal(size=(4, 3)).astype(np.float32))])
    out = _compile(proto, t, [{"x": rng.normal(size=(2, 4)).astype(np.float32)} for _ in range(3)]).proto
    zp_of = {n.input[0]: z for n, _, z in _qdq_params(out) if n.op_type == "QuantizeLinear"}
    assert zp_of["x"].dtype == np.uint8
    assert zp_of["r"].dtype == np.int8 and zp_of["h"].dtype == np.int8 and not zp_of["r"].any()
