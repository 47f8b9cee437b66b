"""Error types that decide the CLI's exit code.

A :class:`UserError` is something the user can fix (bad model, bad target file, bad
calibration data, unwritable output): the CLI prints its one-line message and exits 2.
Anything else escaping a pass is an internal error (exit 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "PassFailure", "Terminated", "did_you_mean"]


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is one line naming file and node/key/input."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class PassFailure(Exception):
    """An unexpected exception inside a pass, annotated with the pass and what ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException) -> None:
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.cause = cause
        before = ", ".join(ran_before) if ran_before else "nothing"
        super().__init__(
            f"pass '{pass_name}' failed ({type(cause).__name__}: {cause}); passes run before it: {before}"
        )


class Terminated(BaseException):
    """SIGTERM arrived (the CLI's handler raises it; SIGINT raises KeyboardInterrupt). A
    BaseException like KeyboardInterrupt, so ``except Exception`` in passes does not swallow it
    and every ``finally`` removes its temp files on the way out."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``choices``, or "" (for one-line errors)."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
