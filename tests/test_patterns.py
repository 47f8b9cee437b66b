"""Pattern API v2: repeated names, commutative ops, constants by value, alternatives, and
``where`` reasons - each shown to accept what it should and reject what it should not, on
small graphs built with onnx.helper; rewrites are checked with onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from conftest import init, make_model, tensor_info
from qcompiler import AnyValue, Const, Either, Match, Op, Rewriter, Rule, apply_rules, load_model, match


def _graph(nodes: list, inits: tuple = (), outputs: tuple[str, ...] = ("y",)):
    proto = make_model(nodes, [tensor_info("x", [1, 4]), tensor_info("z", [1, 4])],
                       [tensor_info(o, [1, 4]) for o in outputs], list(inits))
    model = load_model(proto)
    return model, model.graph


def _root(g, name: str = "root"):
    node = g.find_node(name)
    assert node is not None
    return node


# -- a name bound twice ------------------------------------------------------------------------

X_TIMES_RELU_X = Op("Mul", inputs=(AnyValue("x"), Op("Relu", inputs=(AnyValue("x"),))), bind="mul")


def test_a_name_bound_twice_must_match_the_same_value() -> None:
    """x * relu(x) matches; x * relu(z) has the same structure but two different values."""
    same, g1 = _graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                       helper.make_node("Mul", ["x", "r"], ["y"], name="root")])
    m = match(X_TIMES_RELU_X, _root(g1), g1)
    assert m is not None and m.values["x"].name == "x"
    other, g2 = _graph([helper.make_node("Relu", ["z"], ["r"], name="relu"),
                        helper.make_node("Mul", ["x", "r"], ["y"], name="root")])
    assert match(X_TIMES_RELU_X, _root(g2), g2) is None


# -- commutative ops ---------------------------------------------------------------------------

def test_commutative_matches_either_operand_order_and_backtracks() -> None:
    """Add(c, relu(x)) matches Add(Relu, Const) only when commutative; a failed first order
    leaves no binding behind."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["c", "r"], ["y"], name="root")]
    model, g = _graph(nodes, (init("c", np.ones((1, 4), np.float32)),))
    plain = Op("Add", inputs=(Op("Relu", inputs=(AnyValue("v"),)), Const("c")))
    assert match(plain, _root(g), g) is None
    m = match(Op("Add", inputs=plain.inputs, commutative=True), _root(g), g)
    assert m is not None and m.values["v"].name == "x" and m.values["c"].name == "c"
    # x * relu(x) written relu(x) * x: the first order binds v to relu's output and fails
    # inside; the second order only succeeds if that stale binding was undone
    model, g = _graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                       helper.make_node("Mul", ["r", "x"], ["y"], name="root")])
    assert match(X_TIMES_RELU_X, _root(g), g) is None
    m = match(Op("Mul", inputs=X_TIMES_RELU_X.inputs, commutative=True), _root(g), g)
    assert m is not None and m.values["x"].name == "x"


# -- constants by value ------------------------------------------------------------------------

@pytest.mark.parametrize(("stored", "want", "tol", "ok"), [
    (0.5, 0.5, 1e-6, True),
    (0.5000004, 0.5, 1e-6, True),  # within tol
    (0.51, 0.5, 1e-6, False),
    (0.51, 0.5, 0.05, True),  # a looser tol accepts it
    (6.000005, 6.0, 1e-6, True),  # tol scales with |value| above 1
])
def test_const_value_with_tolerance(stored: float, want: float, tol: float, ok: bool) -> None:
    model, g = _graph([helper.make_node("Mul", ["x", "k"], ["y"], name="root")],
                      (init("k", np.array(stored, np.float32)),))
    pattern = Op("Mul", inputs=(AnyValue(), Const(value=want, tol=tol)))
    assert (match(pattern, _root(g), g) is not None) == ok


def test_const_value_needs_a_single_number() -> None:
    """A [1,4] constant of 0.5s is not "the number 0.5"; a [1,1] one is."""
    for shape, ok in (((1, 4), False), ((1, 1), True)):
        model, g = _graph([helper.make_node("Mul", ["x", "k"], ["y"], name="root")],
                          (init("k", np.full(shape, 0.5, np.float32)),))
        assert (match(Op("Mul", inputs=(None, Const(value=0.5))), _root(g), g) is not None) == ok


# -- alternatives ------------------------------------------------------------------------------

def test_either_takes_the_first_alternative_that_matches() -> None:
    half = Either(Op("Div", inputs=(AnyValue("x"), Const(value=2.0)), bind="h"),
                  Op("Mul", inputs=(AnyValue("x"), Const(value=0.5)), commutative=True, bind="h"))
    pattern = Op("Relu", inputs=(half,))
    for op, k in (("Div", 2.0), ("Mul", 0.5)):
        model, g = _graph([helper.make_node(op, ["x", "k"], ["h"], name="h"),
                           helper.make_node("Relu", ["h"], ["y"], name="root")], (init("k", np.array(k, np.float32)),))
        m = match(pattern, _root(g), g)
        assert m is not None and m.nodes["h"].op == op and m.values["x"].name == "x"
    model, g = _graph([helper.make_node("Div", ["x", "k"], ["h"], name="h"),
                       helper.make_node("Relu", ["h"], ["y"], name="root")], (init("k", np.array(0.5, np.float32)),))
    assert match(pattern, _root(g), g) is None  # x / 0.5 is neither alternative


# -- where: a reason, logged -------------------------------------------------------------------

def _drop_relu(m: Match, rw: Rewriter) -> bool:
    out = m.root.outputs[0]
    rw.erase_node(m.graph, m.root)
    rw.replace_all_uses(m.graph, out, m.values["v"])
    return True


def test_where_reason_vetoes_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A where returning a reason leaves the node alone and logs the reason at debug level on
    the 'qcompiler' logger (what -v shows); returning None lets the rewrite run."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="root"), helper.make_node("Neg", ["r"], ["y"], name="neg")]
    pattern = Op("Relu", inputs=(AnyValue("v"),))
    model, g = _graph(nodes)
    rule = Rule("drop-relu", pattern, _drop_relu, where=lambda m: f"'{m.values['v'].name}' may be negative")
    with caplog.at_level(logging.DEBUG, logger="qcompiler"):
        assert apply_rules(model, [rule], Rewriter(model)) == 0
    assert [n.op for n in g.nodes] == ["Relu", "Neg"]
    assert "drop-relu: 'root' matches but is left alone: 'x' may be negative" in caplog.text
    ok = Rule("drop-relu", pattern, _drop_relu, where=lambda m: None)
    assert apply_rules(model, [ok], Rewriter(model)) == 1 and [n.op for n in g.nodes] == ["Neg"]


# -- rules are data, built once ----------------------------------------------------------------

@pytest.mark.parametrize(("module", "cls"), [("fuse_gelu", "FuseGelu"), ("fuse_hardswish", "FuseHardswish"),
                                            ("fold_matmul_add", "FoldMatmulAdd"), ("fuse_conv_bn", "FuseConvBn")])
def test_ported_passes_build_their_rules_once(module: str, cls: str, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Running a pass twice hands apply_rules the very same rule objects: they are module
    data built at import, not rebuilt per run."""
    import importlib

    from qcompiler import PassContext, load_target

    mod = importlib.import_module(f"qcompiler.passes.{module}")
    seen: list[object] = []
    monkeypatch.setattr(mod, "apply_rules", lambda model, rules, rw, **kw: seen.append(rules) or 0)
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="root")], [tensor_info("x", [1, 4])],
                       [tensor_info("y", [1, 4])], opset=21)
    target = tmp_path / "gemmy.toml"  # fold-matmul-add acts only where MatMul prefers Gemm
    target.write_text('schema = 1\nname = "gemmy"\ndescription = "ort-cpu, MatMul+Add as Gemm"\n'
                      'extends = "ort-cpu"\n\n[ops.MatMul]\nprefer_gemm = true\n')
    for _ in range(2):
        getattr(mod, cls)().run(load_model(proto), PassContext(target=load_target(target)))
    assert len(seen) == 2 and seen[0] is seen[1]


def test_verbose_compile_shows_why_a_rule_left_a_match_alone(tmp_path: Path) -> None:
    """Instrumentation(debug=True) (what `compile(verbose=True)` / `qcompiler -v` sets) writes the
    where-reason to the stream: a 3-D MatMul + bias stays as it is, and the user sees why."""
    import io

    from qcompiler import Instrumentation, PassContext, PassManager, load_target
    from qcompiler.passes.fold_matmul_add import FoldMatmulAdd

    target = tmp_path / "gemmy.toml"
    target.write_text('schema = 1\nname = "gemmy"\ndescription = "ort-cpu, MatMul+Add as Gemm"\n'
                      'extends = "ort-cpu"\n\n[ops.MatMul]\nprefer_gemm = true\n')
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                        helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                       [tensor_info("x", [2, 3, 4])], [tensor_info("y", [2, 3, 5])],
                       [init("w", np.ones((4, 5), np.float32)), init("b", np.ones(5, np.float32))])
    stream = io.StringIO()
    model = load_model(proto)
    PassManager([FoldMatmulAdd()], Instrumentation(debug=True, stream=stream)).run(
        model, PassContext(target=load_target(target)))
    assert [n.op for n in model.graph.nodes] == ["MatMul", "Add"]
    assert "debug: matmul-add: 'add' matches but is left alone: Gemm needs a 2-D activation" in stream.getvalue()
    assert not logging.getLogger("qcompiler").handlers  # the handler is removed afterwards
