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
        if not name.startswith("w/cache/"):  # a calibration cache is ours to rewrite
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


_SUBPROCESS = ["truncated-0.5", "calib-npy-object-pickle", "target-extends-etc-passwd", "opset-17-dynamic",
               "conv-group-0"]  # onnxruntime fails: its own log must not add stderr lines


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


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def test_input_that_is_also_an_output_keeps_its_names(tmp_path: Path) -> None:
    """M2: static mode kept renaming x to x_pre; the names are the contract. The passed-through
    output equals the input exactly (run as written: ORT_DISABLE_ALL)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from badinputs import _input_is_output, save, _compile

    for target in ("ort-cpu", "ort-cpu-qdq"):
        argv = _compile(tmp_path, save(_input_is_output(), tmp_path / "m.onnx"), "--target", target)
        assert main(argv) == 0
        out = onnx.load(str(tmp_path / "out.onnx"))
        assert [i.name for i in out.graph.input] == ["x"]
        assert [o.name for o in out.graph.output] == ["y", "x"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(1, 8)
        _, x_out = ort.InferenceSession(out.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": x})
        np.testing.assert_array_equal(x_out, x)
        (tmp_path / "out.onnx").unlink()


@pytest.mark.parametrize("name, words", [
    ("unknown-op-domain", ["'odd'", "com.example"]),
    ("conv-group-0", ["group"]),
    ("token-ids-out-of-range", ["embed", "idx=10"]),
    ("token-ids-uint64-wrap", ["'ids'", "int64"]),
    ("matmul-shape-mismatch", ["mm", "Incompatible dimensions"]),
    ("if-branches-of-different-types", ["if", "element type"]),
    ("inf-activation-exp-mse", ["tensor 'e'", "--import-ranges"]),
    ("ranges-1e39", ["tensor 'h'", "float32"]),
    ("target-bits-0", ["quantization.activation.bits"]),
    ("target-fixed-scale-0", ["fixed_qparams.Sigmoid.scale"]),
    ("target-extends-etc-passwd", ["extends", "/etc/passwd", ".toml"]),
    ("target-extends-chain-1000", ["longer than"]),
    ("sparse-initializer", ["sparse initializer"]),
    ("non-utf8-node-name", ["UTF-8"]),
    ("opset-99", ["opset 99"]),
    ("huge-declared-dims-random", ["'x'", "random data is limited"]),
])
def test_refusals_name_the_fault(name: str, words: list[str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The one line says which node, tensor, key or input is at fault."""
    case = next(c for c in CASES if c.name == name)
    rc, err = _run(case.build(tmp_path), capsys)
    assert rc == 2, err
    for word in words:
        assert word in err, (word, err)


def test_exporter_unknown_dims_are_independent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'?', '', 'None' and tf2onnx's 'unk__N' are each their own unknown; a real name
    ('size' on two axes) still ties the axes together."""
    for label, rc_want in (("question-mark", 0), ("empty", 0), ("unk", 0), ("none", 0), ("named-shared", 2)):
        work = tmp_path / label
        work.mkdir()
        rc, err = _run(next(c for c in CASES if c.name == f"dim-names-{label}").build(work), capsys)
        assert rc == rc_want, (label, err)
