"""lower-qoperator: DQ -> op -> Q groups become ort-cpu's integer kernels (QOperator format),
keep the names of the nodes they replace, still compute the float model's function, and
leave alone what does not fit a kernel (QDQ format requested, float bias).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import qcompiler
from _util import init, make_model, rand, run_ort, tensor
from conftest import tiny_calibration, tiny_model

TARGET = "ort-cpu"
# the target's own pipeline, with minmax calibration (its mse search costs ~0.4 s per tensor
# and is not what these tests are about)
PIPELINE = qcompiler.load_target(TARGET).pipeline("static").replace("calibrate", "calibrate{method=minmax}")


def _compile(proto: onnx.ModelProto, calibration: dict[str, np.ndarray], **kwargs: object) -> qcompiler.CompileResult:
    return qcompiler.compile(proto, target=TARGET, calibration=calibration, pipeline=PIPELINE, **kwargs)


def _nodes(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in proto.graph.node}


def test_tiny_model_lowers_to_integer_kernels() -> None:
    """Conv -> QLinearConv, Add -> com.microsoft.QLinearAdd, GlobalAveragePool ->
    com.microsoft.QLinearGlobalAveragePool, Gemm -> com.microsoft.QGemm; no float Conv is left
    and every kernel keeps the name of the node it replaces."""
    result = _compile(tiny_model(), tiny_calibration(8))
    proto = result.proto
    nodes = _nodes(proto)
    want = {"conv1": ("QLinearConv", ""), "conv2": ("QLinearConv", ""), "add1": ("QLinearAdd", "com.microsoft"),
            "gap": ("QLinearGlobalAveragePool", "com.microsoft"), "gemm": ("QGemm", "com.microsoft")}
    for name, (op, domain) in want.items():
        assert (nodes[name].op_type, nodes[name].domain) == (op, domain), name
    ops = [n.op_type for n in proto.graph.node]
    assert "Conv" not in ops and "Relu" not in ops and "DequantizeLinear" not in ops  # Relu absorbed by Q saturation
    assert ops.count("QuantizeLinear") == 1  # only the graph input is quantized at run time
    assert {"com.microsoft": 1} == {o.domain: o.version for o in proto.opset_import if o.domain}
    assert sorted(result.report["lowered"]) == sorted(["add1", "conv1", "conv2", "flatten", "gap", "gemm", "relu1"])
    # QLinearConv: 9 inputs with the int32 bias last; QGemm without y_scale: float output
    assert len(nodes["conv1"].input) == 9
    assert [t.data_type for t in proto.graph.initializer if t.name == nodes["conv1"].input[8]] == [onnx.TensorProto.INT32]
    assert len(nodes["gemm"].input) == 7
    onnx.checker.check_model(proto)


def test_lowered_model_matches_float_in_onnxruntime() -> None:
    """The QOperator model runs in onnxruntime and stays close to the float model on unseen
    inputs (cosine > 0.99, max error < 5% of the output range), and close to the QDQ model."""
    qop = _compile(tiny_model(), tiny_calibration(16)).proto
    qdq = _compile(tiny_model(), tiny_calibration(16), format="qdq").proto
    xs = tiny_calibration(12, seed=9)["x"]
    want = np.concatenate([run_ort(tiny_model(), {"x": x[None]})[0] for x in xs]).reshape(-1)
    got = np.concatenate([run_ort(qop, {"x": x[None]})[0] for x in xs]).reshape(-1)
    via_qdq = np.concatenate([run_ort(qdq, {"x": x[None]})[0] for x in xs]).reshape(-1)
    cosine = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
    assert cosine > 0.99
    span = want.max() - want.min()
    assert np.abs(got - want).max() < 0.05 * span
    # integer kernels and the QDQ simulation agree to within a few output steps
    assert np.abs(got - via_qdq).max() < 0.02 * span


def test_qdq_format_lowers_nothing() -> None:
    """format=qdq: lower-qoperator reports modified=False and Q/DQ stay (no QLinearConv)."""
    result = _compile(tiny_model(), tiny_calibration(8), format="qdq")
    record = next(r for r in result.report["passes"] if r["name"] == "lower-qoperator")
    assert record["modified"] is False and record.get("changes", 0) == 0
    ops = [n.op_type for n in result.proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool"} & set(ops)
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 1


def _qdq_conv(bias_from_input: bool) -> onnx.ModelProto:
    """A hand-written QDQ group DQ(x) -> Conv -> Q, with the bias an int32 DQ (lowerable) or a
    float graph input (not a constant: QLinearConv has nowhere to put it)."""
    rng = np.random.default_rng(0)
    w_q = rng.integers(-60, 60, (4, 3, 3, 3)).astype(np.int8)
    inits = [init("x_s", np.array(0.02, np.float32)), init("x_z", np.array(128, np.uint8)),
             init("w_q", w_q), init("w_s", np.full(4, 0.01, np.float32)), init("w_z", np.zeros(4, np.int8)),
             init("y_s", np.array(0.05, np.float32)), init("y_z", np.array(120, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], name="dqw", axis=0)]
    inputs = [tensor("x", [1, 3, 6, 6])]
    if bias_from_input:
        inputs.append(tensor("b", [4]))
        bias = "b"
    else:
        inits += [init("b_q", np.array([100, -50, 0, 7], np.int32)), init("b_s", np.full(4, 0.0002, np.float32))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["bd"], name="dqb", axis=0))
        bias = "bd"
    nodes += [helper.make_node("Conv", ["xd", "wd", bias], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["cq"], name="qc"),
              helper.make_node("DequantizeLinear", ["cq", "y_s", "y_z"], ["y"], name="dqy")]
    return make_model(nodes, inputs, [tensor("y", [1, 4, 6, 6])], inits)


def _lower(proto: onnx.ModelProto) -> tuple[qcompiler.Model, qcompiler.PassManager]:
    """Run lower-qoperator alone in QOperator format (verify-each on)."""
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=qcompiler.load_target(TARGET), format="qoperator")
    pm = qcompiler.PassManager([qcompiler.default_registry().instantiate(qcompiler.PassSpec("lower-qoperator"))])
    pm.run(model, ctx)
    return model, pm


def test_hand_written_group_lowers_exactly() -> None:
    """Control for the next test: with an int32 DQ bias the group becomes one QLinearConv named
    like the Conv, and computes what the QDQ group computed (to one output step)."""
    proto = _qdq_conv(bias_from_input=False)
    model, pm = _lower(proto)
    assert pm.records[-1]["modified"]
    ops = [(n.op_type, n.name) for n in model.to_proto().graph.node]
    assert ("QLinearConv", "conv") in ops and "Conv" not in [o for o, _ in ops]
    x = rand([1, 3, 6, 6], seed=1, low=-2.5, high=2.5)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], run_ort(proto, {"x": x})[0], atol=0.05 + 1e-6, rtol=0)


def test_conv_with_non_constant_bias_not_lowered() -> None:
    """A Conv whose bias is a run-time float value stays Conv in QDQ form (modified=False)."""
    proto = _qdq_conv(bias_from_input=True)
    model, pm = _lower(proto)
    assert not pm.records[-1]["modified"]
    assert [n.op_type for n in model.to_proto().graph.node] == [n.op_type for n in proto.graph.node]
    feeds = {"x": rand([1, 3, 6, 6], seed=1, low=-2.5, high=2.5), "b": rand([4], seed=2)}
    np.testing.assert_array_equal(run_ort(model, feeds)[0], run_ort(proto, feeds)[0])


def test_full_pipeline_keeps_conv_with_non_constant_bias_float() -> None:
    """Through the whole ort-cpu pipeline, such a Conv stays a float Conv and the report says why."""
    w = rand([4, 3, 3, 3], seed=3)
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [tensor("x", [1, 3, 6, 6]), tensor("b", [4])], [tensor("y", [1, 4, 6, 6])], [init("w", w)])
    cal = {"x": rand([4, 1, 3, 6, 6], seed=4), "b": rand([4, 4], seed=5)}
    result = _compile(proto, cal)
    ops = [n.op_type for n in result.proto.graph.node]
    assert "Conv" in ops and "QLinearConv" not in ops
    assert result.report["float_nodes"]["conv"] == "bias 'b' is not a constant"
    feeds = {"x": rand([1, 3, 6, 6], seed=6), "b": rand([4], seed=7)}
    np.testing.assert_allclose(run_ort(result.proto, feeds)[0], run_ort(proto, feeds)[0], rtol=1e-6, atol=1e-6)
