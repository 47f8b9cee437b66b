"""fold-conv-affine: a constant per-channel Mul/Add next to a Conv goes into its weights and bias
(structure: one Conv left; numbers: same outputs in onnxruntime), and is left alone where
folding would not be exact or would change shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import (assert_same_outputs, attrs_of, init, initializers, make_model, modified, op_types, rand, run_pass,
                   tensor)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _conv(inp: str, out: str, bias: bool = True, **attrs: object) -> onnx.NodeProto:
    return helper.make_node("Conv", [inp, "w", "b"] if bias else [inp, "w"], [out], name="conv", **attrs)


def _weights(m: int = 4, c: int = 3, k: int = 3, bias: bool = True, group: int = 1) -> list[onnx.TensorProto]:
    inits = [init("w", rand([m, c // group, k, k], seed=1))]
    return inits + [init("b", rand([m], seed=2))] if bias else inits


# -- Mul/Add after the Conv ---------------------------------------------------------------------


@pytest.mark.parametrize(("op", "shape", "commuted", "bias"), [
    ("Mul", [1, 4, 1, 1], False, True),
    ("Mul", [4, 1, 1], True, False),      # rank-3 constant, constant first
    ("Mul", [], False, True),             # scalar
    ("Add", [1, 4, 1, 1], False, False),  # Conv without bias gets one
    ("Add", [1], True, True),
])
def test_affine_after_conv_folded(op: str, shape: list[int], commuted: bool, bias: bool) -> None:
    """Conv -> Mul/Add(per-channel or scalar constant) becomes one Conv writing the graph output."""
    const = init("k", rand(shape, seed=3, low=0.5, high=2.0))
    inputs = ["k", "c"] if commuted else ["c", "k"]
    nodes = [_conv("x", "c", bias, pads=[1, 1, 1, 1], strides=[2, 2]), helper.make_node(op, inputs, ["y"], name="aff")]
    proto = make_model(nodes, [tensor("x", [2, 3, 8, 8])], [tensor("y", [2, 4, 4, 4])], _weights(bias=bias) + [const])
    model, _, pm = run_pass(proto, "fold-conv-affine")
    assert modified(pm)
    assert op_types(model) == ["Conv"]
    g = model.to_proto().graph
    assert g.node[0].output[0] == "y" and len(g.node[0].input) == 3
    assert attrs_of(model, "Conv") == {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    assert sorted(v.shape for v in initializers(model).values()) == [(4,), (4, 3, 3, 3)]
    assert_same_outputs(proto, model, {"x": rand([2, 3, 8, 8], seed=4)}, **TOL)


def test_mul_then_add_chain_folded() -> None:
    """An exported affine layer (Mul then Add after a Conv) folds completely."""
    nodes = [_conv("x", "c"), helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["y"], name="add")]
    proto = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 4, 4])],
                       _weights() + [init("s", rand([1, 4, 1, 1], seed=5)), init("t", rand([1, 4, 1, 1], seed=6))])
    model, _, pm = run_pass(proto, "fold-conv-affine")
    assert modified(pm) and op_types(model) == ["Conv"]
    assert_same_outputs(proto, model, {"x": rand([1, 3, 6, 6], seed=7)}, **TOL)


# -- Mul/Add before the Conv --------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_affine_before_unpadded_conv_folded(op: str) -> None:
    """Mul/Add(x, per-input-channel constant) -> unpadded strided Conv: the Conv reads x directly
    (Mul scales the weight's input channels, Add moves sum(W * b) into the bias)."""
    nodes = [helper.make_node(op, ["x", "k"], ["a"], name="aff"), _conv("a", "y", strides=[2, 2])]
    proto = make_model(nodes, [tensor("x", [2, 3, 9, 9])], [tensor("y", [2, 4, 4, 4])],
                       _weights() + [init("k", rand([1, 3, 1, 1], seed=8, low=0.5, high=2.0))])
    model, _, pm = run_pass(proto, "fold-conv-affine")
    assert modified(pm)
    assert op_types(model) == ["Conv"]
    assert model.to_proto().graph.node[0].input[0] == "x"
    assert_same_outputs(proto, model, {"x": rand([2, 3, 9, 9], seed=9)}, **TOL)


# -- left alone -----------------------------------------------------------------------------------


def _unchanged(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    model, _, pm = run_pass(proto, "fold-conv-affine")
    assert not modified(pm)
    assert op_types(model) == op_types(proto)
    assert_same_outputs(proto, model, feeds, exact=True)


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_affine_before_padded_conv_not_folded(op: str) -> None:
    """Before a padded Conv the padding zeros would not be shifted by the Add: not exact, so the
    pass leaves it (and conservatively the Mul too)."""
    nodes = [helper.make_node(op, ["x", "k"], ["a"], name="aff"), _conv("a", "y", pads=[1, 1, 1, 1])]
    proto = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                       _weights() + [init("k", rand([1, 3, 1, 1], seed=10))])
    _unchanged(proto, {"x": rand([1, 3, 6, 6], seed=11)})


def test_affine_before_grouped_conv_not_folded() -> None:
    """Grouped Conv: the before-rule only handles group == 1."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["a"], name="aff"),
             helper.make_node("Conv", ["a", "w", "b"], ["y"], name="conv", group=3)]
    proto = make_model(nodes, [tensor("x", [1, 6, 5, 5])], [tensor("y", [1, 6, 3, 3])],
                       [init("w", rand([6, 2, 3, 3], seed=1)), init("b", rand([6], seed=2)),
                        init("k", rand([1, 6, 1, 1], seed=12))])
    _unchanged(proto, {"x": rand([1, 6, 5, 5], seed=13)})


def test_affine_broadcasting_input_up_not_folded() -> None:
    """x has 1 channel and the constant 3: the Mul broadcasts x to the Conv's 3 channels, so the
    Conv cannot read x directly (was folded into an invalid Conv before the fix)."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["a"], name="aff"), _conv("a", "y")]
    proto = make_model(nodes, [tensor("x", [1, 1, 5, 5])], [tensor("y", [1, 4, 3, 3])],
                       _weights() + [init("k", rand([1, 3, 1, 1], seed=14))])
    _unchanged(proto, {"x": rand([1, 1, 5, 5], seed=15)})


def test_rank_raising_constant_after_1d_conv_not_folded() -> None:
    """A rank-4 [1, M, 1, 1] constant times a 1-D Conv's [N, M, L] output broadcasts to
    [N, M, M, L]; with the Conv output's shape unknown the pass must still see that (it used
    to assume rank 4 and fold, changing the output shape)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "k"], ["y"], name="aff")]
    proto = make_model(nodes, [tensor("x", [1, 3, 5])], [tensor("y", [1, 2, 2, 5])],
                       [init("w", rand([2, 3, 1], seed=16)), init("k", rand([1, 2, 1, 1], seed=17))])
    _unchanged(proto, {"x": rand([1, 3, 5], seed=18)})


@pytest.mark.parametrize("case", ["spatial-constant", "shared-conv-output", "run-time-operand"])
def test_not_folded(case: str) -> None:
    """A constant that varies over positions, a Conv output read twice, a non-constant operand."""
    inits = _weights()
    inputs = [tensor("x", [1, 3, 6, 6])]
    outputs = [tensor("y", [1, 4, 4, 4])]
    nodes = [_conv("x", "c")]
    if case == "spatial-constant":
        nodes.append(helper.make_node("Mul", ["c", "k"], ["y"], name="aff"))
        inits.append(init("k", rand([1, 4, 4, 4], seed=19)))
    elif case == "shared-conv-output":
        nodes += [helper.make_node("Mul", ["c", "k"], ["y"], name="aff"), helper.make_node("Relu", ["c"], ["r"], name="r")]
        inits.append(init("k", rand([1, 4, 1, 1], seed=20)))
        outputs.append(tensor("r", [1, 4, 4, 4]))
    else:
        nodes.append(helper.make_node("Mul", ["c", "s"], ["y"], name="aff"))
        inputs.append(tensor("s", [1, 4, 1, 1]))
    proto = make_model(nodes, inputs, outputs, inits)
    feeds = {"x": rand([1, 3, 6, 6], seed=21)}
    if case == "run-time-operand":
        feeds["s"] = rand([1, 4, 1, 1], seed=22)
    _unchanged(proto, feeds)
