"""quantize-weights on single-op graphs: what each lowering emits, and its numbers.

CPU fact pinned: the GatherBlockQuantized comparison runs onnxruntime with the graph as
written (a pure dequantize + gather: no ISA-specific arithmetic); MatMulNBits numerics are
compared in tests/test_weight_only.py with accuracy_level 0 (float32 compute on every CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import qcompiler
from qcompiler.weight_only import gather_block_quantized

from _util import init, make_model, op_types, run_ort, run_pass, tensor


def _matmul(k: int = 80, n: int = 24, opset: int = 17):  # noqa: ANN202
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [tensor("x", [2, k])], [tensor("y", [2, n])], [init("w", w)], opset=opset), w


def _gather(v: int = 50, d: int = 64):  # noqa: ANN202
    table = np.random.default_rng(1).standard_normal((v, d)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)
    return make_model([node], [tensor("ids", [3], TensorProto.INT64)], [tensor("y", [3, d])],
                      [init("table", table)]), table


def test_matmul_becomes_matmul_nbits_with_target_attributes() -> None:
    proto, _ = _matmul()
    model, ctx, _ = run_pass(proto, "quantize-weights", [("block-size", "16"), ("symmetric", "false")])
    assert op_types(model) == ["MatMulNBits"]
    node = model.graph.gs.nodes[0]
    assert node.domain == "com.microsoft"
    assert dict(node.attrs) == {"K": 80, "N": 24, "bits": 4, "block_size": 16, "accuracy_level": 4}
    assert node.inputs[1].values.shape == (24, 5, 8)  # [N, k_blocks, block * bits / 8]
    assert node.inputs[3].values.shape == (24 * 3,)  # 5 zero points a column, packed 2 a byte, padded
    assert ctx.report["weight_only"]["algorithm"] == "rtn"


@pytest.mark.parametrize("options, bits, block", [
    ([("gather-bits", "4"), ("gather-block-size", "32")], 4, 32),
    ([], 8, 16),  # defaults: a small table (3200 elements) at 8 bits, blocks of at most GATHER_BLOCK
])
def test_gather_becomes_gather_block_quantized_equal_to_reference(options: list, bits: int, block: int) -> None:
    proto, table = _gather()
    model, ctx, _ = run_pass(proto, "quantize-weights", [("block-size", "32"), *options])
    assert op_types(model) == ["GatherBlockQuantized"]
    ids = np.array([0, 49, 7], dtype=np.int64)
    got = run_ort(model, {"ids": ids})[0]
    n = model.graph.gs.nodes[0]
    assert (n.attrs["bits"], n.attrs["block_size"]) == (bits, block)
    assert ctx.report["weight_only"]["tables"] == {"table": f"{bits}-bit block {block}"}
    assert len(n.inputs) == 4  # ort-cpu's default symmetry (its first listed) is asymmetric: zero points
    want = gather_block_quantized(n.inputs[0].values, ids, n.inputs[2].values, n.inputs[3].values, block_size=block,
                                  bits=bits)
    np.testing.assert_array_equal(got, want)  # dequantize + gather: exact
    # the clipping search keeps >= 0.75 of a block's range: an extreme is off by at most
    # (1 - 0.75) / 0.75 * 15 = 5 steps, every other value by half a step
    assert np.abs(got - table[ids]).max() <= 5.5 * np.abs(n.inputs[2].values).max() + 1e-6


def test_qdq_target_needs_opset_21_and_emits_blocked_dq() -> None:
    proto, w = _matmul()
    with pytest.raises(qcompiler.UserError, match="opset 21"):
        run_pass(proto, "quantize-weights", target="ort-cpu-qdq")
    proto21, _ = _matmul(opset=21)
    model, _, _ = run_pass(proto21, "quantize-weights", [("block-size", "16"), ("symmetric", "true")],
                           target="ort-cpu-qdq")
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    dq = model.graph.gs.nodes[0]
    assert dq.attrs["block_size"] == 16 and dq.attrs["axis"] == 0
    assert dq.inputs[0].values.dtype.name == "int4" and dq.inputs[1].values.shape == (5, 24)
    x = np.random.default_rng(2).standard_normal((2, 80)).astype(np.float32)
    got = run_ort(model, {"x": x})[0]
    assert np.abs(got - x @ w).max() < 0.2 * np.abs(x @ w).max()


def test_target_without_weight_only_table_refuses() -> None:
    proto, _ = _matmul()
    with pytest.raises(qcompiler.UserError, match="no \\[weight_only\\] table"):
        run_pass(proto, "quantize-weights", target="npu-int8")
