"""group-activations: records (never rewrites) op+activation pairs the target runs as one kernel,
so insert-qdq puts no Q/DQ between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

import qcompiler
from _util import init, make_model, modified, rand, run_pass, tensor


def _model() -> onnx.ModelProto:
    """Five heads: Conv->Relu, Conv->Clip(const), Conv->{Relu, Add}, Conv->Clip(run-time max),
    Conv->Sigmoid (not a fused activation on ort-cpu)."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv_relu"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w"], ["c2"], name="conv_clip"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="clip2"),
        helper.make_node("Conv", ["a2", "w"], ["c3"], name="conv_shared"),
        helper.make_node("Relu", ["c3"], ["a3"], name="relu3"),
        helper.make_node("Add", ["c3", "a3"], ["s3"], name="add3"),
        helper.make_node("Conv", ["s3", "w"], ["c4"], name="conv_rt_clip"),
        helper.make_node("Clip", ["c4", "lo", "hi_rt"], ["a4"], name="clip4"),
        helper.make_node("Conv", ["a4", "w"], ["c5"], name="conv_sigmoid"),
        helper.make_node("Sigmoid", ["c5"], ["y"], name="sig5"),
    ]
    return make_model(nodes, [tensor("x", [1, 2, 4, 4]), tensor("hi_rt", [])], [tensor("y", [1, 2, 4, 4])],
                      [init("w", rand([2, 2, 1, 1], seed=1)), init("lo", np.array(0.0, np.float32)),
                       init("hi", np.array(6.0, np.float32))])


def test_groups_recorded_and_graph_unchanged() -> None:
    """Exactly Conv->Relu and Conv->Clip(const) are grouped; the shared head, the run-time Clip
    and the Sigmoid are not; the graph text is byte-identical and modified is False."""
    proto = _model()
    before = qcompiler.load_model(proto).graph.to_text()
    model, ctx, pm = run_pass(proto, "group-activations")
    assert ctx.analysis["groups"] == {"conv_relu": "relu1", "conv_clip": "clip2"}
    assert ctx.report["fused_groups"] == 2
    assert not modified(pm)
    assert model.graph.to_text() == before


def test_add_relu_grouped() -> None:
    """ort-cpu also fuses Add+Relu (QLinearAdd with a clamped output range)."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Neg", ["r"], ["y"], name="neg")]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("b", rand([3], seed=2))])
    _, ctx, pm = run_pass(proto, "group-activations")
    assert ctx.analysis["groups"] == {"add": "relu"}
    assert not modified(pm)


def test_activation_that_is_graph_output_not_grouped() -> None:
    """The group's output would be a float graph output: the head's own output is quantized instead."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    proto = make_model(nodes, [tensor("x", [3])], [tensor("y", [3])], [init("b", rand([3], seed=2))])
    _, ctx, _ = run_pass(proto, "group-activations")
    assert ctx.analysis["groups"] == {}


def test_head_output_that_is_graph_output_not_grouped() -> None:
    """The Conv's own output is public, so it must be quantized separately."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    proto = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("c", [1, 2, 4, 4]), tensor("y", [1, 2, 4, 4])],
                       [init("w", rand([2, 2, 1, 1], seed=3))])
    _, ctx, _ = run_pass(proto, "group-activations")
    assert ctx.analysis["groups"] == {}
    assert ctx.report["fused_groups"] == 0


def test_fused_patterns_come_from_the_target(tmp_path: Path) -> None:
    """A target whose only fused pattern is Conv+Relu does not group Conv+Clip."""
    path = tmp_path / "relu_only.toml"
    path.write_text('schema = 1\nname = "relu-only"\ndescription = "Conv+Relu only"\nextends = "ort-cpu"\n'
                    '\n[[fused]]\nops = ["Conv", "Relu"]\n')
    _, ctx, pm = run_pass(_model(), "group-activations", target=path)
    assert ctx.analysis["groups"] == {"conv_relu": "relu1"}
    assert not modified(pm)
