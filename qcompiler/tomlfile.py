"""Reading the TOML files users hand qcompiler (targets, image specs) with one set of errors,
and writing one back (a resolved target).

tomllib raises three things on hostile input besides its decode error: OSError, a
UnicodeDecodeError for bytes that are not UTF-8, and RecursionError for deeply nested
arrays or inline tables. Each becomes one UserError line naming the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["read_toml", "dump_toml"]


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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """``data`` (parsed TOML: tables, arrays of tables, scalars) as TOML text that parses back
    to it (``targets --show`` prints a resolved target with it)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, list):
            for item in v:
                lines.append(f"\n[[{name}]]")
                lines.append(dump_toml(item, f"{name}.").strip())
        else:
            lines.append(f"\n[{name}]")
            body = dump_toml(v, f"{name}.").strip()
            if body:
                lines.append(body)
    return "\n".join(lines) + "\n"
