"""Models that are not plain opset-17 float graphs: quantization-aware-trained Q/DQ already in
the model, an old opset (12), and compute inside an If branch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import qcompiler
from conftest import make_model, tensor_info

PIPELINE = qcompiler.load_target("ort-cpu").pipeline("static").replace("calibrate", "calibrate{method=minmax}")
QAT_SCALE = np.float32(0.02)
QAT_ZP = np.uint8(128)


def _compile(proto: onnx.ModelProto, calibration: dict[str, np.ndarray], **kwargs: object) -> qcompiler.CompileResult:
    """ort-cpu's own pipeline, minmax calibration (mse costs ~0.4 s a tensor, not tested here)."""
    return qcompiler.compile(proto, target="ort-cpu", calibration=calibration, pipeline=PIPELINE, **kwargs)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _close(want: np.ndarray, got: np.ndarray) -> None:
    """Quantized vs float: cosine > 0.99 and max error < 5% of the output range (checked on the
    calibration samples: held-out values beyond a 6-sample range would be clipped by design)."""
    w, g = want.reshape(-1).astype(np.float64), got.reshape(-1).astype(np.float64)
    assert float(w @ g / (np.linalg.norm(w) * np.linalg.norm(g))) > 0.99
    assert np.abs(g - w).max() < 0.05 * (w.max() - w.min())


# -- QAT ------------------------------------------------------------------------------------------


def _qat_model() -> onnx.ModelProto:
    """x -> Q/DQ(scale 0.02, zp 128: fixed by training) -> Conv -> Relu -> Conv -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("QuantizeLinear", ["x", "qs", "qz"], ["xq"], name="qat_q"),
             helper.make_node("DequantizeLinear", ["xq", "qs", "qz"], ["xd"], name="qat_dq"),
             helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(np.array(QAT_SCALE), "qs"), numpy_helper.from_array(np.array(QAT_ZP), "qz"),
             numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((2, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(2) * 0.1).astype(np.float32), "b2")]
    return make_model(nodes, [tensor_info("x", [1, 3, 6, 6])], [tensor_info("y", [1, 2, 6, 6])], inits)


def _qat_calibration(n: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs spanning about +-9: a calibrated uint8 scale would be ~0.07, not the QAT 0.02."""
    return {"x": (np.random.default_rng(seed).standard_normal((n, 1, 3, 6, 6)) * 3).astype(np.float32)}


def test_qat_scale_kept_in_qdq_format() -> None:
    """The model's own Q/DQ on x survives unchanged (one Q on x, scale 0.02, zp 128), feeds the
    Conv, and the Conv's int32 bias uses that scale; the model still runs close to the QAT model."""
    proto = _qat_model()
    out = _compile(proto, _qat_calibration(), format="qdq").proto
    inits = _inits(out)
    q_on_x = [n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x"]
    assert len(q_on_x) == 1
    assert inits[q_on_x[0].input[1]] == QAT_SCALE and inits[q_on_x[0].input[2]] == QAT_ZP
    assert inits[q_on_x[0].input[2]].dtype == np.uint8
    producer = {o: n for n in out.graph.node for o in n.output}
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    dq_x = producer[conv1.input[0]]
    assert dq_x.op_type == "DequantizeLinear" and dq_x.input[0] == q_on_x[0].output[0]
    assert inits[dq_x.input[1]] == QAT_SCALE
    w_scale = inits[producer[conv1.input[1]].input[1]]
    b_dq = producer[conv1.input[2]]
    assert inits[b_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(inits[b_dq.input[1]], np.float64(QAT_SCALE) * w_scale, rtol=2e-7)
    x = _qat_calibration()["x"]  # the calibrated data: no activation beyond its calibrated range
    _close(np.stack([_run(proto, {"x": s}) for s in x]), np.stack([_run(out, {"x": s}) for s in x]))


def test_qat_scale_used_by_integer_kernel() -> None:
    """QOperator format: the first QLinearConv reads the QAT-quantized x with the QAT qparams."""
    out = _compile(_qat_model(), _qat_calibration()).proto
    inits = _inits(out)
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    assert conv1.op_type == "QLinearConv"
    assert inits[conv1.input[1]] == QAT_SCALE and inits[conv1.input[2]] == QAT_ZP
    x = _qat_calibration()["x"]
    _close(np.stack([_run(_qat_model(), {"x": s}) for s in x]), np.stack([_run(out, {"x": s}) for s in x]))


# -- old opset ------------------------------------------------------------------------------------


def test_opset_12_conv_gets_per_channel_weights() -> None:
    """An opset-12 model (DequantizeLinear has no axis there) is upgraded: the output opset is
    >= 13 and the Conv weight is per-channel (axis 0, one scale per output channel)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [tensor_info("x", [1, 3, 6, 6])], [tensor_info("y", [1, 4, 6, 6])],
                       [numpy_helper.from_array(w, "w"),
                        numpy_helper.from_array(np.zeros(4, np.float32), "b")], opset=12)
    onnx.checker.check_model(proto, full_check=True)
    cal = {"x": rng.standard_normal((6, 1, 3, 6, 6)).astype(np.float32)}
    out = _compile(proto, cal, format="qdq").proto
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 13
    inits = _inits(out)
    producer = {o: n for n in out.graph.node for o in n.output}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    dq = producer[conv.input[1]]
    assert dq.op_type == "DequantizeLinear"
    assert [helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"] == [0]
    assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].shape == (4,)
    x = cal["x"]  # the calibrated data: no activation beyond its calibrated range
    _close(np.stack([_run(proto, {"x": s}) for s in x]), np.stack([_run(out, {"x": s}) for s in x]))


# -- If branches ----------------------------------------------------------------------------------


def _if_model(conv_reads_outer: bool) -> onnx.ModelProto:
    """y = If(sum(x) > 0, then: Conv(..x..), else: Conv(..x..) with weights doubled). The
    branch Convs read the outer x directly or through a Relu inside the branch."""
    w = (np.random.default_rng(5).standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = [helper.make_node("Conv", ["x" if conv_reads_outer else f"{name}_r", f"w_{name}"], [f"{name}_out"],
                                  name=f"conv_{name}", pads=[1, 1, 1, 1])]
        if not conv_reads_outer:
            nodes.insert(0, helper.make_node("Relu", ["x"], [f"{name}_r"], name=f"relu_{name}"))
        return helper.make_graph(nodes, name, [], [tensor_info(f"{name}_out", [1, 4, 6, 6])],
                                 [numpy_helper.from_array(w * scale, f"w_{name}")])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 1.0),
                              else_branch=branch("else", 2.0))]
    proto = make_model(nodes, [tensor_info("x", [1, 3, 6, 6])], [tensor_info("y", [1, 4, 6, 6])],
                       [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _if_calibration() -> dict[str, np.ndarray]:
    x = np.random.default_rng(6).standard_normal((6, 1, 3, 6, 6)).astype(np.float32)
    x[::2] += 1.0   # both branches taken
    x[1::2] -= 1.0
    return {"x": x}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_if_branch_compute_is_quantized(fmt: str) -> None:
    """Compute inside If branches is calibrated (calibrate observes branch values through the
    If node) and quantized like the main graph's: the branch Convs are lowered, the If itself
    stays float, and both branches stay close to the float model on the calibration inputs."""
    proto = _if_model(conv_reads_outer=False)
    calib = _if_calibration()
    result = _compile(proto, calib, format=fmt)
    # the Relu outputs the branch Convs read; the Conv outputs leave their branch, float: not observed
    assert result.report["calibration"]["subgraph_values"] == 2
    if fmt == "qdq":
        assert {"conv_then", "conv_else"} <= set(result.report["lowered"])
    else:  # the branch Convs write the branch outputs, which stay float: no QLinearConv, said so
        assert all("not quantized" in result.report["float_nodes"][n] for n in ("conv_then", "conv_else"))
    assert "if" in result.report["float_nodes"]
    branch_ops = [n.op_type for node in result.proto.graph.node if node.op_type == "If"
                  for a in node.attribute for n in a.g.node]
    assert "QuantizeLinear" in branch_ops and "DequantizeLinear" in branch_ops  # branch values quantized
    for i in (0, 1):  # sample 0 takes the then branch, sample 1 the else branch
        x = calib["x"][i]
        _close(_run(proto, {"x": x}), _run(result.proto, {"x": x}))


def test_if_branch_reading_outer_value_compiles() -> None:
    """A branch Conv that reads the outer graph's input directly still compiles and runs."""
    proto = _if_model(conv_reads_outer=True)
    result = _compile(proto, _if_calibration(), format="qdq")
    x = (np.random.default_rng(8).standard_normal((1, 3, 6, 6)) + 1.0).astype(np.float32)
    _close(_run(proto, {"x": x}), _run(result.proto, {"x": x}))
