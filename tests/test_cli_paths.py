"""File safety on the command line: which paths the CLI refuses before anything runs, and how
outputs are written (temp + rename for regular files, written through for FIFOs, symlinks
followed). See docs/design.md, "CLI and file safety".

Each refusal is exit 2 with one stderr line naming the path, inputs byte-identical afterwards
and no output (or temp file) anywhere. Cases call ``qcompiler.cli.main`` in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompiler.files
from conftest import tiny_calibration, tiny_model
from qcompiler.cli import main
from qcompiler.target import builtin_targets

PLUGIN = """
from dataclasses import dataclass
from qcompiler import Model, Pass, PassContext, PassResult

@dataclass(frozen=True)
class Nothing(Pass):
    \"\"\"Does nothing.\"\"\"
    name = "do-nothing"
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(False)
"""


class Files:
    """A model with external data, calibration data, a target file, a range file and a plugin
    under ``tmp/in``; outputs go to ``tmp/out``."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "in"
        self.dir.mkdir()
        self.out = tmp / "out"
        self.out.mkdir()
        self.model = self.dir / "m.onnx"
        self.data = self.dir / "model.onnx.data"
        onnx.save_model(tiny_model(), str(self.model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=self.data.name, size_threshold=0)
        self.calib = self.dir / "calib.npz"
        np.savez(self.calib, **tiny_calibration(4))
        self.target = self.dir / "t.toml"
        shutil.copy(builtin_targets()["ort-cpu"], self.target)
        self.ranges = self.dir / "ranges.json"
        self.ranges.write_text(json.dumps({"version": 1, "ranges": {}}))
        self.plugin = self.dir / "plug.py"
        self.plugin.write_text(PLUGIN)

    def digests(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(self.dir.iterdir())}

    def compile(self, *extra: str, output: Path | None = None) -> list[str]:
        return ["compile", str(self.model), "-o", str(output or self.out / "q.onnx"),
                "--calibration", str(self.calib), *extra]


def _refused(f: Files, argv: list[str], capsys: pytest.CaptureFixture[str], *expect: str) -> None:
    before = f.digests()
    names = sorted(p.name for p in f.dir.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for text in expect:
        assert text in err[0], (text, err[0])
    assert f.digests() == before, "an input was modified"
    assert sorted(p.name for p in f.dir.iterdir()) == names, "a file appeared beside the inputs"
    assert list(f.out.iterdir()) == [], "an output was written"


def test_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = Files(tmp_path)
    missing = tmp_path / "nothere.onnx"
    _refused(f, ["compile", str(missing), "-o", str(f.out / "q.onnx"), "--calibration", str(f.calib)], capsys,
             f"no such model file: {missing}")


def test_directory_as_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = Files(tmp_path)
    _refused(f, ["compile", str(f.dir), "-o", str(f.out / "q.onnx"), "--calibration", str(f.calib)], capsys,
             str(f.dir), "is a directory")


def test_output_onto_the_models_external_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """H1: the weights of the input must survive ``-o model.onnx.data``."""
    f = Files(tmp_path)
    _refused(f, f.compile(output=f.data), capsys, str(f.data), "external data")


# M1: every output path differs from every input and every other output
OVERLAPS: dict[str, Callable[[Files], tuple[list[str], str]]] = {
    "report-is-model": lambda f: (f.compile("--report", str(f.model)), "input model"),
    "export-ranges-is-model": lambda f: (f.compile("--export-ranges", str(f.model)), "input model"),
    "tensorrt-table-is-model": lambda f: (f.compile("--export-tensorrt-table", str(f.model)), "input model"),
    "output-is-calibration": lambda f: (f.compile(output=f.calib), "calibration file"),
    "output-is-target": lambda f: (f.compile("--target", str(f.target), output=f.target), "target file"),
    "output-is-import-ranges": lambda f: (f.compile("--import-ranges", str(f.ranges), output=f.ranges), "range file"),
    "report-is-plugin": lambda f: (f.compile("--plugin", str(f.plugin), "--report", str(f.plugin)), "plugin"),
    "report-is-output": lambda f: (f.compile("--report", str(f.out / "q.onnx")), "-o"),
    "ranges-is-report": lambda f: (f.compile("--report", str(f.out / "r.json"), "--export-ranges",
                                             str(f.out / "r.json")), "--report"),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_output_overlapping_another_path_is_refused(case: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = Files(tmp_path)
    argv, what = OVERLAPS[case](f)
    _refused(f, argv, capsys, what, "overwrite" if what != "-o" and what != "--report" else "also the")


def test_links_to_an_input_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Symlinks are followed and hard links compared by inode."""
    f = Files(tmp_path)
    sym = f.out / "sym.onnx"
    sym.symlink_to(f.model)
    _refused_with_links = [(f.compile(output=sym), "input model")]
    hard = tmp_path / "hard.npz"
    os.link(f.calib, hard)
    _refused_with_links.append((f.compile("--report", str(hard)), "calibration file"))
    for argv, what in _refused_with_links:
        before = f.digests()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err
        assert f.digests() == before and sym.is_symlink()


def test_unwritable_report_is_found_before_compiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """L3: no model is written when the report cannot be (checked before compile starts)."""
    f = Files(tmp_path)
    _refused(f, f.compile("--report", str(tmp_path / "no_such_dir" / "r.json")), capsys, "does not exist")
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    _refused(f, f.compile("--export-ranges", str(blocker / "r.json")), capsys, "does not exist")
    _refused(f, f.compile("--report", str(f.out)), capsys, "is a directory")


def test_a_failure_after_the_model_is_saved_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """All outputs or none: the model is staged until the report is written too."""
    f = Files(tmp_path)
    real = qcompiler.files.write_bytes

    def failing(path: object, data: bytes) -> None:
        if str(path).endswith(".json"):
            raise qcompiler.UserError(f"{path}: cannot write: disk full")
        real(path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(qcompiler.files, "write_bytes", failing)
    _refused(f, f.compile("--report", str(f.out / "r.json")), capsys, "disk full")


def _read_fifo(path: Path, sink: list[bytes]) -> threading.Thread:
    def reader() -> None:
        with open(path, "rb") as fh:
            sink.append(fh.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t


def test_fifo_outputs_are_written_through_not_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """H2: a special file at an output path (here a FIFO made for the test, never /dev/null)
    receives the bytes and stays what it was."""
    f = Files(tmp_path)
    fifo_model, fifo_report = f.out / "model.fifo", f.out / "report.fifo"
    os.mkfifo(fifo_model)
    os.mkfifo(fifo_report)
    got_model: list[bytes] = []
    got_report: list[bytes] = []
    readers = [_read_fifo(fifo_model, got_model), _read_fifo(fifo_report, got_report)]
    assert main(f.compile("--report", str(fifo_report), "-q", output=fifo_model)) == 0
    for t in readers:
        t.join(timeout=60)
    assert stat.S_ISFIFO(os.stat(fifo_model).st_mode) and stat.S_ISFIFO(os.stat(fifo_report).st_mode)
    model = onnx.load_from_string(got_model[0])
    assert any(n.op_type == "QLinearConv" for n in model.graph.node)
    assert json.loads(got_report[0])["target"] == "ort-cpu"
    assert sorted(p.name for p in f.out.iterdir()) == ["model.fifo", "report.fifo"]  # no temp files


def test_symlinked_output_writes_the_link_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """H2: the link stays a link; its target gets the model; temp files go beside the target."""
    f = Files(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "real.onnx"
    target.write_bytes(b"old")
    link = f.out / "q.onnx"
    link.symlink_to(target)
    dangling = f.out / "r.json"
    dangling.symlink_to(elsewhere / "report.json")
    assert main(f.compile("--report", str(dangling), "-q", output=link)) == 0
    assert link.is_symlink() and dangling.is_symlink()
    assert os.readlink(link) == str(target)
    onnx.checker.check_model(onnx.load(str(target)), full_check=True)
    assert json.loads((elsewhere / "report.json").read_text())["target"] == "ort-cpu"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["real.onnx", "report.json"]
    assert sorted(p.name for p in f.out.iterdir()) == ["q.onnx", "r.json"]
