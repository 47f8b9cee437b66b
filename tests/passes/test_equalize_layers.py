"""equalize-layers: cross-layer equalization (exact in float) and bias absorption, for targets
with one weight scale per tensor. Float outputs are compared with onnxruntime (graph
optimizations off) at rtol 1e-5 and an absolute tolerance of 1e-5 x the output's magnitude.

CPU fact pinned: the quantized comparison compiles for npu-int8 (QDQ format) and runs with
ORT_DISABLE_ALL (DequantizeLinear -> float Conv), identical with and without VNNI."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import qcompiler
from _util import init, initializers, make_model, op_types, rand, run_ort, tensor

C_IN, C, C_OUT, HW = 3, 8, 6, 10


def _imbalanced(shape: list[int], seed: int) -> np.ndarray:
    """Weights whose output channels differ up to 100x in range (as after folding a BN)."""
    w = rand(shape, seed)
    return (w * np.geomspace(0.01, 1.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


def _model(act: str | None, depthwise: bool = False, b1: np.ndarray | None = None):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [init("w1", _imbalanced([C, C_IN, 3, 3], 1)), init("b1", rand([C], 2, 0.0, 0.5) if b1 is None else b1)]
    mid = "c1"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["a"], name="act"))
        mid = "a"
    elif act == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="act"))
        inits += [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
        mid = "a"
    elif act == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["c1"], ["a"], name="act"))
        mid = "a"
    if depthwise:
        nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2", group=C, pads=[1, 1, 1, 1]))
        inits += [init("w2", rand([C, 1, 3, 3], 3)), init("b2", rand([C], 4))]
        out = [1, C, HW, HW]
    else:
        nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2"))
        inits += [init("w2", rand([C_OUT, C, 1, 1], 3)), init("b2", rand([C_OUT], 4))]
        out = [1, C_OUT, HW, HW]
    return make_model(nodes, [tensor("x", [1, C_IN, HW, HW])], [tensor("y", out)], inits)


def _run(proto, target: str = "npu-int8", calib=None, **options: str):
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=qcompiler.load_target(target), calibration=calib)
    spec = qcompiler.PassSpec("equalize-layers", tuple(options.items()))
    pm = qcompiler.PassManager([qcompiler.default_registry().instantiate(spec)])
    pm.run(model, ctx)
    return model, ctx.report["equalize_layers"], bool(pm.records[-1]["modified"])


def _close(proto, model, rtol: float = 1e-5) -> None:
    feed = {"x": rand([1, C_IN, HW, HW], 9)}
    want, got = run_ort(proto, feed)[0], run_ort(model, feed)[0]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


@pytest.mark.parametrize("act,depthwise", [(None, False), ("Relu", False), ("Relu", True), (None, True)])
def test_equalized_and_exact(act: str | None, depthwise: bool) -> None:
    """Both weights end with equal per-channel ranges; the float output is unchanged."""
    proto = _model(act, depthwise)
    model, report, changed = _run(proto)
    assert changed and report["pairs"] == 1 and report["skipped"] == []
    assert report["spread_after"] < report["spread_before"]
    g, inits = model.to_proto().graph, initializers(model)
    w1 = inits[next(n for n in g.node if n.name == "conv1").input[1]]
    w2 = inits[next(n for n in g.node if n.name == "conv2").input[1]]
    r1 = np.abs(w1).max(axis=(1, 2, 3))
    r2 = np.abs(w2).max(axis=(1, 2, 3)) if depthwise else np.abs(w2).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-4)
    _close(proto, model)


@pytest.mark.parametrize("act,why", [("Clip", "per-channel bound"), ("HardSwish", "not positively homogeneous")])
def test_clip_and_hardswish_skipped_and_reported(act: str, why: str) -> None:
    proto = _model(act)
    model, report, changed = _run(proto)
    assert not changed and report["pairs"] == 0
    (skip,) = report["skipped"]
    assert skip["first"] == "conv1" and skip["second"] == "conv2" and why in skip["reason"]
    _close(proto, model, rtol=0)


def test_per_channel_target_untouched() -> None:
    """ort-cpu quantizes weights per channel: nothing to equalize, unless asked."""
    _, report, changed = _run(_model("Relu"), target="ort-cpu")
    assert not changed and report["pairs"] == 0
    _, _, changed = _run(_model("Relu"), target="ort-cpu", **{"only-per-tensor": "false"})
    assert changed


def _calib(n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": rand([1, C_IN, HW, HW], 50 + i)} for i in range(n)]


def test_bias_absorption() -> None:
    """Conv1's bias shrinks by c = max(0, mean - 3 std) per channel and Conv2's bias takes
    W2 c; Conv2 is 1x1 without padding, so the output is exact wherever Conv1's output >= c
    (every pixel of the channels with a large positive bias here): within 1e-5 relative."""
    proto = _model("Relu", b1=np.array([8, 0, 6, 0, 5, 0, 7, 0], np.float32))
    plain, _, _ = _run(proto)
    model, report, _ = _run(proto, calib=_calib(), **{"absorb-bias": "true"})
    assert report["absorbed_channels"] == 4
    b1_plain = initializers(plain)[next(n for n in plain.to_proto().graph.node if n.name == "conv1").input[2]]
    g = model.to_proto().graph
    b1 = initializers(model)[next(n for n in g.node if n.name == "conv1").input[2]]
    assert (b1 <= b1_plain + 1e-7).all() and (b1 < b1_plain).any()
    _close(proto, model)


def test_absorb_bias_needs_data() -> None:
    with pytest.raises(qcompiler.UserError, match="calibration data"):
        _run(_model("Relu"), **{"absorb-bias": "true"})


def _quant_error(proto, equalize: bool) -> float:
    text = qcompiler.load_target("npu-int8").pipeline("static")
    if equalize:
        text = text.replace("fuse-pad-conv,", "fuse-pad-conv,equalize-layers,")
    assert ("equalize-layers" in text) == equalize
    result = qcompiler.compile(proto, target="npu-int8", calibration=_calib(16), pipeline=text)
    assert op_types(result.model).count("Conv") == 2
    err = 0.0
    for seed in range(4):
        feed = {"x": rand([1, C_IN, HW, HW], 200 + seed)}
        want, got = run_ort(proto, feed)[0], run_ort(result.model, feed)[0]
        err += float(np.square(want - got).sum() / np.square(want).sum())
    return err / 4


def test_per_tensor_quantization_error_drops() -> None:
    """npu-int8 (per-tensor power-of-two weight scales): Conv1's 100x channel imbalance costs
    the small channels their resolution; after equalization the output error at least halves."""
    proto = _model("Relu")
    plain, equalized = _quant_error(proto, False), _quant_error(proto, True)
    assert equalized < 0.5 * plain, (plain, equalized)


def test_clip_as_relu_option() -> None:
    """clip=relu: the Clip(0, 6) becomes a Relu and the pair is equalized; the float output is
    unchanged where no pre-activation reaches 6 (inputs scaled down here), and differs where
    one does (the documented inexactness)."""
    proto = _model("Clip")
    model, report, changed = _run(proto, clip="relu")
    assert changed and report["pairs"] == 1 and report["clips_made_relu"] == 1 and report["skipped"] == []
    assert "Clip" not in op_types(model) and "Relu" in op_types(model)
    small = {"x": rand([1, C_IN, HW, HW], 9) * 0.1}
    want, got = run_ort(proto, small)[0], run_ort(model, small)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    large = {"x": rand([1, C_IN, HW, HW], 9) * 50}
    assert not np.allclose(run_ort(proto, large)[0], run_ort(model, large)[0], rtol=1e-3)
    with pytest.raises(qcompiler.UserError, match="clip"):
        _run(proto, clip="maybe")


def test_chain_of_three_stays_exact() -> None:
    """conv1 -> Relu -> conv2 -> Relu -> conv3: conv2 is the second of one pair and the first
    of the next; sweeping both pairs keeps the float output (and equalizes each pair)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["a2"], name="act2"),
             helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3")]
    inits = [init("w1", _imbalanced([C, C_IN, 3, 3], 1)), init("b1", rand([C], 2)),
             init("w2", _imbalanced([C, 1, 3, 3], 3)), init("b2", rand([C], 4)),
             init("w3", rand([C_OUT, C, 1, 1], 5))]
    proto = make_model(nodes, [tensor("x", [1, C_IN, HW, HW])], [tensor("y", [1, C_OUT, HW, HW])], inits)
    model, report, changed = _run(proto, iterations="8")
    assert changed and report["pairs"] == 2 and report["spread_after"] < report["spread_before"]
    _close(proto, model)


def test_clip_data_exact_on_calibration() -> None:
    """clip=data keeps Clip(0, 6) and bounds each scale by the calibration maxima: the float
    output is unchanged on the calibration samples (and on inputs within their range), the
    channels whose pre-activation reaches 6 keep their weights, others are equalized."""
    b1 = np.array([9, 0, 0, 0, 0, 0, 0, 9], np.float32)  # channels 0 and 7 saturate at 6
    proto = _model("Clip", b1=b1)
    calib = _calib()
    model, report, changed = _run(proto, calib=calib, clip="data")
    assert changed and report["pairs"] == 1 and report["skipped"] == [] and "Clip" in op_types(model)
    g, inits = model.to_proto().graph, initializers(model)
    w1 = inits[next(n for n in g.node if n.name == "conv1").input[1]]
    w1_orig = _imbalanced([C, C_IN, 3, 3], 1)
    np.testing.assert_array_equal(w1[[0, 7]], w1_orig[[0, 7]])
    assert not np.allclose(w1[1:7], w1_orig[1:7], rtol=1e-3)
    assert report["spread_after"] < report["spread_before"]
    for feed in calib[:3]:
        want, got = run_ort(proto, feed)[0], run_ort(model, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    with pytest.raises(qcompiler.UserError, match="calibration data"):
        _run(proto, clip="data")
