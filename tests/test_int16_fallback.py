"""The int16-activations fallback (qcompiler.wide): a layer kept integer with its activations on
the target's 16-bit grid, chosen by the accuracy budget before float on a target listing it first (benchmarks/targets/ort-cpu-qdq-int16.toml).

CPU facts pinned: every numeric comparison runs the compiled model as written (onnxruntime with
ORT_DISABLE_ALL, or onnx.reference) or through qcompiler.simulate, so no u8s8 kernel (which
saturates without VNNI) enters a verdict; the 16-bit groups are Q/DQ around float ops on every
CPU. The budget's fidelity runs as written too (qcompiler.fidelity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qcompiler
from conftest import compile_in, outlier_inputs, write_workdir
from qcompiler.api import build_pipeline
from qcompiler.calibration.data import input_specs, load_calibration
from qcompiler.errors import UserError
from qcompiler.plan import plan_quantization
from qcompiler.quant import QType, compute_qparams
from qcompiler.target import load_target

#: ort-cpu-qdq with int16-activations first (the built-in ort-cpu-qdq falls back to float only)
TARGET = str(Path(__file__).resolve().parent.parent / "benchmarks" / "targets" / "ort-cpu-qdq-int16.toml")
BAD = "conv_in"
WIDE = "int16-activations"


def _model(opset: int = 17) -> onnx.ModelProto:
    """x (channel 0 carries outliers ~1000x the rest, which conv_in weighs ~0) -> conv_in ->
    Relu -> r1; r1 is read by conv_a and conv_b, whose sum goes through conv_out -> GAP ->
    Flatten -> fc. conv_in is the one layer bad on an 8-bit grid: its input's per-tensor grid is
    set by channel 0 and leaves channels 1..3 a handful of levels (a 16-bit grid, 256x finer)."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    w1[:, 0] *= 1e-4
    wa, wb, w3 = (rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2 for _ in range(3))
    wg = rng.standard_normal((10, 8)).astype(np.float32)
    z8 = np.zeros(8, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (z8 + 0.1, "b1"), (wa, "wa"), (z8, "ba"), (wb, "wb"), (z8 + 0.05, "bb"), (w3, "w3"),
        (z8, "b3"), (wg, "wg"), (np.zeros(10, np.float32), "bg")]]
    conv = lambda x, w, b, y, name: helper.make_node("Conv", [x, w, b], [y], name=name, pads=[1, 1, 1, 1])  # noqa: E731
    nodes = [conv("x", "w1", "b1", "c1", BAD), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             conv("r1", "wa", "ba", "ca", "conv_a"), conv("r1", "wb", "bb", "cb", "conv_b"),
             helper.make_node("Add", ["ca", "cb"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["rs"], name="relu_s"),
             conv("rs", "w3", "b3", "c3", "conv_out"), helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "int16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 10, 10])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _inputs(n: int, seed: int) -> np.ndarray:
    return outlier_inputs(n, seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workdir(tmp_path_factory.mktemp("int16"), {"float.onnx": _model(), "float21.onnx": _model(21)}, _inputs(16, 0), _inputs(8, 1))


def _compile(work: Path, model: str = "float.onnx", **kw: object) -> qcompiler.CompileResult:
    kw.setdefault("accuracy", "off")
    return compile_in(work, str(kw.pop("target", TARGET)), model, **kw)


def _as_written(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _q_of(proto: onnx.ModelProto, value: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(input the Q reads, scale, zero point) of every QuantizeLinear reading ``value`` or a
    DequantizeLinear output of it, in graph order."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq_of = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    q_src = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    out = []
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        src = n.input[0]
        root = q_src.get(dq_of.get(src, ""), src)
        if root == value:
            out.append((src, inits[n.input[1]], inits[n.input[2]]))
    return out


def _pipeline(work: Path, overrides: dict[str, tuple[str, str]]) -> tuple[qcompiler.Model, qcompiler.PassContext]:
    """The target's static pipeline with these plan overrides, run pass by pass: the model and
    the context (calibrate's ranges and 16-bit ranges)."""
    tgt = load_target(TARGET)
    model = qcompiler.load_model(str(work / "float21.onnx"))
    calib = load_calibration(str(work / "calib.npz"), input_specs(model))
    ctx = qcompiler.PassContext(target=tgt, calibration=calib, mode="static", format="qdq")
    ctx.analysis["plan_overrides"] = dict(overrides)
    qcompiler.PassManager(build_pipeline(tgt.pipeline("static"), qcompiler.default_registry())).run(model, ctx)
    return model, ctx


def test_plan_keeps_the_node_integer_on_the_16_bit_grid() -> None:
    """The plan decides: conv_in stays a Q/DQ group, its activation rule uint16 (the uint8
    target's 16-bit grid), its weight rule the target's int8; its fused Relu moves with it."""
    tgt = load_target(TARGET)
    model = qcompiler.load_model(onnx.shape_inference.infer_shapes(_model(21)))
    plan = plan_quantization(model, tgt, groups={BAD: "relu1"}, overrides={BAD: (WIDE, "budget: rank 1")})
    assert plan.outcome(BAD) == qcompiler.Outcome(WIDE, "budget: rank 1")
    assert plan.outcome("relu1") == qcompiler.Outcome(WIDE, f"fused into '{BAD}'")
    cfg = plan.nodes[BAD].config
    assert (cfg.activation.dtype, cfg.activation.symmetric, cfg.activation.qtype.qmax) == ("uint16", False, 65535)
    assert cfg.weight == tgt.op("Conv").weight and plan.outcome("conv_a").kind == "kernel"  # (ort-cpu's QLinearConv, fused by onnxruntime)
    # the 16-bit rule needs opset 21: below it the plan says so (upgrade-opset raises it first)
    low = plan_quantization(qcompiler.load_model(onnx.shape_inference.infer_shapes(_model(17))), tgt, overrides={BAD: (WIDE, "x")})
    assert low.outcome(BAD).kind == "float" and "opset >= 21" in low.outcome(BAD).reason
    # a target without the fallback for the op refuses the override in one line
    with pytest.raises(UserError, match=r"conv_in.*int16-activations.*no int16-activations fallback for Conv"):
        plan_quantization(model, load_target("ort-cpu"), overrides={BAD: (WIDE, "x")})
    # Plan.override on an integer node of a plan does the same in place
    plan2 = plan_quantization(model, tgt)
    plan2.override("conv_b", WIDE, "by hand", target=tgt)
    assert plan2.outcome("conv_b").kind == WIDE and plan2.nodes["conv_b"].config.activation.dtype == "uint16"


def test_budget_moves_the_bad_layer_to_int16_first_and_meets_it(work: Path) -> None:
    plain = _compile(work)
    assert plain.report["fidelity"]["outputs"]["logits"]["cosine"] < 0.99
    res = _compile(work, accuracy="cosine>=0.99")
    acc = res.report["accuracy"]
    assert acc["met"] and acc["value_after"] >= 0.99 > acc["value_before"]
    assert [(m["node"], m["to"]) for m in acc["moved"]] == [(BAD, WIDE)], acc["moved"]
    assert acc["moved"][0]["cost"] == load_target(TARGET).fallback_cost("Conv", WIDE)
    assert f"fallback '{WIDE}' (choice 1 of 2)" in acc["moved"][0]["why"]
    assert "1 int16-activations" in acc["summary"]
    assert res.report["int16_nodes"] == {BAD: acc["moved"][0]["why"]}  # the plan's reason, in the report
    assert BAD not in res.report["float_nodes"] and BAD in res.report["lowered"]
    assert res.report["check"]["legal"]
    again = _compile(work, accuracy="cosine>=0.99")  # same inputs, same bytes
    assert again.proto.SerializeToString() == res.proto.SerializeToString()


def test_output_opset_check_and_numerics(work: Path) -> None:
    """The compile raises the opset to 21 (16-bit Q/DQ) only with the override; the result
    passes ``qcompiler check`` (the group labelled int16-activations), runs in onnxruntime with
    its own graph optimizations, and agrees with onnx.reference and qcompiler.simulate."""
    res = _compile(work, plan_overrides={BAD: (WIDE, "test")})
    plain = _compile(work)
    opset = lambda p: next(o.version for o in p.opset_import if o.domain in ("", "ai.onnx"))  # noqa: E731
    assert opset(res.proto) == 21 and opset(plain.proto) == 17
    chk = qcompiler.check_model(res.proto, TARGET)
    assert chk.legal, chk.problem_lines()
    assert chk.integer_nodes[BAD] == "Conv (Q/DQ, int16-activations) + Relu"
    # the same 16-bit group on a target that does not list the fallback is a dtype problem
    assert any(p.node == BAD and p.rule == "dtype" for p in qcompiler.check_model(res.proto, "ort-cpu").problems)
    x = _inputs(4, 3)
    float_y = ReferenceEvaluator(_model()).run(None, {"x": x})[0]
    written = _as_written(res.proto, x)
    # onnx.reference and onnxruntime both run Q/DQ as float ops: float32 rounding only
    ref = ReferenceEvaluator(res.proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(written, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # qcompiler.simulate: the 8-bit groups as integer kernels, the 16-bit group as written; the
    # kernels' float requantization can differ from Q/DQ float ops by one step where a value
    # lies on a rounding boundary, so the tolerance is a fraction of the output's scale
    sim = qcompiler.simulate(res.proto, TARGET, [{"x": x}])
    assert sim.integer_groups >= 3  # conv_a, conv_b, conv_out (+ add): conv_in is not one of them
    np.testing.assert_allclose(sim.outputs[0]["logits"], written, atol=0.02 * float(np.abs(written).max()))
    # the fallback is what recovers the model (full onnxruntime optimizations included)
    full = ort.InferenceSession(res.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert _cos(full.run(None, {"x": x})[0], float_y) > 0.999 > _cos(_as_written(plain.proto, x), float_y)


def test_a_value_read_on_two_grids_gets_a_pair_per_grid(work: Path) -> None:
    """r1 (conv_in's output, 8-bit) is read by conv_a on 16 bits and conv_b on 8: a second pair
    requantizes the first's output onto uint16 for conv_a; each pair's range is calibrate's
    range for its grid (mse: 255 vs 65535 levels), from the one statistics pass."""
    model, ctx = _pipeline(work, {"conv_a": (WIDE, "test")})
    ranges, wide = ctx.analysis["ranges"], ctx.analysis["wide_ranges"]
    assert ctx.report["calibration"]["method"] == "mse"
    assert set(wide) == {"r1", "ca"}  # conv_a's input and output (its inputs and outputs only)
    assert wide["r1"] != ranges["r1"]
    proto = model.to_proto()
    pairs = _q_of(proto, "r1")
    assert [zp.dtype.name for _, _, zp in pairs] == ["uint8", "uint16"]
    (src8, s8, z8), (src16, s16, z16) = pairs
    assert src8 == "r1" and src16 != "r1"  # the 16-bit pair reads the producer's (8-bit) pair
    for (lo, hi), qtype, s, z in ((ranges["r1"], QType("uint8", False, 0, 255), s8, z8),
                                  (wide["r1"], QType("uint16", False, 0, 65535), s16, z16)):
        want = compute_qparams(lo, hi, qtype)
        assert s == want.scale and z == want.zero_point
    readers = {n.name: n.input[0] for n in proto.graph.node if n.name in ("conv_a", "conv_b")}
    dq_out = {n.output[0]: n.input[2] for n in proto.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits[dq_out[readers["conv_a"]]].dtype == np.uint16 and inits[dq_out[readers["conv_b"]]].dtype == np.uint8
    # conv_a's output is written on its own grid; add (8-bit) reads a requantized copy
    assert [zp.dtype.name for _, _, zp in _q_of(proto, "ca")] == ["uint16", "uint8"]
    # the 16-bit range is the mse choice for 65535 levels on the same histogram: wider than the
    # 8-bit one (finer steps make clipping the costlier error)
    assert wide["r1"][1] - wide["r1"][0] > ranges["r1"][1] - ranges["r1"][0]


def test_statistics_cache_key_is_the_plain_compiles(work: Path, tmp_path: Path) -> None:
    """A compile with an int16 override reuses the plain compile's statistics (same cache key,
    no second statistics pass): at opset 21 the two prepared models are the same."""
    opts = qcompiler.CalibrationOptions(cache=str(tmp_path))
    plain = _compile(work, "float21.onnx", calibration_options=opts)
    moved = _compile(work, "float21.onnx", calibration_options=opts, plan_overrides={BAD: (WIDE, "x")})
    assert plain.report["calibration"]["cache"] == "miss" and moved.report["calibration"]["cache"] == "hit"


def test_int32_bias_stays_in_range_on_a_16_bit_input_scale(tmp_path: Path) -> None:
    """A 16-bit input scale is ~256x smaller, so bias / (x_scale * w_scale) grows by as much: a
    bias of 20 on weights of 1e-3 and inputs in [0, 1] would need ~1.6e11 > 2^31. insert-qdq's
    bias-safe rule raises those channels' weight scales instead (the int32 bias then fits and
    keeps its value); the check's bias-scale rule holds."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((4, 3, 1, 1)) * 1e-3).astype(np.float32)
    b = np.array([20.0, -15.0, 0.5, 0.0], np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv"),
                           helper.make_node("Relu", ["y"], ["r"], name="relu"),
                           helper.make_node("Conv", ["r", "w2", "b2"], ["z"], name="conv2")], "bias",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2, 4, 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                           numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"),
                           numpy_helper.from_array(np.zeros(2, np.float32), "b2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / "m.onnx")
    x = rng.uniform(0, 1, (12, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    res = qcompiler.compile(str(tmp_path / "m.onnx"), target=TARGET, calibration=str(tmp_path / "c.npz"),
                            accuracy="off", plan_overrides={"conv": (WIDE, "test")})
    assert res.report["check"]["legal"]
    proto = res.proto
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv = next(n for n in proto.graph.node if n.name == "conv")
    bias_dq = next(n for n in proto.graph.node if n.output[0] == conv.input[2])
    codes, scale = inits[bias_dq.input[0]], inits[bias_dq.input[1]]
    assert codes.dtype == np.int32 and np.abs(codes.astype(np.int64)).max() < 2**31 - 1  # no saturation
    # the stored bias is the float one up to bias correction's (W_q - W) . E[x] (< 1e-4 here)
    np.testing.assert_allclose(codes * scale.astype(np.float64), b, atol=1e-4)
    x_dq = next(n for n in proto.graph.node if n.output[0] == conv.input[0])
    assert inits[x_dq.input[2]].dtype == np.uint16
    y = _as_written(proto, x[:2])
    want = ReferenceEvaluator(onnx.load(tmp_path / "m.onnx")).run(None, {"x": x[:2]})[0]
    assert _cos(y, want) > 0.999


def test_target_schema(tmp_path: Path) -> None:
    """dsp-a16w8's activations are 16-bit already: naming the fallback there is one line naming
    the file and key. A target may declare the 16-bit dtype: int16 is symmetric (zero point 0)."""
    bad = tmp_path / "dsp.toml"
    bad.write_text('name = "d"\ndescription = "x"\nextends = "dsp-a16w8"\n[accuracy]\n'
                   'fallbacks = ["int16-activations", "float"]\n')
    with pytest.raises(UserError) as err:
        load_target(str(bad))
    msg = str(err.value)
    assert msg.startswith(str(bad)) and "accuracy.fallbacks" in msg and "already uint16" in msg and "\n" not in msg
    assert load_target("dsp-a16w8").fallbacks("Conv") == ("float",)
    bad.write_text('name = "d"\ndescription = "x"\nextends = "ort-cpu-qdq"\n[accuracy]\nfallbacks = [\"int16-activations\", \"float\"]\nint16_dtype = "int12"\n')
    with pytest.raises(UserError, match=r"accuracy\.int16_dtype"):
        load_target(str(bad))
    signed = tmp_path / "s16.toml"
    signed.write_text('name = "s16"\ndescription = "x"\nextends = "ort-cpu-qdq"\n[accuracy]\nfallbacks = [\"int16-activations\", \"float\"]\nint16_dtype = "int16"\n')
    model = qcompiler.load_model(onnx.shape_inference.infer_shapes(_model(21)))
    plan = plan_quantization(model, load_target(str(signed)), overrides={BAD: (WIDE, "x")})
    act = plan.nodes[BAD].config.activation
    assert (act.dtype, act.symmetric, act.qtype.qmin, act.qtype.qmax) == ("int16", True, -32767, 32767)


def test_inspect_shows_the_outcome(work: Path) -> None:
    """``qcompiler inspect`` with the override: the group runs on 16-bit activations, its Relu
    fused into it (the plan's answer after upgrade-opset raised the model to opset 21)."""
    from qcompiler.inspect import inspect_model

    shown = inspect_model(work / "float.onnx", TARGET, plan_overrides={BAD: (WIDE, "x")})
    assert shown["lowered"][BAD] == "Conv (Q/DQ, int16-activations)"
    assert shown["lowered"]["relu1"] == f"fused into '{BAD}'" and BAD not in shown["float_nodes"]


def test_fallbacks_a_node_can_take() -> None:
    """A node the target has no Q/DQ rule for (ort-cpu-qdq's ConvTranspose, which the compile only
    stores with integer weights) can go float but not to int16-activations; a Conv can take both.
    (The budget reads these for every node it may move: PP-OCR's float ConvTranspose.)"""
    from qcompiler.plan import fallback_outcomes

    w = numpy_helper.from_array(np.ones((4, 2, 2, 2), np.float32), "w")
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", strides=[2, 2]),
                           helper.make_node("Conv", ["y", "wc"], ["z"], name="conv")], "ct",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 6, 6])],
                          [w, numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "wc")])
    model = qcompiler.load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    got = fallback_outcomes(model, load_target(TARGET), ["ct", "conv"])
    assert got == {"ct": ("float",), "conv": (WIDE, "float")}
