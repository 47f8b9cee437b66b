"""upgrade-opset: an old model is converted once, up front, to the opset later passes emit for
(per-channel DequantizeLinear needs 13); models already new enough are left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import qcompiler

from _util import (assert_same_outputs, init, make_model, modified, op_types, rand, run_ort, run_pass,
                   tensor)


def _model(opset: int) -> onnx.ModelProto:
    """Conv -> Clip(min, max inputs) -> Reshape -> Unsqueeze(axes attribute up to opset 12)."""
    unsqueeze = (helper.make_node("Unsqueeze", ["r"], ["y"], name="unsq", axes=[0]) if opset < 13
                 else helper.make_node("Unsqueeze", ["r", "axes"], ["y"], name="unsq"))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="clip"),
        helper.make_node("Reshape", ["k", "shp"], ["r"], name="reshape"),
        unsqueeze,
    ]
    inits = [init("w", rand([3, 2, 3, 3], seed=1)), init("b", rand([3], seed=2)),
             init("lo", np.array(-0.25, np.float32)), init("hi", np.array(0.5, np.float32)),
             init("shp", np.array([1, -1], np.int64))]
    if opset >= 13:
        inits.append(init("axes", np.array([0], np.int64)))
    return make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 1, 48])], inits, opset=opset)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_opset12_model_becomes_opset13() -> None:
    """Converted to min-version 13; Unsqueeze's axes moves from attribute to input."""
    proto = _model(12)
    model, _, pm = run_pass(proto, "upgrade-opset", (("min-version", "13"),))
    assert modified(pm)
    out = model.to_proto()
    assert _default_opset(out) == 13
    assert model.opset("") == 13
    onnx.checker.check_model(out)
    assert [op for op in op_types(out) if op != "Constant"] == ["Conv", "Clip", "Reshape", "Unsqueeze"]
    unsq = next(n for n in out.graph.node if n.op_type == "Unsqueeze")
    assert [a.name for a in unsq.attribute] == []
    assert len(unsq.input) == 2
    # the axes input is now a tensor [0] (a Constant node or an initializer, either is fine)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in out.graph.node if n.op_type == "Constant"}
    consts.update({t.name: numpy_helper.to_array(t) for t in out.graph.initializer})
    np.testing.assert_array_equal(consts[unsq.input[1]], [0])
    clip = next(n for n in out.graph.node if n.op_type == "Clip")
    assert list(clip.input) == ["c", "lo", "hi"]
    x = rand([1, 2, 4, 4], seed=3)
    assert_same_outputs(proto, model, {"x": x}, exact=True)
    # the clip bounds really bind (the test would not notice a dropped Clip otherwise)
    y = run_ort(out, {"x": x})[0]
    assert y.min() == np.float32(-0.25) and y.max() == np.float32(0.5)


def test_opset17_model_untouched() -> None:
    """Already above the minimum: no conversion, modified=False, identical text."""
    proto = _model(17)
    model, _, pm = run_pass(proto, "upgrade-opset")
    assert not modified(pm)
    assert model.opset("") == 17
    assert _default_opset(model.to_proto()) == 17
    assert model.graph.to_text() == qcompiler.load_model(proto).graph.to_text()


def test_min_version_option() -> None:
    """min-version=15 raises an opset-14 model to 15; the default (target minimum 14) would not."""
    proto = _model(14)
    model, _, pm = run_pass(proto, "upgrade-opset")
    assert not modified(pm)
    model, _, pm = run_pass(proto, "upgrade-opset", (("min-version", "15"),))
    assert modified(pm)
    assert model.opset("") == 15 and _default_opset(model.to_proto()) == 15
    assert_same_outputs(proto, model, {"x": rand([1, 2, 4, 4], seed=4)}, exact=True)


def test_target_min_opset_used_by_default(tmp_path: Path) -> None:
    """With min-version unset, the target's defaults.min_opset decides (here 16)."""
    toml = tmp_path / "newer.toml"
    toml.write_text('schema = 1\nname = "newer"\ndescription = "min opset 16"\nextends = "ort-cpu"\n'
                    "[defaults]\nmin_opset = 16\n")
    model, _, pm = run_pass(_model(13), "upgrade-opset", target=toml)
    assert modified(pm)
    assert model.opset("") == 16
