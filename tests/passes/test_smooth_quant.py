"""smooth-quant: per-input-channel scales move activation outliers into MatMul weights. The
float model computes the same outputs (onnxruntime, graph optimizations off, 1e-5 relative),
and a MatMul whose input has outlier channels loses less accuracy when quantized.

CPU fact pinned: the quantized comparison compiles for ort-cpu-qdq (QDQ format) and runs with
ORT_DISABLE_ALL, i.e. DequantizeLinear -> float MatMul: no int8 kernel, the same on CPUs with
and without VNNI."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import qcompiler
from _util import assert_same_outputs, init, initializers, make_model, op_types, rand, run_ort, tensor

K, N, SEQ = 32, 24, 16
OUTLIERS = (3, 17)


def _activation(seed: int) -> np.ndarray:
    """Token activations with two outlier channels ~60x the others (as after a transformer LN)."""
    x = rand([1, SEQ, K], seed)
    x[..., list(OUTLIERS)] *= 60.0
    return x


def _model(producer: str, extra_reader: bool = False):
    """x -> producer -> MatMul(W1), MatMul(W2) [-> + residual reader of the producer's output]."""
    gamma = np.ones(K, np.float32)
    gamma[list(OUTLIERS)] = 60.0  # the LN itself makes the outliers, as in BERT
    inits = [init("w1", rand([K, N], 1)), init("w2", rand([K, N], 2))]
    if producer == "LayerNormalization":
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1)]
        inits += [init("g", gamma), init("b", rand([K], 3, -0.1, 0.1))]
    elif producer == "Mul":
        nodes = [helper.make_node("Mul", ["x", "c"], ["h"], name="scale")]
        inits.append(init("c", gamma))
    else:  # Relu: not foldable, a Div is inserted
        nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu")]
    nodes += [helper.make_node("MatMul", ["h", "w1"], ["y1"], name="mm1"),
              helper.make_node("MatMul", ["h", "w2"], ["y2"], name="mm2")]
    outputs = [tensor("y1", [1, SEQ, N]), tensor("y2", [1, SEQ, N])]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
        outputs.append(tensor("r", [1, SEQ, K]))
    return make_model(nodes, [tensor("x", [1, SEQ, K])], outputs, inits)


def _calib(n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": rand([1, SEQ, K], 100 + i)} for i in range(n)]


def _smooth(proto, calib=None, **options: str):
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"), calibration=calib or _calib())
    spec = qcompiler.PassSpec("smooth-quant", tuple(options.items()))
    qcompiler.PassManager([qcompiler.default_registry().instantiate(spec)]).run(model, ctx)
    return model, ctx.report["smooth_quant"]


@pytest.mark.parametrize("producer,extra,how,ops", [
    ("LayerNormalization", False, "folded into LayerNormalization", ["LayerNormalization", "MatMul", "MatMul"]),
    ("Mul", False, "folded into Mul", ["Mul", "MatMul", "MatMul"]),
    ("LayerNormalization", True, "inserted Div", ["LayerNormalization", "Div", "MatMul", "MatMul", "Add"]),
    ("Relu", False, "inserted Div", ["Relu", "Div", "MatMul", "MatMul"]),
])
def test_float_outputs_unchanged(producer: str, extra: bool, how: str, ops: list[str]) -> None:
    """1/s goes into the producer's constants where exact, else into one shared Div; the
    float outputs stay within 1e-5 relative of the original's."""
    proto = _model(producer, extra)
    model, report = _smooth(proto)
    (entry,) = report["activations"]
    assert entry["alpha"] is not None and entry["applied"].startswith(how), entry
    assert entry["error_after"] < entry["error_before"]
    assert sorted(op_types(model)) == sorted(ops)
    x = _activation(7) / 60.0 if producer != "Relu" else _activation(7)
    assert_same_outputs(proto, model, {"x": x}, rtol=1e-5, atol=1e-5 * float(np.abs(run_ort(proto, {"x": x})[0]).max()))


def test_outputs_name_and_inputs_kept() -> None:
    """Inputs are never modified and the graph keeps its interface."""
    proto = _model("Relu")
    before = proto.SerializeToString()
    model, _ = _smooth(proto)
    assert proto.SerializeToString() == before
    g = model.to_proto().graph
    assert [o.name for o in g.output] == ["y1", "y2"] and [i.name for i in g.input] == ["x"]


def test_scale_follows_formula() -> None:
    """With one alpha, s_j = max|X_j|^a / max|W_j|^(1-a) over the calibration data and both
    MatMuls' weight rows: the inserted Div holds s and each weight became s * W."""
    proto = _model("Relu")
    calib = [{"x": _activation(100 + i)} for i in range(6)]
    model, report = _smooth(proto, calib, alphas="[0.5]")
    assert report["activations"][0]["alpha"] == 0.5
    x_max = np.max([np.abs(np.maximum(c["x"], 0)).reshape(-1, K).max(axis=0) for c in calib], axis=0)
    w1, w2 = rand([K, N], 1), rand([K, N], 2)
    w_max = np.maximum(np.abs(w1).max(axis=1), np.abs(w2).max(axis=1))
    s = np.sqrt(x_max) / np.sqrt(w_max)
    inits = initializers(model)
    g = model.to_proto().graph
    div = next(n for n in g.node if n.op_type == "Div")
    np.testing.assert_allclose(inits[div.input[1]], s, rtol=1e-6)
    mm1 = next(n for n in g.node if n.name == "mm1")
    np.testing.assert_allclose(inits[mm1.input[1]], w1 * s[:, None], rtol=1e-6)


def _quant_error(proto, pipeline_extra: bool) -> float:
    base = qcompiler.load_target("ort-cpu-qdq").pipeline("static")
    text = base.replace("calibrate,", "smooth-quant,calibrate,") if pipeline_extra else base
    assert ("smooth-quant" in text) == pipeline_extra
    result = qcompiler.compile(proto, target="ort-cpu-qdq", calibration=_calib(16), pipeline=text)
    errs = []
    for seed in range(4):
        feed = {"x": rand([1, SEQ, K], 300 + seed)}
        want = run_ort(proto, feed)
        got = run_ort(result.model, feed)
        errs.append(sum(float(np.square(w - g).sum()) / float(np.square(w).sum()) for w, g in zip(want, got)))
    return float(np.mean(errs))


def test_quantized_error_drops_on_outlier_channels() -> None:
    """The full static pipeline with smooth-quant before calibrate: the relative output error
    of a LayerNorm -> MatMul pair with two 60x channels drops by at least half."""
    proto = _model("LayerNormalization")
    plain, smooth = _quant_error(proto, False), _quant_error(proto, True)
    assert smooth < 0.5 * plain, (plain, smooth)


def test_bad_options_and_no_data() -> None:
    with pytest.raises(qcompiler.UserError, match="alphas"):
        _smooth(_model("Relu"), alphas="[1.5]")
    model = qcompiler.load_model(_model("Relu"))
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"))
    p = qcompiler.default_registry().instantiate(qcompiler.PassSpec("smooth-quant"))
    with pytest.raises(qcompiler.UserError, match="calibration data"):
        qcompiler.PassManager([p]).run(model, ctx)
