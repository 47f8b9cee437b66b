"""What a compile prints while it runs (docs/design.md, "CLI and file safety"):

- on a terminal, one status line redrawn in place naming the pass and, inside the long ones,
  their progress (calibration runs, insert-qdq's weights and GPTQ rounding);
- outside a terminal, whole lines only: with ``-v`` a started and a finished line (seconds)
  per phase; by default only phases slower than ``SLOW_PHASE_SECONDS`` and the summary;
- with ``-q``, nothing at all: no onnxruntime log lines and no numpy warnings either.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qcompiler
import qcompiler.status
from conftest import tiny_calibration, tiny_model
from qcompiler.cli import main
from qcompiler.target import load_target

PASSES = [p.name for p in qcompiler.parse_pipeline(load_target("ort-cpu").pipeline("static"))]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _files(tmp: Path) -> list[str]:
    (tmp / "m.onnx").write_bytes(tiny_model().SerializeToString())
    np.savez(tmp / "c.npz", **tiny_calibration(4))
    return ["compile", str(tmp / "m.onnx"), "-o", str(tmp / "q.onnx"), "--calibration", str(tmp / "c.npz")]


def test_verbose_prints_a_timed_line_per_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_files(tmp_path), "-v"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # not a terminal: whole lines only
    n = len(PASSES)
    for i, name in enumerate(PASSES, 1):
        assert f"qcompiler: [{i}/{n}] {name} started\n" in err
        assert re.search(rf"qcompiler: \[{i}/{n}\] {name} finished in \d+\.\d\d s\n", err), name
    for phase in ("loading the model", "checking the compiled model", "saving the outputs"):
        assert re.search(rf"qcompiler: {phase} finished in \d+\.\d\d s\n", err), phase
    assert err.rstrip().splitlines()[-1].startswith(f"qcompiler: {tmp_path / 'm.onnx'} -> ")


def test_default_output_outside_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _files(tmp_path)
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "nodes integer" in lines[0]  # a fast compile: just the summary
    monkeypatch.setattr(qcompiler.status, "SLOW_PHASE_SECONDS", 0.0)  # now every phase counts as slow
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    took = [ln for ln in lines if re.fullmatch(r"qcompiler: .* took \d+\.\d s", ln)]
    assert len(took) == len(PASSES) + 3 and len(lines) == len(took) + 1


def test_status_line_on_a_terminal_names_passes_and_their_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcompiler.status, "REDRAW_SECONDS", 0.0)  # draw every update (a tiny model is fast)
    term = Terminal()
    qcompiler.compile(tiny_model(), calibration=tiny_calibration(4), quiet=False, stream=term)
    text = term.getvalue()
    frames = [f.strip() for f in text.split("\r") if f.strip()]
    n, cal, ins = len(PASSES), PASSES.index("calibrate") + 1, PASSES.index("insert-qdq") + 1
    assert f"qcompiler: [{cal}/{n}] calibrate" in frames
    assert any(re.fullmatch(rf"qcompiler: \[{cal}/{n}\] calibrate: run 1/\d+, 4 samples, .*", f) for f in frames)
    assert any(f.startswith(f"qcompiler: [{cal}/{n}] calibrate: choosing ranges") for f in frames)
    rounding = [f for f in frames if f.startswith(f"qcompiler: [{ins}/{n}] insert-qdq: quantizing weights (GPTQ rounding) ")]
    assert len(rounding) >= 2 and rounding[-1].endswith(f" {len(rounding) - 1}/{len(rounding)}")  # one per node
    assert "qcompiler: checking the compiled model" in frames
    assert text.endswith("\r") and "\n" not in text  # cleared at the end; nothing else printed


WARNING_PLUGIN = """
from dataclasses import dataclass
import numpy as np
from qcompiler import Model, Pass, PassContext, PassResult

@dataclass(frozen=True)
class Warn(Pass):
    \"\"\"Computes log(0), as range code on a degenerate histogram would.\"\"\"
    name = "warn-here"
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        np.log(np.zeros(2))
        return PassResult(False)
"""


@pytest.mark.parametrize("flag", ["-q", "-v"])
def test_quiet_compile_prints_nothing_and_warnings_are_for_verbose(flag: str, tmp_path: Path) -> None:
    """L5: a real process (onnxruntime's logger and Python warnings as a user gets them). A
    numpy RuntimeWarning inside a pass shows only with -v; -q prints nothing at all."""
    (tmp_path / "warn.py").write_text(WARNING_PLUGIN)
    argv = [*_files(tmp_path), "--plugin", str(tmp_path / "warn.py"),
            "--pipeline", load_target("ort-cpu").pipeline("static") + ",warn-here", flag]
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    if flag == "-q":
        assert proc.stderr == ""
    else:
        assert "RuntimeWarning: divide by zero encountered in log" in proc.stderr
