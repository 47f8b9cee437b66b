"""``qcompiler simulate --image-spec``: an image folder as simulation inputs, preprocessed by
the same loader and with the same semantics as ``compile --calibration DIR --image-spec``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from conftest import TINY_INPUT, tiny_model
from qcompiler.calibration import input_specs, load_calibration
from qcompiler.cli import main

Image = pytest.importorskip("PIL.Image")
SPEC = "resize=8,crop=8,scale=1/255,mean=0.5,0.5,0.5,std=0.25,0.25,0.25"


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_simulate_reads_an_image_folder_with_a_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _images(tmp_path / "images")
    ref = tmp_path / "float.onnx"
    ref.write_bytes(tiny_model().SerializeToString())
    q = tmp_path / "q.onnx"
    qcompiler.compile(str(ref), calibration=str(images), image_spec=SPEC, format="qdq").save(q)
    report = tmp_path / "sim.json"
    assert main(["simulate", str(q), "--inputs", str(images), "--image-spec", SPEC, "--reference", str(ref),
                 "--report", str(report), "-q"]) == 0
    got = json.loads(report.read_text())
    assert got["samples"] == 3
    # the same loader: the result equals simulating the arrays compile's loader produces
    feeds = list(load_calibration(str(images), input_specs(qcompiler.load_model(str(ref))), image_spec=SPEC))
    stacked = {TINY_INPUT: np.concatenate([f[TINY_INPUT] for f in feeds])}
    direct = qcompiler.simulate(str(q), "ort-cpu", stacked, reference=str(ref)).to_dict()
    assert got == json.loads(json.dumps(direct, sort_keys=True))


def test_simulate_image_folder_without_a_spec_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _images(tmp_path / "images")
    q = tmp_path / "q.onnx"
    qcompiler.compile(tiny_model(), calibration=str(images), image_spec=SPEC).save(q)
    capsys.readouterr()
    assert main(["simulate", str(q), "--inputs", str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-spec" in err[0], err
    assert main(["simulate", str(q), "--inputs", str(images), "--image-spec", "resize=zz"]) == 2
    assert "resize" in capsys.readouterr().err
