"""Third-party passes and targets registered through entry points (groups `qcompiler.passes`
and `qcompiler.targets`), found the way an installed plugin package is found: a real
`.dist-info` directory with `entry_points.txt` on sys.path, no mocking of importlib.metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcompiler
import qcompiler.registry
from conftest import tiny_calibration, tiny_model

PLUGIN = '''
from dataclasses import dataclass
from qcompiler import Model, Pass, PassContext, PassResult


@dataclass(frozen=True)
class TagModel(Pass):
    """Adds a metadata entry (a visible, harmless change)."""

    name = "tag-model"
    value: str = "tagged"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.metadata["plugin.tag"] = self.value
        return PassResult(False)
'''

TARGET = '''schema = 1
name = "ep-target"
description = "a target shipped inside a plugin package"
extends = "ort-cpu"

[defaults]
format = "qdq"
'''


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    pkg = site / "qc_ep_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    (pkg / "ep-target.toml").write_text(TARGET)
    info = site / "qc_ep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qc-ep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[qcompiler.passes]\ntag-model = qc_ep_plugin:TagModel\n\n"
        "[qcompiler.targets]\nep-target = qc_ep_plugin:ep-target.toml\n")
    monkeypatch.syspath_prepend(str(site))
    # the default registry is built once per process: start from a fresh one (restored after)
    monkeypatch.setattr(qcompiler.registry, "_default", None)
    return site


def test_entry_point_pass_is_registered_and_runs(plugin_site: Path) -> None:
    reg = qcompiler.default_registry()
    assert "tag-model" in reg.names()
    assert reg.origin("tag-model").startswith("entry point (qc-ep-plugin")
    target = qcompiler.load_target("ort-cpu")
    result = qcompiler.compile(tiny_model(), target=target, calibration=tiny_calibration(4),
                               pipeline=target.pipeline("static") + ",tag-model{value=from-entry-point}")
    assert {p.key: p.value for p in result.proto.metadata_props}["plugin.tag"] == "from-entry-point"


def test_entry_point_target_is_listed_and_compiles(plugin_site: Path) -> None:
    assert "ep-target" in qcompiler.builtin_targets()
    t = qcompiler.load_target("ep-target")
    assert t.default_format == "qdq" and t.data["extends"] == "ort-cpu"
    result = qcompiler.compile(tiny_model(), target="ep-target", calibration=tiny_calibration(4))
    ops = {n.op_type for n in result.proto.graph.node}
    assert "QuantizeLinear" in ops and "QLinearConv" not in ops  # QDQ, as the plugin's file says
    assert result.report["target"] == "ep-target"


def test_without_the_plugin_nothing_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcompiler.registry, "_default", None)
    assert "tag-model" not in qcompiler.default_registry().names()
    assert "ep-target" not in qcompiler.builtin_targets()
