"""PassManager instrumentation and the checks it makes on every pass.

A compiler engineer debugging a pipeline relies on print-ir-after, time-passes, stop-after and
disable-pass doing exactly what they say, and on a misbehaving pass (crash, dishonest
``modified``, broken IR) being blamed by name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model, tensor_info
from qcompiler import (Instrumentation, Model, Pass, PassContext, PassFailure, PassManager, PassResult,
                       UserError, load_model, load_target)
from qcompiler.cli import main


def _chain_model() -> Model:
    """x -> Relu(relu0) -> Neg(neg0) -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Neg", ["r"], ["y"], name="neg0")]
    return load_model(make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", [1, 4])]))


@pytest.fixture
def ctx() -> PassContext:
    """A context for the ort-cpu target; passes here don't read it."""
    return PassContext(target=load_target("ort-cpu"))


@dataclass(frozen=True)
class Noop(Pass):
    """Changes nothing; records that it ran in the report."""

    name = "noop-a"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.report.setdefault("ran", []).append(self.name)
        return PassResult(False)


@dataclass(frozen=True)
class NoopB(Noop):
    """A second no-op with another name."""

    name = "noop-b"


@dataclass(frozen=True)
class RenameFirst(Pass):
    """Renames the first node (one rewriter change)."""

    name = "rename-first"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.report.setdefault("ran", []).append(self.name)
        rw = ctx.rewriter(model)
        rw.rename_node(model.graph.nodes[0], "renamed_first")
        return PassResult(rw.modified)


@dataclass(frozen=True)
class Boom(Pass):
    """Crashes with an internal error."""

    name = "boom"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise RuntimeError("kaboom")


@dataclass(frozen=True)
class UserProblem(Pass):
    """Raises a UserError (the user's fault, must pass through unchanged)."""

    name = "user-problem"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise UserError("model.onnx: node 'x' is bad")


@dataclass(frozen=True)
class Liar(Pass):
    """Changes an attribute through the rewriter but reports modified=False."""

    name = "liar"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        rw.set_attr(model.graph.nodes[0], "note", 1)
        return PassResult(False)


@dataclass(frozen=True)
class Boaster(Pass):
    """Reports modified=True without changing anything."""

    name = "boaster"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ctx.rewriter(model)
        return PassResult(True)


@dataclass(frozen=True)
class WrongReturn(Pass):
    """Returns a bare bool instead of a PassResult."""

    name = "wrong-return"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return True  # type: ignore[return-value]


@dataclass(frozen=True)
class Dangle(Pass):
    """Rewires the Neg to read a value that nothing produces."""

    name = "dangle"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        neg = model.graph.find_node("neg0")
        assert neg is not None
        rw.set_input(neg, 0, rw.value("ghost", np.float32, [1, 4]))
        return PassResult(rw.modified)


@dataclass(frozen=True)
class MakeCycle(Pass):
    """Makes the Relu read the Neg's output: relu0 -> neg0 -> relu0."""

    name = "make-cycle"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        relu, neg = model.graph.find_node("relu0"), model.graph.find_node("neg0")
        assert relu is not None and neg is not None
        rw.set_input(relu, 0, neg.outputs[0])
        return PassResult(rw.modified)


def _run(passes: list[Pass], ctx: PassContext, model: Model | None = None,
         **inst: object) -> tuple[PassManager, Model, str]:
    stream = io.StringIO()
    manager = PassManager(passes, Instrumentation(stream=stream, **inst))  # type: ignore[arg-type]
    model = model or _chain_model()
    manager.run(model, ctx)
    return manager, model, stream.getvalue()


def test_records_one_row_per_pass(ctx: PassContext) -> None:
    """Each pass gets a record with its name, spec, time and honest modified flag."""
    manager, model, out = _run([Noop(), RenameFirst(), NoopB()], ctx)
    assert [r["name"] for r in manager.records] == ["noop-a", "rename-first", "noop-b"]
    assert [r["modified"] for r in manager.records] == [False, True, False]
    assert manager.records[1]["changes"] == 1
    assert all(r["seconds"] >= 0 for r in manager.records)
    assert model.graph.nodes[0].name == "renamed_first"
    assert out == ""  # no instrumentation asked for, nothing printed


def test_print_ir_after_named_pass_only(ctx: PassContext) -> None:
    """Only the named pass's IR is printed, as ONNX text that onnx's parser reads back."""
    _, _, out = _run([Noop(), RenameFirst(), NoopB()], ctx, print_ir_after={"rename-first"})
    assert out.count("// ----- IR after") == 1
    header, _, body = out.partition("\n")
    assert header == "// ----- IR after rename-first -----"
    graph = onnx.parser.parse_graph(body)
    assert [(n.name, n.op_type) for n in graph.node] == [("renamed_first", "Relu"), ("neg0", "Neg")]


def test_print_ir_after_all(ctx: PassContext) -> None:
    """'all' prints after every pass that ran, in order (skipped passes print nothing)."""
    _, _, out = _run([Noop(), RenameFirst(), NoopB()], ctx, print_ir_after={"all"}, disabled={"noop-b"})
    headers = [line for line in out.splitlines() if line.startswith("// ----- IR after")]
    assert headers == ["// ----- IR after noop-a -----", "// ----- IR after rename-first -----"]


def test_time_passes_prints_table(ctx: PassContext) -> None:
    """The timing table has a header, one row per pass (skipped ones marked), and a total."""
    _, _, out = _run([Noop(), RenameFirst(), NoopB()], ctx, time_passes=True, disabled={"noop-b"})
    lines = out.splitlines()
    assert lines[0].split() == ["pass", "seconds", "%", "modified"]
    rows = [line.split() for line in lines[1:-1]]
    assert [r[0] for r in rows] == ["noop-a", "rename-first", "noop-b"]
    assert [r[-1] for r in rows] == ["False", "True", "skipped"]
    for r in rows:
        float(r[1]), float(r[2])  # seconds and percent are numbers
    assert lines[-1].split()[0] == "total"
    assert sum(float(r[2]) for r in rows) == pytest.approx(100.0, abs=0.5)


def test_stop_after(ctx: PassContext) -> None:
    """Passes after --stop-after neither run nor appear in the records."""
    manager, _, _ = _run([Noop(), RenameFirst(), NoopB()], ctx, stop_after="rename-first")
    assert [r["name"] for r in manager.records] == ["noop-a", "rename-first"]
    assert ctx.report["ran"] == ["noop-a", "rename-first"]


def test_stop_after_unknown_pass_is_user_error(ctx: PassContext) -> None:
    """Stopping after a pass that isn't in the pipeline is the user's mistake, named."""
    with pytest.raises(UserError, match="fold-constnts"):
        _run([Noop(), RenameFirst()], ctx, stop_after="fold-constnts")


def test_disabled_pass_is_skipped(ctx: PassContext) -> None:
    """A disabled pass doesn't run, and its record says skipped."""
    manager, model, _ = _run([Noop(), RenameFirst(), NoopB()], ctx, disabled={"rename-first"})
    assert ctx.report["ran"] == ["noop-a", "noop-b"]
    skipped = manager.records[1]
    assert skipped["name"] == "rename-first" and skipped.get("skipped") is True
    assert skipped["modified"] is False
    assert model.graph.nodes[0].name == "relu0"


def test_crashing_pass_is_pass_failure(ctx: PassContext) -> None:
    """An exception in a pass names the pass and the passes that ran before it."""
    with pytest.raises(PassFailure) as err:
        _run([Noop(), RenameFirst(), NoopB(), Boom(), Noop()], ctx, disabled={"noop-b"})
    failure = err.value
    assert failure.pass_name == "boom"
    assert failure.ran_before == ["noop-a", "rename-first"]
    assert isinstance(failure.cause, RuntimeError)
    assert "'boom'" in str(failure) and "kaboom" in str(failure)
    assert "noop-a, rename-first" in str(failure)


def test_first_pass_failure_says_nothing_ran(ctx: PassContext) -> None:
    """When the first pass fails, the message says nothing ran before it."""
    with pytest.raises(PassFailure) as err:
        _run([Boom()], ctx)
    assert err.value.ran_before == []
    assert "nothing" in str(err.value)


def test_user_error_in_pass_passes_through(ctx: PassContext) -> None:
    """A UserError from a pass is the user's problem: not wrapped as an internal failure."""
    with pytest.raises(UserError, match="node 'x' is bad"):
        _run([Noop(), UserProblem()], ctx)


@pytest.mark.parametrize("bad, fragment", [(Liar(), "modified=False"), (Boaster(), "modified=True"),
                                           (WrongReturn(), "PassResult")])
def test_dishonest_pass_is_caught(ctx: PassContext, bad: Pass, fragment: str) -> None:
    """``modified`` must agree with the rewriter's change count, and run() must return PassResult."""
    with pytest.raises(PassFailure) as err:
        _run([Noop(), bad], ctx)
    assert err.value.pass_name == bad.name
    assert err.value.ran_before == ["noop-a"]
    assert fragment in str(err.value)


def test_dangling_value_caught_by_verify_each(ctx: PassContext) -> None:
    """verify-each blames the pass that left a read of an unproduced value, and names the value."""
    with pytest.raises(PassFailure) as err:
        _run([Noop(), Dangle(), NoopB()], ctx)
    failure = err.value
    assert failure.pass_name == "dangle"
    assert failure.ran_before == ["noop-a"]
    assert "ghost" in str(failure) and "neg0" in str(failure)
    assert "noop-b" not in ctx.report["ran"]


def test_dangling_value_not_checked_without_verify_each(ctx: PassContext) -> None:
    """With --no-verify the manager trusts the pass (the record still shows the change)."""
    manager, _, _ = _run([Dangle(), Noop()], ctx, verify_each=False)
    assert [r["modified"] for r in manager.records] == [True, False]


def test_pass_creating_cycle_is_pass_failure(ctx: PassContext) -> None:
    """A pass that makes the graph cyclic is blamed by name (not an anonymous ValueError)."""
    with pytest.raises(PassFailure) as err:
        _run([Noop(), MakeCycle()], ctx)
    assert err.value.pass_name == "make-cycle"
    assert err.value.ran_before == ["noop-a"]
    assert "cycle" in str(err.value)


# -- the same instrumentation through the command line -------------------------------------

def test_cli_print_ir_after_and_time_passes(tiny_model_path: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--print-ir-after NAME prints that pass's IR only; --time-passes adds the table."""
    out = tmp_path / "out.onnx"
    rc = main(["compile", str(tiny_model_path), "-o", str(out), "--pipeline", "canonicalize,infer-shapes,"
               "fold-constants", "--print-ir-after", "infer-shapes", "--time-passes", "-q"])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.count("// ----- IR after") == 1
    assert "// ----- IR after infer-shapes -----" in err
    assert "Conv" in err and "Gemm" in err
    table = [line.split()[0] for line in err.splitlines() if line.split() and line.split()[0] in
             ("pass", "canonicalize", "infer-shapes", "fold-constants", "total")]
    assert table[-5:] == ["pass", "canonicalize", "infer-shapes", "fold-constants", "total"]


def test_cli_stop_after_and_disable(tiny_model_path: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--stop-after and --disable-pass show up in the report's pass records."""
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = main(["compile", str(tiny_model_path), "-o", str(out), "--pipeline", "canonicalize,infer-shapes,"
               "fold-constants", "--stop-after", "infer-shapes", "--disable-pass", "canonicalize",
               "--report", str(report), "-q"])
    assert rc == 0, capsys.readouterr().err
    records = json.loads(report.read_text())["passes"]
    assert [(r["name"], r.get("skipped", False)) for r in records] == [("canonicalize", True),
                                                                      ("infer-shapes", False)]
