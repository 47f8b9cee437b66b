"""SIGINT and SIGTERM during a compile: exit 130 / 143, one stderr line saying so, no output
and no temp file left anywhere (issue 13, L4).

Deterministic without timing guesses: a test plugin either writes a marker file and sleeps
inside a pass (the test sends the signal once the marker exists, so the compile is surely in
progress), or signals its own process right after the model's temp file is complete (the
signal arrives mid-save, the L4 case).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_calibration, tiny_model
from qcompiler.target import load_target

PLUGIN = '''
import os, signal, time
from dataclasses import dataclass
from pathlib import Path
from qcompiler import Model, Pass, PassContext, PassResult
import qcompiler.files

MODE = os.environ["QC_TEST_MODE"]


@dataclass(frozen=True)
class SleepHere(Pass):
    """Marks that the compile is running, then waits (sleep mode)."""
    name = "sleep-here"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if MODE == "sleep":
            Path(os.environ["QC_TEST_MARKER"]).write_text("running")
            time.sleep(300)
        return PassResult(False)


if MODE.startswith("signal-in-save:"):
    _publish = qcompiler.files.publish

    def publish(tmp, final):  # the temp file is complete: now the signal arrives
        _publish(tmp, final)
        os.kill(os.getpid(), getattr(signal, MODE.split(":")[1]))

    qcompiler.files.publish = publish
'''

EXPECT = {"SIGINT": 130, "SIGTERM": 143}


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[list[str], Path]:
    (tmp_path / "m.onnx").write_bytes(tiny_model().SerializeToString())
    np.savez(tmp_path / "calib.npz", **tiny_calibration(4))
    (tmp_path / "plugin.py").write_text(PLUGIN)
    out = tmp_path / "out"
    out.mkdir()
    pipeline = load_target("ort-cpu").pipeline("static") + ",sleep-here"
    argv = [sys.executable, "-m", "qcompiler.cli", "compile", str(tmp_path / "m.onnx"), "-o", str(out / "q.onnx"),
            "--calibration", str(tmp_path / "calib.npz"), "--report", str(out / "r.json"),
            "--export-ranges", str(out / "ranges.json"), "--plugin", str(tmp_path / "plugin.py"),
            "--pipeline", pipeline]
    return argv, out


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def _check(proc: subprocess.CompletedProcess[str] | tuple[int, str], name: str, tmp: Path, out: Path) -> None:
    code, err = proc if isinstance(proc, tuple) else (proc.returncode, proc.stderr)
    assert code == EXPECT[name], err
    lines = err.strip().splitlines()
    assert lines == [f"qcompiler: interrupted by {name}; no output written"], err
    assert list(out.iterdir()) == [], "an output or temp file was left behind"
    assert sorted(p.name for p in tmp.iterdir()) == ["calib.npz", "m.onnx", "out", "plugin.py"] + \
        (["running"] if (tmp / "running").exists() else [])


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_signal_during_a_pass(name: str, setup: tuple[list[str], Path], tmp_path: Path) -> None:
    argv, out = setup
    marker = tmp_path / "running"
    proc = subprocess.Popen(argv, env=_env(QC_TEST_MODE="sleep", QC_TEST_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compile never reached the plugin pass"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, name))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    _check((proc.returncode, err), name, tmp_path, out)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_signal_while_saving(name: str, setup: tuple[list[str], Path], tmp_path: Path) -> None:
    """L4: the signal arrives when the model's temp file is written and staged."""
    argv, out = setup
    proc = subprocess.run(argv, env=_env(QC_TEST_MODE=f"signal-in-save:{name}"), capture_output=True, text=True,
                          timeout=300)
    _check(proc, name, tmp_path, out)
