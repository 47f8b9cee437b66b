"""The wheel holds every package of the source tree: setuptools is given an explicit package
list (pyproject ``[tool.setuptools] packages``), so a new sub-package that is not added there is
silently missing from ``pip install .`` while every test of an editable install passes."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_the_wheel_package_list() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    mapped = conf.get("package-dir", {})
    found = {"qcompiler"} | {"qcompiler." + ".".join(p.parent.relative_to(ROOT / "qcompiler").parts)
                             for p in (ROOT / "qcompiler").rglob("__init__.py") if p.parent != ROOT / "qcompiler"}
    found |= set(mapped)  # top-level passes/ and targets/ are installed as qcompiler.passes/.targets
    assert found <= listed, f"packages missing from pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    for name, folder in mapped.items():
        assert (ROOT / folder / "__init__.py").is_file(), (name, folder)
