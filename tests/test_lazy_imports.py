"""Structural check behind `qcompiler --version`, `targets` and `passes` starting fast: the
heavy libraries are imported only by the commands that need them (timings: docs/benchmarks.md,
"Command start-up"; a timed unit test would depend on the machine's load)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "onnx", "onnx_graphsurgeon", "networkx", "ml_dtypes")

_PROBE = """
import contextlib, io, json, sys
from qcompiler.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "out": out.getvalue(), "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--version",), ("targets",)])
def test_version_and_targets_import_no_heavy_library(args: tuple[str, ...]) -> None:
    res = _run(*args)
    assert res["rc"] == 0 and res["out"].strip()
    assert res["heavy"] == []
    if args == ("targets",):
        assert "ort-cpu" in res["out"]


def test_passes_does_not_import_onnxruntime() -> None:
    res = _run("passes")
    assert res["rc"] == 0 and "insert-qdq" in res["out"]
    assert "onnxruntime" not in res["heavy"]


def test_lazy_public_names() -> None:
    """Every public name resolves (the lazy table names real definitions), and unknown names
    are AttributeErrors, as with a plain module."""
    import qcompiler

    for name in qcompiler.__all__:
        assert getattr(qcompiler, name) is not None, name
    with pytest.raises(AttributeError):
        qcompiler.no_such_name  # noqa: B018
