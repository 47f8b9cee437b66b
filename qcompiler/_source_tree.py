"""Make ``qcompiler.passes`` and ``qcompiler.targets`` importable from a source checkout.

Why: the repository keeps passes and targets in top-level ``passes/`` and ``targets/`` folders
that the package build maps to ``qcompiler.passes`` / ``qcompiler.targets`` (pyproject's
``[tool.setuptools.package-dir]``). A wheel and an editable install both apply that mapping,
but ``python`` run from the repository root puts the root on ``sys.path`` first, so
``import qcompiler`` finds the source folder ``qcompiler/`` - which has no ``passes`` or
``targets`` sub-package - even when ``pip install .`` installed a complete copy.

When ``qcompiler`` is imported from such a checkout (a ``pyproject.toml`` for the project
``qcompiler`` beside the package folder), :func:`install` adds a meta-path finder that maps
exactly the sub-packages pyproject's ``package-dir`` names to their folders. The mapping is
read from pyproject, so it has one place; nothing else on ``sys.path`` changes, and imports
stay lazy (the finder is consulted only when a mapped name is imported).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["install", "package_dirs"]


def package_dirs(root: Path) -> dict[str, Path]:
    """``{sub-package: folder}`` from ``root/pyproject.toml`` when it builds qcompiler, else {}."""
    try:
        with open(root / "pyproject.toml", "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if data.get("project", {}).get("name") != "qcompiler":
        return {}
    mapping = data.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: root / folder for name, folder in mapping.items()
            if isinstance(name, str) and name.startswith("qcompiler.") and isinstance(folder, str)
            and (root / folder / "__init__.py").is_file()}


class _MappedPackages(importlib.abc.MetaPathFinder):
    """Finds the mapped sub-packages (and, through their ``__path__``, their modules)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def install(package_file: str) -> None:
    """Map the sub-packages when ``package_file`` (qcompiler's ``__init__.py``) is in a checkout
    that lacks them; a no-op for an installed package or when already installed."""
    package = Path(package_file).resolve().parent
    root = package.parent
    if any(isinstance(f, _MappedPackages) for f in sys.meta_path):
        return
    dirs = {name: folder for name, folder in package_dirs(root).items()
            if not (package / name.split(".", 1)[1]).is_dir()}
    if dirs:
        sys.meta_path.append(_MappedPackages(dirs))
