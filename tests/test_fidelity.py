"""The compile report's fidelity section: the float half computed in the background
(qcompiler.fidelity.FloatReference) gives the numbers a direct two-session run gives, and a model
too large to hold twice keeps its calibration samples instead of measuring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompiler
import qcompiler.fidelity as fidelity_mod
from qcompiler.fidelity import FloatReference, measure_fidelity
from conftest import tiny_calibration, tiny_model


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    batch = tiny_calibration(n, seed=3)
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)]


def test_background_reference_equals_a_direct_run(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(src))
    result = qcompiler.compile(str(src), target="ort-cpu", calibration=_samples(20))
    fid = result.report["fidelity"]
    assert fid["samples"] == 2 and "held_out" in fid
    held = _samples(20)[18:]
    direct = measure_fidelity(str(src), result.serialized(), held, as_written=False)
    via_thread = measure_fidelity(FloatReference(str(src), held), result.serialized(), held, as_written=False)
    for name, row in direct.items():
        for key, value in row.items():
            # same float model, same samples: the one-thread session may reorder a sum, nothing more
            assert via_thread[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
            assert fid["outputs"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)


def test_background_reference_raises_in_the_caller() -> None:
    ref = FloatReference(b"not a model", _samples(1))
    with pytest.raises(Exception):
        ref.outputs()


def test_large_input_keeps_every_sample_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(src))
    monkeypatch.setattr(fidelity_mod, "HOLD_OUT_MAX_MODEL_BYTES", 16)  # every model counts as huge
    result = qcompiler.compile(str(src), target="ort-cpu", calibration=_samples(20))
    fid = result.report["fidelity"]
    assert fid["status"].startswith("not measured: the input model is") and "--eval-data" in fid["status"]
    assert result.report["calibration"]["samples"] == 20  # nothing held out for a measurement not made
    with_eval = qcompiler.compile(str(src), target="ort-cpu", calibration=_samples(20), eval_data=_samples(3))
    assert with_eval.report["fidelity"]["samples"] == 3 and "outputs" in with_eval.report["fidelity"]


def test_same_model_and_samples_reuse_the_reference(tmp_path: Path) -> None:
    """A budget search compiles one model on one sample set several times: the float outputs
    are computed once; another sample set or a rewritten file computes them again."""
    src = tmp_path / "m.onnx"
    onnx.save(tiny_model(), str(src))
    a = FloatReference.start(str(src), _samples(2))
    assert FloatReference.start(str(src), _samples(2)) is a  # equal content, new arrays
    b = FloatReference.start(str(src), _samples(3))
    assert b is not a
    m = tiny_model()
    m.doc_string = "changed"
    onnx.save(m, str(src))
    assert FloatReference.start(str(src), _samples(3)) is not b
