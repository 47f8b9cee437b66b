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


@pytest.mark.parametrize("args", [("--version",), ("targets",), ("passes",)])
def test_listing_commands_import_no_heavy_library(args: tuple[str, ...]) -> None:
    res = _run(*args)
    assert res["rc"] == 0 and res["out"].strip()
    assert res["heavy"] == []
    if args == ("targets",):
        assert "ort-cpu" in res["out"]


def test_passes_listing_read_from_source_equals_the_classes() -> None:
    """`qcompiler passes` reads docstrings and options from the pass modules' source (no import);
    what it prints equals what the imported classes say."""
    from qcompiler.pass_manager import pass_summary
    from qcompiler.registry import PassRegistry

    reg = PassRegistry()  # a fresh one: the shared default registry may hold imported classes already
    for name in reg.names():
        listed = (reg.summary(name), reg.options(name))
        assert reg._from_source(name) is not None, name  # every built-in pass is listed without importing
        reg.get(name)  # now imported: summary and options come from the class
        assert listed == (pass_summary(reg.get(name)), reg.options(name)), name


def test_lazy_public_names() -> None:
    """Every public name resolves (the lazy table names real definitions), and unknown names
    are AttributeErrors, as with a plain module."""
    import qcompiler

    for name in qcompiler.__all__:
        assert getattr(qcompiler, name) is not None, name
    with pytest.raises(AttributeError):
        qcompiler.no_such_name  # noqa: B018
