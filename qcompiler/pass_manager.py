"""Passes and the manager that runs them.

A pass is a frozen dataclass with a kebab-case ``name`` and typed option fields; the same
object is its pipeline text (``insert-qdq{per-channel=true}``). ``run`` changes the model in
place through a :class:`Rewriter` obtained from the context and returns a
:class:`PassResult`. The manager checks that ``modified`` agrees with what the rewriter saw,
and adds the instrumentation a compiler engineer expects (print IR, time, verify, stop after,
disable).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from .errors import PassFailure, UserError, did_you_mean
from .ir import Model, Rewriter, verify_model
from .ir.verify import VerificationError
from .pipeline import pass_summary
from .status import StatusLine

if TYPE_CHECKING:
    from .target import Target

__all__ = ["Pass", "PassResult", "PassContext", "PassManager", "Instrumentation", "pass_summary"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: whether it changed the model."""

    modified: bool


@dataclass(frozen=True)
class Pass:
    """Base class of every pass, built-in or third-party.

    Subclasses set ``name`` (kebab-case), declare options as dataclass fields with defaults
    and type hints, say in the docstring what they rewrite and require, and implement
    :meth:`run`, which edits the model it is given in place.
    """

    name: ClassVar[str] = ""

    def run(self, model: Model, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def spec(self) -> str:
        """This pass as pipeline text, listing options that differ from their defaults."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            opts.append(f"{f.name.replace('_', '-')}={_format_value(value)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


@dataclass
class PassContext:
    """Everything a pass may read besides the model: the target, calibration data, options,
    and ``analysis`` (facts passes hand to later passes; never saved into the model)."""

    target: "Target"
    calibration: Any = None
    mode: str = "static"
    format: str = "qdq"
    analysis: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False
    verbose: bool = False  # -v: timed started/finished lines per phase (qcompiler.status)
    log: Callable[[str], None] = field(default=lambda msg: None)
    status: StatusLine = field(default_factory=StatusLine)  # disabled unless a terminal (qcompiler.status)
    _rewriters: list[Rewriter] = field(default_factory=list)
    _listeners: list[Callable[[str, str], None]] = field(default_factory=list)

    def rewriter(self, model: Model) -> Rewriter:
        """The rewriter a pass must use; the manager counts its changes."""
        rw = Rewriter(model, self._listeners)
        self._rewriters.append(rw)
        return rw

    def changes(self) -> int:
        return sum(rw.changes for rw in self._rewriters)

    def progress(self, what: str, done: int | None = None, total: int | None = None) -> None:
        """Say on the status line what the running pass does (``what done/total``); a no-op
        outside a terminal, cheap enough to call once per weight or sample."""
        self.status.show(what if done is None else f"{what} {done}/{total}")


ELIDE_ELEMENTS = 64  # --print-ir-after prints larger constants as shape, dtype and digest


@dataclass
class Instrumentation:
    print_ir_after: set[str] = field(default_factory=set)  # pass names, or {"all"}
    time_passes: bool = False
    verify_each: bool = True
    stop_after: str | None = None
    disabled: set[str] = field(default_factory=set)
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    debug: bool = False  # -v: the 'qcompiler' logger's debug records (e.g. why a rule left a match alone) to stream


class PassManager:
    """Runs passes in order with instrumentation; records one report row per pass."""

    def __init__(self, passes: Sequence[Pass], instrumentation: Instrumentation | None = None) -> None:
        self.passes = list(passes)
        self.inst = instrumentation or Instrumentation()
        self.records: list[dict[str, Any]] = []

    def run(self, model: Model, ctx: PassContext) -> bool:
        if not self.inst.debug:
            return self._run(model, ctx)
        logger = logging.getLogger("qcompiler")
        handler, level = logging.StreamHandler(self.inst.stream), logger.level
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            return self._run(model, ctx)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    def _run(self, model: Model, ctx: PassContext) -> bool:
        inst = self.inst
        ran: list[str] = []
        any_modified = False
        names = [p.name for p in self.passes]
        for flag, wanted in [("--stop-after", inst.stop_after)] + [("--print-ir-after", n) for n in
                                                                   sorted(inst.print_ir_after - {"all"})]:
            if wanted and wanted not in names:
                raise UserError(f"{flag} {wanted}: no such pass in the pipeline{did_you_mean(wanted, names)} "
                                f"({', '.join(names)})")
        status = ctx.status
        for index, p in enumerate(self.passes, 1):
            step = f"[{index}/{len(self.passes)}] {p.name}"
            if p.name in inst.disabled:
                self.records.append({"name": p.name, "spec": p.spec(), "seconds": 0.0, "modified": False,
                                     "skipped": True})
                continue
            before = ctx.changes()
            start = time.perf_counter()
            with status.phase(step, ctx.log, ctx.verbose):
                try:
                    result = p.run(model, ctx)
                except UserError:
                    raise
                except Exception as exc:
                    raise PassFailure(p.name, ran, exc) from exc
            changed = ctx.changes() - before
            if changed:
                try:
                    model.graph.toposort()
                except ValueError as exc:  # the pass left a cycle: blame it, like verify-each would
                    raise PassFailure(p.name, ran, VerificationError(f"IR invalid after pass: {exc}")) from exc
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise PassFailure(p.name, ran, TypeError(f"run() returned {type(result).__name__}, not PassResult"))
            if result.modified != bool(changed):
                raise PassFailure(p.name, ran, AssertionError(
                    f"reported modified={result.modified} but its rewriters made {changed} changes"))
            ran.append(p.name)
            any_modified |= result.modified
            self.records.append({"name": p.name, "spec": p.spec(), "seconds": round(seconds, 6),
                                 "modified": result.modified, "changes": changed})
            if inst.verify_each and result.modified:
                problems = verify_model(model)
                if problems:
                    raise PassFailure(p.name, ran[:-1], VerificationError(
                        f"IR invalid after pass: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")))
            if "all" in inst.print_ir_after or p.name in inst.print_ir_after:
                inst.stream.write(f"// ----- IR after {p.spec()} -----\n{model.graph.to_text(elide_above=ELIDE_ELEMENTS)}\n")
            if inst.stop_after == p.name:
                break
        if inst.time_passes:
            total = sum(r["seconds"] for r in self.records) or 1e-12
            inst.stream.write(f"{'pass':<28}{'seconds':>10}{'%':>7}  modified\n")
            for r in self.records:
                inst.stream.write(f"{r['name']:<28}{r['seconds']:>10.4f}{100 * r['seconds'] / total:>7.1f}  "
                                  f"{'skipped' if r.get('skipped') else r['modified']}\n")
            inst.stream.write(f"{'total':<28}{total:>10.4f}\n")
        return any_modified
