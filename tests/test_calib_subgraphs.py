"""Calibration reaches into If and Loop bodies: their float values are observed (through
extra outputs of a calibration copy of the model), get exact min/max ranges, and the ops there
are lowered like main-graph ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qcompiler

RNG = np.random.default_rng(0)
W1 = (RNG.standard_normal((16, 16)) * 0.3).astype(np.float32)
W2 = (RNG.standard_normal((16, 16)) * 0.3).astype(np.float32)


def _if_model() -> onnx.ModelProto:
    then_g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["t1"], name="then_mm"),
                           h.make_node("Relu", ["t1"], ["t_out"], name="then_relu")],
                          "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, [4, 16])])
    else_g = h.make_graph([h.make_node("MatMul", ["x", "W2"], ["e1"], name="else_mm"),
                           h.make_node("Tanh", ["e1"], ["e_out"], name="else_tanh")],
                          "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, [4, 16])])
    g = h.make_graph([h.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)], "g",
                     [h.make_tensor_value_info("cond", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 16])], [nh.from_array(W1, "W1"), nh.from_array(W2, "W2")])
    m = h.make_model(g, ir_version=8, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _loop_model(grow: bool = False) -> onnx.ModelProto:
    """s <- tanh(s @ W1), 3 times; with ``grow`` the body also builds a tensor whose length
    changes every iteration (a value that cannot be stacked over iterations)."""
    body_nodes = [h.make_node("Identity", ["c_in"], ["c_out"], name="keep_going"),
                  h.make_node("MatMul", ["s", "W1"], ["lt"], name="loop_mm"),
                  h.make_node("Tanh", ["lt"], ["s_next"], name="loop_tanh")]
    if grow:
        body_nodes += [h.make_node("Cast", ["i"], ["i_f"], name="i_float", to=T.FLOAT),
                       h.make_node("Reshape", ["i_f", "one"], ["i_1"], name="i_vec"),
                       h.make_node("Concat", ["s_flat_first", "i_1"], ["grown"], name="grow", axis=0),
                       h.make_node("Reshape", ["i", "one"], ["i_v"], name="i_as_vec"),
                       h.make_node("Add", ["i_v", "one"], ["i_plus"], name="i_plus_one"),
                       h.make_node("Slice", ["grown", "zero", "i_plus"], ["varlen"], name="varlen_slice"),
                       h.make_node("ReduceSum", ["varlen"], ["vsum"], name="vsum", keepdims=1)]
    body = h.make_graph(body_nodes, "body",
                        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("c_in", T.BOOL, []),
                         h.make_tensor_value_info("s", T.FLOAT, [4, 16])],
                        [h.make_tensor_value_info("c_out", T.BOOL, []), h.make_tensor_value_info("s_next", T.FLOAT, [4, 16])]
                        + ([h.make_tensor_value_info("vsum", T.FLOAT, [1])] if grow else []))
    inits = [nh.from_array(W1, "W1"), nh.from_array(np.array(3, np.int64), "trips"), nh.from_array(np.array(True), "go")]
    if grow:
        inits += [nh.from_array(np.array([1], np.int64), "one"), nh.from_array(np.array([0], np.int64), "zero"),
                  nh.from_array(np.arange(16, dtype=np.float32), "s_flat_first")]
    outs = ["y"] + (["stack"] if grow else [])
    g = h.make_graph([h.make_node("Loop", ["trips", "go", "x"], outs, name="loop", body=body)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 16])]
                     + ([h.make_tensor_value_info("stack", T.FLOAT, [3, 1])] if grow else []), inits)
    m = h.make_model(g, ir_version=8, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _ranges(proto, feeds, tmp_path: Path, **kw) -> tuple[dict, qcompiler.CompileResult]:
    path = tmp_path / "ranges.json"
    r = qcompiler.compile(proto, target="ort-cpu", calibration=feeds, export_ranges=path,
                          calibration_options=qcompiler.CalibrationOptions(method="minmax", **kw))
    return {k: (v["min"], v["max"]) for k, v in json.loads(path.read_text())["ranges"].items()}, r


def _run(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_if_branches_calibrated_on_the_samples_that_take_them(tmp_path: Path) -> None:
    m = _if_model()
    feeds = [{"cond": np.array(i % 3 == 0), "x": RNG.standard_normal((4, 16)).astype(np.float32)} for i in range(9)]
    ranges, r = _ranges(m, feeds, tmp_path)
    assert r.report["calibration"]["subgraph_values"] == 4  # t1, t_out, e1, e_out
    t1 = [f["x"] @ W1 for f in feeds if f["cond"]]
    e1 = [f["x"] @ W2 for f in feeds if not f["cond"]]
    np.testing.assert_allclose(ranges["t1"], (min(a.min() for a in t1), max(a.max() for a in t1)), rtol=1e-5)
    np.testing.assert_allclose(ranges["e1"], (min(a.min() for a in e1), max(a.max() for a in e1)), rtol=1e-5)
    branches = {a.name: [n.op_type for n in a.g.node] for n in r.proto.graph.node if n.op_type == "If" for a in n.attribute}
    assert "QLinearMatMul" in branches["then_branch"] and "QLinearMatMul" in branches["else_branch"]
    for f in feeds[:2]:  # both branches, inputs inside the calibrated ranges
        ref, got = _run(m, f), _run(r.proto, f)
        assert np.abs(got - ref).max() <= 0.08 * np.abs(ref).max()  # a few 8-bit steps of x, t1/e1 and y


def test_loop_body_ranges_cover_every_iteration(tmp_path: Path) -> None:
    m = _loop_model()
    feeds = [{"x": RNG.standard_normal((4, 16)).astype(np.float32)} for _ in range(5)]
    ranges, r = _ranges(m, feeds, tmp_path)
    assert r.report["calibration"]["subgraph_values"] == 3  # s (carried), lt and s_next
    seen = []
    for f in feeds:
        s = f["x"]
        for _ in range(3):
            seen.append(s @ W1)
            s = np.tanh(seen[-1])
    np.testing.assert_allclose(ranges["lt"], (min(a.min() for a in seen), max(a.max() for a in seen)), rtol=1e-5)
    body = next(a.g for n in r.proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    assert "QLinearMatMul" in [n.op_type for n in body.node]
    ref, got = _run(m, feeds[0]), _run(r.proto, feeds[0])
    assert np.abs(got - ref).max() <= 0.08 * np.abs(ref).max()


def test_loop_value_that_cannot_be_stacked_is_left_out(tmp_path: Path) -> None:
    """A body value whose length changes per iteration cannot become a scan output: observing
    every float tensor, the instrumented run fails, Loop observation is dropped, the compile
    still succeeds and the loop's ops stay float (with a reason). Observing only what the
    target quantizes (the default), that value (read by float Slice/ReduceSum) is not asked
    for, and the loop's MatMul is calibrated and lowered."""
    m = _loop_model(grow=True)
    feeds = [{"x": RNG.standard_normal((4, 16)).astype(np.float32)} for _ in range(3)]
    r = qcompiler.compile(m, target="ort-cpu", calibration=feeds,
                          calibration_options=qcompiler.CalibrationOptions(method="minmax", observe="all"))
    assert r.report["calibration"]["subgraph_values"] == 0
    assert "loop_mm" in r.report["float_nodes"]
    np.testing.assert_allclose(_run(r.proto, feeds[0]), _run(m, feeds[0]), rtol=1e-5, atol=1e-6)
    r = qcompiler.compile(m, target="ort-cpu", calibration=feeds,
                          calibration_options=qcompiler.CalibrationOptions(method="minmax"))
    # s, lt, s_next, and the grown Concat's float input (ort-cpu's QLinearConcat quantizes every
    # input); not varlen (the Slice shares grown's qparams)
    assert r.report["calibration"]["subgraph_values"] == 4
    assert "loop_mm" not in r.report["float_nodes"]
    body = next(a.g for n in r.proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    assert "QLinearMatMul" in [n.op_type for n in body.node]
    ref, got = _run(m, feeds[0]), _run(r.proto, feeds[0])
    assert np.abs(got - ref).max() <= 0.08 * np.abs(ref).max()
