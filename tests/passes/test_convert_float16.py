"""convert-float16: float parts compute in float16 when the target's float_precision is fp16.

Numerical checks compare against the float32 model. fp16 has a unit roundoff of 2^-11
(4.9e-4); a few chained roundings plus sums of up to 36 products (3x3x4 Conv) stay within
``FP16_TOL`` = 2e-3 of the output's magnitude (max |y|), which is what these tests assert.
onnxruntime's CPU EP loads every fp16 model here, but where it has no float16 kernel its
graph transformers run the node in float32 and can drop the Cast pair around it (found here:
the Cast->fp16 Relu->Cast of test_qdq_float_op_goes_fp16_between_casts gave results
bit-identical to the fp32 model), so an ORT run does not show fp16 arithmetic. The
converted models are therefore evaluated with onnx.reference (numpy in float16), the float32
originals with onnxruntime, and ``_run_fp16`` also checks that ORT runs the fp16 model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import qcompiler
from _util import init, make_model, op_types, rand, run_pass, tensor
from conftest import TINY_INPUT, tiny_calibration, tiny_model

FP16_TOL = 2e-3
F16 = TensorProto.FLOAT16


def _shaped(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The pass reads value dtypes, which the pipeline's infer-shapes pass provides."""
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _fp16_target(tmp_path: Path, base: str = "ort-cpu") -> Path:
    path = tmp_path / "half.toml"
    path.write_text(f'schema = 1\nname = "half"\ndescription = "{base} with fp16 float parts"\n'
                    f'extends = "{base}"\n\n[defaults]\nfloat_precision = "fp16"\n')
    return path


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(r) for r in sess.run(None, feeds)]


def _run_fp16(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnx.reference's fp16 arithmetic; onnxruntime must run the model too and agree
    within fp16 tolerance (it may compute some nodes in float32)."""
    ref = proto
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        # onnx.reference implements Q/DQ from opset 19 only; the same graph, converted
        ref = onnx.version_converter.convert_version(proto, max(19, proto.opset_import[0].version))
    ort_out = _run(proto, feeds)
    # onnx.reference returns LayerNormalization's Mean in X's type, not stash_type's float32
    got = [np.asarray(r).astype(o.dtype) for r, o in zip(ReferenceEvaluator(ref).run(None, feeds), ort_out)]
    for r, o in zip(got, ort_out):
        assert r.dtype == o.dtype and r.shape == o.shape
        assert float(np.max(np.abs(r - o), initial=0)) <= 2 * FP16_TOL * max(float(np.max(np.abs(r), initial=0)), 1e-6)
    return got


def _assert_fp16_close(want: np.ndarray, got: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= FP16_TOL * scale, f"max error {err} > {FP16_TOL} * {scale}"
    assert err > 0, "nothing changed: the model did not compute in float16"


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value: inputs, outputs, value_info and initializers."""
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def test_fp32_target_changes_nothing() -> None:
    """ort-cpu says fp32: the pass reports no change and the model bytes are the same."""
    proto = _shaped(tiny_model())
    before = qcompiler.load_model(proto).to_proto().SerializeToString()
    model, _, pm = run_pass(proto, "convert-float16")
    assert pm.records[-1]["modified"] is False
    assert model.to_proto().SerializeToString() == before


def test_fp16_target_converts_the_float_model(tmp_path: Path) -> None:
    """Every float op runs in fp16 between one Cast in and one Cast out; IO stays float32."""
    proto = _shaped(tiny_model())
    model, _, pm = run_pass(proto, "convert-float16", target=_fp16_target(tmp_path))
    out = model.to_proto()
    assert pm.records[-1]["modified"] is True
    assert op_types(out) == ["Cast", "Conv", "Relu", "Conv", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Cast"]
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].name == "y" and out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = _elem_types(out)
    assert all(t.data_type == F16 for t in out.graph.initializer)
    for name in ("c1", "r1", "c2", "a1", "p1", "f1"):
        assert types[name] == F16, name
    onnx.checker.check_model(out, full_check=True)
    x = rand((1, 3, 8, 8), seed=3)
    _assert_fp16_close(_run(proto, {TINY_INPUT: x})[0], _run_fp16(out, {TINY_INPUT: x})[0])


def test_force_and_idempotence() -> None:
    """force converts on an fp32 target; a second run finds nothing left to do."""
    model, _, _ = run_pass(_shaped(tiny_model()), "convert-float16", [("force", "true")])
    assert op_types(model).count("Cast") == 2
    again, _, pm = run_pass(model, "convert-float16", [("force", "true")])
    assert pm.records[-1]["modified"] is False
    assert op_types(again).count("Cast") == 2


def test_exclude_keeps_named_node_fp32() -> None:
    """exclude=gemm: the Gemm reads float32 (a Cast before it) and writes the output directly."""
    proto = _shaped(tiny_model())
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true"), ("exclude", "gemm")])
    out = model.to_proto()
    assert op_types(out) == ["Cast", "Conv", "Relu", "Conv", "Add", "GlobalAveragePool", "Flatten", "Cast", "Gemm"]
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    types = _elem_types(out)
    assert [types[i] for i in gemm.input] == [TensorProto.FLOAT] * 3
    assert list(gemm.input[1:]) == ["wg", "bg"] and list(gemm.output) == ["y"]
    x = rand((1, 3, 8, 8), seed=4)
    _assert_fp16_close(_run(proto, {TINY_INPUT: x})[0], _run_fp16(out, {TINY_INPUT: x})[0])


def test_shared_initializer_gets_a_converted_copy() -> None:
    """c is read by a converted Mul and an excluded Add: Add keeps float32 c, Mul gets an fp16 copy."""
    c = rand((4,), seed=1)
    proto = _shaped(make_model(
        [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
         helper.make_node("Add", ["m", "c"], ["y"], name="add")],
        [tensor("x", [2, 4])], [tensor("y", [2, 4])], [init("c", c)]))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true"), ("exclude", "add")])
    out = model.to_proto()
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits == {"c": TensorProto.FLOAT, "c_fp16": F16}
    assert op_types(out) == ["Cast", "Mul", "Cast", "Add"]
    x = rand((2, 4), seed=2)
    _assert_fp16_close(_run(proto, {"x": x})[0], _run_fp16(out, {"x": x})[0])


def test_schema_decides_per_input_type() -> None:
    """Resize: X (T1) converts, `scales` (fixed tensor(float)) stays float32. Clip: min/max are
    bound to T with the input, so they convert too, FLT_MAX clamped to fp16's 65504.
    LayerNormalization: Y (T) converts, Mean (U: no float16) stays float32 with no Cast."""
    scales = np.array([1, 1, 2, 2], np.float32)
    g = rand((8,), seed=5, low=0.5, high=1.5)
    b = rand((8,), seed=6)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
        helper.make_node("Clip", ["r", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("LayerNormalization", ["c", "g", "b"], ["y", "mean"], name="ln", axis=-1),
    ]
    inits = [init("scales", scales), init("lo", np.array(-0.5, np.float32)),
             init("hi", np.array(np.finfo(np.float32).max, np.float32)), init("g", g), init("b", b)]
    proto = _shaped(make_model(nodes, [tensor("x", [1, 2, 3, 4])],
                               [tensor("y", [1, 2, 6, 8]), tensor("mean", [1, 2, 6, 1])], inits, opset=18))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    out = model.to_proto()
    types = _elem_types(out)
    by_op = {n.op_type: n for n in out.graph.node if n.op_type != "Cast"}
    assert types[by_op["Resize"].input[2]] == TensorProto.FLOAT and by_op["Resize"].input[2] == "scales"
    assert types[by_op["Resize"].output[0]] == F16
    assert [types[i] for i in by_op["Clip"].input] == [F16] * 3
    hi = next(t for t in out.graph.initializer if t.name == by_op["Clip"].input[2])
    assert float(onnx.numpy_helper.to_array(hi)) == 65504.0  # clamped: a Clip bound only
    assert by_op["LayerNormalization"].output[1] == "mean" and types["mean"] == TensorProto.FLOAT
    assert op_types(out).count("Cast") == 2  # x in, y out; mean leaves as float32 directly
    onnx.checker.check_model(out, full_check=True)
    x = rand((1, 2, 3, 4), seed=7)
    want, got = _run(proto, {"x": x}), _run_fp16(out, {"x": x})
    _assert_fp16_close(want[0], got[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=FP16_TOL * float(np.max(np.abs(want[1]))))


def test_cancelling_cast_pair_is_removed() -> None:
    """A model that already casts to fp16 after a float op: the fp32 Cast the pass would put
    between them cancels with the model's own Cast(to=FLOAT16)."""
    proto = _shaped(make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Cast", ["r"], ["h"], name="to_half", to=F16),
         helper.make_node("Neg", ["h"], ["n"], name="neg"),
         helper.make_node("Cast", ["n"], ["y"], name="to_float", to=TensorProto.FLOAT)],
        [tensor("x", [3])], [tensor("y", [3])]))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    out = model.to_proto()
    assert op_types(out) == ["Cast", "Relu", "Neg", "Cast"]
    x = np.array([-1.5, 0.25, 3.0], np.float32)
    np.testing.assert_array_equal(_run_fp16(out, {"x": x})[0], _run(proto, {"x": x})[0])


def _qdq_model() -> onnx.ModelProto:
    """x -> Q -> DQ -> Sigmoid -> Q -> DQ -> y, and DQ(x) -> Conv (a quantized op for tensorrt)."""
    s, z = np.array(0.02, np.float32), np.array(0, np.int8)
    so = np.array(1 / 127, np.float32)
    w = rand((2, 2, 1, 1), seed=8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="xd"),
        helper.make_node("Sigmoid", ["xd"], ["sg"], name="sigmoid"),
        helper.make_node("QuantizeLinear", ["sg", "so", "z"], ["sq"], name="sq"),
        helper.make_node("DequantizeLinear", ["sq", "so", "z"], ["y"], name="sd"),
        helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["y2"], name="relu"),
    ]
    inits = [init("s", s), init("z", z), init("so", so), init("w", w)]
    return _shaped(make_model(nodes, [tensor("x", [1, 2, 4, 4])],
                              [tensor("y", [1, 2, 4, 4]), tensor("y2", [1, 2, 4, 4])], inits))


def test_qdq_float_op_goes_fp16_between_casts() -> None:
    """In QDQ format the Sigmoid (float for tensorrt) runs in fp16 between DQ and Q; the Conv
    reads DQ and tensorrt quantizes it, so it stays float32 (a Cast would break the fusion)."""
    proto = _qdq_model()
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")], target="tensorrt")
    out = model.to_proto()
    nodes = {n.name: n for n in out.graph.node}
    types = _elem_types(out)
    sig = nodes["sigmoid"]
    assert types[sig.input[0]] == F16 and types[sig.output[0]] == F16
    assert out.graph.node[[n.name for n in out.graph.node].index("sigmoid") - 1].op_type == "Cast"
    assert types[nodes["sq"].input[0]] == TensorProto.FLOAT
    assert [types[i] for i in nodes["conv"].input] == [TensorProto.FLOAT] * 2
    assert types[nodes["relu"].input[0]] == F16  # tensorrt declares no Conv+Relu fusion
    assert qcompiler.check_model(out, target="tensorrt").problems == []
    x = rand((1, 2, 4, 4), seed=9, low=-2, high=2)
    want, got = _run(proto, {"x": x}), _run_fp16(out, {"x": x})
    # the fp16 Sigmoid may move a value across a rounding boundary of the int8 output: 1 LSB
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1 / 127 + 1e-7)
    _assert_fp16_close(want[1], got[1])


def test_builtin_pipelines_run_it_after_cleanup_qdq() -> None:
    for name in qcompiler.builtin_targets():
        passes = qcompiler.load_target(name).pipeline("static").split(",")
        assert passes[passes.index("cleanup-qdq") + 1] == "convert-float16", name


def test_compile_tensorrt_fp16_target(tmp_path: Path) -> None:
    """A user target extending tensorrt with fp16: the compiled model is legal, runs in
    onnxruntime, and stays close to the same compile at fp32."""
    target = _fp16_target(tmp_path, "tensorrt")
    pipeline = qcompiler.load_target(target).pipeline("static").replace("calibrate", "calibrate{method=minmax}")
    half = qcompiler.compile(tiny_model(), target=target, calibration=tiny_calibration(8), pipeline=pipeline)
    full = qcompiler.compile(tiny_model(), target="tensorrt", calibration=tiny_calibration(8), pipeline=pipeline)
    assert half.report["check"]["legal"] is True
    assert qcompiler.check_model(half.proto, target=target).problems == []
    producers = {o: n for n in half.proto.graph.node for o in n.output}
    relu = next(n for n in half.proto.graph.node if n.op_type == "Relu")
    cast = producers[relu.input[0]]
    assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == F16
    assert half.proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = tiny_calibration(3, seed=11)[TINY_INPUT]
    for i in range(3):
        want = _run(full.proto, {TINY_INPUT: x[i:i + 1]})[0]
        got = _run_fp16(half.proto, {TINY_INPUT: x[i:i + 1]})[0]
        # only Relu runs in fp16 here, and Relu(fp16(x)) lands on the same int8 step as Relu(x)
        # for these inputs (measured difference < 1e-7 relative); a flipped step would cost ~1e-2
        np.testing.assert_allclose(got, want, rtol=0, atol=FP16_TOL * float(np.max(np.abs(want))))


@pytest.mark.parametrize("opset", [17, 21])
def test_if_node_and_its_body_stay_fp32(opset: int) -> None:
    """Nodes with subgraphs (If/Loop/Scan) and everything in their bodies stay float32."""
    then_g = helper.make_graph([helper.make_node("Relu", ["a"], ["t"], name="then_relu")], "then", [],
                               [tensor("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e"], name="else_neg")], "else", [],
                               [tensor("e", [2])])
    proto = _shaped(make_model(
        [helper.make_node("Abs", ["x"], ["a"], name="abs"),
         helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
         helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        [tensor("x", [2])], [tensor("y", [2])], [init("zero", np.array(1.0, np.float32))], opset=opset))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    out = model.to_proto()
    types = _elem_types(out)
    assert types["a"] == F16 and types["y"] == TensorProto.FLOAT
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    then_body = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert then_body.node[0].input[0] != "a"  # reads the float32 copy of a
    x = np.array([0.75, -0.5], np.float32)
    np.testing.assert_allclose(_run_fp16(out, {"x": x})[0], _run(proto, {"x": x})[0], rtol=1e-3)


def test_movement_op_follows_its_producer_and_double_reads_share_one_cast() -> None:
    """A Reshape fed by a float32 graph input stays float32 (no Cast pair around it); Mul(r, r)
    reads one fp16 copy of r through one Cast. Output is deterministic, byte for byte."""
    proto = _shaped(make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
         helper.make_node("Mul", ["r", "r"], ["m"], name="square"),
         helper.make_node("Flatten", ["m"], ["y"], name="flatten", axis=1)],
        [tensor("x", [2, 6])], [tensor("y", [3, 4])], [init("shape", np.array([3, 4], np.int64))]))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    out = model.to_proto()
    assert sorted(op_types(out)) == ["Cast", "Cast", "Flatten", "Mul", "Reshape"]
    types = _elem_types(out)
    nodes = {n.name: n for n in out.graph.node}
    assert types[nodes["reshape"].output[0]] == TensorProto.FLOAT
    assert nodes["square"].input[0] == nodes["square"].input[1] and types[nodes["square"].input[0]] == F16
    assert types[nodes["flatten"].input[0]] == F16  # follows the converted Mul
    again, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    assert again.to_proto().SerializeToString() == out.SerializeToString()
    x = rand((2, 6), seed=12)
    _assert_fp16_close(_run(proto, {"x": x})[0], _run_fp16(out, {"x": x})[0])


def test_constants_float16_cannot_hold_keep_their_node_fp32() -> None:
    """A BatchNormalization with running variances of 1e7 (seen in PP-OCRv4 before BN folding)
    and an Add of a -1e9 mask stay float32: clamping those to 65504 would change the result.
    The Relu between them still converts."""
    c = 3
    var = np.full(c, 1e7, np.float32)
    proto = _shaped(make_model(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], name="bn"),
         helper.make_node("Relu", ["n"], ["r"], name="relu"),
         helper.make_node("Add", ["r", "mask"], ["y"], name="mask_add")],
        [tensor("x", [1, c, 2, 2])], [tensor("y", [1, c, 2, 2])],
        [init("s", np.ones(c, np.float32)), init("b", np.zeros(c, np.float32)),
         init("m", np.full(c, 300.0, np.float32)), init("v", var),
         init("mask", np.array([[[[0.0, -1e9]]]], np.float32))]))
    model, _, _ = run_pass(proto, "convert-float16", [("force", "true")])
    out = model.to_proto()
    nodes = {n.name: n for n in out.graph.node}
    types = _elem_types(out)
    assert [types[i] for i in nodes["bn"].input] == [TensorProto.FLOAT] * 5
    assert types[nodes["relu"].output[0]] == F16
    assert [types[i] for i in nodes["mask_add"].input] == [TensorProto.FLOAT] * 2
    x = rand((1, c, 2, 2), seed=13, low=-3000, high=3000)
    _assert_fp16_close(_run(proto, {"x": x})[0][..., 0], _run_fp16(out, {"x": x})[0][..., 0])
