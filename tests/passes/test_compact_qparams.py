"""compact-qparams: equal zero points shared, generated names shortened, numbers unchanged."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import qcompiler
from _util import modified, run_pass

from conftest import TINY_INPUT, tiny_calibration, tiny_model


def _compiled(target: str = "ort-cpu") -> onnx.ModelProto:
    """The tiny model compiled by the target's pipeline without compact-qparams itself."""
    t = qcompiler.load_target(target)
    pipeline = ",".join(p for p in t.pipeline("static").split(",") if not p.startswith("compact-qparams"))
    return qcompiler.compile(tiny_model(), target=target, calibration=tiny_calibration(8), pipeline=pipeline).proto


def _run(proto: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {TINY_INPUT: tiny_calibration(2, seed=7)[TINY_INPUT][:1]})[0]


def _zero_points(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in proto.graph.initializer if not t.dims and t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)]


def test_outputs_bit_identical_and_zero_points_shared() -> None:
    before = _compiled()
    model, _, pm = run_pass(before, "compact-qparams")
    after = model.to_proto()
    assert modified(pm)
    assert np.array_equal(_run(before), _run(after))
    zps = _zero_points(after)
    values = [(t.data_type, numpy_helper.to_array(t).item()) for t in zps]
    assert len(values) == len(set(values)), "one initializer per distinct zero point"
    assert len(zps) < len(_zero_points(before))
    for t in zps:
        v = numpy_helper.to_array(t)
        assert t.name == f"zp_{'u8' if v.dtype == np.uint8 else 'i8'}_{v.item()}".replace("-", "m")


def test_names_shortened_interface_and_op_nodes_kept() -> None:
    before = _compiled()
    model, _, _ = run_pass(before, "compact-qparams")
    after = model.to_proto()
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    # op nodes keep their names (reports cite them); only Q/DQ node names change
    op_names = lambda p: [n.name for n in p.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert op_names(after) == op_names(before)
    names = [x for n in after.graph.node for x in list(n.input) + list(n.output)]
    assert not [x for x in names if x.endswith(("_quantized", "_scale", "_zero_point"))]
    inits = {t.name for t in after.graph.initializer}
    assert any(n.startswith("s") and n[1:].isdigit() for n in inits)
    assert any(n.startswith("q") and n[1:].isdigit() for n in inits)
    assert len(after.SerializeToString()) < len(before.SerializeToString())


def test_second_run_changes_nothing() -> None:
    model, _, _ = run_pass(_compiled(), "compact-qparams")
    again, _, pm = run_pass(model, "compact-qparams")
    assert not modified(pm)


def test_options_off_keep_names() -> None:
    before = _compiled()
    model, _, _ = run_pass(before, "compact-qparams", [("short-suffixes", "false"), ("number-initializers", "false")])
    after = model.to_proto()
    kept = {t.name for t in after.graph.initializer}
    originals = {t.name for t in before.graph.initializer}
    assert kept - originals == {t.name for t in _zero_points(after)}  # only the shared zero points are new
    assert collections.Counter(n.op_type for n in after.graph.node) == collections.Counter(n.op_type for n in before.graph.node)
