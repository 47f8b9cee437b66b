"""The status line: one line on a terminal, redrawn in place, saying what the compile does now.

Why: a compile of a real model spends tens of seconds in single passes (calibration runs,
GPTQ rounding); without a sign of life a user cannot tell slow from stuck. The pass manager
names the running pass (``[12/17] insert-qdq``) and a pass may add its own progress through
``PassContext.progress`` (``weights 37/81``). Outside a terminal, or with ``-q``, the line is
disabled and every call is a cheap no-op: logs and pipes get whole lines only (the ``-v``
per-pass lines, see docs/design.md "CLI and file safety").
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

__all__ = ["StatusLine", "is_terminal", "SLOW_PHASE_SECONDS"]

SLOW_PHASE_SECONDS = 10.0  # outside a terminal, a phase this slow gets a line even without -v
REDRAW_SECONDS = 0.1  # the status line is redrawn at most this often


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StatusLine:
    """A line on ``stream`` rewritten with ``\\r``; redraws at most every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = False, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = REDRAW_SECONDS if interval is None else interval
        self.prefix = ""
        self._width = 0
        self._last = 0.0

    def show(self, text: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        line = self.prefix + (": " + text if text and self.prefix else text)
        line = line[: max(shutil.get_terminal_size().columns - 1, 20)]
        self.stream.write("\r" + line + " " * max(self._width - len(line), 0))
        self.stream.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def println(self, message: str) -> None:
        """Print a whole line (clearing the status line first; the next ``show`` redraws it)."""
        self.clear()
        print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str, log: Callable[[str], None], verbose: bool) -> Iterator[None]:
        """Show ``qcompiler: NAME`` while the block runs. ``verbose`` (-v) logs a started and a
        finished line with seconds; otherwise, outside a terminal, a phase slower than
        ``SLOW_PHASE_SECONDS`` logs one line when it ends (a sign of life in CI logs)."""
        if verbose:
            log(f"qcompiler: {name} started")
        self.prefix = f"qcompiler: {name}"
        self.show(force=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clear()
            self.prefix = ""
        seconds = time.perf_counter() - start
        if verbose:
            log(f"qcompiler: {name} finished in {seconds:.2f} s")
        elif seconds >= SLOW_PHASE_SECONDS and not self.enabled:
            log(f"qcompiler: {name} took {seconds:.1f} s")
