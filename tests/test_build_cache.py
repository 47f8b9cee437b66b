"""The whole-build cache (qcompiler/build_cache.py): a second compile with unchanged inputs
is a hit that runs no pass and returns byte-identical outputs and the same report; any
changed input misses; a damaged entry is recomputed; plugins disable the cache.
No CPU fact is involved: hits and misses are decided by hashes, outputs compared as bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import qcompiler
import qcompiler.build_cache
import qcompiler.pass_manager
from conftest import TINY_INPUT, tiny_calibration, tiny_model
from qcompiler.cli import main
from test_registry import PLUGIN_SOURCE

TIMING = ("seconds", "build_cache")


@pytest.fixture
def passes_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts PassManager.run calls (a hit makes none)."""
    count = [0]
    real = qcompiler.pass_manager.PassManager.run

    def counting(self: Any, *args: Any, **kw: Any) -> Any:
        count[0] += 1
        return real(self, *args, **kw)

    monkeypatch.setattr(qcompiler.pass_manager.PassManager, "run", counting)
    return count


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **tiny_calibration(12))  # 12 samples: some are held out for the fidelity section
    return {"model": model, "calib": calib, "cache": tmp_path / "cache"}


def _compile(inputs: dict[str, Path], **kw: Any) -> qcompiler.CompileResult:
    args: dict[str, Any] = {"target": "ort-cpu", "calibration": str(inputs["calib"]),
                            "calibration_options": qcompiler.CalibrationOptions(cache=str(inputs["cache"]))}
    args.update(kw)
    return qcompiler.compile(str(inputs["model"]), **args)


def _without_timing(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if k not in TIMING}
    if isinstance(out.get("accuracy"), dict):  # the budget check's own clock
        out["accuracy"] = {k: v for k, v in out["accuracy"].items() if k not in ("seconds", "summary")}
    return out


def test_second_compile_is_a_hit(inputs: dict[str, Path], tmp_path: Path, passes_run: list[int]) -> None:
    first = _compile(inputs, export_ranges=str(tmp_path / "r1.json"))
    assert first.report["build_cache"]["status"] == "miss" and passes_run[0] == 1
    assert "outputs" in first.report["fidelity"]  # measured on held-out samples
    assert len(list(inputs["cache"].glob("*.qcbuild"))) == 1
    second = _compile(inputs, export_ranges=str(tmp_path / "r2.json"))
    assert second.report["build_cache"] == {"status": "hit", "key": first.report["build_cache"]["key"]}
    assert passes_run[0] == 1  # no pass ran for the hit
    assert _without_timing(second.report) == _without_timing(first.report)
    assert (tmp_path / "r1.json").read_bytes() == (tmp_path / "r2.json").read_bytes()
    first.save(tmp_path / "a.onnx")
    second.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the hit's model is usable as a Model too (parsed on first use)
    assert qcompiler.op_histogram(second.model) == first.report["ops_after"]


def _bump_weight(inputs: dict[str, Path]) -> None:
    proto = onnx.load(str(inputs["model"]))
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w.flat[0] += 1e-3
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, proto.graph.initializer[0].name))
    onnx.save_model(proto, str(inputs["model"]))


def _bump_sample(inputs: dict[str, Path]) -> None:
    data = tiny_calibration(12)
    data[TINY_INPUT][3, 0, 0, 0] += 1e-3  # one value of one sample
    np.savez(inputs["calib"], **data)


def _other_target(inputs: dict[str, Path]) -> dict[str, Any]:
    path = inputs["model"].parent / "t.toml"
    path.write_text('schema = 1\nname = "ort-cpu-entropy"\ndescription = "ort-cpu, entropy"\nextends = "ort-cpu"\n\n'
                    '[defaults]\ncalibration_method = "entropy"\n')
    return {"target": str(path)}


CHANGES = {
    "model byte": lambda i: _bump_weight(i) or {},
    "calibration sample": lambda i: _bump_sample(i) or {},
    "target key": _other_target,
    "option": lambda i: {"calibration_options": qcompiler.CalibrationOptions(cache=str(i["cache"]), method="percentile")},
    "disabled pass": lambda i: {"disable_passes": ["fuse-pad-conv"]},
    "qcompiler code": lambda i: {},  # see the monkeypatch below
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_changed_input_misses(inputs: dict[str, Path], change: str, passes_run: list[int],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = _compile(inputs)
    kw = CHANGES[change](inputs)
    if change == "qcompiler code":
        monkeypatch.setattr(qcompiler.build_cache, "code_digest", lambda: "another source tree")
    second = _compile(inputs, **kw)
    assert second.report["build_cache"]["status"] == "miss"
    assert second.report["build_cache"]["key"] != first.report["build_cache"]["key"]
    assert passes_run[0] == 2
    assert len(list(inputs["cache"].glob("*.qcbuild"))) == 2


#: a non-default value for every CalibrationOptions field the key must cover (``cache`` is where
#: the key is looked up, ``ranges_file`` goes through import_ranges and its bytes are keyed)
OTHER_OPTION = {"method": "mse", "overrides": ("Relu=mse",), "range_overrides": ("Relu=percentile",),
                "percentile": 99.0, "momentum": 0.5, "bins": 512, "limit": 5, "second_moments": False, "moment_samples": 4, "grouped_moment_samples": 2,
                "clip_weight": 2.0, "max_moment_dim": 64, "memory": "2GB", "workers": 2, "scheduler": "tcp://h:1",
                "lanes": 1, "observe": "all", "statistics": "ranges", "saturation": True}


def test_every_calibration_option_is_in_the_key(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each calibration option changes the build key (the key is read before any pass runs)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(qcompiler.CalibrationOptions)}
    assert set(OTHER_OPTION) == fields - {"cache", "ranges_file"}  # a new option needs a line here
    keyed: list[str] = []

    class Stop(Exception):
        pass

    def record(options: dict[str, Any]) -> str:
        keyed.append(json.dumps(options, sort_keys=True, default=str))
        raise Stop

    monkeypatch.setattr(qcompiler.build_cache, "build_key", record)
    cache = str(inputs["cache"])
    for opts in [{}] + [{name: value} for name, value in OTHER_OPTION.items()]:
        with pytest.raises(Stop):
            _compile(inputs, calibration_options=qcompiler.CalibrationOptions(cache=cache, **opts))
    assert len(set(keyed)) == len(OTHER_OPTION) + 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_entry_is_recomputed(inputs: dict[str, Path], damage: str, passes_run: list[int]) -> None:
    first = _compile(inputs)
    (entry,) = inputs["cache"].glob("*.qcbuild")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) - 100:]
    else:
        data.clear()
    entry.write_bytes(bytes(data))
    second = _compile(inputs)
    assert second.report["build_cache"]["status"] == "miss" and passes_run[0] == 2
    assert second.serialized() == first.serialized()
    third = _compile(inputs)  # the entry was rewritten
    assert third.report["build_cache"]["status"] == "hit" and passes_run[0] == 2


def test_plugin_disables_the_build_cache(inputs: dict[str, Path], tmp_path: Path, passes_run: list[int]) -> None:
    plugin = tmp_path / "count_plugin.py"
    plugin.write_text(PLUGIN_SOURCE)
    for _ in range(2):
        res = _compile(inputs, plugins=[str(plugin)])
        assert res.report["build_cache"]["status"].startswith("disabled: plugins")
    assert passes_run[0] == 2 and not list(inputs["cache"].glob("*.qcbuild"))
    assert list(inputs["cache"].glob("*.qcstats"))  # the statistics cache still works


def test_cli_rebuild_writes_identical_files(inputs: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        out.mkdir()
        rc = main(["compile", str(inputs["model"]), "-o", str(out / "q.onnx"), "--calibration", str(inputs["calib"]),
                   "--calibration-cache", str(inputs["cache"]), "--report", str(out / "r.json"),
                   "--export-tensorrt-table", str(out / "trt.txt"), "-q"])
        assert rc == 0
        outs.append(out)
    reports = [json.loads((o / "r.json").read_text()) for o in outs]
    assert [r["build_cache"]["status"] for r in reports] == ["miss", "hit"]
    assert _without_timing(reports[0]) == _without_timing(reports[1])
    for name in ("q.onnx", "trt.txt"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert sorted(p.name for p in inputs["cache"].iterdir() if p.name.startswith(".tmp")) == []


def test_proto_specs_equal_model_specs() -> None:
    """The key reads the samples against specs taken from the proto (the model is not loaded
    on a hit); they must be the specs the imported Model gives, for a compile to reuse them."""
    from onnx import TensorProto, helper

    from qcompiler.calibration import input_specs
    from qcompiler.ir import load_model

    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", None, 7])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [7])  # an initializer listed as input
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None, 7])
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["c"], to=TensorProto.FLOAT),
                               helper.make_node("Mul", ["c", "w"], ["y"])], "g", [x, w], [y],
                              [onnx.numpy_helper.from_array(np.ones(7, np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for model in (proto, tiny_model()):
        assert input_specs(model) == input_specs(load_model(model))
    assert [s.name for s in input_specs(proto)] == ["ids"]


def test_one_shot_iterator_is_read_once_and_cached(inputs: dict[str, Path], passes_run: list[int]) -> None:
    data = tiny_calibration(12)[TINY_INPUT]

    def samples() -> Any:
        return ({TINY_INPUT: data[i:i + 1]} for i in range(len(data)))

    first = qcompiler.compile(str(inputs["model"]), calibration=samples(),
                              calibration_options=qcompiler.CalibrationOptions(cache=str(inputs["cache"])))
    second = qcompiler.compile(str(inputs["model"]), calibration=samples(),
                              calibration_options=qcompiler.CalibrationOptions(cache=str(inputs["cache"])))
    assert [r.report["build_cache"]["status"] for r in (first, second)] == ["miss", "hit"]
    assert first.report["calibration"]["samples"] > 0 and passes_run[0] == 1
    assert first.serialized() == second.serialized()


def test_external_data_outside_the_folder_is_not_read_for_the_key(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The key never reads a file the loader's sandbox refuses; the compile reports it."""
    hashed: list[Path] = []
    real = qcompiler.build_cache.file_digest
    monkeypatch.setattr(qcompiler.build_cache, "file_digest", lambda paths: hashed.extend(paths) or real(paths))
    proto = tiny_model()
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    bad = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in bad.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "outside.data").write_bytes((tmp_path / "m.data").read_bytes())
    onnx.save_model(bad, str(sub / "m.onnx"))
    with pytest.raises(qcompiler.UserError):
        qcompiler.compile(str(sub / "m.onnx"), calibration=tiny_calibration(4),
                          calibration_options=qcompiler.CalibrationOptions(cache=str(tmp_path / "c")))
    assert not list(tmp_path.glob("c/*.qcbuild"))
    assert not any("outside" in str(p) for p in hashed)
