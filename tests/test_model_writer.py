"""Saving a model one tensor at a time (qcompiler.ir.writer): the streamed single file is
byte for byte ``to_proto().SerializeToString(deterministic=True)``; above the (lowered) 2 GB
threshold the payloads go to page-aligned external data, the same bytes twice; and a save never
exports the weights into a proto (the compile's peak memory on a billion-parameter model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qcompiler
import qcompiler.ir.io as irio
from conftest import tiny_calibration, tiny_model
from qcompiler.ir import load_model
from qcompiler.ir.io import model_bytes, model_size, save_model
from qcompiler.ir.model import Model

_spec = importlib.util.spec_from_file_location("make_decoder", Path(__file__).parents[1] / "benchmarks" / "make_decoder.py")
make_decoder = importlib.util.module_from_spec(_spec)
sys.modules["make_decoder"] = make_decoder
_spec.loader.exec_module(make_decoder)
CFG = make_decoder.SIZES["tiny"]


def _reference(model: Model) -> bytes:
    proto = model.to_proto()
    del proto.graph.value_info[:]
    return proto.SerializeToString(deterministic=True)


def _mixed_model() -> onnx.ModelProto:
    """Large and small initializers of several dtypes, one read only inside an If branch, a
    Constant node, doc strings and metadata: every field around the streamed payloads."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w")
    w.doc_string = "a doc string after raw_data"
    h = onnx.numpy_helper.from_array(rng.standard_normal((48,)).astype(np.float16), "h")
    mask = onnx.numpy_helper.from_array(rng.random(2000) > 0.5, "mask")
    idx = onnx.numpy_helper.from_array(np.arange(600, dtype=np.int64), "idx")
    small = onnx.numpy_helper.from_array(np.ones(3, np.float32), "small")
    body_w = onnx.numpy_helper.from_array(rng.standard_normal((48, 48)).astype(np.float32), "body_w")
    then_g = helper.make_graph([helper.make_node("MatMul", ["y", "body_w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 48])])
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 48])])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
            rng.standard_normal(400).astype(np.float32), "cv")),
        helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["c"], ["cs"], keepdims=0),
        helper.make_node("Greater", ["cs", "cs"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["z", "hf"], ["out"]),
        helper.make_node("Not", ["mask"], ["mask_out"]),
        helper.make_node("Identity", ["idx"], ["idx_out"]),
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 48]),
                               helper.make_tensor_value_info("mask_out", TensorProto.BOOL, [2000]),
                               helper.make_tensor_value_info("idx_out", TensorProto.INT64, [600])],
                              initializer=[w, h, mask, idx, small, body_w], doc_string="graph doc")
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="model doc",
                          producer_name="test")
    m.ir_version = 8
    helper.set_model_props(m, {"b": "2", "a": "1"})
    return m


@pytest.mark.parametrize("min_bytes", [64, 1024])
def test_streamed_file_is_the_serialized_proto(min_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(irio, "_EXTERNAL_MIN_BYTES", min_bytes)  # 64: every tensor above streams
    model = load_model(_mixed_model())
    assert model_bytes(model) == _reference(model)
    assert model_size(model) == len(_reference(model))


def test_streamed_compiled_models_are_their_serialized_protos(tmp_path: Path) -> None:
    dec = make_decoder.build_decoder(CFG, tmp_path / "dec.onnx", seed=1)
    for res in (qcompiler.compile(tiny_model(), calibration=tiny_calibration(6)),
                qcompiler.compile(dec, mode="weight-only", block_size=16)):
        out = tmp_path / "q.onnx"
        size = res.save(out)
        assert out.read_bytes() == res.proto.SerializeToString(deterministic=True)
        assert size == res.report["size_bytes"]["output"] == out.stat().st_size


def test_save_never_exports_the_weights_into_a_proto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every export during compile and save leaves the large initializers out (``shared``):
    the payloads are written from the IR's arrays, one at a time."""
    dec = make_decoder.build_decoder(CFG, tmp_path / "dec.onnx", seed=1)
    calls: list[bool] = []
    original = Model.to_proto

    def spy(self: Model, shared: dict | None = None, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(shared is not None)
        return original(self, shared, *args, **kwargs)

    monkeypatch.setattr(Model, "to_proto", spy)
    res = qcompiler.compile(dec, mode="weight-only", block_size=16)
    start = len(calls)
    res.save(tmp_path / "q.onnx")
    assert len(calls) > start and all(calls[start:]), "save exported a whole proto"
    monkeypatch.setattr(irio, "_TWO_GB", 64 * 1024)
    res.save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 64 * 1024 and all(calls[start:])


def test_external_data_is_page_aligned_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(irio, "_TWO_GB", 16 * 1024)  # the skeleton (~11 KB) fits, the model does not
    monkeypatch.setattr(irio, "_EXTERNAL_MIN_BYTES", 64)
    model = load_model(_mixed_model())
    assert model_size(model) is None and model_bytes(model) is None  # above the (lowered) limit
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name / "m.onnx"
        out.parent.mkdir()
        size = save_model(model, out)
        data = out.parent / "m.onnx.data"
        assert size == out.stat().st_size + data.stat().st_size
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
        stored = onnx.load(str(out), load_external_data=False)
        offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"])
                   for t in stored.graph.initializer if t.external_data}
        assert set(offsets) == {"w", "h", "mask", "idx"}  # small stays inline; body_w is in a branch
        assert all(o % 4096 == 0 for o in offsets.values())
        loaded = onnx.load(str(out))
        ref = {t.name: onnx.numpy_helper.to_array(t) for t in _mixed_model().graph.initializer}
        for t in loaded.graph.initializer:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), ref[t.name])
        onnx.checker.check_model(str(out), full_check=True)
        digests.append((out.read_bytes(), data.read_bytes()))
    assert digests[0] == digests[1]
    x = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, x)  # noqa: E731
    for got, want in zip(run(str(tmp_path / "a" / "m.onnx")), run(_mixed_model().SerializeToString())):
        np.testing.assert_array_equal(got, want)
