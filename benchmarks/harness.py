"""What every benchmark script here needs around the measurement itself: spawning a job in a
fresh process, reading its memory, feeding onnxruntime's quantizer, and writing markdown.

bench.py, calib_bench.py, calib_floor.py and targets_bench.py import these (public) names;
the model-specific parts (preprocessing, metrics) stay in bench.py.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ListReader", "current_rss_mb", "peak_rss_mb", "window_peak_rss_mb", "reset_peak_rss", "spawn_in_child",
           "escape_cell", "cpu_info", "write_report", "BEGIN_MARKER", "END_MARKER"]

BEGIN_MARKER = "<!-- bench:begin -->"
END_MARKER = "<!-- bench:end -->"
Feed = dict[str, np.ndarray]


class ListReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts (structurally typed)."""

    def __init__(self, feeds: list[Feed]) -> None:
        self.feeds = feeds
        self.pos = 0

    def get_next(self) -> Feed | None:
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


# -- memory -------------------------------------------------------------------------------------

def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def window_peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (Linux: VmHWM; ru_maxrss also keeps the
    peaks of threads that exited before the reset, so it cannot be windowed), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets the
    kernel's high-water mark, which ru_maxrss reports); False where that is not possible, and
    the peak then covers the process's whole life."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- processes ----------------------------------------------------------------------------------

def spawn_in_child(entry: Callable[..., None], args: Sequence[Any], out_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``entry(conn, *args, scratch)`` in a fresh 'spawn' child, in a scratch working
    directory next to ``out_path`` that is removed afterwards; the dict the child sends on
    ``conn``, or an error dict when it times out or dies (never raises)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    scratch = Path(tempfile.mkdtemp(prefix="scratch.", dir=out_path.parent))
    proc = ctx.Process(target=entry, args=(send, *args, str(scratch)))
    proc.start()
    send.close()
    result: dict[str, Any] | None = None
    try:
        if recv.poll(timeout):
            result = recv.recv()
        else:
            proc.kill()
            result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    except EOFError:
        pass
    proc.join()
    shutil.rmtree(scratch, ignore_errors=True)
    if result is None:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        result = {"ok": False, "error": f"child process died ({why}; -9 is usually out of memory)"}
    return result


# -- markdown -----------------------------------------------------------------------------------

def escape_cell(text: str, limit: int = 320) -> str:
    """One table-safe line; long messages keep their start and their end (where the cause usually is)."""
    one = " ".join(text.split())
    one = one if len(one) <= limit else one[: limit // 3] + " ... " + one[-(2 * limit // 3):]
    return one.replace("|", "\\|")


def cpu_info() -> tuple[str, dict[str, bool]]:
    """CPU model name and presence of the flags that decide int8 kernel speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", {}
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
        elif line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    return model, {f: f in flags for f in ("avx2", "avx512_vnni", "avx_vnni")}


def write_report(path: Path, section: str, begin: str = BEGIN_MARKER, end: str = END_MARKER) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (creating the file or markers
    if missing); the rest of the file, other benchmarks' marked sections included, is kept."""
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    if path.exists():
        text = path.read_text()
        start, stop = text.find(begin), text.find(end)
        if start != -1 and stop > start:
            text = text[:start] + block.rstrip("\n") + text[stop + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
