"""Outputs above protobuf's 2 GB limit (issue 13, M4), exercised with the limit lowered
(``qcompiler.ir.io._TWO_GB``): the CLI compiles, writes the model with its weights in
``OUT.data``, reports the true sizes, and does so deterministically. Also: the report's input
size counts the input's external data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qcompiler
import qcompiler.ir.io as model_mod
from conftest import TINY_INPUT, tiny_calibration, tiny_model
from qcompiler.cli import main


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod, "_TWO_GB", 256)  # the tiny compiled model (~1.4 KB) is "above 2 GB"
    monkeypatch.setattr(model_mod, "_EXTERNAL_MIN_BYTES", 64)  # and its weights go to external data


def test_large_output_compiles_with_external_data(tmp_path: Path, lowered: None) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny_model().SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, **tiny_calibration(6))
    digests = []
    for run in ("a", "b"):
        out_dir = tmp_path / run
        out_dir.mkdir()
        out, rep = out_dir / "q.onnx", out_dir / "r.json"
        assert main(["compile", str(src), "-o", str(out), "--calibration", str(calib), "--report", str(rep), "-q"]) == 0
        data = out_dir / "q.onnx.data"
        assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "q.onnx.data", "r.json"]
        report = json.loads(rep.read_text())
        assert report["size_bytes"]["output"] == out.stat().st_size + data.stat().st_size
        stored = onnx.load(str(out), load_external_data=False)
        assert any(t.external_data for t in stored.graph.initializer)
        onnx.checker.check_model(str(out), full_check=True)
        digests.append((_sha(out), _sha(data)))
    assert digests[0] == digests[1], "same inputs must give the same bytes"
    # the same numbers as the model saved inline
    x = tiny_calibration(1, seed=3)[TINY_INPUT]
    inline = qcompiler.compile(str(src), calibration=str(calib)).proto.SerializeToString()
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {TINY_INPUT: x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(str(tmp_path / "a" / "q.onnx")), run(inline))


def test_report_output_size_is_unknown_until_saved_above_the_limit(tmp_path: Path, lowered: None) -> None:
    result = qcompiler.compile(tiny_model(), calibration=tiny_calibration(6))
    assert result.report["size_bytes"]["output"] is None  # protobuf could not size it: no ByteSize() call
    size = result.save(tmp_path / "q.onnx")
    assert result.report["size_bytes"]["output"] == size > 0


def test_input_size_counts_external_data(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    onnx.save_model(tiny_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    result = qcompiler.compile(str(src), calibration=tiny_calibration(6))
    assert result.report["size_bytes"]["input"] == src.stat().st_size + (tmp_path / "w.bin").stat().st_size
    assert (tmp_path / "w.bin").stat().st_size > src.stat().st_size
