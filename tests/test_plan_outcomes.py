"""The plan as the one decider: per-node outcomes (Q/DQ group, kernel, dynamic kernel, float with
a reason), and overrides set from outside that every reader honours end to end (calibrate,
insert-qdq, lower-qoperator, quantize-dynamic, check, inspect).

CPU facts: the compiled graphs are compared by structure and run through qcompiler.simulate,
never through onnxruntime's ISA-dependent int8 kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
from qcompiler.inspect import inspect_model
from qcompiler.plan import Plan, plan_dynamic, plan_quantization, ranges_read
from conftest import init, make_model, tensor_info, tiny_calibration, tiny_model


def _compile(target: str, **kw: object) -> qcompiler.CompileResult:
    pipeline = qcompiler.load_target(target).pipeline("static").replace("calibrate", "calibrate{method=minmax}")
    return qcompiler.compile(tiny_model(), target=target, calibration=tiny_calibration(8), pipeline=pipeline, **kw)


def test_outcomes_name_how_each_node_runs() -> None:
    """ort-cpu names kernels (kernel outcome with its name), npu-int8 none (Q/DQ groups); the
    Relu fused into conv1 follows its head; a node the target has no rule for is float."""
    model = qcompiler.load_model(tiny_model())
    ort_cpu = plan_quantization(model, qcompiler.load_target("ort-cpu"), groups={"conv1": "relu1"})
    assert ort_cpu.outcome("conv1") == qcompiler.Outcome("kernel", "", "QLinearConv")
    assert ort_cpu.outcome("relu1").kind == "kernel" and "conv1" in ort_cpu.outcome("relu1").reason
    npu = plan_quantization(model, qcompiler.load_target("npu-int8"))
    assert npu.outcome("conv1").kind == "qdq"
    assert npu.outcome("gap").kind == "float" and "GlobalAveragePool" in npu.outcome("gap").reason
    assert ort_cpu.outcome("flatten") is None  # ort-cpu data movement: follows its input


def test_override_to_float_is_respected_end_to_end() -> None:
    """conv2 overridden to float: no kernel and no Q/DQ on its weight, the report and check give
    the override's reason, the rest of the model is still integer, and the result simulates."""
    why = "accuracy budget: static int8 loses 3 dB here"
    res = _compile("ort-cpu", plan_overrides={"conv2": ("float", why)})
    nodes = {n.name: n for n in res.proto.graph.node}
    assert nodes["conv2"].op_type == "Conv" and nodes["conv1"].op_type == "QLinearConv"
    w2 = nodes["conv2"].input[1]
    assert w2 == "w2" or not any(n.op_type == "DequantizeLinear" and n.output[0] == w2 for n in res.proto.graph.node)
    assert res.report["float_nodes"]["conv2"] == why and "conv2" not in res.report["lowered"]
    assert res.report["check"]["legal"]
    base = _compile("ort-cpu")
    assert {n.name: n.op_type for n in base.proto.graph.node}["conv2"] == "QLinearConv"
    out = qcompiler.simulate(res.proto, "ort-cpu", tiny_calibration(2, seed=3)).outputs
    assert np.isfinite(out[0]["y"]).all()
    # a QDQ target too: the override is the plan's, not a format's
    qdq = _compile("npu-int8", plan_overrides={"conv2": ("float", why)})
    assert qdq.report["float_nodes"]["conv2"] == why
    readers = [n for n in qdq.proto.graph.node if "conv2" == n.name]
    assert readers and all(not i.endswith("_quantized") for i in readers[0].input[1:])


def test_override_in_dynamic_mode() -> None:
    """Dynamic mode is a plan outcome too: an override keeps one MatMul float, the others run
    as the target's dynamic kernel."""
    rng = np.random.default_rng(0)
    inits = [init(f"w{i}", (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)) for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm1")]
    proto = make_model(nodes, [tensor_info("x", [4, 64])], [tensor_info("y", [4, 64])], inits)
    tgt = qcompiler.load_target("ort-cpu")
    plan = plan_dynamic(qcompiler.load_model(proto), tgt, min_weight_elements=16,
                        overrides={"mm1": ("float", "kept float by a search")})
    assert plan.outcome("mm0").kind == "dynamic" and plan.outcome("mm0").kernel == tgt.op("MatMul", "dynamic").kernel
    assert plan.outcome("mm1") == qcompiler.Outcome("float", "kept float by a search")
    pipeline = tgt.pipeline("dynamic").replace("quantize-dynamic", "quantize-dynamic{min-weight-elements=16}")
    res = qcompiler.compile(proto, target=tgt, mode="dynamic", pipeline=pipeline,
                            plan_overrides={"mm1": ("float", "kept float by a search")})
    kinds = [n.op_type for n in res.proto.graph.node]
    assert kinds.count("MatMul") == 1 and "mm1" in {n.name for n in res.proto.graph.node}
    assert res.report["float_nodes"] == {"mm1": "kept float by a search"}


def test_override_outcomes_other_than_float_and_dynamic_are_refused() -> None:
    """dynamic needs the target's dynamic kernel for the op: ort-cpu has none for Conv."""
    with pytest.raises(qcompiler.UserError, match="conv1.*'dynamic'.*no dynamic kernel for Conv"):
        plan_quantization(qcompiler.load_model(tiny_model()), qcompiler.load_target("ort-cpu"),
                          overrides={"conv1": ("dynamic", "x")})
    with pytest.raises(qcompiler.UserError, match="'int16'"):
        Plan().override("conv1", "int16", "x")


def _mlp() -> onnx.ModelProto:
    """x -> mm0 -> Relu -> mm1 -> Relu -> att (a MatMul of two run-time values) -> mm2 -> y."""
    rng = np.random.default_rng(0)
    inits = [init(f"w{i}", (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "s"], ["a"], name="att"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [tensor_info("x", ["n", 64]), tensor_info("s", [64, 64])], [tensor_info("y", ["n", 64])],
                      inits)


def _mlp_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Samples whose scale varies over four decades: one static range per tensor fits none of
    them well; a range measured per call (dynamic) fits each."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 64)).astype(np.float32) * (10.0 ** r.uniform(-2, 2, (n, 1))).astype(np.float32)
    return {"x": x, "s": np.broadcast_to(np.eye(64, dtype=np.float32) * 0.5, (n, 64, 64)).copy()}


def test_dynamic_outcome_in_a_static_compile() -> None:
    """Plan.override(mm0, "dynamic") in a static ort-cpu compile: mm0 lowers to the kernel the
    dynamic pipeline emits (the kernel table's entry for the target's dynamic.ops.MatMul, with
    the same int8 weight), its input x gets no static Q/DQ (calibrate does not observe it), the
    rest stays static integer; check, report, inspect and the simulator agree.

    CPU facts: numerics are compared as written (ORT_DISABLE_ALL) against qcompiler.simulate, so
    no ISA-dependent fused int8 kernel enters."""
    import onnxruntime as ort

    tgt = qcompiler.load_target("ort-cpu")
    proto = _mlp()
    typed = qcompiler.load_model(onnx.shape_inference.infer_shapes(proto))
    plan = plan_quantization(typed, tgt, overrides={"mm0": ("dynamic", "budget: dyn")})
    spec = qcompiler.kernel_spec(tgt.op("MatMul", "dynamic").kernel_op)
    assert plan.outcome("mm0") == qcompiler.Outcome("dynamic", "budget: dyn", tgt.op("MatMul", "dynamic").kernel)
    assert plan.outcome("mm1").kind == "kernel" and "mm0" not in plan.nodes and "mm0" not in plan.float_nodes
    with pytest.raises(qcompiler.UserError, match="'att'.*two run-time values"):
        plan_quantization(typed, tgt, overrides={"att": ("dynamic", "x")})

    calib = _mlp_data(16, 0)
    kw = dict(target=tgt, mode="static", calibration=calib, accuracy="off")
    base = qcompiler.compile(proto, **kw)
    res = qcompiler.compile(proto, plan_overrides={"mm0": ("dynamic", "budget: dyn")}, **kw)
    ops = {n.name: n.op_type for n in res.proto.graph.node}
    assert ops["mm0_quant"] == spec.name and "mm0" not in ops and ops["mm1"] == "QLinearMatMul"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in res.proto.graph.node)
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in base.proto.graph.node)
    # the plan reads no range for x (calibrate still observes the full-integer plan's values, so a
    # budget search's recompiles share one calibration: the statistics per tensor are the same)
    assert "x" not in ranges_read(typed, tgt, plan)[0] and "x" in ranges_read(typed, tgt, plan_quantization(typed, tgt))[0]
    assert res.report["dynamic_nodes"] == {"mm0": "budget: dyn"} and "mm0_quant" in res.report["lowered"]
    assert res.report["check"]["legal"] and "dynamic_nodes" not in base.report

    # the same kernel and weight bytes as the dynamic pipeline builds for mm0
    dyn = qcompiler.compile(proto, target=tgt, mode="dynamic", pipeline=tgt.pipeline("dynamic").replace(
        "quantize-dynamic", "quantize-dynamic{min-weight-elements=16}"), accuracy="off")

    def weight(m: onnx.ModelProto) -> np.ndarray:
        node = next(n for n in m.graph.node if n.name == "mm0_quant")
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        return inits[node.input[1]]

    np.testing.assert_array_equal(weight(res.proto), weight(dyn.proto))

    feeds = [{k: v[i:i + 1] if k == "x" else v[i] for k, v in _mlp_data(4, 7).items()} for i in range(4)]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(res.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sim = qcompiler.simulate(res.proto, "ort-cpu", feeds).outputs
    for feed, got in zip(feeds, sim):
        want = sess.run(["y"], feed)[0]
        np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_inspect_and_fallback_outcomes_show_dynamic(tmp_path) -> None:
    """inspect names mm0's dynamic kernel; a MatMul of two run-time values can only go to float."""
    from qcompiler.plan import fallback_outcomes

    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), path)
    shown = inspect_model(path, "ort-cpu", plan_overrides={"mm0": ("dynamic", "search")})
    assert "dynamic" in shown["lowered"]["mm0"] and "mm0" not in shown["float_nodes"]
    tgt = qcompiler.load_target("ort-cpu")
    got = fallback_outcomes(qcompiler.load_model(_mlp()), tgt, ["mm0", "att", "relu0"])
    assert got == {"mm0": ("dynamic", "float"), "att": ("float",), "relu0": tgt.fallbacks("Relu")}
    qdq = qcompiler.load_target("ort-cpu-qdq")  # its file keeps MatMul's fallback float
    assert fallback_outcomes(qcompiler.load_model(_mlp()), qdq, ["mm0"]) == {"mm0": ("float",)}


def test_deviation_and_override_change_the_outcome() -> None:
    """Plan.deviate (lowering found no kernel) and Plan.override (a search) both make a planned
    integer node float; an overridden head takes its fused tail with it."""
    model = qcompiler.load_model(tiny_model())
    plan = plan_quantization(model, qcompiler.load_target("ort-cpu"), groups={"conv1": "relu1"})
    plan.deviate("gemm", "no QGemm fits")
    assert plan.outcome("gemm") == qcompiler.Outcome("float", "no QGemm fits")
    plan.override("conv1", "float", "search")
    assert plan.outcome("conv1").kind == "float" and plan.outcome("relu1").kind == "float"
    # a dynamic override: the node leaves the static tables, its outcome names the kernel and why
    plan.override("conv2", "dynamic", "search: dynamic", kernel="MatMulInteger")
    assert plan.outcome("conv2") == qcompiler.Outcome("dynamic", "search: dynamic", "MatMulInteger")
    assert "conv2" not in plan.nodes and "conv2" not in plan.float_nodes


def test_inspect_reads_the_plan_with_overrides(tmp_path) -> None:
    """inspect shows what compile does: the override's reason, and data movement decided by the
    same walk insert-qdq follows."""
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    shown = inspect_model(path, "ort-cpu", plan_overrides={"gap": ("float", "search")})
    assert shown["float_nodes"]["gap"] == "search" and "conv1" in shown["lowered"]
    compiled = _compile("ort-cpu", plan_overrides={"gap": ("float", "search")})
    assert set(compiled.report["lowered"]) <= set(shown["lowered"])
    assert compiled.report["float_nodes"]["gap"] == "search"
