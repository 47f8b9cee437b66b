"""canonicalize: Constant nodes -> initializers, no Identity/inference Dropout, one initializer
per distinct weight, no dead code, sorted, every node named. Later passes rely on each of these."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import qcompiler
from _util import (assert_same_outputs, init, initializer_names, initializers, make_model, modified, op_types,
                   rand, run_pass, tensor)


def test_constant_nodes_become_initializers() -> None:
    """All three spellings of a Constant (tensor, value_float, value_ints) end up as initializers
    with the same name, dtype and shape, so patterns matching Const() see them."""
    nodes = [
        helper.make_node("Constant", [], ["c_vec"], name="k1",
                         value=helper.make_tensor("t", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])),
        helper.make_node("Constant", [], ["c_scalar"], name="k2", value_float=2.0),
        helper.make_node("Constant", [], ["c_shape"], name="k3", value_ints=[1, 3]),
        helper.make_node("Add", ["x", "c_vec"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "c_scalar"], ["b"], name="mul"),
        helper.make_node("Reshape", ["b", "c_shape"], ["y"], name="reshape"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [1, 3])])
    model, _, pm = run_pass(proto, "canonicalize")

    assert modified(pm)
    assert op_types(model) == ["Add", "Mul", "Reshape"]
    inits = initializers(model)
    assert sorted(inits) == ["c_scalar", "c_shape", "c_vec"]
    np.testing.assert_array_equal(inits["c_vec"], np.array([1, 2, 3], np.float32))
    assert inits["c_vec"].dtype == np.float32
    assert inits["c_scalar"].shape == () and inits["c_scalar"].dtype == np.float32 and inits["c_scalar"] == 2.0
    assert inits["c_shape"].dtype == np.int64
    np.testing.assert_array_equal(inits["c_shape"], [1, 3])
    assert_same_outputs(proto, model, {"x": rand([3], seed=1)}, exact=True)


def test_identity_between_nodes_removed() -> None:
    """An Identity in the middle of the graph disappears; its reader reads the source directly."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i"], name="ident"),
        helper.make_node("Sigmoid", ["i"], ["y"], name="sig"),
    ]
    proto = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    assert op_types(model) == ["Relu", "Sigmoid"]
    g = model.to_proto().graph
    assert list(g.node[1].input) == ["r"]
    assert_same_outputs(proto, model, {"x": rand([2, 3], seed=2)}, exact=True)


def test_identity_feeding_graph_output_keeps_output_name() -> None:
    """Identity(intermediate) -> output is removed, but the graph output keeps its public name."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="ident"),
    ]
    proto = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    g = model.to_proto().graph
    assert op_types(model) == ["Relu"]
    assert [o.name for o in g.output] == ["y"]
    assert list(g.node[0].output) == ["y"]
    assert_same_outputs(proto, model, {"x": rand([4], seed=3)}, exact=True)


def test_identity_from_graph_input_to_graph_output_stays() -> None:
    """Both names are public, so the Identity is the only way to keep them; nothing changes."""
    proto = make_model([helper.make_node("Identity", ["x"], ["y"], name="ident")],
                       [tensor("x", [4])], [tensor("y", [4])])
    model, _, pm = run_pass(proto, "canonicalize")
    assert not modified(pm)
    assert op_types(model) == ["Identity"]
    g = model.to_proto().graph
    assert [i.name for i in g.input] == ["x"] and [o.name for o in g.output] == ["y"]


def test_inference_dropout_removed() -> None:
    """Dropout without training_mode is the identity at inference; with a ratio input it still goes."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d1"], name="drop1"),
        helper.make_node("Dropout", ["d1", "ratio"], ["d2"], name="drop2"),
        helper.make_node("Sigmoid", ["d2"], ["y"], name="sig"),
    ]
    proto = make_model(nodes, [tensor("x", [2, 5])], [tensor("y", [2, 5])],
                       [init("ratio", np.array(0.5, np.float32))])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    assert op_types(model) == ["Relu", "Sigmoid"]
    assert initializer_names(model) == []  # the ratio became dead and was dropped
    assert_same_outputs(proto, model, {"x": rand([2, 5], seed=4)}, exact=True)


def test_training_dropout_and_used_mask_stay() -> None:
    """Dropout in training mode, or whose mask someone reads, is not an identity: keep it."""
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"], name="drop_train"),
        helper.make_node("Dropout", ["d1"], ["d2", "mask"], name="drop_mask"),
        helper.make_node("Cast", ["mask"], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["d2", "m"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])],
                       [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))])
    model, _, pm = run_pass(proto, "canonicalize")
    assert not modified(pm)
    assert op_types(model) == ["Dropout", "Dropout", "Cast", "Add"]


def test_duplicate_initializers_merged() -> None:
    """Two byte-identical weights become one initializer read by both nodes."""
    w = rand([3], seed=5)
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "w2"], ["y"], name="mul"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("w1", w), init("w2", w.copy())])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    assert initializer_names(model) == ["w1"]
    g = model.to_proto().graph
    assert list(g.node[0].input) == ["x", "w1"] and list(g.node[1].input) == ["a", "w1"]
    assert_same_outputs(proto, model, {"x": rand([3], seed=6)}, exact=True)


def test_scalar_and_one_element_vector_not_merged() -> None:
    """Same bytes, different shapes: merging would change broadcasting (and output rank)."""
    nodes = [
        helper.make_node("Add", ["x", "s"], ["a"], name="add"),
        helper.make_node("Mul", ["x", "v"], ["b"], name="mul"),
    ]
    proto = make_model(nodes, [tensor("x", [])], [tensor("a", []), tensor("b", [1])],
                       [init("s", np.array(2.0, np.float32)), init("v", np.array([2.0], np.float32))])
    model, _, pm = run_pass(proto, "canonicalize")
    assert not modified(pm)
    inits = initializers(model)
    assert sorted(inits) == ["s", "v"]
    assert inits["s"].shape == () and inits["v"].shape == (1,)
    assert_same_outputs(proto, model, {"x": np.array(1.5, np.float32)}, exact=True)


def test_merge_initializers_option_off() -> None:
    """merge-initializers=false keeps byte-identical weights apart."""
    w = rand([3], seed=7)
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "w2"], ["y"], name="mul"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("w1", w), init("w2", w.copy())])
    model, _, pm = run_pass(proto, "canonicalize", (("merge-initializers", "false"),))
    assert not modified(pm)
    assert initializer_names(model) == ["w1", "w2"]


def test_dead_nodes_and_initializers_removed() -> None:
    """A chain nobody reads (and the weight only it used) is deleted; the live path is untouched."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Mul", ["x", "w_dead"], ["dead1"], name="dead_mul"),
        helper.make_node("Sigmoid", ["dead1"], ["dead2"], name="dead_sig"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("w_dead", rand([3], seed=8))])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    assert op_types(model) == ["Relu"]
    assert initializer_names(model) == []
    assert [i.name for i in model.to_proto().graph.input] == ["x"]


def test_unsorted_model_becomes_sorted() -> None:
    """Nodes listed consumer-first come out in dependency order (stable otherwise)."""
    nodes = [
        helper.make_node("Sigmoid", ["b"], ["y"], name="n3"),
        helper.make_node("Relu", ["x"], ["a"], name="n1"),
        helper.make_node("Neg", ["a"], ["b"], name="n2"),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])])
    model = qcompiler.load_model(proto, check=False)  # the checked loader would sort it already
    assert [n.name for n in model.graph.nodes] == ["n3", "n1", "n2"]
    model, _, pm = run_pass(model, "canonicalize")
    assert modified(pm)
    assert [n.name for n in model.graph.nodes] == ["n1", "n2", "n3"]
    assert qcompiler.verify_model(model) == []
    onnx.checker.check_model(model.to_proto())
    assert_same_outputs(make_model([nodes[1], nodes[2], nodes[0]], [tensor("x", [3])], [tensor("y", [3])]),
                        model, {"x": rand([3], seed=9)}, exact=True)


def test_unnamed_nodes_get_unique_names() -> None:
    """Every node gets a deterministic name derived from its op and output, never a clash."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_b"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    names = [n.name for n in model.to_proto().graph.node]
    assert names == ["Relu_a", "Relu_b", "Relu_y"]
    assert len(set(names)) == len(names)


def test_unnamed_name_clash_gets_suffix() -> None:
    """If the derived name is taken, a suffix keeps names unique."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="Relu_b"),
        helper.make_node("Relu", ["a"], ["b"]),
    ]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("b", [3])])
    model, _, pm = run_pass(proto, "canonicalize")
    assert modified(pm)
    names = [n.name for n in model.to_proto().graph.node]
    assert names[0] == "Relu_b" and names[1].startswith("Relu_b_") and len(set(names)) == 2


def test_canonical_model_untouched() -> None:
    """Running on an already canonical model reports no change and leaves identical text."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    proto = make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y", [1, 3, 5, 5])],
                       [init("w", rand([3, 2, 3, 3], seed=10)), init("b", rand([3], seed=11))])
    before = qcompiler.load_model(proto).graph.to_text()
    model, _, pm = run_pass(proto, "canonicalize")
    assert not modified(pm)
    assert model.graph.to_text() == before


def test_identity_of_outer_value_in_if_branch_stays() -> None:
    """H3: a branch whose output is Identity(x) of the enclosing graph's input x keeps the
    Identity (dropping it renamed x, an invalid model); the result runs in onnxruntime and
    computes what the original did, both branches taken (exact: no arithmetic changes)."""
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t_out"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])])
    proto = make_model([helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
                        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                       [init("zero", np.array(0.0, np.float32))])
    model, _, _ = run_pass(proto, "canonicalize")
    out = model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"]
    for sign in (1.0, -1.0):
        assert_same_outputs(proto, model, {"x": np.full((1, 4), sign, np.float32)}, exact=True)
