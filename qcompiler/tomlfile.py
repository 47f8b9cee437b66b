"""Reading the TOML files users hand qcompiler (targets, image specs) with one set of errors.

tomllib raises three things on hostile input besides its decode error: OSError, a
UnicodeDecodeError for bytes that are not UTF-8, and RecursionError for deeply nested
arrays or inline tables. Each becomes one UserError line naming the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["read_toml"]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The parsed TOML file ``path``; ``what`` names the kind of file in the error."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError:
        raise UserError(f"{path}: cannot read {what} (not UTF-8 text)") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read {what} (TOML nested too deeply)") from None
