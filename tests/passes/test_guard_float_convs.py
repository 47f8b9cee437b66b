"""guard-float-convs: a float Conv/Gemm reading a per-tensor DequantizeLinear gets a per-axis copy
of it, so onnxruntime's optimizer (what a user runs) does not quantize its float weight.

CPU facts pinned: onnxruntime's WeightBiasQuantization transformer is a graph rewrite (no ISA
choice): on every CPU it turns the unguarded float weight into a per-tensor int8 one, and the
guarded model runs float Conv/Gemm kernels only, so both verdicts hold on VNNI and AVX2 hosts.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from _util import init, make_model, modified, op_types, rand, run_ort, run_pass, tensor


def _weights(shape: list[int], seed: int) -> np.ndarray:
    # output channels 10^-3 .. 1 apart: a per-tensor int8 grid rounds the small ones to a few steps
    w = rand(shape, seed=seed)
    return (w * np.logspace(-3, 0, shape[0], dtype=np.float32).reshape([-1] + [1] * (len(shape) - 1))).astype(
        np.float32)


def _model(op: str = "Conv", *, extra_reader: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x -> Q -> DQ (per-tensor uint8) -> float Conv(8->4, 3x3) or Gemm(16->5, transB) -> yc -> Q -> DQ -> y:
    a float layer between integer ones (onnxruntime 1.32 quantizes the weight only when the output
    goes to a QuantizeLinear); ``yc``, the float layer's own output, is a graph output too."""
    if op == "Conv":
        x_shape, y_shape, w = [1, 8, 6, 6], [1, 4, 4, 4], _weights([4, 8, 3, 3], 1)
        node = helper.make_node("Conv", ["xd", "w", "b"], ["yc"], name="conv")
        b = rand([4], seed=2)
    else:
        x_shape, y_shape, w = [2, 16], [2, 5], _weights([5, 16], 1)
        node = helper.make_node("Gemm", ["xd", "w", "b"], ["yc"], name="gemm", transB=1)
        b = rand([5], seed=2)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"), node,
             helper.make_node("QuantizeLinear", ["yc", "s", "z"], ["yq"], name="q2"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq2")]
    outputs = [tensor("y", y_shape), tensor("yc", y_shape)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["xd"], ["r"], name="relu"))
        outputs.append(tensor("r", x_shape))
    inits = [init("s", np.array(0.02, np.float32)), init("z", np.array(128, np.uint8)), init("w", w), init("b", b)]
    return make_model(nodes, [tensor("x", x_shape)], outputs, inits, opset=opset)


def _optimized(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime as a user runs it: every graph optimization on."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _worst_channel_error(got: np.ndarray, want: np.ndarray) -> float:
    """The largest error of an output channel (axis 1) relative to that channel's largest value."""
    axes = tuple(i for i in range(want.ndim) if i != 1)
    return float((np.abs(got - want).max(axis=axes) / np.abs(want).max(axis=axes)).max())


def _feeds(op: str) -> dict[str, np.ndarray]:
    return {"x": rand([1, 8, 6, 6] if op == "Conv" else [2, 16], seed=3, low=-2.0, high=2.0)}


def test_float_conv_and_gemm_stay_float_under_onnxruntime() -> None:
    """Unguarded, the optimized session differs from the graph as written (its weight went per-tensor
    int8); guarded, it computes the float op on the dequantized input, as written."""
    for op in ("Conv", "Gemm"):
        proto, feeds = _model(op), _feeds(op)
        want = run_ort(proto, feeds)[1]  # graph optimizations off: the float op as written
        rel = _worst_channel_error(_optimized(proto, feeds)[1], want)
        assert rel > 1e-3, f"{op}: onnxruntime no longer quantizes the float weight ({rel:.2g}); is the pass needed?"
        model, _, pm = run_pass(proto, "guard-float-convs")
        assert modified(pm)
        out = model.to_proto()
        assert op_types(out) == ["QuantizeLinear", "DequantizeLinear", op, "QuantizeLinear", "DequantizeLinear"]
        dq = out.graph.node[1]
        assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
        assert inits[dq.input[1]].shape == (8 if op == "Conv" else 16,)
        np.testing.assert_allclose(_optimized(out, feeds)[1], want, rtol=1e-5, atol=1e-5)


def test_other_readers_keep_the_per_tensor_dequantize() -> None:
    """A DequantizeLinear also read by another node stays for it; the Conv gets its own."""
    proto = _model("Conv", extra_reader=True)
    model, _, pm = run_pass(proto, "guard-float-convs")
    assert modified(pm)
    out = model.to_proto()
    assert op_types(out).count("DequantizeLinear") == 3 and len(out.graph.node) == 7
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert relu.input[0] == "xd"
    want = run_ort(proto, _feeds("Conv"))
    got = _optimized(out, _feeds("Conv"))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)  # yc: the float Conv
    np.testing.assert_array_equal(got[2], want[2])  # r: Relu of the per-tensor DequantizeLinear


def test_integer_weight_or_old_opset_is_left_alone() -> None:
    """A Conv whose input is not a DequantizeLinear output, and any model below opset 13 (no axis
    on DequantizeLinear), are unchanged."""
    _, _, pm = run_pass(_model("Conv", opset=12), "guard-float-convs")
    assert not modified(pm)
    plain = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [tensor("x", [1, 8, 6, 6])],
                       [tensor("y", [1, 4, 4, 4])], [init("w", _weights([4, 8, 3, 3], 1))])
    _, _, pm = run_pass(plain, "guard-float-convs")
    assert not modified(pm)
