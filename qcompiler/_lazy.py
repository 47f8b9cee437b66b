"""Public names imported on first use (PEP 562), for ``qcompiler`` and its sub-packages.

Why: `qcompiler --version` and `targets` must not pay for onnx, networkx and onnxruntime
(docs/design.md, "Import time"), and a package whose modules import each other in a circle
through a third module (``calibration.engine`` -> ``rounding`` -> ``calibration.cache``) must
not import them all when it is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public names are ``table`` (name ->
    relative module defining it); a resolved name is stored in the package, so later lookups
    skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
