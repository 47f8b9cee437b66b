"""Built-in passes use only qcompiler's public API, so a third-party pass can do all they do.

"Public" here means: a name listed in the ``__all__`` of a qcompiler module whose dotted path
has no component starting with an underscore (``qcompiler``, ``qcompiler.plan``, ...). A pass
may import such names (``from qcompiler import Model``, ``from qcompiler.plan import
partitions``) and read such attributes (``qcompiler.Model``). It may not import
onnx_graphsurgeon (the IR's storage, hidden behind ``qcompiler.ir``), reach through the IR to
it (``graph.gs``), or read private attributes of objects it does not define (``model._gs``): those are the
leaks that tie a pass to the IR's internals. The check reads the source (ast), so it covers
code paths no test exercises.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PASSES = Path(__file__).resolve().parents[1] / "passes"


def _public(module: str) -> set[str]:
    assert not any(part.startswith("_") for part in module.split(".")), f"{module} is a private module"
    return set(getattr(importlib.import_module(module), "__all__", ()))


def violations(path: Path) -> list[str]:
    """Every non-public use in one source file, as 'line: what'."""
    found: list[str] = []
    tree = ast.parse(path.read_text())
    own = {"self", "cls"} | {n.name for n in tree.body if isinstance(n, ast.ClassDef)}  # the file's own privates
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "onnx_graphsurgeon":
                    found.append(f"{line}: imports onnx_graphsurgeon")
                elif alias.name.startswith("qcompiler."):
                    found.append(f"{line}: imports module {alias.name} (import its public names instead)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "onnx_graphsurgeon":
                found.append(f"{line}: imports from onnx_graphsurgeon")
            elif node.module.split(".")[0] == "qcompiler":
                if any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"{line}: imports from private module {node.module}")
                    continue
                public = _public(node.module)
                found += [f"{line}: {node.module}.{a.name} is not public" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner == "qcompiler" and node.attr not in _public("qcompiler"):
                found.append(f"{line}: qcompiler.{node.attr} is not public")
            elif node.attr == "gs":
                found.append(f"{line}: reaches the graphsurgeon graph through .gs")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and owner not in own:
                found.append(f"{line}: reads private attribute .{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted(PASSES.glob("*.py")), ids=lambda p: p.name)
def test_pass_uses_only_the_public_api(path: Path) -> None:
    problems = violations(path)
    assert problems == [], f"{path.name}:\n" + "\n".join(problems)


def test_the_checker_catches_each_kind_of_leak(tmp_path: Path) -> None:
    """The check itself can fail: a file with one leak of each kind yields one finding each."""
    bad = tmp_path / "bad.py"
    bad.write_text("import onnx_graphsurgeon as gs\n"
                   "from qcompiler.ir.model import SHARED_LOCATION\n"  # public (in __all__): allowed
                   "from qcompiler.ir import _private\n"
                   "from qcompiler.plan import not_a_name\n"
                   "import qcompiler\n"
                   "x = qcompiler.api\n"
                   "def f(graph, model):\n"
                   "    return graph.gs.nodes, model._gs\n")
    assert len(violations(bad)) == 6, violations(bad)
