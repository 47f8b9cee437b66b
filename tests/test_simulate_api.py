"""qcompiler.simulate / `qcompiler simulate`: QDQ groups run as integer kernels, fidelity against
the float model, the target's arithmetic, the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.cli import main
from qcompiler.sim import Arithmetic, integer_groups, simulate

RNG_SEED = 21


def _c(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v), name)


def _vi(name: str, t: int, shape=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, shape)


def _weights():
    rng = np.random.default_rng(RNG_SEED)
    wq = rng.integers(-64, 65, (6, 4, 3, 3)).astype(np.int8)
    ws = (rng.random(6) * 0.01 + 0.005).astype(np.float32)
    bq = rng.integers(-500, 500, 6).astype(np.int32)
    return wq, ws, bq


X_S, X_Z, Y_S, Y_Z = np.float32(0.03), np.uint8(128), np.float32(0.05), np.uint8(0)


def float_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> r -> Identity -> y, the float weights being exactly the dequantized integer ones."""
    wq, ws, bq = _weights()
    w = (wq.astype(np.float32) * ws[:, None, None, None]).astype(np.float32)
    b = (bq.astype(np.float32) * (X_S * ws)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["y"], name="out")]
    g = helper.make_graph(nodes, "f", [_vi("x", TensorProto.FLOAT, [1, 4, 7, 7])],
                          [_vi("y", TensorProto.FLOAT, [1, 6, 7, 7])], [_c("w", w), _c("b", b)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def qdq_model(clip_max: float | None = None) -> onnx.ModelProto:
    """The same network in QDQ form: Q(x) -> DQ -> Conv(DQ w, DQ int32 b) -> Relu -> Q (r_quantized) -> DQ -> y."""
    wq, ws, bq = _weights()
    inits = [_c("xs", X_S), _c("xz", X_Z), _c("wq", wq), _c("ws", ws), _c("wz", np.zeros(6, np.int8)),
             _c("bq", bq), _c("bs", (X_S * ws).astype(np.float32)), _c("ys", Y_S), _c("yz", Y_Z),
             _c("lo", np.float32(0.0)), _c("hi", np.float32(clip_max or 0.0))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["x_quantized"], name="qx"),
             helper.make_node("DequantizeLinear", ["x_quantized", "xs", "xz"], ["x_dq"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w_dq"], name="dqw", axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["b_dq"], name="dqb", axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu") if clip_max is None else
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip"),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["r_quantized"], name="qy"),
             helper.make_node("DequantizeLinear", ["r_quantized", "ys", "yz"], ["y"], name="dqy")]
    g = helper.make_graph(nodes, "q", [_vi("x", TensorProto.FLOAT, [1, 4, 7, 7])],
                          [_vi("y", TensorProto.FLOAT, [1, 6, 7, 7])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def qoperator_model() -> onnx.ModelProto:
    """The same network lowered: QuantizeLinear -> QLinearConv -> DequantizeLinear."""
    wq, ws, bq = _weights()
    inits = [_c("xs", X_S), _c("xz", X_Z), _c("wq", wq), _c("ws", ws), _c("wz", np.zeros(6, np.int8)),
             _c("bq", bq), _c("ys", Y_S), _c("yz", Y_Z)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["x_quantized"]),
             helper.make_node("QLinearConv", ["x_quantized", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"],
                              ["y_quantized"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["y_quantized", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "o", [_vi("x", TensorProto.FLOAT, [1, 4, 7, 7])],
                          [_vi("y", TensorProto.FLOAT, [1, 6, 7, 7])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"x": rng.standard_normal((1, 4, 7, 7)).astype(np.float32)} for _ in range(n)]


def test_qdq_group_runs_as_one_integer_kernel() -> None:
    """DQ -> Conv -> Relu -> Q becomes one integer kernel on a target that runs Conv in integer
    and fuses Relu; it then gives exactly the QOperator model's bytes."""
    target = qcompiler.load_target("ort-cpu")
    rewritten, n = integer_groups(qdq_model(), target)
    assert n == 1
    assert [x.op_type for x in rewritten.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                                                        "DequantizeLinear", "QLinearConv", "DequantizeLinear"]
    a = simulate(qdq_model(), "ort-cpu", feeds())
    b = simulate(qoperator_model(), "ort-cpu", feeds())
    assert a.integer_groups == 1 and b.integer_groups == 0
    for x, y in zip(a.outputs, b.outputs):
        np.testing.assert_array_equal(x["y"], y["y"])


def test_qdq_group_matches_onnxruntime_within_one_step() -> None:
    """onnxruntime fuses the same QDQ group into QLinearConv (or runs it in float): at most one
    quantization step apart."""
    sess = ort.InferenceSession(qdq_model().SerializeToString(), providers=["CPUExecutionProvider"])
    res = simulate(qdq_model(), "ort-cpu", feeds())
    for f, out in zip(feeds(), res.outputs):
        assert np.abs(sess.run(None, f)[0] - out["y"]).max() <= Y_S * 1.001


def test_fused_clip_clamps_in_integer() -> None:
    """Conv -> Clip(0, 0.42) -> Q runs as one kernel whose output range is [Q(0), Q(0.42)]."""
    model = qdq_model(clip_max=0.42)
    res = simulate(model, "ort-cpu", feeds())
    assert res.integer_groups == 1
    top = float(np.rint(np.float32(0.42) / Y_S)) * Y_S
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hit = False
    for f, out in zip(feeds(), res.outputs):
        assert out["y"].min() >= 0 and out["y"].max() <= top + 1e-6
        hit |= bool(np.isclose(out["y"].max(), top))
        assert np.abs(sess.run(None, f)[0] - out["y"]).max() <= Y_S * 1.001
    assert hit  # the clamp was reached


def test_groups_not_on_the_target_stay_float() -> None:
    """No integer Conv on the target, or a Relu the target does not fuse: the group stays float."""
    ort_cpu = qcompiler.load_target("ort-cpu")
    no_conv = type("T", (), {"op": staticmethod(lambda op, mode="static": None), "fused_with": ort_cpu.fused_with})()
    assert integer_groups(qdq_model(), no_conv)[1] == 0
    no_fuse = type("T", (), {"op": ort_cpu.op, "fused_with": staticmethod(lambda a, b: False)})()
    assert integer_groups(qdq_model(), no_fuse)[1] == 0
    assert integer_groups(qdq_model(), ort_cpu)[1] == 1


def test_reference_fidelity_per_tensor_and_output() -> None:
    res = simulate(qdq_model(), "ort-cpu", feeds(), reference=float_model())
    assert set(res.output_fidelity) == {"y"}
    y = res.output_fidelity["y"]
    assert 20 < y.sqnr_db < 80 and 0.99 < y.cosine <= 1.0
    assert y.elements == 3 * 6 * 7 * 7
    # r_quantized (the kernel's output, dequantized) is compared with the float model's r
    assert set(res.tensors) == {"r"}
    np.testing.assert_allclose(res.tensors["r"].sqnr_db, y.sqnr_db)
    d = res.to_dict()
    assert d["samples"] == 3 and d["qdq_groups_simulated_in_integer"] == 1
    assert json.dumps(d, sort_keys=True) == json.dumps(simulate(qdq_model(), "ort-cpu", feeds(),
                                                                reference=float_model()).to_dict(), sort_keys=True)
    # the same model against itself: no error at all
    same = simulate(float_model(), "ort-cpu", feeds(), reference=float_model())
    assert same.output_fidelity["y"].sqnr_db > 100


def test_target_arithmetic_is_read_from_the_target(tmp_path: Path) -> None:
    toml = tmp_path / "fx.toml"
    toml.write_text('schema = 1\nname = "fx"\ndescription = "fixed point"\nextends = "ort-cpu"\n'
                    '[arithmetic]\nrequantize = "fixed-point"\nrounding = "half-up"\nmultiplier_bits = 15\n'
                    'accumulator_bits = 32\n')
    arith = Arithmetic.from_target(qcompiler.load_target(toml))
    assert arith == Arithmetic("fixed-point", "half-up", 15, 32, pair_saturation=True)
    fx = simulate(qoperator_model(), toml, feeds())
    fl = simulate(qoperator_model(), "ort-cpu", feeds())
    diffs = [np.abs(a["y"] - b["y"]).max() for a, b in zip(fx.outputs, fl.outputs)]
    assert max(diffs) <= Y_S * 1.001  # a 15-bit multiplier moves results by at most one step


def test_cli_simulate_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, f = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(qdq_model(), q)
    onnx.save(float_model(), f)
    data = tmp_path / "in.npz"
    np.savez(data, x=np.concatenate([s["x"] for s in feeds(4)]))
    rep = tmp_path / "r.json"
    rc = main(["simulate", str(q), "--target", "ort-cpu", "--inputs", str(data), "--reference", str(f),
               "--report", str(rep), "--limit", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SQNR" in out and "y" in out
    d = json.loads(rep.read_text())
    assert d["samples"] == 2 and d["target"] == "ort-cpu" and "y" in d["outputs"]


def test_cli_simulate_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "q.onnx"
    onnx.save(qdq_model(), q)
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((1, 4, 7, 7), np.float32))
    assert main(["simulate", str(q), "--inputs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "wrong" in err and "Traceback" not in err
    assert main(["simulate", str(tmp_path / "missing.onnx"), "--inputs", str(bad)]) == 2
    assert main(["simulate", str(q), "--inputs", str(bad), "--target", "no-such-target"]) == 2


def test_qdq_matmul_gemm_add_groups() -> None:
    """MatMul (per-column weights), Gemm (transB, per-row weights, int32 bias) and Add groups all
    become integer kernels; the result stays within one output step of onnxruntime's."""
    rng = np.random.default_rng(3)
    w1 = rng.integers(-64, 65, (8, 6)).astype(np.int8)
    w2 = rng.integers(-64, 65, (5, 6)).astype(np.int8)  # transB: [N, K]
    s1 = (rng.random(6) * 0.02 + 0.01).astype(np.float32)
    s2 = (rng.random(5) * 0.02 + 0.01).astype(np.float32)
    sx, sh, sg, sa, sy = (np.float32(v) for v in (0.02, 0.04, 0.05, 0.03, 0.06))
    u8 = np.uint8
    b2 = rng.integers(-300, 300, 5).astype(np.int32)
    inits = [_c("sx", sx), _c("zx", u8(128)), _c("w1", w1), _c("s1", s1), _c("z1", np.zeros(6, np.int8)),
             _c("sh", sh), _c("zh", u8(120)), _c("w2", w2), _c("s2", s2), _c("z2", np.zeros(5, np.int8)),
             _c("b2", b2), _c("sb2", (sh * s2).astype(np.float32)), _c("sg", sg), _c("zg", u8(110)),
             _c("sa", sa), _c("za", u8(100)), _c("sy", sy), _c("zy", u8(90))]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), n("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             n("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], axis=1), n("MatMul", ["xd", "w1d"], ["h"], name="mm"),
             n("QuantizeLinear", ["h", "sh", "zh"], ["hq"]), n("DequantizeLinear", ["hq", "sh", "zh"], ["hd"]),
             n("DequantizeLinear", ["w2", "s2", "z2"], ["w2d"], axis=0),
             n("DequantizeLinear", ["b2", "sb2"], ["b2d"], axis=0),
             n("Gemm", ["hd", "w2d", "b2d"], ["g"], name="gemm", transB=1),
             n("QuantizeLinear", ["g", "sg", "zg"], ["gq"]), n("DequantizeLinear", ["gq", "sg", "zg"], ["gd"]),
             n("QuantizeLinear", ["a", "sa", "za"], ["aq"]), n("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             n("Add", ["gd", "ad"], ["s"], name="add"), n("QuantizeLinear", ["s", "sy", "zy"], ["sq"]),
             n("DequantizeLinear", ["sq", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "mga", [_vi("x", TensorProto.FLOAT, [3, 8]), _vi("a", TensorProto.FLOAT, [3, 5])],
                          [_vi("y", TensorProto.FLOAT, [3, 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    samples = [{"x": rng.standard_normal((3, 8)).astype(np.float32),
                "a": rng.standard_normal((3, 5)).astype(np.float32)} for _ in range(4)]
    res = simulate(model, "ort-cpu", samples)
    assert res.integer_groups == 3
    kinds = [x.op_type for x in integer_groups(model, qcompiler.load_target("ort-cpu"))[0].graph.node]
    assert {"QLinearMatMul", "QGemm", "QLinearAdd"} <= set(kinds) and not {"MatMul", "Gemm", "Add"} & set(kinds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f, out in zip(samples, res.outputs):
        assert np.abs(sess.run(None, f)[0] - out["y"]).max() <= sy * 1.001
