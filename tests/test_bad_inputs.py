"""The bad-input corpus (tests/badinputs.py) against the CLI contract of issue 13.

Each case runs ``qcompiler.cli.main`` in-process (fast); a few run the installed
``qcompiler`` entry point in a subprocess to prove the same holds there.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from badinputs import CASES, MARKER, Case
from qcompiler.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check(case: Case, tmp_path: Path, rc: int, err: str, before: dict[str, str]) -> None:
    work = tmp_path / "w"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert rc in (0, 2), f"exit {rc}: {err}"
    if case.expect is not None:
        assert rc == case.expect, f"expected exit {case.expect}, got {rc}: {err}"
    after = _snapshot(tmp_path)
    for name, digest in before.items():  # inputs (and everything else there) unchanged
        assert after.get(name) == digest, f"{name} changed or vanished"
    assert not (work / MARKER).exists(), "a pickle payload ran"
    if rc == 2:
        assert len(lines) == 1, err
        assert set(after) - set(before) <= {n for n in after if n.startswith("w/cache/")}, \
            f"files left behind on exit 2: {sorted(set(after) - set(before))}"
    else:
        assert (work / "out.onnx").is_file(), err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "w"
    work.mkdir()
    argv = case.build(work)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    _check(case, tmp_path, rc, err, before)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES)


_SUBPROCESS = ["truncated-0.5", "calib-npy-object-pickle", "target-extends-etc-passwd", "opset-17-dynamic"]


@pytest.mark.parametrize("name", _SUBPROCESS)
def test_bad_input_through_the_entry_point(name: str, tmp_path: Path) -> None:
    """The real console entry point (a fresh interpreter) keeps the same contract."""
    case = next(c for c in CASES if c.name == name)
    work = tmp_path / "w"
    work.mkdir()
    argv = case.build(work)
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *argv], capture_output=True, text=True,
                          timeout=300)
    _check(case, tmp_path, proc.returncode, proc.stderr, before)
