"""Range files: JSON export/import round-trips bit-exactly, imported ranges override calibrated
ones (checked in the compiled model's scales), a file that pins every tensor replaces the
calibration data, bad files fail with one line naming file and tensor, and the TensorRT
table holds amax/127 as big-endian float32 hex (decoded independently with struct)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qcompiler
from conftest import tiny_calibration, tiny_model
from qcompiler.cli import main
from qcompiler.rangefile import (read_ranges, read_tensorrt_table, tensorrt_table, write_ranges,
                                 write_tensorrt_table)

TINY_TENSORS = {"x", "r1", "c2", "a1", "p1", "f1", "y"}  # float tensors calibrate observes (c1: inside the fused conv1+relu1)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **tiny_calibration())
    return {"model": model, "calib": calib, "dir": tmp_path}


def _input_scale(proto: onnx.ModelProto, tensor: str) -> float:
    """Scale of the QuantizeLinear that quantizes ``tensor``."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    (node,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    return float(inits[node.input[1]])


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    """Awkward floats (subnormal-ish, negative zero, long mantissas) read back bit-exactly;
    the file is deterministic and sorted by tensor name."""
    ranges = {"b": (-1e-30, 3.0000000000000004), "a": (-0.0, 1 / 3), "c/with:odd name": (-7.5, -7.5)}
    path = tmp_path / "r.json"
    write_ranges(path, ranges, method="minmax", samples=3, real_data=True)
    first = path.read_bytes()
    assert read_ranges(path) == ranges
    data = json.loads(first)
    assert data["format"] == "qcompiler-ranges" and data["version"] == 1
    assert list(data["ranges"]) == sorted(ranges)
    write_ranges(path, dict(reversed(list(ranges.items()))), method="minmax", samples=3, real_data=True)
    assert path.read_bytes() == first


@pytest.mark.parametrize("content, fragment", [
    ("not json", "not a JSON range file"),
    ('{"format": "other", "version": 1, "ranges": {}}', "not a qcompiler range file"),
    ('{"format": "qcompiler-ranges", "version": 2, "ranges": {}}', "version 2"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": []}', "'ranges'"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": {"t1": {"min": 0}}}', "tensor 't1'"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": {"t1": {"min": "0", "max": 1}}}', "tensor 't1'"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": {"t1": {"min": 2, "max": 1}}}', "greater than max"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": {"t1": {"min": NaN, "max": 1}}}', "finite"),
    ('{"format": "qcompiler-ranges", "version": 1, "ranges": {"t1": {"min": 0, "max": 1, "mx": 2}}}', "tensor 't1'"),
])
def test_read_rejects_bad_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(qcompiler.UserError) as info:
        read_ranges(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_tensorrt_table_format(tmp_path: Path) -> None:
    """First line TRT-<version>-EntropyCalibration2; each line 'name: hex' with hex the
    big-endian float32 of max(|min|, |max|) / 127; a known value checked by hand."""
    ranges = {"data": (-1.0, 0.5), "conv": (0.0, 6.0), "neg": (-12.7, 1.0)}
    text = tensorrt_table(ranges)
    lines = text.splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1:] == sorted(lines[1:])
    table = dict(line.split(": ") for line in lines[1:])
    for name, (lo, hi) in ranges.items():
        want = np.float32(max(abs(lo), abs(hi)) / 127.0)
        got = np.frombuffer(bytes.fromhex(table[name]), dtype=">f4")[0]
        assert got == want, name
    assert table["neg"] == "3dcccccd"  # 12.7 / 127 = 0.1f: IEEE-754 0x3DCCCCCD
    path = tmp_path / "t.cache"
    write_tensorrt_table(path, ranges, version="7000")
    assert path.read_text().splitlines()[0] == "TRT-7000-EntropyCalibration2"
    scales = read_tensorrt_table(path)
    assert scales["conv"] == struct.unpack(">f", struct.pack(">f", 6.0 / 127))[0]


def test_export_then_import_reproduces_the_model(files: dict[str, Path]) -> None:
    """Exported ranges imported with the same data give a byte-identical model; the exported
    tensors are exactly the float tensors calibrate observes."""
    out = files["dir"] / "ranges.json"
    first = qcompiler.compile(str(files["model"]), calibration=str(files["calib"]), export_ranges=out)
    assert set(read_ranges(out)) == TINY_TENSORS
    assert json.loads(out.read_text())["real_data"] is True
    again = qcompiler.compile(str(files["model"]), calibration=str(files["calib"]), import_ranges=out)
    assert first.proto.SerializeToString() == again.proto.SerializeToString()
    assert again.report["calibration"]["ranges_file"] == str(out)


def test_imported_range_overrides_calibrated(files: dict[str, Path]) -> None:
    """Pinning only 'x' to [-10, 10] on tensorrt (symmetric int8) makes x's scale 10/127;
    without the pin it is the calibrated one (much smaller for N(0,1) data)."""
    pin = files["dir"] / "pin.json"
    write_ranges(pin, {"x": (-10.0, 10.0)})
    plain = qcompiler.compile(str(files["model"]), target="tensorrt", calibration=str(files["calib"]))
    pinned = qcompiler.compile(str(files["model"]), target="tensorrt", calibration=str(files["calib"]),
                               import_ranges=pin)
    assert _input_scale(pinned.proto, "x") == pytest.approx(10 / 127, rel=1e-6)
    assert _input_scale(plain.proto, "x") < 0.05


def test_full_pin_needs_no_data(files: dict[str, Path]) -> None:
    """A file pinning every tensor compiles with no calibration data (no model runs); one that
    misses a tensor fails naming it."""
    full = files["dir"] / "full.json"
    qcompiler.compile(str(files["model"]), calibration=str(files["calib"]), export_ranges=full)
    result = qcompiler.compile(str(files["model"]), import_ranges=full)
    assert result.report["calibration"]["samples"] == 0
    assert "QLinearConv" in result.report["ops_after"]
    partial = files["dir"] / "partial.json"
    ranges = read_ranges(full)
    del ranges["c2"]
    write_ranges(partial, ranges)
    with pytest.raises(qcompiler.UserError, match="does not pin tensor 'c2'"):
        qcompiler.compile(str(files["model"]), import_ranges=partial)


def test_dynamic_mode_cannot_export(files: dict[str, Path]) -> None:
    with pytest.raises(qcompiler.UserError, match="no ranges to export"):
        qcompiler.compile(str(files["model"]), mode="dynamic", export_ranges=files["dir"] / "r.json")
    assert not (files["dir"] / "r.json").exists()


def test_cli_export_import_and_errors(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """CLI flags: exports written on success; an unknown pinned tensor is exit 2 with one line
    naming the file and the tensor, and no output model."""
    d = files["dir"]
    rng, trt = d / "r.json", d / "t.cache"
    assert main(["compile", str(files["model"]), "-o", str(d / "a.onnx"), "--calibration", str(files["calib"]),
                 "--export-ranges", str(rng), "--export-tensorrt-table", str(trt), "-q"]) == 0
    assert set(read_ranges(rng)) == set(read_tensorrt_table(trt)) == TINY_TENSORS
    bad = d / "bad.json"
    write_ranges(bad, {"x": (-1.0, 1.0), "no_such_tensor": (0.0, 1.0)})
    capsys.readouterr()
    out = d / "b.onnx"
    rc = main(["compile", str(files["model"]), "-o", str(out), "--calibration", str(files["calib"]),
               "--import-ranges", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(bad) in err[0] and "'no_such_tensor'" in err[0]
    assert not out.exists()
    rc = main(["compile", str(files["model"]), "-o", str(out), "--calibration", str(files["calib"]),
               "--export-ranges", str(d / "missing_dir" / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing_dir" in err[0] and not out.exists()


def test_pin_of_a_value_inside_a_fused_group_is_accepted_and_unused(files: dict[str, Path]) -> None:
    """c1 (conv1's output, read only by relu1, fused on ort-cpu) is not observed; a range file
    from before that (or hand-written) may still pin it: accepted, and the model is unchanged."""
    out = files["dir"] / "ranges.json"
    first = qcompiler.compile(str(files["model"]), calibration=str(files["calib"]), export_ranges=out)
    ranges = read_ranges(out)
    assert "c1" not in ranges
    write_ranges(out, {**ranges, "c1": (-1.0, 1.0)})
    with_c1 = qcompiler.compile(str(files["model"]), calibration=str(files["calib"]), import_ranges=out)
    assert with_c1.proto.SerializeToString() == first.proto.SerializeToString()
    data_free = qcompiler.compile(str(files["model"]), import_ranges=out)  # every observed tensor pinned
    assert data_free.report["calibration"]["samples"] == 0
