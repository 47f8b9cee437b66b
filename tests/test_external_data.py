"""Models whose weights live in external data files: loading them, and the save path used for
outputs above protobuf's 2 GB limit (exercised with the limit lowered, since a real 2 GB model
is too large for the suite)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qcompiler
import qcompiler.ir.io as io_mod
from conftest import TINY_INPUT, tiny_calibration, tiny_model


def _save_external(path: Path) -> None:
    onnx.save_model(tiny_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _run(model: str | bytes) -> np.ndarray:
    x = tiny_calibration(1, seed=9)[TINY_INPUT]
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {TINY_INPUT: x})[0]


def test_compile_reads_external_data_and_leaves_it_untouched(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    _save_external(src)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size > src.stat().st_size  # the weights really are outside
    before = _digest(src, data)
    result = qcompiler.compile(str(src), target="ort-cpu", calibration=tiny_calibration(6))
    assert before == _digest(src, data)
    ref = _run(tiny_model().SerializeToString())
    got = _run(result.proto.SerializeToString())
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


def test_large_output_goes_to_external_data_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_mod, "_TWO_GB", 64)  # every model counts as "large" now
    monkeypatch.setattr(io_mod, "_EXTERNAL_MIN_BYTES", 64)  # and the tiny weights go outside
    result = qcompiler.compile(tiny_model(), target="ort-cpu", calibration=tiny_calibration(6))
    assert result.report["size_bytes"]["output"] is None  # unknown until saved with external data
    out = tmp_path / "big.onnx"
    size = result.save(out)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and size == out.stat().st_size + data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp files left
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.external_data for t in stored.graph.initializer)
    assert {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(_run(str(out)), _run(result.proto.SerializeToString()))


def test_missing_external_data_is_a_user_error(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    _save_external(src)
    (tmp_path / "ext.onnx.data").unlink()
    calib = tmp_path / "calib.npz"
    np.savez(calib, **tiny_calibration(4))
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", str(src), "-o", str(out),
                           "--calibration", str(calib)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
