"""One model, two targets: the same passes produce an onnxruntime-CPU QOperator model (uint8
activations, integer kernels) or a TensorRT QDQ model (symmetric int8, float bias, Q/DQ on
quantized inputs only), purely from what the target TOML files say.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompiler
from conftest import TINY_INPUT, tiny_calibration, tiny_model


def _compile(target: str | Path) -> onnx.ModelProto:
    """The target's own static pipeline, with minmax calibration (mse costs ~0.4 s a tensor)."""
    pipeline = qcompiler.load_target(target).pipeline("static").replace("calibrate", "calibrate{method=minmax}")
    return qcompiler.compile(tiny_model(), target=target, calibration=tiny_calibration(8), pipeline=pipeline).proto


@pytest.fixture(scope="module")
def compiled() -> dict[str, onnx.ModelProto]:
    return {name: _compile(name) for name in ("ort-cpu", "tensorrt")}


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {TINY_INPUT: x})[0]


def test_targets_give_different_models(compiled: dict[str, onnx.ModelProto]) -> None:
    """Same model, same calibration, same pass code: different op sets."""
    ops = {name: sorted({n.op_type for n in p.graph.node}) for name, p in compiled.items()}
    assert ops["ort-cpu"] != ops["tensorrt"]
    assert compiled["ort-cpu"].SerializeToString() != compiled["tensorrt"].SerializeToString()


def test_ort_cpu_model(compiled: dict[str, onnx.ModelProto]) -> None:
    """ort-cpu: QLinearConv kernels, uint8 activations with asymmetric zero points."""
    proto = compiled["ort-cpu"]
    inits = _inits(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops
    q_in = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == TINY_INPUT)
    assert inits[q_in.input[2]].dtype == np.uint8 and int(inits[q_in.input[2]]) not in (0, 128)
    for conv in (n for n in proto.graph.node if n.op_type == "QLinearConv"):
        x_zp, w_zp, y_zp = inits[conv.input[2]], inits[conv.input[5]], inits[conv.input[7]]
        assert x_zp.dtype == np.uint8 and y_zp.dtype == np.uint8 and w_zp.dtype == np.int8


def test_tensorrt_model(compiled: dict[str, onnx.ModelProto]) -> None:
    """tensorrt: only Q/DQ besides the float ops; int8 zero points all 0; float biases (no int32
    DQ); Q/DQ on every Conv input but no Q on a Conv's output unless a quantized op reads it."""
    proto = compiled["tensorrt"]
    inits = _inits(proto)
    nodes = list(proto.graph.node)
    ops = {n.op_type for n in nodes}
    assert ops == {"QuantizeLinear", "DequantizeLinear", "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert all(n.domain in ("", "ai.onnx") for n in nodes)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                assert inits[n.input[0]].dtype == np.int8  # weights only: no int32 bias anywhere
    convs = {n.name: n for n in nodes if n.op_type in ("Conv", "Gemm")}
    for name, node in convs.items():
        assert producer[node.input[0]].op_type == "DequantizeLinear", name
        assert producer[node.input[1]].op_type == "DequantizeLinear", name
        assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32, name
    # conv1 -> Relu (float on TensorRT): no Q on its output; conv2 -> Add (quantized): Q
    assert readers[convs["conv1"].output[0]] == ["Relu"]
    assert readers[convs["conv2"].output[0]] == ["QuantizeLinear"]
    assert convs["gemm"].output[0] == "y" and "y" not in readers


def test_both_run_close_to_float(compiled: dict[str, onnx.ModelProto]) -> None:
    """Both compiled models run in onnxruntime and stay close to the float model (cosine >
    0.99, max error < 5% of the output range) on unseen inputs."""
    xs = tiny_calibration(10, seed=11)[TINY_INPUT]
    want = np.concatenate([_run(tiny_model(), x[None]) for x in xs]).reshape(-1)
    for name, proto in compiled.items():
        got = np.concatenate([_run(proto, x[None]) for x in xs]).reshape(-1)
        cosine = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert cosine > 0.99, name
        assert np.abs(got - want).max() < 0.05 * (want.max() - want.min()), name


def test_target_is_data(tmp_path: Path, compiled: dict[str, onnx.ModelProto]) -> None:
    """A copy of tensorrt.toml loaded from a file path compiles to the very same bytes as the
    built-in name: nothing but the file's contents decides."""
    copy = tmp_path / "my-gpu.toml"
    shutil.copyfile(qcompiler.builtin_targets()["tensorrt"], copy)
    assert _compile(copy).SerializeToString() == compiled["tensorrt"].SerializeToString()
