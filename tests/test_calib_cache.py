"""The build cache: a rebuild with the same graph, data and options makes no model run and
no GPTQ rounding and gives identical bytes; any change of data or method misses; writes are
atomic; damaged entries are recomputed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qcompiler
import qcompiler.calibration.stats
from conftest import TINY_INPUT, tiny_calibration, tiny_model
from qcompiler.calibration.cache import cache_key, data_digest


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts onnxruntime runs of the calibration engine."""
    count = [0]
    real = qcompiler.calibration.stats.run_model
    lock = threading.Lock()  # runs come from the engine's lanes (threads)

    def counting(sess: Any, feed: Any, outputs: Any = None) -> Any:
        with lock:
            count[0] += 1
        return real(sess, feed, outputs)

    monkeypatch.setattr(qcompiler.calibration.stats, "run_model", counting)
    return count


def _drop_builds(cache: Path) -> None:
    """These tests are about the statistics and GPTQ entries: remove whole-build entries
    (tests/test_build_cache.py), which would serve the first build's stored report."""
    for entry in cache.glob("*.qcbuild"):
        entry.unlink()


def _compile(cache: Path, data: dict[str, np.ndarray], method: str = "mse") -> qcompiler.CompileResult:
    _drop_builds(cache)
    return qcompiler.compile(tiny_model(), calibration=data,
                             calibration_options=qcompiler.CalibrationOptions(cache=str(cache), method=method))


def test_hit_skips_model_runs(tmp_path: Path, runs: list[int]) -> None:
    data = tiny_calibration(5)
    first = _compile(tmp_path / "cache", data)
    assert first.report["calibration"]["cache"] == "miss" and runs[0] >= 10  # two phases x 5 samples
    rounded = first.report["weight_rounding"]
    assert rounded["gptq_layers"] >= 2 and rounded["gptq_cache_hits"] == 0
    entries = sorted(p.suffix for p in (tmp_path / "cache").iterdir())  # no temp file left behind
    assert entries == [".qcarray"] * rounded["gptq_layers"] + [".qcbuild", ".qcstats"]
    runs[0] = 0
    second = _compile(tmp_path / "cache", data)
    assert second.report["calibration"]["cache"] == "hit"
    assert runs[0] == 0
    assert second.report["weight_rounding"]["gptq_layers"] == 0  # no GPTQ work either
    assert second.report["weight_rounding"]["gptq_cache_hits"] == rounded["gptq_layers"]
    assert second.report["calibration"]["samples"] == 5
    assert first.proto.SerializeToString() == second.proto.SerializeToString()


def test_changes_miss(tmp_path: Path, runs: list[int]) -> None:
    data = tiny_calibration(5)
    _compile(tmp_path, data)
    other = {TINY_INPUT: data[TINY_INPUT].copy()}
    other[TINY_INPUT][2, 0, 0, 0] += 1e-3  # one value of one sample
    assert _compile(tmp_path, other).report["calibration"]["cache"] == "miss"
    assert _compile(tmp_path, data, method="entropy").report["calibration"]["cache"] == "miss"
    runs[0] = 0
    assert _compile(tmp_path, data, method="entropy").report["calibration"]["cache"] == "hit"
    assert runs[0] == 0
    assert len(list(tmp_path.glob("*.qcstats"))) == 3


def test_key_parts() -> None:
    feeds = [{"x": np.zeros((1, 2), np.float32)}, {"x": np.ones((1, 2), np.float32)}]
    d, n = data_digest(feeds)
    assert n == 2 and data_digest(feeds)[0] == d
    assert data_digest(feeds[::-1])[0] != d                      # order matters
    assert data_digest(feeds, limit=1)[0] != d                   # the sample limit matters
    assert data_digest([{"x": np.zeros((2, 1), np.float32)}, feeds[1]])[0] != d  # shapes matter
    assert data_digest([{"x": np.zeros((1, 2), np.float64)}, feeds[1]])[0] != d  # dtypes matter
    assert cache_key(b"m", d, {"a": 1}) != cache_key(b"m2", d, {"a": 1}) != cache_key(b"m", d, {"a": 2})


def test_corrupt_entry_is_recomputed(tmp_path: Path, runs: list[int]) -> None:
    data = tiny_calibration(3)
    first = _compile(tmp_path, data)
    entry = next(tmp_path.glob("*.qcstats"))
    entry.write_bytes(b"garbage")
    runs[0] = 0
    again = _compile(tmp_path, data)
    assert again.report["calibration"]["cache"] == "miss" and runs[0] > 0
    assert first.proto.SerializeToString() == again.proto.SerializeToString()


def test_statistics_ranges_from_the_cli_and_in_the_key(tmp_path: Path, runs: list[int],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--calibration-statistics ranges reaches the calibrate pass (its report says so), and the
    statistics are part of the cache key: `all` cached does not serve `ranges`, `ranges`
    cached serves `ranges`; an unknown value is a usage error (exit 2, nothing written)."""
    import json

    import onnx

    from qcompiler.cli import main

    model, data, cache = tmp_path / "tiny.onnx", tmp_path / "calib.npz", tmp_path / "cache"
    onnx.save(tiny_model(), str(model))
    np.savez(data, **tiny_calibration(4))
    reports = []
    for stats in ("all", "ranges", "ranges"):
        report = tmp_path / f"report-{len(reports)}.json"
        extra = [] if stats == "all" else ["--calibration-statistics", stats]
        _drop_builds(cache)
        rc = main(["compile", str(model), "-o", str(tmp_path / f"q{len(reports)}.onnx"), "--calibration", str(data),
                   "--calibration-cache", str(cache), "--report", str(report), "-q", *extra])
        assert rc == 0, capsys.readouterr().err
        reports.append(json.loads(report.read_text())["calibration"])
    assert [r["statistics"] for r in reports] == ["all", "ranges", "ranges"]
    assert [r["cache"] for r in reports] == ["miss", "miss", "hit"]
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage and exit 2
        main(["compile", str(model), "-o", str(tmp_path / "bad.onnx"), "--calibration", str(data),
              "--calibration-statistics", "most"])
    assert exc.value.code == 2 and not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "garbage"])
def test_damaged_gptq_entry_is_recomputed(tmp_path: Path, damage: str) -> None:
    """A GPTQ entry whose bytes changed (one flipped bit in the codes, a cut-off file, foreign
    content) is not used: that layer is rounded again, the entry rewritten, the output the same."""
    data = tiny_calibration(3)
    first = _compile(tmp_path, data)
    entry = max(tmp_path.glob("*.qcarray"), key=lambda p: p.stat().st_size)
    raw = bytearray(entry.read_bytes())
    if damage == "bitflip":
        raw[-1] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-3]
    else:
        raw = bytearray(b"\x93NUMPY" + bytes(40))
    entry.write_bytes(bytes(raw))
    again = _compile(tmp_path, data)
    rounded = again.report["weight_rounding"]
    assert rounded["gptq_layers"] == 1
    assert rounded["gptq_cache_hits"] == first.report["weight_rounding"]["gptq_layers"] - 1
    assert first.proto.SerializeToString() == again.proto.SerializeToString()
    assert _compile(tmp_path, data).report["weight_rounding"]["gptq_layers"] == 0  # rewritten


def test_array_entries(tmp_path: Path) -> None:
    """Array entries: the key covers dtype, shape, bytes and options; a load states dtype and
    shape, and an entry of another size is a miss; nothing but raw numbers is read."""
    from qcompiler.calibration.cache import array_key, load_array, store_array

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    k = array_key("test-v1", [a], {"o": 1})
    assert k != array_key("test-v2", [a], {"o": 1}) != array_key("test-v1", [a], {"o": 2})
    assert k != array_key("test-v1", [a.reshape(4, 3)], {"o": 1}) != array_key("test-v1", [a.astype(np.float64)], {"o": 1})
    assert load_array(tmp_path, k, np.int8, (3, 4)) is None
    codes = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    store_array(tmp_path, k, codes)
    assert np.array_equal(load_array(tmp_path, k, np.int8, (3, 4)), codes)
    assert load_array(tmp_path, k, np.int8, (4, 4)) is None
    assert load_array(tmp_path, k, np.int16, (3, 4)) is None
    assert [p.name for p in tmp_path.iterdir()] == [f"{k}.qcarray"]
