"""CalibrationOptions (qcompiler/calibration/options.py): one validated object for every
calibration knob, built the same way by compile(), the calibrate pass and the CLI.

Each rule group is checked where a user meets it: the object itself (UserError, one line naming
the option), pipeline text (the pass builds the same object) and CLI flags (exit 2, one line,
nothing written). No CPU fact is involved: validation happens before any model run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompiler
from conftest import tiny_calibration, tiny_model
from qcompiler.cli import main

#: per rule group, bad values that must be refused, and the option name the message must carry
BAD = {
    "methods": [({"method": "median"}, "method"), ({"overrides": ("Softmax",)}, "Softmax"),
                ({"overrides": {"Relu": "best"}}, "Relu"), ({"percentile": 0.0}, "percentile"),
                ({"percentile": 100.5}, "percentile"), ({"momentum": 1.0}, "momentum"),
                ({"momentum": -0.1}, "momentum"), ({"bins": 8}, "bins"), ({"clip_weight": 0.0}, "clip-weight"),
                ({"clip_weight": float("nan")}, "clip-weight"), ({"overrides": "Relu=minmax"}, "overrides")],
    "statistics": [({"observe": "some"}, "observe"), ({"statistics": "moments"}, "statistics"),
                   ({"limit": -1}, "limit"), ({"moment_samples": -2}, "moment-samples"),
                   ({"grouped_moment_samples": -1}, "grouped-moment-samples"), ({"max_moment_dim": -1}, "max-moment-dim")],
    "engine": [({"memory": "huge"}, "calibration-memory"), ({"memory": "0MB"}, "calibration-memory"),
               ({"workers": 0}, "workers"), ({"lanes": 0}, "lanes"), ({"cache": 3.5}, "cache")],
    "types": [({"percentile": "high"}, "percentile"), ({"workers": 2.0}, "workers"), ({"bins": True}, "bins"),
              ({"saturation": 1}, "saturation"), ({"method": None}, "method")],
}


@pytest.mark.parametrize("group", sorted(BAD))
def test_bad_values_are_refused_naming_the_option(group: str) -> None:
    for kwargs, name in BAD[group]:
        with pytest.raises(qcompiler.UserError) as info:
            qcompiler.CalibrationOptions(**kwargs)
        text = str(info.value)
        assert name in text and "\n" not in text, (kwargs, text)


def test_accepted_spellings_are_stored_canonically() -> None:
    """A mapping of overrides becomes the pass's KEY=METHOD tuple (sorted), an int memory and a
    path become strings: the same object whatever the caller wrote."""
    a = qcompiler.CalibrationOptions(overrides={"b": "mse", "Relu": "minmax"}, memory=1 << 20, cache=Path("/tmp/c"))
    b = qcompiler.CalibrationOptions(overrides=("Relu=minmax", "b=mse"), memory=str(1 << 20), cache="/tmp/c")
    assert a == b and a.overrides == ("Relu=minmax", "b=mse") and a.memory_bytes == 1 << 20
    assert a.override_map == {"Relu": "minmax", "b": "mse"}
    assert a.changed() == {"overrides": ("Relu=minmax", "b=mse"), "memory": "1048576", "cache": "/tmp/c"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.workers = 2  # type: ignore[misc]


def test_the_pass_options_are_the_calibration_options() -> None:
    """The calibrate pass extends CalibrationOptions (one field list), and `qcompiler passes`,
    which reads options from source without importing, follows the base class to list them."""
    from qcompiler.registry import PassRegistry

    rows = PassRegistry()._from_source("calibrate")
    assert rows is not None
    want = [(f.name.replace("_", "-"), f.default) for f in dataclasses.fields(qcompiler.CalibrationOptions)]
    assert [(name, default) for name, _, default in rows[1]] == want


@pytest.mark.parametrize("group", sorted(BAD))
def test_pipeline_text_goes_through_the_same_rules(group: str) -> None:
    """A bad option in pipeline text fails with the same message as the object."""
    kwargs, name = next((k, n) for k, n in BAD[group] if isinstance(next(iter(k.values())), (int, float, str)))
    (key, value), = kwargs.items()
    text = f"canonicalize,calibrate{{{key.replace('_', '-')}={value}}},insert-qdq"
    with pytest.raises(qcompiler.UserError, match=name):
        qcompiler.compile(tiny_model(), target="ort-cpu-qdq", calibration=tiny_calibration(2), pipeline=text)


@pytest.mark.parametrize("flags", [["--calibration-method", "entropy", "--workers", "0"],
                                   ["--calibration-limit", "0"], ["--calibration-observe", "all",
                                                                  "--calibration-override", "Relu"]])
def test_cli_flags_build_the_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    """Bad calibration flags: exit 2, one error line, no output file."""
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    onnx.save(tiny_model(), str(model))
    np.savez(calib, **tiny_calibration(2))
    assert main(["compile", str(model), "-o", str(out), "--calibration", str(calib), "-q", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists(), err


def test_compile_options_replace_only_what_they_set() -> None:
    """compile(calibration_options=...) replaces the pipeline's calibrate options it sets to a
    non-default value and keeps the others (here the pipeline's percentile)."""
    text = "canonicalize,calibrate{method=percentile,percentile=99.0},insert-qdq"
    r = qcompiler.compile(tiny_model(), target="ort-cpu-qdq", calibration=tiny_calibration(3), pipeline=text,
                          calibration_options=qcompiler.CalibrationOptions(statistics="ranges", lanes=1))
    rep = r.report["calibration"]
    assert (rep["method"], rep["percentile"], rep["statistics"], rep["lanes"]) == ("percentile", 99.0, "ranges", 1)
    assert "CalibrationOptions" in qcompiler.__all__
