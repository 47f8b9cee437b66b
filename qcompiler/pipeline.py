"""Pipelines as text: ``fold-constants,fuse-conv-bn,insert-qdq{per-channel=true}``.

The text is the pipeline's canonical form: parsing and printing round-trip exactly, so a
pipeline can be copied from a report into a command line. Option values stay strings here;
the registry converts them to each pass's typed fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

__all__ = ["PassSpec", "parse_pipeline", "format_pipeline", "pass_summary"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: a pass name and its options as written (kebab-case keys)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"

    def option_dict(self) -> dict[str, str]:
        return dict(self.options)


def _split_top(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise UserError(f"pipeline '{text}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"pipeline '{text}': unbalanced braces")
    parts.append("".join(cur))
    return parts


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text; errors name the entry at fault."""
    specs: list[PassSpec] = []
    if not text.strip():
        return specs
    for raw in _split_top(text.strip(), ","):
        entry = raw.strip()
        if "{" in entry:
            if not entry.endswith("}"):
                raise UserError(f"pipeline entry '{entry}': options must end with '}}'")
            name, body = entry[: entry.index("{")].strip(), entry[entry.index("{") + 1 : -1]
            options: list[tuple[str, str]] = []
            for item in _split_top(body, ",") if body.strip() else []:
                if "=" not in item:
                    raise UserError(f"pipeline entry '{entry}': option '{item.strip()}' needs key=value")
                key, value = item.split("=", 1)
                key, value = key.strip(), value.strip()
                if not _NAME.match(key):
                    raise UserError(f"pipeline entry '{entry}': bad option name '{key}'")
                options.append((key, value))
        else:
            name, options = entry, []
        if not _NAME.match(name):
            raise UserError(f"pipeline entry '{entry}': '{name}' is not a kebab-case pass name")
        specs.append(PassSpec(name, tuple(options)))
    return specs


def format_pipeline(specs: list[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


def pass_summary(cls: type | str) -> str:
    """The first sentence of a pass's docstring (its one-line description); ``cls`` may be the
    docstring itself."""
    doc = (cls if isinstance(cls, str) else cls.__doc__ or "").strip()
    para = " ".join(doc.split("\n\n")[0].split())
    cut = para.find(". ")
    return para if cut < 0 else para[: cut + 1]
