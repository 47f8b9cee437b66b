"""cleanup-qdq: Q(DQ(x)) with identical qparams is the identity on integers and goes away;
QuantizeLinear of a constant float weight is precomputed into a stored integer initializer
(bit-exact with ONNX's QuantizeLinear)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from _util import (assert_same_outputs, init, initializers, make_model, modified, op_types, rand, run_pass,
                   tensor)


def _requant_model(s1: float, z1: int, s2: float, z2: int, zp_type: type = np.uint8) -> onnx.ModelProto:
    """x -> Q(s1,z1) -> DQ(s1,z1) -> Q(s2,z2) -> DQ(s2,z2) -> y: the middle DQ->Q is the pair."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"], name="dq1"),
        helper.make_node("QuantizeLinear", ["d1", "s2", "z2"], ["q2"], name="q2"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"], name="dq2"),
    ]
    return make_model(nodes, [tensor("x", [2, 16])], [tensor("y", [2, 16])],
                      [init("s1", np.array(s1, np.float32)), init("z1", np.array(z1, zp_type)),
                       init("s2", np.array(s2, np.float32)), init("z2", np.array(z2, np.uint8))])


def _x() -> dict[str, np.ndarray]:
    return {"x": rand([2, 16], seed=1, low=-2.0, high=3.0)}


def test_dq_q_with_equal_qparams_removed() -> None:
    """Separate but equal scale/zp tensors still count as equal; the pair disappears, exactly."""
    proto = _requant_model(0.02, 100, 0.02, 100)
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear"]
    g = model.to_proto().graph
    assert list(g.node[1].input)[0] == "q1"
    assert_same_outputs(proto, model, _x(), exact=True)


@pytest.mark.parametrize("params", [
    pytest.param((0.02, 100, 0.03, 100), id="different-scale"),
    pytest.param((0.02, 100, 0.02, 101), id="different-zero-point"),
])
def test_dq_q_with_different_qparams_kept(params: tuple[float, int, float, int]) -> None:
    """A real requantization changes values, so it must stay."""
    model, _, pm = run_pass(_requant_model(*params), "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear"]


def test_dq_q_with_different_zero_point_type_kept() -> None:
    """int8 -> uint8 with the same numbers is a type change, not a no-op."""
    model, _, pm = run_pass(_requant_model(0.02, 0, 0.02, 0, zp_type=np.int8), "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model).count("QuantizeLinear") == 2


def test_dq_q_feeding_graph_output_kept() -> None:
    """The Q's output is public: its name and node stay."""
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["d"], name="dq"),
        helper.make_node("QuantizeLinear", ["d", "s", "z"], ["y"], name="q"),
    ]
    proto = make_model(nodes, [tensor("xq", [4], TensorProto.UINT8)], [tensor("y", [4], TensorProto.UINT8)],
                       [init("s", np.array(0.1, np.float32)), init("z", np.array(3, np.uint8))])
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model) == ["DequantizeLinear", "QuantizeLinear"]


def _reference_quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, opset: int = 17) -> np.ndarray:
    node = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=axis)
    graph = helper.make_graph([node], "q", [], [helper.make_tensor_value_info("q", TensorProto.UNDEFINED, None)],
                              [init("w", w), init("s", scale), init("z", zp)])
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(proto).run(None, {})[0])


def _weight_model(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> onnx.ModelProto:
    """QAT-style weight path: MatMul(x, DQ(Q(W_float)))."""
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="wq", axis=axis),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq", axis=axis),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    return make_model(nodes, [tensor("x", [3, w.shape[0]])], [tensor("y", [3, w.shape[1]])],
                      [init("w", w), init("ws", scale), init("wz", zp)])


def _tricky_weight() -> np.ndarray:
    """Exact .5 ties (round half to even), values past the int8 range (saturation), and noise."""
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 200.0, -300.0], np.float32)
    return np.concatenate([ties.reshape(2, 4), rand([4, 4], seed=2, low=-5, high=5)]).astype(np.float32)


def test_quantize_of_constant_weight_folded_per_tensor() -> None:
    """Q(W) becomes an int8 initializer equal to onnx.reference's QuantizeLinear; DQ reads it."""
    w = _tricky_weight()
    scale, zp = np.array(1.0, np.float32), np.array(-3, np.int8)
    proto = _weight_model(w, scale, zp, axis=1)
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert modified(pm)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    inits = initializers(model)
    assert "w" not in inits  # the float weight is gone: only the int8 copy is stored
    assert inits["wq"].dtype == np.int8
    np.testing.assert_array_equal(inits["wq"], _reference_quantize(w, scale, zp, axis=1))
    assert_same_outputs(proto, model, {"x": rand([3, 6], seed=3)}, exact=True)


def test_quantize_of_constant_weight_folded_per_channel() -> None:
    """Per-channel scales along axis 1 (MatMul output channels) broadcast the way ONNX does."""
    w = _tricky_weight()
    scale = np.array([0.5, 1.0, 0.01, 2.0], np.float32)
    zp = np.array([0, 1, -2, 5], np.int8)
    proto = _weight_model(w, scale, zp, axis=1)
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert modified(pm)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    wq = initializers(model)["wq"]
    assert wq.dtype == np.int8
    np.testing.assert_array_equal(wq, _reference_quantize(w, scale, zp, axis=1))
    assert_same_outputs(proto, model, {"x": rand([3, 6], seed=4)}, exact=True)


def test_quantize_of_constant_without_zero_point_is_uint8() -> None:
    """No zero point means uint8 with zp 0 (negative weights saturate to 0, like ONNX)."""
    w = _tricky_weight()
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "ws"], ["wq"], name="wq"),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="wdq"),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    scale = np.array(0.25, np.float32)
    proto = make_model(nodes, [tensor("x", [3, 6])], [tensor("y", [3, 4])], [init("w", w), init("ws", scale)])
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert modified(pm)
    wq = initializers(model)["wq"]
    assert wq.dtype == np.uint8
    np.testing.assert_array_equal(wq, _reference_quantize(w, scale, np.array(0, np.uint8), axis=1))
    assert_same_outputs(proto, model, {"x": rand([3, 6], seed=5)}, exact=True)


def test_fold_weights_off_keeps_quantize() -> None:
    """fold-weights=false leaves the QAT weight path as it is."""
    proto = _weight_model(_tricky_weight(), np.array(1.0, np.float32), np.array(0, np.int8), axis=1)
    model, _, pm = run_pass(proto, "cleanup-qdq", (("fold-weights", "false"),))
    assert not modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]


def test_quantize_of_runtime_value_kept() -> None:
    """Activation quantization happens at run time: nothing to fold, nothing to remove."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    proto = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])],
                       [init("s", np.array(0.1, np.float32)), init("z", np.array(128, np.uint8))])
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear"]


def test_quantize_output_dtype_attribute_respected() -> None:
    """Opset 21: Q without a zero point but with output_dtype=INT8 folds to int8, not uint8
    (uint8 would clamp every negative weight to 0)."""
    w = _tricky_weight()
    scale = np.array(0.25, np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "ws"], ["wq"], name="wq", output_dtype=TensorProto.INT8),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], name="wdq"),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    proto = make_model(nodes, [tensor("x", [3, 6])], [tensor("y", [3, 4])], [init("w", w), init("ws", scale)],
                       opset=21)
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert modified(pm)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    wq = initializers(model)["wq"]
    assert wq.dtype == np.int8
    np.testing.assert_array_equal(wq, _reference_quantize(w, scale, np.array(0, np.int8), axis=1, opset=21))
    assert_same_outputs(proto, model, {"x": rand([3, 6], seed=6)}, exact=True)


def test_dq_of_int8_then_q_to_uint8_without_zero_points_kept() -> None:
    """DQ(int8) -> Q(uint8), both zero points omitted: the zero points are 0 in both, but the
    types differ (negatives saturate to 0), so the pair is not a no-op."""
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "s"], ["d"], name="dq"),
        helper.make_node("QuantizeLinear", ["d", "s"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq_out"),
    ]
    proto = make_model(nodes, [tensor("xq", [8], TensorProto.INT8)], [tensor("y", [8])],
                       [init("s", np.array(0.5, np.float32))])
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model) == ["DequantizeLinear", "QuantizeLinear", "DequantizeLinear"]
    assert_same_outputs(proto, model, {"xq": np.arange(-4, 4, dtype=np.int8)}, exact=True)


def test_int4_weight_quantize_not_folded() -> None:
    """int4 storage is not a numpy integer type: the Q stays (instead of the pass crashing)."""
    zp = helper.make_tensor("wz", TensorProto.INT4, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="wq"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq"),
        helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
    ]
    proto = make_model(nodes, [tensor("x", [3, 6])], [tensor("y", [3, 4])],
                       [init("w", _tricky_weight()), init("ws", np.array(0.25, np.float32)), zp], opset=21)
    model, _, pm = run_pass(proto, "cleanup-qdq")
    assert not modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]
