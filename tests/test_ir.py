"""The IR: load/save fidelity, graph queries, ordering, the verifier, subgraphs, the Rewriter
and the pattern driver.

Everything a pass does goes through these pieces, so they are tested directly on small
hand-built graphs whose expected structure is obvious.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import init, make_model, tensor_info, tiny_model
from qcompiler import (AnyValue, Const, Match, Model, Op, Rewriter, Rule, UserError, apply_rules, const_value,
                       is_constant, load_model, match, node_subgraphs, producer, users, verify_model)
from qcompiler.ir import save_proto


def _run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _node_names(model: Model) -> list[str]:
    return [n.name for n in model.graph.nodes]


# -- load / save ---------------------------------------------------------------------------

def _rich_model() -> onnx.ModelProto:
    """Two inputs, two outputs, an extra opset import, metadata and producer fields."""
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add0"),
             helper.make_node("Relu", ["s"], ["out_relu"], name="relu0"),
             helper.make_node("Mul", ["s", "k"], ["out_mul"], name="mul0")]
    proto = make_model(nodes, [tensor_info("a", [2, 3]), tensor_info("b", [2, 3])],
                       [tensor_info("out_relu", [2, 3]), tensor_info("out_mul", [2, 3])],
                       [init("k", np.full((2, 3), 2.0, np.float32))], extra_opsets={"com.microsoft": 1})
    proto.producer_name = "unit-test"
    proto.producer_version = "1.2"
    proto.model_version = 7
    proto.doc_string = "round trip me"
    for key, value in (("zeta", "last"), ("author", "tests"), ("license", "none")):
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return proto


def test_load_save_round_trip_keeps_model_fields(tmp_path: Path) -> None:
    """Saving a loaded model keeps opsets, IR version, metadata, producer and I/O names."""
    original = _rich_model()
    path = tmp_path / "in.onnx"
    onnx.save_model(original, str(path))
    model = load_model(path)
    out = tmp_path / "out.onnx"
    size = save_proto(model.to_proto(), out)
    assert size == out.stat().st_size
    saved = onnx.load(str(out))
    assert saved.ir_version == 8
    assert {(o.domain, o.version) for o in saved.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert {p.key: p.value for p in saved.metadata_props} == {"zeta": "last", "author": "tests", "license": "none"}
    assert (saved.producer_name, saved.producer_version, saved.model_version, saved.doc_string) == \
        ("unit-test", "1.2", 7, "round trip me")
    assert [i.name for i in saved.graph.input] == ["a", "b"]
    assert [o.name for o in saved.graph.output] == ["out_relu", "out_mul"]
    assert [n.op_type for n in saved.graph.node] == ["Add", "Relu", "Mul"]
    onnx.checker.check_model(saved, full_check=True)
    # no temp files left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_round_trip_is_numerically_identical(tmp_path: Path) -> None:
    """Load+save must not change what the model computes (exact: same ops, same weights)."""
    original = tiny_model()
    out = tmp_path / "t.onnx"
    save_proto(load_model(original).to_proto(), out)
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (want,) = _run_ort(original, {"x": x})
    (got,) = _run_ort(onnx.load(str(out)), {"x": x})
    np.testing.assert_array_equal(got, want)


def test_load_from_proto_does_not_change_it() -> None:
    """load_model copies a ModelProto; editing the Model leaves the caller's proto alone."""
    proto = tiny_model()
    before = proto.SerializeToString()
    model = load_model(proto)
    model.metadata["touched"] = "yes"
    model.graph.nodes[0].name = "changed"
    assert proto.SerializeToString() == before


def test_save_into_missing_directory_is_user_error(tmp_path: Path) -> None:
    """Saving where the directory doesn't exist is a UserError naming the path."""
    model = load_model(tiny_model())
    target = tmp_path / "nope" / "m.onnx"
    with pytest.raises(UserError, match="nope"):
        save_proto(model.to_proto(), target)
    assert not target.parent.exists()


def test_load_missing_file_is_user_error(tmp_path: Path) -> None:
    """A path that doesn't exist is reported as such."""
    with pytest.raises(UserError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")


def test_fresh_name_is_unique_and_deterministic() -> None:
    """fresh_name never returns a name in use, and the same history gives the same names."""
    names = []
    for _ in range(2):
        model = load_model(tiny_model())
        names.append([model.fresh_name("conv1"), model.fresh_name("conv1"), model.fresh_name("brand_new"),
                      model.fresh_name("brand_new")])
    assert names[0] == names[1] == ["conv1_1", "conv1_2", "brand_new", "brand_new_1"]


# -- graph queries ---------------------------------------------------------------------------

def test_producer_and_users() -> None:
    """producer/users follow value edges; graph inputs and initializers have no producer."""
    model = load_model(tiny_model())
    g = model.graph
    values = g.values()
    r1 = values["r1"]
    assert producer(r1).name == "relu1"
    assert sorted(n.name for n in users(r1)) == ["add1", "conv2"]
    assert producer(values["x"]) is None and producer(values["w1"]) is None
    assert g.is_graph_input(values["x"]) and g.is_graph_output(values["y"])
    assert users(values["y"]) == []
    assert is_constant(values["w1"]) and not is_constant(r1)
    assert const_value(values["w1"]).shape == (4, 3, 3, 3)
    assert const_value(r1) is None
    assert g.find_node("gemm").op == "Gemm" and g.find_node("absent") is None
    assert model.opset("") == 17 and model.opset("ai.onnx") == 17 and model.opset("com.x") is None


def test_to_text_contains_ops() -> None:
    """to_text is ONNX text syntax listing every node's op."""
    text = load_model(tiny_model()).graph.to_text()
    for op in ("Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"):
        assert f"= {op} " in text or f"= {op}<" in text or f"= {op}(" in text, op
    assert onnx.parser.parse_graph(text).node[0].op_type == "Conv"


# -- ordering ----------------------------------------------------------------------------------

def _unsorted_proto() -> onnx.ModelProto:
    """Nodes listed out of order: B reads C's output, D reads A and B."""
    nodes = [helper.make_node("Neg", ["x"], ["a"], name="A"),
             helper.make_node("Relu", ["c"], ["b"], name="B"),
             helper.make_node("Abs", ["x"], ["c"], name="C"),
             helper.make_node("Add", ["a", "b"], ["y"], name="D")]
    return make_model(nodes, [tensor_info("x", [4])], [tensor_info("y", [4])])


def test_toposort_fixes_unsorted_and_is_stable() -> None:
    """Only the misplaced node moves; everything else keeps its relative order."""
    model = load_model(_unsorted_proto(), check=False)
    problems = verify_model(model)
    assert any("not topologically sorted" in p and "'B'" in p for p in problems)
    assert model.graph.toposort() is True
    assert _node_names(model) == ["A", "C", "B", "D"]
    assert verify_model(model) == []
    assert model.graph.toposort() is False  # already sorted: nothing changes
    assert _node_names(model) == ["A", "C", "B", "D"]


def test_toposort_keeps_valid_order() -> None:
    """A valid order is never reshuffled (e.g. independent branches stay as written)."""
    model = load_model(tiny_model())
    before = _node_names(model)
    assert model.graph.toposort() is False
    assert _node_names(model) == before


def test_load_model_accepts_and_sorts_unsorted_model(tmp_path: Path) -> None:
    """A model whose nodes are out of order loads (sorted) and saves as a valid model."""
    model = load_model(_unsorted_proto())
    assert _node_names(model) == ["A", "C", "B", "D"]
    out = tmp_path / "sorted.onnx"
    save_proto(model.to_proto(), out)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    x = np.array([-1.0, 2.0, -3.0, 4.0], np.float32)
    (y,) = _run_ort(saved, {"x": x})
    np.testing.assert_allclose(y, -x + np.abs(x), atol=0)


# -- verifier ----------------------------------------------------------------------------------

def _one_input(nodes: list[onnx.NodeProto], **kw: object) -> onnx.ModelProto:
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", [1, 4])], **kw)  # type: ignore[arg-type]


def test_verifier_detects_cycle() -> None:
    """n1 -> n2 -> n1 is reported with the nodes on the cycle."""
    proto = _one_input([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                        helper.make_node("Relu", ["a"], ["b"], name="n2"),
                        helper.make_node("Relu", ["a"], ["y"], name="n3")])
    model = load_model(proto, check=False)
    problems = verify_model(model)
    assert len(problems) == 1
    assert "cycle" in problems[0] and "n1" in problems[0] and "n2" in problems[0]
    assert model.graph.find_cycle() is not None
    with pytest.raises(ValueError, match="cycle"):
        model.graph.toposort()
    with pytest.raises(UserError, match="cycle"):
        load_model(proto)


def test_verifier_detects_missing_initializer() -> None:
    """A node reading an undefined value is reported naming the node and the value."""
    proto = _one_input([helper.make_node("Add", ["x", "w"], ["y"], name="addw")])
    problems = verify_model(load_model(proto, check=False))
    assert problems == ["node 'addw' (Add) reads 'w', which no node, graph input or initializer "
                        "provides (missing initializer?)"]
    with pytest.raises(UserError) as err:
        load_model(proto)
    assert "'addw'" in str(err.value) and "'w'" in str(err.value)


def test_verifier_detects_unimported_domain() -> None:
    """An op from a domain the model doesn't import is reported with the node and domain."""
    proto = _one_input([helper.make_node("Foo", ["x"], ["y"], name="foo1", domain="com.example")])
    problems = verify_model(load_model(proto, check=False))
    assert len(problems) == 1
    assert "'foo1'" in problems[0] and "com.example" in problems[0]
    # importing the domain makes the verifier (not necessarily onnx's checker) happy
    ok = _one_input([helper.make_node("Foo", ["x"], ["y"], name="foo1", domain="com.example")],
                    extra_opsets={"com.example": 1})
    assert verify_model(load_model(ok, check=False)) == []


def test_verifier_detects_unproduced_graph_output() -> None:
    """A declared graph output that nothing computes is reported by name."""
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [tensor_info("x", [1])],
                       [tensor_info("y", [1]), tensor_info("z", [1])])
    problems = verify_model(load_model(proto, check=False))
    assert any("'z'" in p for p in problems)


def test_valid_model_has_no_problems() -> None:
    """The tiny model is well formed: no false positives."""
    assert verify_model(load_model(tiny_model())) == []


# -- subgraphs ---------------------------------------------------------------------------------

def _if_model() -> onnx.ModelProto:
    """abs0 computes h in the main graph; both If branches read h from the outer scope."""
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then_b", [],
                               [tensor_info("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else_b", [],
                               [tensor_info("e", [1, 4])])
    nodes = [helper.make_node("Abs", ["x"], ["h"], name="abs0"),
             helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [tensor_info("x", [1, 4]), tensor_info("c", [], TensorProto.BOOL)],
                      [tensor_info("y", [1, 4])])


def test_walk_visits_if_branches() -> None:
    """walk() yields the main graph then each branch; branches know their parent."""
    model = load_model(_if_model())
    graphs = list(model.graph.walk())
    assert [g.name for g in graphs] == ["g", "else_b", "then_b"]
    assert [g.is_subgraph for g in graphs] == [False, True, True]
    assert all(g.parent is not None and g.parent.name == "g" for g in graphs[1:])
    if_node = model.graph.find_node("if0")
    assert len(node_subgraphs(if_node)) == 2
    ops = sorted(n.op for g in graphs for n in g.nodes)
    assert ops == ["Abs", "If", "Neg", "Relu"]
    assert "Relu" in graphs[2].to_text()
    assert verify_model(model) == []


def test_toposort_respects_outer_scope_reads() -> None:
    """An If whose branch reads h must stay after h's producer even though h isn't an If input."""
    model = load_model(_if_model())
    gs_graph = model.graph.gs
    gs_graph.nodes = [gs_graph.nodes[1], gs_graph.nodes[0]]  # move If first (test setup)
    assert model.graph.toposort() is True
    assert _node_names(model) == ["abs0", "if0"]
    assert verify_model(model) == []


# -- rewriter ----------------------------------------------------------------------------------

def _chain(ops: list[str], out_shape: list[int] | None = None) -> onnx.ModelProto:
    """x -> ops[0] -> ops[1] -> ... -> y, nodes named n0, n1, ..."""
    names = ["x"] + [f"v{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}") for i, op in enumerate(ops)]
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", out_shape or [1, 4])])


def test_rewriter_counts_every_change() -> None:
    """Each edit counts once; a no-op set_input doesn't."""
    model = load_model(_chain(["Relu", "Neg"]))
    g = model.graph
    rw = Rewriter(model)
    seen: list[str] = []
    rw.listeners.append(lambda action, what: seen.append(action))
    assert not rw.modified
    n0, n1 = g.nodes
    rw.set_input(n1, 0, n0.outputs[0])  # already its input: no change
    assert rw.changes == 0
    extra = rw.value("extra", np.float32, [1, 4])
    node = rw.create_node(g, "Abs", [n0.outputs[0]], [extra], name="abs_new")
    rw.set_attr(n0, "note", 1)
    rw.set_input(n1, 0, extra)
    assert rw.changes == 3 and rw.modified
    assert seen == ["insert", "set-attr", "set-input"]
    assert node.name == "abs_new" and [n.name for n in g.nodes] == ["n0", "n1", "abs_new"]
    rw.toposort(g)
    assert [n.name for n in g.nodes] == ["n0", "abs_new", "n1"]
    assert rw.changes == 4


def test_replace_all_uses_on_graph_output_keeps_public_name(tmp_path: Path) -> None:
    """Erasing the last node and rerouting the output: the graph output keeps the name 'y'."""
    model = load_model(_chain(["Relu", "Neg"]))
    g = model.graph
    relu, neg = g.nodes
    old_out = neg.outputs[0]
    rw = Rewriter(model)
    rw.erase_node(g, neg)
    rw.replace_all_uses(g, old_out, relu.outputs[0])
    assert rw.changes == 2
    assert [o.name for o in g.outputs] == ["y"]
    assert g.outputs[0] is relu.outputs[0]
    assert old_out.name != "y"
    out = tmp_path / "r.onnx"
    save_proto(model.to_proto(), out)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert [o.name for o in saved.graph.output] == ["y"]
    x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
    (y,) = _run_ort(saved, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_replace_node_erases_rewires_and_names_in_one_call() -> None:
    """Neg(Relu(x)) -> Abs(x) through replace_node: the chain is gone, the graph output keeps
    its public name 'y', the new node is named after the one it replaces, and onnxruntime
    computes |x| from the saved model."""
    model = load_model(_chain(["Relu", "Neg"]))
    g = model.graph
    relu, neg = g.nodes
    rw = Rewriter(model)
    node = rw.replace_node(g, neg, "Abs", [relu.inputs[0]], erase=[relu], before=relu)
    assert node.name == "n1_abs" and [n.name for n in g.nodes] == ["n1_abs"]
    assert [o.name for o in g.outputs] == ["y"] and g.outputs[0] is node.outputs[0]
    assert not relu.outputs and not neg.outputs  # erased nodes are disconnected
    assert verify_model(model) == []
    x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
    (y,) = _run_ort(model.to_proto(), {"x": x})
    np.testing.assert_array_equal(y, np.abs(x))


def test_rewriter_constant_packs_4bit_arrays() -> None:
    """An int4 array (ml_dtypes, one number a byte) becomes a packed ONNX INT4 initializer:
    the exported tensor holds two numbers a byte and reads back to the same numbers."""
    import ml_dtypes

    model = load_model(_chain(["Relu"]))
    rw = Rewriter(model)
    numbers = np.array([-8, -1, 0, 3, 7], dtype=ml_dtypes.int4)
    const = rw.constant("w4", numbers)
    g = model.graph
    rw.create_node(g, "Identity", [const], [rw.value("w4_out", ml_dtypes.int4, [5])])
    proto = {t.name: t for t in model.to_proto().graph.initializer}["w4"]
    assert proto.data_type == TensorProto.INT4 and len(proto.raw_data) == 3  # ceil(5 / 2) bytes
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto).astype(np.int8), numbers.astype(np.int8))


def test_replace_all_uses_rewires_every_reader() -> None:
    """All consumers of the old value read the new one, except the ones excluded."""
    model = load_model(tiny_model())
    g = model.graph
    values = g.values()
    rw = Rewriter(model)
    conv2 = g.find_node("conv2")
    rw.replace_all_uses(g, values["r1"], values["c1"], except_nodes=[conv2])
    assert g.find_node("add1").inputs[0] is values["c1"]
    assert conv2.inputs[0] is values["r1"]
    assert rw.changes == 1


def test_cleanup_removes_dead_nodes() -> None:
    """cleanup drops a node nothing reads, counts as one change, and keeps graph I/O."""
    model = load_model(_chain(["Relu", "Neg"]))
    g = model.graph
    rw = Rewriter(model)
    rw.create_node(g, "Abs", [g.inputs[0]], [rw.value("dead", np.float32, [1, 4])], name="dead_abs")
    rw.cleanup(g)
    assert [n.name for n in g.nodes] == ["n0", "n1"]
    assert rw.changes == 2
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["y"]


# -- patterns ----------------------------------------------------------------------------------

def _collapse_relu(m: Match, rw: Rewriter) -> bool:
    """Relu(Relu(x)) -> Relu(x): drop the outer Relu."""
    outer = m.root
    inner = m.nodes["inner"]
    out = outer.outputs[0]
    rw.erase_node(m.graph, outer)
    rw.replace_all_uses(m.graph, out, inner.outputs[0])
    return True


RELU_RELU = Rule("relu-relu", Op("Relu", inputs=(Op("Relu", single_use=True, bind="inner"),)), _collapse_relu)


def test_apply_rules_reaches_fixed_point() -> None:
    """Five stacked Relus collapse to one; a second run finds nothing to do."""
    model = load_model(_chain(["Relu"] * 5))
    rw = Rewriter(model)
    applied = apply_rules(model, [RELU_RELU], rw)
    assert applied == 4
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert verify_model(model) == []
    changes = rw.changes
    assert apply_rules(model, [RELU_RELU], rw) == 0
    assert rw.changes == changes
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    (y,) = _run_ort(model.to_proto(), {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_apply_rules_respects_single_use() -> None:
    """An inner Relu whose output is also a graph output must not be fused away."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="inner"),
             helper.make_node("Relu", ["r"], ["y"], name="outer")]
    proto = make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", [1, 4]), tensor_info("r", [1, 4])])
    model = load_model(proto)
    rw = Rewriter(model)
    assert apply_rules(model, [RELU_RELU], rw) == 0
    assert rw.changes == 0 and len(model.graph.nodes) == 2


def test_apply_rules_where_filters_matches() -> None:
    """A rule's ``where`` can veto a structural match by returning a reason."""
    model = load_model(_chain(["Relu"] * 3))
    rule = Rule("never", RELU_RELU.pattern, _collapse_relu, where=lambda m: "vetoed")
    assert apply_rules(model, [rule], Rewriter(model)) == 0
    assert len(model.graph.nodes) == 3


def test_match_binds_constants_and_checks_attrs() -> None:
    """Const(check=...) and attribute constraints decide a match; bindings are returned."""
    model = load_model(tiny_model())
    g = model.graph
    gemm = g.find_node("gemm")
    pattern = Op("Gemm", inputs=(AnyValue("a"), Const("w", check=lambda w: w.ndim == 2), Const("b")),
                 attrs={"transB": 1}, bind="gemm")
    m = match(pattern, gemm, g)
    assert m is not None
    assert m.nodes["gemm"] is gemm
    assert m.values["a"].name == "f1"
    assert m.const("w").shape == (5, 4) and m.const("b").shape == (5,)
    assert match(Op("Gemm", attrs={"transB": 0}), gemm, g) is None
    assert match(Op("Gemm", inputs=(Const("a"),)), gemm, g) is None  # f1 is not an initializer
    assert match(Op("Gemm", inputs=(AnyValue(), Const("w", check=lambda w: w.ndim == 4))), gemm, g) is None
    assert match(Op("Gemm", opset=(18, 30)), gemm, g) is None
    assert match(Op(("Gemm", "MatMul"), opset=(13, 17)), gemm, g) is not None
    # a producer chain: Gemm(Flatten(GlobalAveragePool(...)))
    chain = Op("Gemm", inputs=(Op("Flatten", inputs=(Op("GlobalAveragePool", bind="gap"),)),))
    assert match(chain, gemm, g).nodes["gap"].name == "gap"


# -- weights held once; shared with onnxruntime ------------------------------------------------

def _weights_model() -> onnx.ModelProto:
    """x[1,8] -> MatMul(W 8x512) -> Gather-free; plus a bfloat16 constant cast to float."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 512)).astype(np.float32)  # 16 KiB: shared
    small = rng.standard_normal((512,)).astype(np.float32)  # 2 KiB, read by Add: shared only without a filter
    bf16 = helper.make_tensor("h", TensorProto.BFLOAT16, [4], [1.0, -2.0, 0.5, 3.0])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add"),
             helper.make_node("Cast", ["h"], ["hf"], name="cast", to=TensorProto.FLOAT)]
    return make_model(nodes, [tensor_info("x", [1, 8])], [tensor_info("y", [1, 512]), tensor_info("hf", [4])],
                      [init("W", w), init("b", small), bf16])


def test_load_model_detaches_weights_from_the_source_proto() -> None:
    """Every constant is the IR's own array (or a standalone proto for bfloat16), so the file's
    proto can be freed; dtypes numpy cannot hold survive a round trip unchanged."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    src = _weights_model()
    m = load_model(src)
    consts = {n: t for n, t in m.graph.gs.tensors().items() if isinstance(t, gs.Constant)}
    assert isinstance(consts["W"]._values, np.ndarray) and isinstance(consts["b"]._values, np.ndarray)
    assert isinstance(consts["h"]._values, LazyValues)
    h_src = next(t for t in src.graph.initializer if t.name == "h")
    assert consts["h"]._values.tensor is not h_src and consts["h"]._values.tensor == h_src
    assert isinstance(m.graph.gs.import_domains, list)  # not a view of the proto's opset_import
    out = {t.name: t for t in m.to_proto().graph.initializer}
    assert out["h"].data_type == TensorProto.BFLOAT16 and out["h"] == h_src
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out["W"]),
                                  onnx.numpy_helper.to_array(src.graph.initializer[0]))


def test_to_proto_shared_lends_the_ir_arrays() -> None:
    """to_proto(shared=...) exports large weights as payload-less external-data stubs and hands
    out the IR's arrays themselves; the IR is unchanged afterwards."""
    from qcompiler.ir.model import SHARED_LOCATION

    m = load_model(_weights_model())
    shared: dict[str, np.ndarray] = {}
    proto = m.to_proto(shared=shared)
    stubs = {t.name: t for t in proto.graph.initializer}
    assert set(shared) == {"W", "b"}  # >= 1 KiB and a numpy dtype; bfloat16 stays inline
    for name in ("W", "b"):
        t = stubs[name]
        assert t.data_location == TensorProto.EXTERNAL and not t.raw_data
        assert {e.key: e.value for e in t.external_data}["location"] == SHARED_LOCATION
        assert np.shares_memory(shared[name], m.graph.gs.tensors()[name].values)
    assert stubs["h"].data_location != TensorProto.EXTERNAL
    narrowed: dict[str, np.ndarray] = {}
    m.to_proto(shared=narrowed, share=lambda c: all(n.op == "MatMul" for n in c.outputs))
    assert set(narrowed) == {"W"}
    whole = {t.name: t for t in m.to_proto().graph.initializer}  # the stubs were only for that export
    assert whole["W"].raw_data and whole["W"].data_location != TensorProto.EXTERNAL


def test_cycle_check_of_20k_node_chain_is_linear() -> None:
    """M3: a 20k-node chain verifies (the old check re-walked the chain; this one is Kahn's
    algorithm); a back edge added at the end is found and named."""
    n = 20_000
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"v{i - 1}"], [f"v{i}"], name=f"n{i}") for i in range(n)]
    nodes.append(helper.make_node("Identity", [f"v{n - 1}"], ["y"], name="last"))
    model = load_model(_one_input(nodes), check=False)
    assert model.graph.find_cycle() is None
    assert verify_model(model) == []
    # close a loop n5 -> ... -> n9 -> n5 and the check names exactly that loop
    model.graph.gs.nodes[5].inputs[0] = model.graph.gs.nodes[9].outputs[0]
    assert model.graph.find_cycle() == [f"n{i}" for i in range(5, 10)]
