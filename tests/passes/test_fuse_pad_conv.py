"""fuse-pad-conv: an explicit zero Pad of the spatial axes in front of a Conv becomes the Conv's own
padding (no copy, and no pad value to requantize later); any other Pad stays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import assert_same_outputs, attrs_of, init, make_model, modified, op_types, rand, run_pass, tensor

TOL = {"rtol": 1e-5, "atol": 1e-5}
X_SHAPE = [1, 2, 6, 7]


def _model(pads: list[int], *, mode: str = "constant", value: float | None = None,
           conv_attrs: dict | None = None, extra_reader: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x -> Pad -> Conv(3x3) -> y, with the Pad given either as inputs (opset >= 11) or attributes."""
    inits = [init("w", rand([3, 2, 3, 3], seed=1)), init("b", rand([3], seed=2))]
    if opset >= 11:
        pad_in = ["x", "pads"]
        inits.append(init("pads", np.array(pads, np.int64)))
        if value is not None:
            pad_in.append("pv")
            inits.append(init("pv", np.array(value, np.float32)))
        pad = helper.make_node("Pad", pad_in, ["p"], name="pad", mode=mode)
    else:
        attrs = {"mode": mode, "pads": pads}
        if value is not None:
            attrs["value"] = value
        pad = helper.make_node("Pad", ["x"], ["p"], name="pad", **attrs)
    nodes = [pad, helper.make_node("Conv", ["p", "w", "b"], ["y"], name="conv", **(conv_attrs or {}))]
    outputs = [tensor("y", ["N", 3, "H", "W"])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["p"], ["r"], name="relu"))
        outputs.append(tensor("r", ["N", 2, "H2", "W2"]))
    return make_model(nodes, [tensor("x", X_SHAPE)], outputs, inits, opset=opset)


def _x() -> dict[str, np.ndarray]:
    return {"x": rand(X_SHAPE, seed=3)}


def test_zero_spatial_pad_fused_without_conv_pads() -> None:
    """Asymmetric pad [t=1, l=2, b=0, r=1] becomes Conv pads [1, 2, 0, 1]."""
    proto = _model([0, 0, 1, 2, 0, 0, 0, 1])
    model, _, pm = run_pass(proto, "fuse-pad-conv")
    assert modified(pm)
    assert op_types(model) == ["Conv"]
    assert list(model.to_proto().graph.node[0].input) == ["x", "w", "b"]
    assert attrs_of(model, "Conv") == {"pads": [1, 2, 0, 1]}
    assert_same_outputs(proto, model, _x(), **TOL)


def test_pads_are_summed_with_conv_pads() -> None:
    """Pad [1,2 | 3,4] plus the Conv's own [1,1,1,1] gives [2,3,4,5]; other Conv attributes kept."""
    proto = _model([0, 0, 1, 2, 0, 0, 3, 4], conv_attrs={"pads": [1, 1, 1, 1], "strides": [2, 1]})
    model, _, pm = run_pass(proto, "fuse-pad-conv")
    assert modified(pm)
    assert op_types(model) == ["Conv"]
    assert attrs_of(model, "Conv") == {"pads": [2, 3, 4, 5], "strides": [2, 1]}
    assert [t.name for t in model.to_proto().graph.initializer] == ["w", "b"]  # the pads tensor is gone
    assert_same_outputs(proto, model, _x(), **TOL)


def test_explicit_zero_value_fused() -> None:
    """A constant_value input of 0.0 is the same as no value."""
    proto = _model([0, 0, 1, 1, 0, 0, 1, 1], value=0.0)
    model, _, pm = run_pass(proto, "fuse-pad-conv")
    assert modified(pm)
    assert attrs_of(model, "Conv") == {"pads": [1, 1, 1, 1]}
    assert_same_outputs(proto, model, _x(), **TOL)


def test_opset10_attribute_pad_fused() -> None:
    """Before opset 11 the pads are an attribute; they fold the same way."""
    proto = _model([0, 0, 2, 0, 0, 0, 0, 1], opset=10)
    model, _, pm = run_pass(proto, "fuse-pad-conv")
    assert modified(pm)
    assert op_types(model) == ["Conv"]
    assert attrs_of(model, "Conv") == {"pads": [2, 0, 0, 1]}
    assert_same_outputs(proto, model, _x(), **TOL)


@pytest.mark.parametrize("case", [
    pytest.param({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"}, id="reflect-mode"),
    pytest.param({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "edge"}, id="edge-mode"),
    pytest.param({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 0.5}, id="nonzero-value"),
    pytest.param({"pads": [0, 1, 1, 1, 0, 0, 1, 1]}, id="channel-axis"),
    pytest.param({"pads": [1, 0, 0, 0, 0, 0, 0, 0]}, id="batch-axis"),
    pytest.param({"pads": [0, 0, -1, 0, 0, 0, 0, 0]}, id="negative-crop"),
    pytest.param({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "conv_attrs": {"auto_pad": "SAME_UPPER"}}, id="conv-auto-pad"),
    pytest.param({"pads": [0, 0, 1, 1, 0, 0, 1, 1], "extra_reader": True}, id="pad-output-read-twice"),
])
def test_not_fused(case: dict) -> None:
    """Anything Conv padding cannot express (or that someone else still reads) is left alone."""
    kwargs = dict(case)
    pads = kwargs.pop("pads")
    proto = _model(pads, **kwargs)
    model, _, pm = run_pass(proto, "fuse-pad-conv")
    assert not modified(pm)
    assert op_types(model)[:2] == ["Pad", "Conv"]
    assert "pads" not in attrs_of(model, "Conv")
