"""The kernel table (qcompiler.kernels): one place for every kernel fact.

A grep over the product code proves no other module names a kernel; the table's layouts are
consistent; every kernel a built-in target names is in it for the right float op; and adding
a kernel is one entry that lowering, the checker and the simulator all pick up.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler import kernels as K
from conftest import tiny_calibration, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """Identifiers and string literals of a module, without its docstrings (prose may name
    a kernel; code may not)."""
    tree = ast.parse(path.read_text())
    docs: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out.append((node.lineno, node.name))
    return out


def test_kernel_names_live_only_in_the_table_and_targets() -> None:
    """Every kernel op name (e.g. QLinearConv) occurs in product code only in kernels.py (and in
    targets/*.toml, which name kernels): no second table, no special case by name."""
    names = sorted(K.INTEGER_OPS, key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])")
    files = sorted((ROOT / "qcompiler").rglob("*.py")) + sorted((ROOT / "passes").glob("*.py"))
    assert len(files) > 30
    found = []
    for path in files:
        if path == ROOT / "qcompiler" / "kernels.py":
            continue
        for line, text in _code_strings(path):
            m = pattern.search(text)
            if m:
                found.append(f"{path.relative_to(ROOT)}:{line}: {m.group(1)}")
    assert not found, "kernel names outside the kernel table:\n" + "\n".join(found)


def test_the_grep_sees_a_kernel_name_in_code(tmp_path: Path) -> None:
    """The check above can fail: a literal kernel name in code is found, prose is not."""
    src = tmp_path / "m.py"
    src.write_text('"""QLinearConv in a docstring is prose."""\n# QLinearConv in a comment\nX = "QLinearConv"\n')
    assert [t for _, t in _code_strings(src) if "QLinearConv" in t] == ["QLinearConv"]


@pytest.mark.parametrize("spec", list(K.KERNELS.values()), ids=lambda s: s.name)
def test_layout_is_consistent(spec: K.KernelSpec) -> None:
    """No two facts of a kernel claim the same input slot; a bias has no qparams; the weight is
    an operand; the simulator knows the implementation the spec names."""
    slots = [i for _, o in spec.positions(spec.variadic_from + 6 if spec.variadic_from else 0)
             for i in (o.value, o.scale, o.zero_point) if i is not None]
    slots += list(spec.output or ())
    assert len(slots) == len(set(slots)), spec
    if spec.weight is not None:
        assert spec.operand(spec.weight) is not None and not spec.operand(spec.weight).is_bias
    for pos in spec.shared_zero_point + spec.scalar_zero_point:
        assert spec.operand(pos) is not None and spec.operand(pos).zero_point is not None
    if spec.sim is not None:
        from qcompiler.sim.kernels import IMPLEMENTATIONS
        assert spec.sim in IMPLEMENTATIONS
    assert spec.name in qcompiler.INTEGER_OPS


def test_assemble_inputs_keeps_optional_slots_in_place() -> None:
    """A missing bias before the output qparams is an empty input (QGemm), trailing ones are
    dropped (QLinearConv), and a float output ends the list at the bias slot."""
    e = lambda: ""  # noqa: E731
    gemm, conv = K.KERNELS["QGemm"], K.KERNELS["QLinearConv"]
    a, b = ("a", "as", "az"), ("b", "bs", "bz")
    assert K.assemble_inputs(gemm, [a, b, None], ("ys", "yz"), e) == ["a", "as", "az", "b", "bs", "bz", "", "ys", "yz"]
    assert K.assemble_inputs(gemm, [a, b, None], None, e) == ["a", "as", "az", "b", "bs", "bz", ""]
    assert K.assemble_inputs(conv, [a, b, None], ("ys", "yz"), e) == ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    assert K.assemble_inputs(conv, [a, b, ("c",)], ("ys", "yz"), e)[-1] == "c"
    concat = K.KERNELS["QLinearConcat"]
    assert K.assemble_inputs(concat, [a, b], ("ys", "yz"), e) == ["ys", "yz", *a, *b]


def test_every_kernel_a_builtin_target_names_is_in_the_table() -> None:
    """A target names kernels; the table must say what each is, for the op it is named for."""
    named = 0
    for name in qcompiler.builtin_targets():
        tgt = qcompiler.load_target(name)
        for op, cfg in list(tgt.ops.items()) + list(tgt.dynamic_ops.items()):
            for c in [cfg] + list((cfg.variants or {}).values()):
                if c.kernel:
                    spec = K.kernel_spec(c.kernel_op)
                    assert spec is not None and spec.float_op == op, (name, op, c.kernel)
                    assert c.kernel_domain in spec.domains, (name, op, c.kernel)
                    named += 1
    assert named >= 10


def test_adding_a_kernel_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new spec in the table (here QLinearAdd's layout registered under a second name for Add)
    is lowered by lower-qoperator, accepted by the checker and simulated, with no other edit."""
    spec = dataclasses.replace(K.KERNELS["QLinearAdd"], name="QLinearAddTwo")
    monkeypatch.setitem(K.KERNELS, spec.name, spec)
    base = qcompiler.load_target("ort-cpu")
    data = dict(base.data)
    ops = {k: dict(v) for k, v in data["ops"].items()}
    ops["Add"]["kernel"] = "com.microsoft.QLinearAddTwo"
    data["ops"] = ops
    tgt = qcompiler.Target(data, base.path)
    pipeline = tgt.pipeline("static").replace("calibrate", "calibrate{method=minmax}")
    res = qcompiler.compile(tiny_model(), target=tgt, calibration=tiny_calibration(8), pipeline=pipeline)
    kinds = {n.name: n.op_type for n in res.proto.graph.node}
    assert kinds["add1"] == "QLinearAddTwo" and res.report["check"]["legal"]
    # the simulator runs it with QLinearAdd's implementation: the same outputs bit for bit
    ref = qcompiler.compile(tiny_model(), target=base, calibration=tiny_calibration(8), pipeline=pipeline)
    feeds = tiny_calibration(2, seed=5)
    a = qcompiler.simulate(res.proto, tgt, feeds).outputs
    b = qcompiler.simulate(ref.proto, base, feeds).outputs
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
