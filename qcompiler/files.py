"""Output files: checked before a command runs, written so that a failure leaves nothing behind.

Why this module: a compile names several inputs (model, its external data, calibration
data, target file, range file, plugins) and several outputs (model, report, range files).
Each output is written to a temp file beside its final path and renamed over it, so a
reader never sees a half-written file. Inside :func:`transaction` (what the CLI uses) the
renames wait until the command has succeeded and then happen together with SIGINT/SIGTERM
blocked: an error or a signal at any point leaves no output and no temp file.

Special files (FIFO, character or block device, socket) are written through, never
replaced: renaming over ``/dev/null`` would swap the device for a regular file. A symlink
is followed and its target written (the link stays). ``docs/design.md`` ("CLI and file
safety") records these decisions.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import Terminated, UserError

__all__ = ["check_paths", "is_special", "real_path", "temp_beside", "publish", "write_bytes", "discard",
           "transaction"]

PathLike = str | os.PathLike[str]


def real_path(path: PathLike) -> Path:
    """The path with every symlink followed (also a dangling one: its target is what gets written)."""
    return Path(os.path.realpath(path))


def is_special(path: PathLike) -> bool:
    """True for an existing FIFO, character/block device or socket (after following symlinks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_writable(flag: str, path: str) -> None:
    final = real_path(path)
    if final.is_dir():
        raise UserError(f"{path}: {flag}: output path is a directory")
    if is_special(final):
        if not os.access(final, os.W_OK):
            raise UserError(f"{path}: {flag}: cannot write output: permission denied")
        return
    parent = final.parent
    if not parent.is_dir():
        raise UserError(f"{path}: {flag}: cannot write output: directory '{Path(path).parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: {flag}: cannot write output: directory '{Path(path).parent}' is not writable")


def check_paths(inputs: Iterable[tuple[str, PathLike | None]], outputs: Iterable[tuple[str, PathLike | None]]) -> None:
    """Refuse (``UserError``, before anything runs) an output that cannot be written, that is
    an input, or that is another output. Pairs are ``(what, path)``; ``None`` paths are skipped.
    Paths are compared after following symlinks, and hard links by inode."""
    outs = [(flag, str(p)) for flag, p in outputs if p is not None]
    ins = [(what, str(p)) for what, p in inputs if p is not None and Path(p).is_file()]
    for flag, path in outs:
        _check_writable(flag, path)
    for i, (flag, path) in enumerate(outs):
        final = real_path(path)
        for what, src in ins:
            if _same(final, real_path(src)):
                raise UserError(f"{path}: {flag} would overwrite the {what} ({src})")
        if is_special(final):
            continue  # several outputs may stream into one device (e.g. all to /dev/null)
        for other_flag, other in outs[:i]:
            if _same(final, real_path(other)):
                raise UserError(f"{path}: {flag} is also the {other_flag} output; give each output its own path")


# -- writing -----------------------------------------------------------------------------------


class _Transaction:
    def __init__(self) -> None:
        self.renames: list[tuple[Path, Path]] = []  # (temp, final)
        self.streams: list[tuple[bytes, Path]] = []  # special files, written at commit

    def commit(self) -> None:
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:  # renames are quick: finish them all, then let a pending signal in
            while self.renames:
                tmp, final = self.renames[0]
                os.replace(tmp, final)
                self.renames.pop(0)
            late = signal.sigtimedwait(blocked, 0)  # arrived during the renames: too late to undo
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if late is not None:
            exc: BaseException = KeyboardInterrupt() if late.si_signo == signal.SIGINT else Terminated()
            exc.outputs_written = True  # type: ignore[attr-defined]
            raise exc
        while self.streams:
            data, final = self.streams.pop(0)
            _write_through(final, data)

    def discard(self) -> None:
        for tmp, _ in self.renames:
            discard(tmp)
        self.renames.clear()
        self.streams.clear()


_current: contextvars.ContextVar[_Transaction | None] = contextvars.ContextVar("qcompiler_outputs", default=None)


@contextlib.contextmanager
def transaction() -> Iterator[None]:
    """Outputs published inside are renamed into place only when the block succeeds."""
    tx = _Transaction()
    token = _current.set(tx)
    try:
        yield
        try:
            tx.commit()
        except OSError as exc:
            raise UserError(f"cannot write output: {exc.strerror or exc}") from exc
    finally:
        _current.reset(token)
        tx.discard()


def temp_beside(final: Path, suffix: str = ".tmp") -> Path:
    """A new empty file in ``final``'s directory (same file system: the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temp file onto ``final`` now, or at the end of the current transaction."""
    tx = _current.get()
    if tx is None:
        os.replace(tmp, final)
    else:
        tx.renames.append((tmp, final))


def _write_through(final: Path, data: bytes) -> None:
    with open(final, "wb", buffering=0) as fh:  # no O_CREAT race: it exists; "wb" truncates only regular files
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` safely (temp + rename; through to special files; symlinks followed).
    Errors become ``UserError`` naming the path."""
    final = real_path(path)
    try:
        if is_special(final):
            tx = _current.get()
            if tx is None:
                _write_through(final, data)
            else:
                tx.streams.append((data, final))
            return
        tmp = temp_beside(final)
        try:
            tmp.write_bytes(data)
            publish(tmp, final)
        except BaseException:
            discard(tmp)
            raise
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
