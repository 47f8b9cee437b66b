"""quantize-dynamic: MatMuls with constant weights run as MatMulInteger on a run-time quantized
activation (one DynamicQuantizeLinear per activation), int8 embedding tables with per-row
scales; numbers checked in onnxruntime against the float model with stated bounds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from _util import init, make_model, modified, run_pass, tensor


def _qkv(k: int = 128, n: int = 64) -> onnx.ModelProto:
    """x -> three MatMuls reading x (attention's Q/K/V), summed, then one more MatMul."""
    rng = np.random.default_rng(0)
    inits = [init(f"w{i}", (rng.standard_normal((k, n)) * 0.2).astype(np.float32)) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [helper.make_node("Add", ["m0", "m1"], ["s0"], name="add0"),
              helper.make_node("Add", ["s0", "m2"], ["s1"], name="add1"),
              helper.make_node("MatMul", ["s1", "wt"], ["y"], name="mm_rt")]
    inits.append(init("wt", (rng.standard_normal((n, n)) * 0.2).astype(np.float32)))
    return make_model(nodes, [tensor("x", [4, k])], [tensor("y", [4, n])], inits)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_matmuls_share_one_dynamic_quantization_and_stay_close() -> None:
    proto = _qkv()
    model, ctx, pm = run_pass(proto, "quantize-dynamic")
    out = model.to_proto()
    assert modified(pm)
    ops = _ops(out)
    assert ops.count("MatMulInteger") == 4 and ops.count("MatMul") == 0
    assert ops.count("DynamicQuantizeLinear") == 2  # x (shared by mm0..mm2) and s1
    assert sorted(ctx.analysis["lowered"]) == ["mm0_quant", "mm1_quant", "mm2_quant", "mm_rt_quant"]
    x = {"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}
    ref, got = _run(proto, x), _run(out, x)
    # u8 activations (step = range/255) and int8 weights: a few percent of the output scale
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()
    assert np.abs(got - ref).max() > 0


def test_weights_int8_per_column_within_pair_sum() -> None:
    model, _, _ = run_pass(_qkv(), "quantize-dynamic")
    out = model.to_proto()
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    mmi = next(n for n in out.graph.node if n.op_type == "MatMulInteger")
    w, wz = inits[mmi.input[1]], inits[mmi.input[3]]
    assert w.dtype == np.int8 and wz.shape == (64,) and not wz.any()
    limit = qcompiler.load_target("ort-cpu").data["dynamic"]["weight"]["pair_sum_max"]
    top2 = -np.sort(-np.abs(w.astype(np.int32)), axis=0)[:2]
    assert (top2.sum(axis=0) <= limit).all()


def test_max_k_and_exclude_keep_float_with_reasons() -> None:
    model, ctx, _ = run_pass(_qkv(), "quantize-dynamic", [("max-k", "100"), ("exclude", "[mm_rt]")])
    assert _ops(model.to_proto()).count("MatMul") == 4
    assert ctx.analysis["float_nodes"]["mm0"] == "128 input features > max-k 100"
    assert "mm_rt" in ctx.analysis["float_nodes"]


def test_two_runtime_inputs_stay_float() -> None:
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="qk")]
    proto = make_model(nodes, [tensor("a", [4, 8]), tensor("b", [8, 4])], [tensor("y", [4, 4])])
    model, ctx, pm = run_pass(proto, "quantize-dynamic")
    assert not modified(pm)
    assert "no constant weight" in ctx.analysis["float_nodes"]["qk"]


def test_embedding_table_int8_rows() -> None:
    rng = np.random.default_rng(2)
    table = (rng.standard_normal((4096, 256)) * np.linspace(0.1, 3, 4096)[:, None]).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["y"], name="embed", axis=0)]
    proto = make_model(nodes, [tensor("ids", [1, 6], TensorProto.INT64)], [tensor("y", [1, 6, 256])],
                       [init("emb", table)])
    model, ctx, _ = run_pass(proto, "quantize-dynamic")
    out = model.to_proto()
    assert "embed" in ctx.analysis["lowered"]
    stored = next(t for t in out.graph.initializer if t.data_type == TensorProto.INT8)
    assert list(stored.dims) == [4096, 256]
    ids = {"ids": np.array([[0, 5, 100, 2000, 4000, 4095]], np.int64)}
    ref, got = _run(proto, ids), _run(out, ids)
    # symmetric int8 per row: error at most half a step = max|row| / 127 / 2 (plus float rounding)
    half_step = np.abs(table[ids["ids"][0]]).max(axis=1) / 127 / 2
    assert (np.abs(got - ref)[0].max(axis=1) <= half_step * 1.0001).all()


def test_weight_range_mse_lowers_weight_error_on_heavy_tails() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_t(2, size=(256, 64)).astype(np.float32)  # heavy tails: min/max wastes levels
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = make_model(nodes, [tensor("x", [2, 256])], [tensor("y", [2, 64])], [init("w", w)])

    def quantized(option: str) -> tuple[float, np.ndarray]:
        model, _, _ = run_pass(proto, "quantize-dynamic", [("weight-range", option)])
        out = model.to_proto()
        inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        mmi = next(n for n in out.graph.node if n.op_type == "MatMulInteger")
        scale = next(inits[n.input[1]] for n in out.graph.node
                     if n.op_type == "Mul" and n.input[1] in inits and inits[n.input[1]].shape == (64,))
        return float(((inits[mmi.input[1]].astype(np.float32) * scale - w) ** 2).mean()), scale

    err_mse, s_mse = quantized("mse")
    err_minmax, s_minmax = quantized("minmax")
    assert err_mse <= err_minmax
    assert (s_mse <= s_minmax * (1 + 1e-6)).all() and (s_mse < s_minmax).any()  # some columns clipped
    with pytest.raises(qcompiler.UserError, match="weight-range"):
        run_pass(proto, "quantize-dynamic", [("weight-range", "best")])
