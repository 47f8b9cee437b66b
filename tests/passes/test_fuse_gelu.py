"""fuse-gelu: 0.5 * x * (1 + erf(x / sqrt 2)) -> Gelu(x), the standard op at opset 20+
(`domain=ai.onnx`) or onnxruntime's contrib op (`domain=com.microsoft`). Structure: one Gelu
writing the same output; numbers: the same outputs in onnxruntime (1e-5); and nothing else:
other constants, another tensor in the product, a shared intermediate, an old opset."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

import qcompiler
from _util import assert_same_outputs, init, make_model, modified, op_types, rand, run_pass, tensor

SHAPE = [2, 5, 16]


def _gelu(*, grouping: str = "hf", scale: str = "div", sqrt2: float = math.sqrt(2.0), one: float = 1.0,
          half: float = 0.5, add_commuted: bool = False, other: bool = False, shared_erf: bool = False,
          opset: int = 17) -> "helper.ModelProto":
    """The exact GELU as exporters write it, every piece adjustable. A MatMul produces x, as in
    a transformer's feed-forward layer.

    grouping: hf = (x * (1 + erf)) * 0.5; half-last = x * ((1 + erf) * 0.5);
    x-first = 0.5 * ((1 + erf) * x) (operands swapped at both Muls); half-first =
    (x * 0.5) * (1 + erf), as `x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))` exports."""
    inits = [init("w", rand([16, 16], seed=3)), init("c", np.array(sqrt2 if scale == "div" else 1 / sqrt2, np.float32)),
             init("one", np.array(one, np.float32)), init("half", np.array(half, np.float32))]
    factor = "z" if other else "x"
    nodes = [helper.make_node("MatMul", ["inp", "w"], ["x"], name="mm"),
             helper.make_node("Div" if scale == "div" else "Mul", ["x", "c"], ["s"], name="scale"),
             helper.make_node("Erf", ["s"], ["e"], name="erf"),
             helper.make_node("Add", ["one", "e"] if add_commuted else ["e", "one"], ["a"], name="add")]
    if grouping == "hf":
        nodes += [helper.make_node("Mul", [factor, "a"], ["p"], name="inner"),
                  helper.make_node("Mul", ["p", "half"], ["y"], name="outer")]
    elif grouping == "half-last":
        nodes += [helper.make_node("Mul", ["a", "half"], ["p"], name="inner"),
                  helper.make_node("Mul", [factor, "p"], ["y"], name="outer")]
    elif grouping == "half-first":
        nodes += [helper.make_node("Mul", [factor, "half"], ["p"], name="inner"),
                  helper.make_node("Mul", ["p", "a"], ["y"], name="outer")]
    else:
        nodes += [helper.make_node("Mul", ["a", factor], ["p"], name="inner"),
                  helper.make_node("Mul", ["half", "p"], ["y"], name="outer")]
    inputs = [tensor("inp", SHAPE)] + ([tensor("z", SHAPE)] if other else [])
    outputs = [tensor("y", SHAPE)] + ([tensor("e", SHAPE)] if shared_erf else [])
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(other: bool = False) -> dict[str, np.ndarray]:
    feeds = {"inp": rand(SHAPE, seed=1, low=-2.0, high=2.0)}
    if other:
        feeds["z"] = rand(SHAPE, seed=2)
    return feeds


@pytest.mark.parametrize(("grouping", "scale", "add_commuted"), [
    ("hf", "div", False), ("half-last", "div", True), ("x-first", "mul", False), ("hf", "mul", True),
    ("half-first", "div", False), ("half-first", "mul", True)])
def test_fused_contrib(grouping: str, scale: str, add_commuted: bool) -> None:
    """Every grouping, Div by sqrt 2 or Mul by 1/sqrt 2: six nodes -> MatMul + com.microsoft Gelu."""
    proto = _gelu(grouping=grouping, scale=scale, add_commuted=add_commuted)
    model, _, pm = run_pass(proto, "fuse-gelu", [("domain", "com.microsoft")])
    assert modified(pm)
    g = model.to_proto()
    assert op_types(g) == ["MatMul", "Gelu"]
    gelu = g.graph.node[1]
    assert gelu.domain == "com.microsoft" and list(gelu.input) == ["x"] and gelu.output[0] == "y"
    assert {o.domain for o in g.opset_import} == {"", "com.microsoft"}
    assert {t.name for t in g.graph.initializer} == {"w"}  # the constants went with the pieces
    assert_same_outputs(proto, model, _feeds(), rtol=1e-5, atol=1e-6)


def test_standard_gelu_at_opset_20() -> None:
    """domain=ai.onnx (the default) emits the standard Gelu, exact form (no approximate attr)."""
    proto = _gelu(opset=20)
    model, _, pm = run_pass(proto, "fuse-gelu")
    assert modified(pm)
    g = model.to_proto()
    assert op_types(g) == ["MatMul", "Gelu"] and g.graph.node[1].domain == ""
    assert not g.graph.node[1].attribute
    assert_same_outputs(proto, model, _feeds(), rtol=1e-5, atol=1e-6)


def test_standard_gelu_needs_opset_20() -> None:
    proto = _gelu(opset=17)
    model, _, pm = run_pass(proto, "fuse-gelu")
    assert not modified(pm)
    assert op_types(model) == op_types(proto)


@pytest.mark.parametrize("kwargs", [
    {"sqrt2": 2.0},          # erf(x / 2)
    {"grouping": "half-first", "half": 0.25},                 # (x * 0.25) * (1 + erf)
    {"grouping": "half-first", "other": True},                # (z * 0.5) * (1 + erf(x / sqrt 2))
    {"one": 2.0},            # 2 + erf
    {"half": 0.25},          # * 0.25
    {"other": True},         # z * (1 + erf(x / sqrt 2)) * 0.5
    {"shared_erf": True},    # erf(...) also a graph output
], ids=["div-2", "half-first-quarter", "half-first-other", "add-2", "quarter", "other-factor", "shared-erf"])
def test_not_fused(kwargs: dict) -> None:
    """Anything that is not exactly the exact GELU (with private intermediates) stays."""
    proto = _gelu(**kwargs)
    model, _, pm = run_pass(proto, "fuse-gelu", [("domain", "com.microsoft")])
    assert not modified(pm)
    assert op_types(model) == op_types(proto)
    assert_same_outputs(proto, model, _feeds(kwargs.get("other", False)), exact=True)


def test_bad_domain_is_one_line_error() -> None:
    with pytest.raises(qcompiler.UserError, match="fuse-gelu: domain must be one of ai.onnx, com.microsoft, not 'foo'"):
        run_pass(_gelu(), "fuse-gelu", [("domain", "foo")])
