"""The pass registry: lazy built-ins, helpful unknown-name errors, and --plugin loading.

Plugins are the extension point for third parties, so every way a plugin can be broken must
surface as a UserError naming the plugin, not as a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qcompiler import Pass, PassRegistry, PassSpec, UserError, parse_pipeline
from qcompiler.registry import BUILTIN_PASSES

PLUGIN_SOURCE = textwrap.dedent('''
    """A third-party plugin defining one pass and one helper class."""
    from dataclasses import dataclass

    from qcompiler import Model, Pass, PassContext, PassResult


    @dataclass(frozen=True)
    class CountNodes(Pass):
        """Count nodes into the report. Does not change the graph."""

        name = "count-nodes"
        scale: int = 1

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            ctx.report["node_count"] = self.scale * len(model.graph.nodes)
            return PassResult(False)


    class NotAPass:
        name = "not-a-pass"
''')


def reg_spec(text: str) -> PassSpec:
    """One parsed pipeline entry."""
    (spec,) = parse_pipeline(text)
    return spec


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def test_builtin_names_are_listed() -> None:
    """Every built-in pass is in names() and sorted."""
    reg = PassRegistry(use_entry_points=False)
    names = reg.names()
    assert set(BUILTIN_PASSES) <= set(names)
    assert names == sorted(names)
    assert reg.origin("fuse-conv-bn") == "builtin"


@pytest.mark.parametrize("name", sorted(BUILTIN_PASSES))
def test_builtin_resolves_to_pass_with_same_name(name: str) -> None:
    """The registry entry and the class's own ``name`` agree, and options are listable."""
    reg = PassRegistry(use_entry_points=False)
    cls = reg.get(name)
    assert issubclass(cls, Pass)
    assert cls.name == name
    assert cls().spec() == name  # defaults print as the bare name
    assert reg.summary(name)  # a one-line description exists
    for option, _type, _default in reg.options(name):
        assert option == option.lower() and "_" not in option


def test_builtins_are_imported_lazily() -> None:
    """Listing names must not import pass modules; get() imports exactly the one asked for.

    Run in a fresh interpreter so other tests' imports don't hide an eager import.
    """
    code = textwrap.dedent("""
        import sys
        from qcompiler import default_registry
        reg = default_registry()
        names = reg.names()
        loaded = sorted(m for m in sys.modules if m.startswith("qcompiler.passes."))
        assert "fuse-conv-bn" in names, names
        assert loaded == [], loaded
        reg.get("fuse-conv-bn")
        loaded = sorted(m for m in sys.modules if m.startswith("qcompiler.passes."))
        assert loaded == ["qcompiler.passes.fuse_conv_bn"], loaded
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_unknown_pass_suggests_close_name() -> None:
    """A typo gets a 'did you mean' with the closest registered name."""
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError) as err:
        reg.get("fuse-conv-nb")
    msg = str(err.value)
    assert "'fuse-conv-nb'" in msg
    assert "did you mean 'fuse-conv-bn'" in msg


def test_unknown_pass_without_close_match_has_no_suggestion() -> None:
    """A name unlike any pass still errors, but without a misleading suggestion."""
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError) as err:
        reg.get("zzzzzzzz")
    assert "zzzzzzzz" in str(err.value)
    assert "did you mean" not in str(err.value)


def test_broken_reference_is_user_error() -> None:
    """A registry entry pointing at a missing class is reported, naming the pass."""
    reg = PassRegistry({"ghost": "qcompiler.passes.fuse_conv_bn:NoSuchClass"}, use_entry_points=False)
    with pytest.raises(UserError, match="ghost"):
        reg.get("ghost")


def test_plugin_file_registers_its_passes(tmp_path: Path) -> None:
    """A .py plugin contributes every named Pass subclass it defines, and nothing else."""
    path = _write(tmp_path, "myplugin.py", PLUGIN_SOURCE)
    reg = PassRegistry(use_entry_points=False)
    assert reg.load_plugin(str(path)) == ["count-nodes"]
    assert "count-nodes" in reg.names()
    assert "not-a-pass" not in reg.names()
    cls = reg.get("count-nodes")
    assert cls.__name__ == "CountNodes"
    assert reg.origin("count-nodes") == f"plugin {path}"
    p = reg.instantiate(reg_spec("count-nodes{scale=3}"))
    assert p.scale == 3


def test_plugin_module_on_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--plugin also accepts an importable module name."""
    _write(tmp_path, "qc_test_plugin_mod.py", PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qc_test_plugin_mod", raising=False)
    reg = PassRegistry(use_entry_points=False)
    assert reg.load_plugin("qc_test_plugin_mod") == ["count-nodes"]
    assert reg.origin("count-nodes") == "plugin qc_test_plugin_mod"


def test_plugin_without_passes_is_user_error(tmp_path: Path) -> None:
    """A plugin that only imports a pass (defines none) is rejected, naming the file."""
    path = _write(tmp_path, "empty_plugin.py",
                  "from qcompiler.passes.fuse_conv_bn import FuseConvBn\n\nX = 1\n")
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError) as err:
        reg.load_plugin(str(path))
    assert str(path) in str(err.value)
    assert "no Pass subclass" in str(err.value)


@pytest.mark.parametrize("source, fragment", [
    ("import qcompiler_no_such_module_xyz\n", "ModuleNotFoundError"),
    ("raise RuntimeError('plugin exploded')\n", "plugin exploded"),
    ("def broken(:\n    pass\n", "SyntaxError"),
])
def test_plugin_import_error_is_user_error(tmp_path: Path, source: str, fragment: str) -> None:
    """Whatever goes wrong while importing a plugin file becomes one UserError line."""
    path = _write(tmp_path, "bad_plugin.py", source)
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError) as err:
        reg.load_plugin(str(path))
    msg = str(err.value)
    assert str(path) in msg and fragment in msg
    assert "\n" not in msg


def test_missing_plugin_file_and_module(tmp_path: Path) -> None:
    """A plugin path that doesn't exist, or a module that can't be imported, is a UserError."""
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError, match="no such file"):
        reg.load_plugin(str(tmp_path / "absent.py"))
    with pytest.raises(UserError, match="qc_absent_module_xyz"):
        reg.load_plugin("qc_absent_module_xyz")


def test_register_rejects_non_pass() -> None:
    """register() only takes named Pass subclasses."""
    reg = PassRegistry(use_entry_points=False)
    with pytest.raises(UserError):
        reg.register(int)  # type: ignore[arg-type]
    with pytest.raises(UserError):
        reg.register(Pass)  # the base class has no name
