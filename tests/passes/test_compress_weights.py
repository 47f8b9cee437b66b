"""compress-weights: a float op's large float weight becomes int8 + DequantizeLinear (per output
channel), the op still computes in float, and its output (run in onnxruntime) moves by no more than the
weight rounding allows."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort

from _util import init, make_model, modified, op_types, rand, run_pass, tensor
from onnx import helper


def _convtranspose(cin: int = 16, cout: int = 8, k: int = 3) -> onnx.ModelProto:
    w = rand([cin, cout, k, k], seed=3) * np.linspace(0.1, 2.0, cout, dtype=np.float32).reshape(1, -1, 1, 1)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])]
    return make_model(nodes, [tensor("x", [1, cin, 5, 5])], [tensor("y", [1, cout, 2 * 5 + k - 2, 2 * 5 + k - 2])], [init("w", w)])


def test_convtranspose_weight_stored_int8_per_output_channel() -> None:
    proto = _convtranspose()
    model, _, pm = run_pass(proto, "compress-weights", [("min-elements", "64")])
    assert modified(pm)
    assert op_types(model) == ["DequantizeLinear", "ConvTranspose"]
    out = model.to_proto()
    dq = out.graph.node[0]
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    q = inits[dq.input[0]]
    scale = inits[dq.input[1]]
    assert q.dtype == np.int8 and q.shape == (16, 8, 3, 3) and scale.shape == (8,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    x = {"x": rand([1, 16, 5, 5], seed=4)}
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    ref, got = run(proto), run(out)
    # each weight moves by at most half a step (scale/2 per channel): bound the output change
    # by sum |x| * scale/2 over the receptive field, a loose but sound limit
    bound = np.abs(x["x"]).sum() * scale.max() / 2
    assert np.abs(got - ref).max() <= bound
    assert np.abs(got - ref).max() > 0  # it really was rounded
    w = numpy_helper.to_array(proto.graph.initializer[0])
    rel = np.abs(q.astype(np.float32) * scale.reshape(1, -1, 1, 1) - w).max(axis=(0, 2, 3)) / np.abs(w).max(axis=(0, 2, 3))
    assert rel.max() <= 0.5 / 127 + 1e-6  # half a step of a per-channel symmetric 8-bit scale


def test_small_and_shared_weights_left_alone() -> None:
    model, _, pm = run_pass(_convtranspose(), "compress-weights")  # 1152 elements >= 1024: compressed
    assert modified(pm)
    small, _, pm = run_pass(_convtranspose(4, 2, 2), "compress-weights")  # 32 elements
    assert not modified(pm)
    w = rand([8, 8], seed=1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="m2")]
    shared = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])], [init("w", w)])
    _, _, pm = run_pass(shared, "compress-weights", [("min-elements", "1")])
    assert not modified(pm)


def test_old_opset_untouched() -> None:
    proto = _convtranspose()
    proto.opset_import[0].version = 12
    _, _, pm = run_pass(proto, "compress-weights", [("min-elements", "64")])
    assert not modified(pm)


def test_plan_override_keeps_float_weights() -> None:
    """A node a plan override keeps float (the accuracy budget's moves) keeps its float weight."""
    import qcompiler

    model = qcompiler.load_model(_convtranspose())
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"))
    ctx.analysis["plan_overrides"] = {"up": ("float", "accuracy budget")}
    p = qcompiler.default_registry().instantiate(qcompiler.PassSpec("compress-weights", (("min-elements", "64"),)))
    pm = qcompiler.PassManager([p])
    pm.run(model, ctx)
    assert not modified(pm) and op_types(model) == ["ConvTranspose"]
