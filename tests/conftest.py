"""Shared, generic helpers for qcompiler tests: small ONNX models built with onnx.helper.

Every model sets ``ir_version`` and the opset explicitly (onnx's defaults are newer than the
onnxruntime the tests run against).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17

# Tiny float model: x[1,3,8,8] -> Conv -> Relu -> (Conv) -> Add -> GlobalAveragePool -> Flatten -> Gemm -> y[1,5]
TINY_INPUT = "x"
TINY_OUTPUT = "y"
TINY_INPUT_SHAPE = (1, 3, 8, 8)
TINY_OUTPUT_SHAPE = (1, 5)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Iterable[onnx.TensorProto] = (),
               opset: int = OPSET, *, extra_opsets: dict[str, int] | None = None,
               ir_version: int = IR_VERSION, name: str = "g",
               value_info: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """A ModelProto with an explicit IR version and opset imports (never onnx's defaults)."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers),
                              value_info=list(value_info))
    imports = [helper.make_opsetid("", opset)]
    for domain, version in (extra_opsets or {}).items():
        imports.append(helper.make_opsetid(domain, version))
    return helper.make_model(graph, opset_imports=imports, ir_version=ir_version)


def tensor_info(name: str, shape: Sequence[int | str | None] | None,
                elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A typed graph input/output declaration."""
    return helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape))


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer from a numpy array (dtype kept)."""
    return numpy_helper.from_array(np.asarray(array), name)


def tiny_model() -> onnx.ModelProto:
    """Conv+Relu+Add+GlobalAveragePool+Gemm float model with fixed-seed weights."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32)
    b2 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    wg = (rng.standard_normal((5, 4)) * 0.5).astype(np.float32)
    bg = (rng.standard_normal(5) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r1", "c2"], ["a1"], name="add1"),
        helper.make_node("GlobalAveragePool", ["a1"], ["p1"], name="gap"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f1", "wg", "bg"], ["y"], name="gemm", transB=1),
    ]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2), init("wg", wg), init("bg", bg)]
    model = make_model(nodes, [tensor_info(TINY_INPUT, TINY_INPUT_SHAPE)],
                       [tensor_info(TINY_OUTPUT, TINY_OUTPUT_SHAPE)], inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_calibration(n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    """Calibration samples for :func:`tiny_model`, stacked on axis 0 (one sample per row)."""
    rng = np.random.default_rng(seed)
    return {TINY_INPUT: rng.standard_normal((n,) + TINY_INPUT_SHAPE[1:]).astype(np.float32)}


@pytest.fixture
def tiny_model_proto() -> onnx.ModelProto:
    """A fresh copy of the tiny float model."""
    return tiny_model()


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    """The tiny float model saved as tmp_path/tiny.onnx."""
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), str(path))
    return path


@pytest.fixture
def tiny_calib_path(tmp_path: Path) -> Path:
    """A matching calibration .npz (key 'x', 4 samples) in tmp_path."""
    path = tmp_path / "tiny_calib.npz"
    np.savez(path, **tiny_calibration())
    return path


def write_workdir(d: Path, models: dict[str, onnx.ModelProto], calib: np.ndarray, evaluation: np.ndarray,
                  input_name: str = "x") -> Path:
    """Save ``models`` (file name -> proto) and the calibration / eval arrays as ``calib.npz`` and
    ``eval.npz`` under ``d``: the working directory of the accuracy-budget tests."""
    for name, proto in models.items():
        onnx.save(proto, d / name)
    np.savez(d / "calib.npz", **{input_name: calib})
    np.savez(d / "eval.npz", **{input_name: evaluation})
    return d


def compile_in(work: Path, target: str, model: str = "float.onnx", **kw: object):  # -> qcompiler.CompileResult
    """``qcompiler.compile`` of ``work/model`` on its ``calib.npz``, measured on its ``eval.npz``."""
    import qcompiler

    return qcompiler.compile(str(work / model), target=target, calibration=str(work / "calib.npz"),
                             eval_data=str(work / "eval.npz"), **kw)


def outlier_inputs(n: int, seed: int) -> np.ndarray:
    """[n, 4, 10, 10] standard normal samples whose channel 0 is 1000x the others: its per-tensor
    8-bit grid leaves the other channels a handful of levels (the budget tests' one bad layer)."""
    x = np.random.default_rng(seed).standard_normal((n, 4, 10, 10)).astype(np.float32)
    x[:, 0] *= 1000.0
    return x
