"""fuse-conv-bn: an inference BatchNormalization after a Conv is folded into the Conv's weights and
bias, so quantization sees one op with one weight (and one output range) instead of two."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import (assert_same_outputs, attrs_of, init, initializers, make_model, modified, op_types, rand,
                   run_pass, tensor)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _bn_inits(prefix: str, ch: int, seed: int) -> list[onnx.TensorProto]:
    """BN parameters far from identity (var well away from 0, non-trivial mean/beta)."""
    return [init(f"{prefix}gamma", rand([ch], seed, 0.5, 1.5)), init(f"{prefix}beta", rand([ch], seed + 1)),
            init(f"{prefix}mean", rand([ch], seed + 2)), init(f"{prefix}var", rand([ch], seed + 3, 0.2, 2.0))]


def _bn(inp: str, out: str, prefix: str = "", name: str = "bn", **attrs: object) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [inp, f"{prefix}gamma", f"{prefix}beta", f"{prefix}mean",
                                                   f"{prefix}var"], [out], name=name, **attrs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_bn_fused(with_bias: bool) -> None:
    """Conv(+/-bias) + BN -> one Conv with a bias; output name and attributes kept; numerically equal."""
    conv_in = ["x", "w", "b"] if with_bias else ["x", "w"]
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             _bn("c", "y", epsilon=1e-3)]
    inits = [init("w", rand([4, 3, 3, 3], seed=1))] + _bn_inits("", 4, seed=10)
    if with_bias:
        inits.append(init("b", rand([4], seed=2)))
    proto = make_model(nodes, [tensor("x", [2, 3, 8, 8])], [tensor("y", [2, 4, 4, 4])], inits)
    model, _, pm = run_pass(proto, "fuse-conv-bn")

    assert modified(pm)
    assert op_types(model) == ["Conv"]
    g = model.to_proto().graph
    assert len(g.node[0].input) == 3 and list(g.output)[0].name == "y" and g.node[0].output[0] == "y"
    assert attrs_of(model, "Conv") == {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    inits_after = initializers(model)
    assert len(inits_after) == 2  # the fused weight and bias; BN params and the old weight are gone
    w_new, b_new = inits_after[g.node[0].input[1]], inits_after[g.node[0].input[2]]
    assert w_new.shape == (4, 3, 3, 3) and b_new.shape == (4,)
    assert w_new.dtype == np.float32 and b_new.dtype == np.float32
    assert_same_outputs(proto, model, {"x": rand([2, 3, 8, 8], seed=3)}, **TOL)


def test_depthwise_1d_conv_bn_fused() -> None:
    """Grouped (depthwise) 1-D Conv: the per-output-channel scale still lines up with weight axis 0."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=3, pads=[1, 1]),
             _bn("c", "bn_out"),
             helper.make_node("Relu", ["bn_out"], ["y"], name="relu")]
    proto = make_model(nodes, [tensor("x", [1, 3, 10])], [tensor("y", [1, 3, 10])],
                       [init("w", rand([3, 1, 3], seed=4))] + _bn_inits("", 3, seed=20))
    model, _, pm = run_pass(proto, "fuse-conv-bn")
    assert modified(pm)
    assert op_types(model) == ["Conv", "Relu"]
    assert attrs_of(model, "Conv")["group"] == 3
    assert_same_outputs(proto, model, {"x": rand([1, 3, 10], seed=5)}, **TOL)


def test_shared_weight_two_fusions_each_correct() -> None:
    """Two Convs share one weight but have different BNs: each gets its own fused weight."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), _bn("c1", "y1", "a_", name="bn1"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), _bn("c2", "y2", "b_", name="bn2")]
    proto = make_model(nodes, [tensor("x", [1, 2, 5, 5])], [tensor("y1", [1, 3, 5, 5]), tensor("y2", [1, 3, 5, 5])],
                       [init("w", rand([3, 2, 1, 1], seed=6))] + _bn_inits("a_", 3, 30) + _bn_inits("b_", 3, 40))
    model, _, pm = run_pass(proto, "fuse-conv-bn")
    assert modified(pm)
    assert op_types(model) == ["Conv", "Conv"]
    g = model.to_proto().graph
    assert g.node[0].input[1] != g.node[1].input[1]
    assert_same_outputs(proto, model, {"x": rand([1, 2, 5, 5], seed=7)}, **TOL)


def test_conv_output_with_second_reader_not_fused() -> None:
    """The pre-BN value is still needed by the Add, so folding BN into the Conv would change it."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             _bn("c", "n"),
             helper.make_node("Add", ["c", "n"], ["y"], name="add")]
    proto = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 2, 4, 4])],
                       [init("w", rand([2, 2, 1, 1], seed=8))] + _bn_inits("", 2, seed=50))
    model, _, pm = run_pass(proto, "fuse-conv-bn")
    assert not modified(pm)
    assert op_types(model) == ["Conv", "BatchNormalization", "Add"]


def test_conv_output_is_graph_output_not_fused() -> None:
    """A graph output is a reader too."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y")]
    proto = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("c", [1, 2, 4, 4]), tensor("y", [1, 2, 4, 4])],
                       [init("w", rand([2, 2, 1, 1], seed=9))] + _bn_inits("", 2, seed=60))
    model, _, pm = run_pass(proto, "fuse-conv-bn")
    assert not modified(pm)
    assert op_types(model) == ["Conv", "BatchNormalization"]


def test_runtime_bn_parameters_not_fused() -> None:
    """BN statistics fed at run time cannot be folded into constant weights."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y")]
    inits = [init("w", rand([2, 2, 1, 1], seed=10))] + [t for t in _bn_inits("", 2, seed=70) if t.name != "mean"]
    proto = make_model(nodes, [tensor("x", [1, 2, 4, 4]), tensor("mean", [2])], [tensor("y", [1, 2, 4, 4])], inits)
    model, _, pm = run_pass(proto, "fuse-conv-bn")
    assert not modified(pm)
    assert op_types(model) == ["Conv", "BatchNormalization"]
