"""fuse-hardswish: x * clip(x + 3, 0, 6) / 6 -> HardSwish(x) at opset >= 14 (structure: one
HardSwish writing the same output; numbers: same outputs in onnxruntime), and nothing else:
other constants, other clip bounds, another tensor in the product, or opset 13."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import assert_same_outputs, init, make_model, modified, op_types, rand, run_pass, tensor

SHAPE = [2, 3, 4, 4]


def _hswish(*, add: float = 3.0, lo: float | None = 0.0, hi: float | None = 6.0, div: float = 6.0,
            mul_commuted: bool = False, add_commuted: bool = False, other: bool = False,
            opset: int = 17, shared_add: bool = False) -> onnx.ModelProto:
    """The decomposed hard-swish as exporters write it, with every piece adjustable. A Relu
    produces x, so the pattern also works on an intermediate value."""
    inits = [init("three", np.array(add, np.float32)), init("six", np.array(div, np.float32))]
    clip_in = ["s"]
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound is None:
            clip_in.append("")
        else:
            inits.append(init(name, np.array(bound, np.float32)))
            clip_in.append(name)
    while clip_in and clip_in[-1] == "":
        clip_in.pop()
    factor = "z" if other else "x"
    nodes = [helper.make_node("Relu", ["inp"], ["x"], name="relu"),
             helper.make_node("Add", ["three", "x"] if add_commuted else ["x", "three"], ["s"], name="add"),
             helper.make_node("Clip", clip_in, ["c"], name="clip"),
             helper.make_node("Mul", ["c", factor] if mul_commuted else [factor, "c"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    inputs = [tensor("inp", SHAPE)] + ([tensor("z", SHAPE)] if other else [])
    outputs = [tensor("y", SHAPE)] + ([tensor("s", SHAPE)] if shared_add else [])
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(other: bool = False) -> dict[str, np.ndarray]:
    """Inputs spanning all three pieces of hard-swish (below -3, between, above 3)."""
    feeds = {"inp": rand(SHAPE, seed=1, low=-6.0, high=6.0)}
    if other:
        feeds["z"] = rand(SHAPE, seed=2)
    return feeds


@pytest.mark.parametrize(("mul_commuted", "add_commuted", "opset"), [
    (False, False, 17), (True, False, 17), (False, True, 14), (True, True, 17)])
def test_fused(mul_commuted: bool, add_commuted: bool, opset: int) -> None:
    """Both operand orders of Mul and Add: four nodes -> one HardSwish writing the graph output y."""
    proto = _hswish(mul_commuted=mul_commuted, add_commuted=add_commuted, opset=opset)
    model, _, pm = run_pass(proto, "fuse-hardswish")
    assert modified(pm)
    assert op_types(model) == ["Relu", "HardSwish"]
    g = model.to_proto().graph
    assert list(g.node[1].input) == ["x"] and g.node[1].output[0] == "y" and g.output[0].name == "y"
    assert {t.name for t in g.initializer} == set()  # the constants went with the decomposed nodes
    assert_same_outputs(proto, model, _feeds(), rtol=1e-6, atol=1e-6)


def test_opset_13_is_a_no_op() -> None:
    """HardSwish needs opset 14: at opset 13 the pass changes nothing."""
    proto = _hswish(opset=13)
    model, _, pm = run_pass(proto, "fuse-hardswish")
    assert not modified(pm)
    assert op_types(model) == op_types(proto)


@pytest.mark.parametrize("kwargs", [
    {"add": 2.0},                      # x + 2: not hard-swish
    {"lo": 0.0, "hi": 5.0},            # Clip(0, 5)
    {"lo": -1.0, "hi": 6.0},           # Clip(-1, 6)
    {"lo": 0.0, "hi": None},           # Clip with no upper bound
    {"div": 5.0},                      # / 5
    {"other": True},                   # z * clip(x + 3, 0, 6) / 6
    {"shared_add": True},              # x + 3 also read elsewhere
], ids=["add-2", "clip-0-5", "clip-m1-6", "clip-no-max", "div-5", "other-factor", "shared-add"])
def test_not_fused(kwargs: dict) -> None:
    """Anything that is not exactly x * clip(x + 3, 0, 6) / 6 (with private intermediates) stays."""
    proto = _hswish(**kwargs)
    model, _, pm = run_pass(proto, "fuse-hardswish")
    assert not modified(pm)
    assert op_types(model) == op_types(proto)
    assert_same_outputs(proto, model, _feeds(kwargs.get("other", False)), exact=True)
