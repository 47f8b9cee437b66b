"""qcompiler.plan: the target's `needs_integer_consumer` keeps weightless elementwise ops float
outside integer regions (structural checks on small graphs, numerical check on the compiled
model against the float model)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import qcompiler
import qcompiler.rangefile
from conftest import init, make_model, tensor_info
from qcompiler import load_target
from qcompiler.plan import plan_quantization, ranges_read


def _model() -> onnx.ModelProto:
    """conv -> add_in (residual, read by conv2: integer region) -> conv2 -> add_out (read only
    by Softmax, which ort-cpu runs in float) -> mul_out (graph output) ; add_rs -> Reshape ->
    conv3 (integer through a passthrough op) -> Neg (float: conv3 writes a quantized output)."""
    rng = np.random.default_rng(0)
    w = lambda *s: init(f"w{len(s)}_{rng.integers(1 << 30)}", (rng.standard_normal(s) * 0.3).astype(np.float32))
    w1, w2, w3 = w(4, 4, 3, 3), w(4, 4, 3, 3), w(4, 4, 1, 1)
    shape = init("shape", np.array([1, 4, 6, 6], np.int64))
    nodes = [
        helper.make_node("Conv", ["x", w1.name], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x", "c1"], ["a_in"], name="add_in"),
        helper.make_node("Conv", ["a_in", w2.name], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "a_in"], ["a_out"], name="add_out"),
        helper.make_node("Softmax", ["a_out"], ["s"], name="softmax", axis=1),
        helper.make_node("Mul", ["s", "c2"], ["m"], name="mul_out"),
        helper.make_node("Add", ["c1", "c2"], ["a_rs"], name="add_rs"),
        helper.make_node("Reshape", ["a_rs", "shape"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", w3.name], ["c3"], name="conv3"),
        helper.make_node("Neg", ["c3"], ["y3"], name="neg3"),
    ]
    return make_model(nodes, [tensor_info("x", [1, 4, 6, 6])],
                      [tensor_info("m", [1, 4, 6, 6]), tensor_info("y3", [1, 4, 6, 6])], [w1, w2, w3, shape])


def _typed(proto: onnx.ModelProto, shape: list[int]) -> qcompiler.Model:
    """The model as insert-qdq sees it (shapes inferred, fusions done)."""
    sample = {"x": np.ones(shape, np.float32)}
    return qcompiler.compile(proto, target="ort-cpu", calibration=[sample], stop_after="group-activations",
                             check=False).model


def test_elementwise_ops_stay_float_outside_integer_regions() -> None:
    model = _typed(_model(), [1, 4, 6, 6])
    plan = plan_quantization(model, load_target("ort-cpu"))
    assert {"conv1", "conv2", "conv3", "add_in", "add_rs"} <= set(plan.nodes)
    # add_out feeds only the float Softmax; mul_out only the graph output (nowhere to write)
    assert not {"add_out", "mul_out"} & set(plan.nodes)
    assert "needs_integer_consumer" in plan.float_nodes["add_out"]
    assert "quantize_graph_outputs" in plan.float_nodes["mul_out"]


def test_without_the_key_every_add_is_integer(tmp_path) -> None:
    """The rule is the target's: a target extending ort-cpu that turns it off quantizes all."""
    path = tmp_path / "all-int.toml"
    path.write_text('schema = 1\nname = "all-int"\ndescription = "d"\nextends = "ort-cpu"\n'
                    '[ops.Add]\nneeds_integer_consumer = false\n[ops.Mul]\nneeds_integer_consumer = false\n')
    model = _typed(_model(), [1, 4, 6, 6])
    plan = plan_quantization(model, load_target(str(path)))
    assert {"add_in", "add_out", "add_rs"} <= set(plan.nodes)
    # mul_out writes a graph output, which ort-cpu leaves float: QLinearMul has nowhere to write
    assert "quantize_graph_outputs" in plan.float_nodes["mul_out"]
    assert "mul_out" in plan_quantization(model, load_target(str(path)), fmt="qdq").nodes


def test_kernel_writing_a_float_graph_output_stays_float() -> None:
    """x -> Sigmoid -> y: ort-cpu (QOperator) leaves graph outputs float and QLinearSigmoid writes
    only a quantized output, so the Sigmoid stays float (lowering could only run it float on a
    rounded input); in QDQ format DQ -> Sigmoid -> y is the format's own way to say it, and it
    stays. A weight op (Conv -> y) is still left to lowering."""
    model = _typed(make_model([helper.make_node("Sigmoid", ["x"], ["y"], name="sig")],
                              [tensor_info("x", [1, 4, 6, 6])], [tensor_info("y", [1, 4, 6, 6])]), [1, 4, 6, 6])
    plan = plan_quantization(model, load_target("ort-cpu"))
    assert not plan.nodes and "QLinearSigmoid writes only a quantized output" in plan.float_nodes["sig"]
    assert "sig" in plan_quantization(model, load_target("ort-cpu"), fmt="qdq").nodes
    w = init("w", np.full((4, 4, 1, 1), 0.1, np.float32))
    conv = _typed(make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                             [tensor_info("x", [1, 4, 6, 6])], [tensor_info("y", [1, 4, 6, 6])], [w]), [1, 4, 6, 6])
    assert "conv" in plan_quantization(conv, load_target("ort-cpu")).nodes


def test_chain_of_elementwise_ops_is_dropped_to_a_fixpoint() -> None:
    """Add -> Add -> float op: the second Add has no integer reader, and once it is float the
    first has none either."""
    nodes = [helper.make_node("Add", ["x", "x"], ["a1"], name="a1"),
             helper.make_node("Add", ["a1", "x"], ["a2"], name="a2"),
             helper.make_node("Softmax", ["a2"], ["y"], name="sm", axis=1)]
    model = _typed(make_model(nodes, [tensor_info("x", [1, 8])], [tensor_info("y", [1, 8])]), [1, 8])
    plan = plan_quantization(model, load_target("ort-cpu"))
    assert not plan.nodes and {"a1", "a2"} <= set(plan.float_nodes)


def test_bad_value_is_a_target_error(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('schema = 1\nname = "bad"\ndescription = "d"\nextends = "ort-cpu"\n[ops.Add]\nneeds_integer_consumer = "yes"\n')
    with pytest.raises(qcompiler.UserError, match="needs_integer_consumer"):
        load_target(str(path))


def test_compiled_model_keeps_float_adds_and_matches_float_model() -> None:
    """End to end: the compiled model runs, the float Add/Mul are real float nodes, and the
    outputs stay within int8 error of the float model (tolerance: 5% of the output range)."""
    proto = _model()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    result = qcompiler.compile(proto, target="ort-cpu", calibration=samples)
    ops = [n.op_type for n in result.proto.graph.node]
    assert ops.count("Add") == 1 and ops.count("Mul") == 1  # add_out, mul_out
    assert ops.count("QLinearAdd") == 2
    sess = ort.InferenceSession(result.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for s in samples:
        for got, want in zip(sess.run(None, s), ref.run(None, s)):
            assert np.abs(got - want).max() <= 0.05 * (want.max() - want.min())


# -- ranges_read: what calibrate observes -----------------------------------------------------------


def test_ranges_read_is_what_insert_qdq_quantizes() -> None:
    """Integer nodes' quantized inputs and outputs need a range; the Reshape output inherits
    a_rs's qparams (mapped to it); float ops' values (a_out, s, m, y3) need none."""
    model = _typed(_model(), [1, 4, 6, 6])
    target = load_target("ort-cpu")
    need, inherited = ranges_read(model, target, plan_quantization(model, target))
    assert need == {"x", "c1", "a_in", "c2", "a_rs", "c3"}
    assert inherited == {"r": "a_rs"}


def test_observing_only_quantized_tensors_gives_the_same_model(tmp_path) -> None:
    """calibrate observes 6 of the 11 float tensors by default, and the compiled model is
    byte-identical to the one calibrated on all of them; the Reshape output's range is its
    source's (the qparams it shares)."""
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    few = qcompiler.compile(_model(), target="ort-cpu", calibration=samples)
    every = qcompiler.compile(_model(), target="ort-cpu", calibration=samples,
                              calibration_options=qcompiler.CalibrationOptions(observe="all"))
    assert few.report["calibration"]["observe"] == "quantized"
    assert few.report["calibration"]["unobserved_tensors"] == 5 and every.report["calibration"]["unobserved_tensors"] == 0
    assert few.proto.SerializeToString() == every.proto.SerializeToString()
    assert sorted(few.report["lowered"]) == sorted(every.report["lowered"])
    qcompiler.compile(_model(), target="ort-cpu", calibration=samples,
                      calibration_options=qcompiler.CalibrationOptions(observe="quantized"),
                      export_ranges=tmp_path / "r.json")
    ranges = qcompiler.rangefile.read_ranges(tmp_path / "r.json")
    assert set(ranges) == {"x", "c1", "a_in", "c2", "a_rs", "c3", "r"} and ranges["r"] == ranges["a_rs"]
