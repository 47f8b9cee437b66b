"""fold-constants: shape arithmetic and other all-constant nodes become initializers, so later
passes see constant operands; Q/DQ only on request, big results never, run-time values never."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from _util import (assert_same_outputs, init, initializers, make_model, modified, op_types, rand, run_pass,
                   tensor)


def _shape_chain_model(x_shape: list[int | str]) -> onnx.ModelProto:
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])): an exporter's flatten."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "idx0"], ["d0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes0"], ["d0u"], name="unsq"),
        helper.make_node("Concat", ["d0u", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    return make_model(nodes, [tensor("x", x_shape)], [tensor("y", [x_shape[0], 12])],
                      [init("idx0", np.array(0, np.int64)), init("axes0", np.array([0], np.int64)),
                       init("minus1", np.array([-1], np.int64))])


def test_shape_chain_on_static_input_folds() -> None:
    """The whole Shape->Gather->Unsqueeze->Concat chain becomes one int64 initializer [2, -1]."""
    proto = _shape_chain_model([2, 3, 4])
    model, _, pm = run_pass(proto, "fold-constants")
    assert modified(pm)
    assert op_types(model) == ["Reshape"]
    g = model.to_proto().graph
    assert list(g.node[0].input) == ["x", "target"]
    inits = initializers(model)
    assert sorted(inits) == ["target"]  # idx0/axes0/minus1 became dead and were dropped
    assert inits["target"].dtype == np.int64
    np.testing.assert_array_equal(inits["target"], [2, -1])
    assert_same_outputs(proto, model, {"x": rand([2, 3, 4], seed=1)}, exact=True)


def test_shape_of_symbolic_input_not_folded() -> None:
    """A symbolic batch dim is only known at run time, so nothing in the chain folds."""
    proto = _shape_chain_model(["N", 3, 4])
    model, _, pm = run_pass(proto, "fold-constants")
    assert not modified(pm)
    assert op_types(model) == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]


def test_shape_start_end_attributes() -> None:
    """Shape's start/end slice the dims like ONNX does (negative end counts from the back)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=-1),
        helper.make_node("Concat", ["minus1", "s"], ["s2"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "s2"], ["y"], name="reshape"),
    ]
    proto = make_model(nodes, [tensor("x", [2, 3, 4, 5])], [tensor("y", [10, 3, 4])],
                       [init("minus1", np.array([-1], np.int64))])
    model, _, pm = run_pass(proto, "fold-constants")
    assert modified(pm)
    assert op_types(model) == ["Reshape"]
    np.testing.assert_array_equal(initializers(model)["s2"], [-1, 3, 4])
    assert_same_outputs(proto, model, {"x": rand([2, 3, 4, 5], seed=2)}, exact=True)


def _dq_weight_model() -> onnx.ModelProto:
    w_int = np.array([[-3, 5], [7, -128], [127, 0]], np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    return make_model(nodes, [tensor("x", [4, 3])], [tensor("y", [4, 2])],
                      [init("w_q", w_int), init("w_scale", np.array(0.05, np.float32)),
                       init("w_zp", np.array(1, np.int8))])


def test_dequantize_of_constant_kept_by_default() -> None:
    """Stored int8 weights stay int8: folding DQ would quadruple their size and lose the Q/DQ form."""
    model, _, pm = run_pass(_dq_weight_model(), "fold-constants")
    assert not modified(pm)
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    assert initializers(model)["w_q"].dtype == np.int8


def test_dequantize_of_constant_folded_with_fold_qdq() -> None:
    """fold-qdq=true evaluates the DQ: the weight becomes (q - zp) * scale in float32."""
    proto = _dq_weight_model()
    model, _, pm = run_pass(proto, "fold-constants", (("fold-qdq", "true"),))
    assert modified(pm)
    assert op_types(model) == ["MatMul"]
    inits = initializers(model)
    assert sorted(inits) == ["w"]
    want = (np.array([[-3, 5], [7, -128], [127, 0]], np.float32) - 1.0) * np.float32(0.05)
    assert inits["w"].dtype == np.float32
    np.testing.assert_allclose(inits["w"], want, rtol=1e-6, atol=0)
    assert_same_outputs(proto, model, {"x": rand([4, 3], seed=3)}, rtol=1e-6, atol=1e-6)


def test_quantize_of_constant_kept_by_default_folded_with_option() -> None:
    """QuantizeLinear of a float constant follows the same rule as DQ."""
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="q"),
        helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="dq"),
        helper.make_node("Add", ["x", "wd"], ["y"], name="add"),
    ]
    w = np.array([0.0, 0.26, -0.74, 3.0], np.float32)
    proto = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])],
                       [init("w", w), init("s", np.array(0.1, np.float32)), init("zp", np.array(0, np.uint8))])
    model, _, pm = run_pass(proto, "fold-constants")
    assert not modified(pm)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "Add"]

    model, _, pm = run_pass(proto, "fold-constants", (("fold-qdq", "true"),))
    assert modified(pm)
    assert op_types(model) == ["Add"]
    assert_same_outputs(proto, model, {"x": rand([4], seed=4)}, rtol=0, atol=1e-7)


def _constant_of_shape_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ConstantOfShape", ["n"], ["big"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["x", "big"], ["y"], name="add"),
    ]
    return make_model(nodes, [tensor("x", [1000])], [tensor("y", [1000])], [init("n", np.array([1000], np.int64))])


def test_constant_of_shape_folded_under_default_limit() -> None:
    """4000 bytes is far below the default max-bytes: the fill becomes an initializer."""
    proto = _constant_of_shape_model()
    model, _, pm = run_pass(proto, "fold-constants")
    assert modified(pm)
    assert op_types(model) == ["Add"]
    big = initializers(model)["big"]
    assert big.shape == (1000,) and big.dtype == np.float32 and np.all(big == 0.5)
    assert_same_outputs(proto, model, {"x": rand([1000], seed=5)}, exact=True)


def test_max_bytes_prevents_folding_large_result() -> None:
    """With max-bytes below the 4000-byte result, ConstantOfShape stays a node (model stays small)."""
    model, _, pm = run_pass(_constant_of_shape_model(), "fold-constants", (("max-bytes", "3999"),))
    assert not modified(pm)
    assert op_types(model) == ["ConstantOfShape", "Add"]
    assert sorted(initializers(model)) == ["n"]


def test_max_bytes_boundary_is_inclusive() -> None:
    """A result of exactly max-bytes still folds."""
    model, _, pm = run_pass(_constant_of_shape_model(), "fold-constants", (("max-bytes", "4000"),))
    assert modified(pm)
    assert op_types(model) == ["Add"]


def test_node_reading_runtime_input_not_folded() -> None:
    """Only the all-constant Mul folds; the Add reads the graph input and stays."""
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
        helper.make_node("Add", ["x", "ab"], ["t"], name="add"),
        helper.make_node("Relu", ["t"], ["y"], name="relu"),
    ]
    a, b = rand([3], seed=6), rand([3], seed=7)
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("a", a), init("b", b)])
    model, _, pm = run_pass(proto, "fold-constants")
    assert modified(pm)
    assert op_types(model) == ["Add", "Relu"]
    inits = initializers(model)
    assert sorted(inits) == ["ab"]
    np.testing.assert_array_equal(inits["ab"], a * b)
    assert_same_outputs(proto, model, {"x": rand([3], seed=8)}, exact=True)


def test_nothing_constant_is_unchanged() -> None:
    """A graph with no all-constant node reports modified=False."""
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("w", rand([3], seed=9))])
    model, _, pm = run_pass(proto, "fold-constants")
    assert not modified(pm)
    assert op_types(model) == ["Add"]


def test_constant_graph_output_not_folded() -> None:
    """A node producing a graph output stays (the output must remain computed, not an initializer)."""
    nodes = [
        helper.make_node("Add", ["a", "a"], ["y"], name="add_const"),
        helper.make_node("Relu", ["x"], ["z"], name="relu"),
    ]
    proto = make_model(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("z", [2])],
                       [init("a", np.array([1.0, 2.0], np.float32))])
    model, _, pm = run_pass(proto, "fold-constants")
    assert not modified(pm)
    assert op_types(model) == ["Add", "Relu"]
