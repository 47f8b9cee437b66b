"""fold-matmul-add: MatMul + constant bias Add -> Gemm, but only where the target asks for it
(`prefer_gemm`), and only in the 2-D form Gemm can express."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from _util import assert_same_outputs, init, initializers, make_model, modified, op_types, rand, run_pass, tensor

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def gemm_target(tmp_path: Path) -> Path:
    """ort-cpu plus `prefer_gemm = true` on MatMul: the only switch this pass reads."""
    path = tmp_path / "gemmy.toml"
    path.write_text('schema = 1\nname = "gemmy"\ndescription = "ort-cpu, MatMul+Add as Gemm"\n'
                    'extends = "ort-cpu"\n\n[ops.MatMul]\nprefer_gemm = true\n')
    return path


def _model(x_shape: list[int], bias: np.ndarray, *, bias_first: bool = False, extra_reader: bool = False,
           runtime_bias: bool = False) -> onnx.ModelProto:
    k, n = x_shape[-1], 5
    add_in = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", add_in, ["y"], name="add")]
    out_shape = x_shape[:-1] + [n]
    outputs = [tensor("y", out_shape)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="relu"))
        outputs.append(tensor("r", out_shape))
    inputs = [tensor("x", x_shape)]
    inits = [init("w", rand([k, n], seed=1))]
    if runtime_bias:
        inputs.append(tensor("b", list(bias.shape)))
    else:
        inits.append(init("b", bias))
    return make_model(nodes, inputs, outputs, inits)


def test_matmul_add_becomes_gemm(gemm_target: Path) -> None:
    """Add(MatMul(x[4,8], W[8,5]), b[5]) -> Gemm(x, W, b) with default attributes; same numbers."""
    bias = rand([5], seed=2)
    proto = _model([4, 8], bias)
    model, _, pm = run_pass(proto, "fold-matmul-add", target=gemm_target)
    assert modified(pm)
    assert op_types(model) == ["Gemm"]
    g = model.to_proto().graph
    gemm = g.node[0]
    assert list(gemm.attribute) == []  # alpha=beta=1, no transposes
    assert gemm.input[0] == "x" and gemm.input[1] == "w" and gemm.output[0] == "y"
    inits = initializers(model)
    np.testing.assert_array_equal(inits[gemm.input[2]], bias)
    assert inits[gemm.input[2]].shape == (5,)
    assert_same_outputs(proto, model, {"x": rand([4, 8], seed=3)}, **TOL)


def test_bias_first_and_row_bias_fold(gemm_target: Path) -> None:
    """Add(b[1,5], MatMul) (commuted, bias as a [1,N] row) folds too; the bias is stored 1-D."""
    proto = _model([3, 8], rand([1, 5], seed=4), bias_first=True)
    model, _, pm = run_pass(proto, "fold-matmul-add", target=gemm_target)
    assert modified(pm)
    assert op_types(model) == ["Gemm"]
    gemm = model.to_proto().graph.node[0]
    assert initializers(model)[gemm.input[2]].shape == (5,)
    assert_same_outputs(proto, model, {"x": rand([3, 8], seed=5)}, **TOL)


def test_3d_activation_left_alone(gemm_target: Path) -> None:
    """Gemm is 2-D only: a [2,4,8] activation keeps MatMul + Add."""
    model, _, pm = run_pass(_model([2, 4, 8], rand([5], seed=6)), "fold-matmul-add", target=gemm_target)
    assert not modified(pm)
    assert op_types(model) == ["MatMul", "Add"]


def test_ort_cpu_without_prefer_gemm_left_alone() -> None:
    """ort-cpu does not set prefer_gemm on MatMul: the pass does nothing there."""
    model, _, pm = run_pass(_model([4, 8], rand([5], seed=7)), "fold-matmul-add", target="ort-cpu")
    assert not modified(pm)
    assert op_types(model) == ["MatMul", "Add"]


@pytest.mark.parametrize("kwargs", [
    pytest.param({"bias": np.ones([4, 5], np.float32)}, id="full-matrix-bias"),
    pytest.param({"bias": np.ones([5], np.float32), "extra_reader": True}, id="matmul-output-read-twice"),
    pytest.param({"bias": np.ones([5], np.float32), "runtime_bias": True}, id="runtime-bias"),
])
def test_not_folded(gemm_target: Path, kwargs: dict) -> None:
    """A bias Gemm cannot take as [N], a MatMul result still needed elsewhere, or a run-time
    bias all keep the original pair."""
    kw = dict(kwargs)
    bias = kw.pop("bias")
    model, _, pm = run_pass(_model([4, 8], bias, **kw), "fold-matmul-add", target=gemm_target)
    assert not modified(pm)
    assert op_types(model)[:2] == ["MatMul", "Add"]
