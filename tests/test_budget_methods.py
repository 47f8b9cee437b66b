"""The accuracy budget's per-layer calibration method trial (qcompiler.budget_methods) and the
statistics it reads (one collection serves every method; calibration/methods.abs_from_signed).

CPU facts pinned: every compile targets ort-cpu-qdq (QDQ format), whose fidelity runs the model
as written (ORT_DISABLE_ALL: Q/DQ as float ops, no int8 kernel), and the fake-quant model the
trial predicts with runs only float ops; so no u8 x s8 saturation (AVX2 without VNNI) can enter
and the verdicts are the same on every CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from conftest import compile_in, write_workdir
from qcompiler import budget_methods
from qcompiler.calibration.methods import (RangeTarget, abs_from_signed, entropy_range, percentile_range, serves)
from qcompiler.cli import main

TARGET = "ort-cpu-qdq"


def _model() -> onnx.ModelProto:
    """x -> conv_in -> Relu -> conv_mid -> Relu -> GAP -> Flatten -> fc. Channel 0 of x carries
    two +-300 outliers a sample (the rest ~N(0, 1)) and conv_in gives it a tiny weight: the
    outliers hardly matter to the output, but minmax and mse keep them in x's range (mse: their
    clipping error outweighs the rounding noise of the bulk), leaving the bulk a few uint8
    levels; entropy clips them."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    w1[:, 0] *= 1e-3
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    wg = rng.standard_normal((10, 8)).astype(np.float32)
    z8 = np.zeros(8, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (z8 + 0.1, "b1"), (w2, "w2"), (z8, "b2"), (wg, "wg"), (np.zeros(10, np.float32), "bg")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_in", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv_mid", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _inputs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, 16, 16)).astype(np.float32)
    for i in range(n):
        at = rng.integers(0, 16, size=(2, 2))
        x[i, 0, at[:, 0], at[:, 1]] = rng.choice([-300.0, 300.0], size=2)
    return x


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workdir(tmp_path_factory.mktemp("methods"), {"float.onnx": _model()}, _inputs(32, 0), _inputs(16, 1))


def _compile(work: Path, **kw: object) -> qcompiler.CompileResult:
    return compile_in(work, TARGET, **kw)


def _sqnr(res: qcompiler.CompileResult) -> float:
    return res.report["fidelity"]["outputs"]["logits"]["sqnr_db"]


def test_the_model_has_one_tensor_whose_method_matters(work: Path) -> None:
    """The premise: mse (the target's method) and minmax leave the model under 20 dB, entropy
    on x alone lifts it above 40 dB."""
    got = {m: _sqnr(_compile(work, accuracy="off", calibration_options=qcompiler.CalibrationOptions(
        overrides={"x": m}))) for m in ("minmax", "mse", "entropy")}
    assert got["minmax"] < 20 and got["mse"] < 20 and got["entropy"] > 40, got


def test_method_change_alone_meets_the_budget(work: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = _compile(work, accuracy="sqnr>=30", calibration_options=qcompiler.CalibrationOptions(cache=str(cache)))
    acc = res.report["accuracy"]
    assert acc["met"] and acc["moved"] == [] and acc["value_before"] < 30 <= acc["value_after"]
    assert [(r["layer"], r["tensor"], r["node"], r["from"], r["to"]) for r in acc["methods"]] == \
        [("conv_in", "x", "x", "mse", "entropy")]
    assert acc["methods"][0]["predicted_gain"] > 0
    assert acc["compiles"] == 2  # the integer plan, then the one with the method change
    # the method change's compile read the first compile's statistics: a cache hit, and one
    # statistics entry in the cache
    assert res.report["calibration"]["cache"] == "hit" and acc["method_trial"]["calibration_cache"] == "hit"
    assert len(list(cache.glob("*.qcstats"))) == 1
    assert res.report["calibration"]["range_overrides"] == {"x": "entropy"}
    assert res.report["calibration"]["overrides"] == {}
    assert "1 method change(s)" in acc["summary"] and "0 layer(s) moved" in acc["summary"]
    assert _sqnr(res) == acc["value_after"]


def test_cli_summary_counts_method_changes(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = tmp_path / "r.json"
    rc = main(["compile", str(work / "float.onnx"), "-o", str(tmp_path / "q.onnx"), "--target", TARGET,
               "--calibration", str(work / "calib.npz"), "--eval-data", str(work / "eval.npz"),
               "--accuracy", "sqnr>=30", "--report", str(rep)])
    assert rc == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "accuracy sqnr>=30 met" in x]
    assert len(lines) == 1 and "1 method change(s)" in lines[0], lines
    assert [r["to"] for r in json.loads(rep.read_text())["accuracy"]["methods"]] == ["entropy"]


def test_trial_is_never_worse_than_no_trial(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the trial the same budget moves a layer off integer; with it none moves, and
    the figure is at least as high."""
    with_trial = _compile(work, accuracy="sqnr>=30").report["accuracy"]
    monkeypatch.setattr(budget_methods, "TRIAL_LAYERS", 0)
    without = _compile(work, accuracy="sqnr>=30").report["accuracy"]
    assert without["methods"] == [] and len(without["moved"]) >= 1
    assert len(with_trial["moved"]) < len(without["moved"])
    assert with_trial["met"] and without["met"]


def test_a_change_the_real_compile_measures_worse_is_dropped(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced to accept every candidate (entropy is the method here, so x's only other
    candidate its abs histogram serves is minmax, which is bad), the trial's compile measures
    worse than the integer plan: the changes are dropped and the search ends with the very
    model it gives without the trial."""
    opts = qcompiler.CalibrationOptions(method="entropy")
    monkeypatch.setattr(budget_methods, "_improves", lambda metric, old, new: True)
    forced = _compile(work, accuracy="sqnr>=60", calibration_options=opts)
    acc = forced.report["accuracy"]
    assert acc["methods"] and all(r["kept"] is False for r in acc["methods"])
    assert "rejected" in acc["method_trial"] and "method change" not in acc["summary"]
    monkeypatch.setattr(budget_methods, "TRIAL_LAYERS", 0)
    plain = _compile(work, accuracy="sqnr>=60", calibration_options=opts)
    assert forced.proto.SerializeToString() == plain.proto.SerializeToString()
    assert acc["moved"] == plain.report["accuracy"]["moved"]


def test_range_override_keeps_the_statistics_key(work: Path, tmp_path: Path) -> None:
    """A range override the collected statistics serve (x collects a signed histogram for mse;
    entropy reads an abs one derived from it) hits the cache; one they cannot serve (the method
    minmax collects no histogram) collects its own. A plain override collects for its method,
    as before (a miss)."""
    def calib(**kw: object) -> dict:
        opts = qcompiler.CalibrationOptions(cache=str(tmp_path), **kw)
        return _compile(work, accuracy="off", calibration_options=opts).report["calibration"]

    first = calib()
    served = calib(range_overrides={"x": "entropy"})
    assert first["cache"] == "miss" and served["cache"] == "hit" and served["cache_key"] == first["cache_key"]
    assert served["range_overrides"] == {"x": "entropy"} and "range_overrides" not in first
    assert calib(overrides={"x": "entropy"})["cache"] == "miss"
    assert calib(method="minmax")["cache"] == "miss"
    assert calib(method="minmax", range_overrides={"x": "entropy"})["cache"] == "miss"


def test_abs_histogram_derived_from_signed_is_exact_enough() -> None:
    """Percentile and entropy ranges from the derived |x| histogram against a directly binned
    one: within one signed bin width (percentile) and within 2% of the range (entropy, whose
    search runs on merged bins). The counts agree exactly in total and in exact zeros."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(200_000) * 1.5 + 0.4, rng.standard_t(3, 5_000) * 4, np.zeros(3_000)])
    x = x.astype(np.float32)
    lo, hi, bins = float(x.min()), float(x.max()), 2048
    signed = np.bincount(np.clip(((x - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1), minlength=bins)
    amax = max(-lo, hi)
    direct = np.bincount(np.clip((np.abs(x) * (bins / amax)).astype(np.int64), 0, bins - 1), minlength=bins)
    zeros = int((x == 0).sum())
    derived = abs_from_signed(signed, lo, hi, zeros)
    assert derived.sum() == pytest.approx(direct.sum(), rel=1e-12)
    assert derived[0] >= zeros
    width = (hi - lo) / bins
    for p in (99.0, 99.9, 99.99):
        a = percentile_range(direct, lo, hi, p, "abs")
        b = percentile_range(derived, lo, hi, p, "abs")
        assert abs(a[1] - b[1]) <= width and abs(a[0] - b[0]) <= width, (p, a, b)
    grid = RangeTarget(255, False)
    a = entropy_range(direct, lo, hi, grid, zeros)
    b = entropy_range(derived, lo, hi, grid, zeros)
    assert abs(a[1] - b[1]) <= 0.02 * (hi - lo), (a, b)


def test_serves_rule() -> None:
    asym, sym = RangeTarget(255, False), RangeTarget(254, True)
    assert all(serves("signed", m, g) for m in ("minmax", "percentile", "mse", "entropy") for g in (asym, sym))
    assert serves("abs", "entropy", asym) and serves("abs", "percentile", sym) and serves("abs", "minmax", asym)
    assert not serves("abs", "mse", sym) and not serves("abs", "percentile", asym)
    assert not serves(None, "mse", asym) and serves(None, "minmax", asym)


def test_tuned_model_with_unchanged_grids_is_the_fake_quant_model(work: Path) -> None:
    """The trial's session (scale and zero point as graph inputs) gives the analysis's
    fake-quant outputs when no grid is changed, and other outputs once one is."""
    from qcompiler.analysis import setup_analysis
    from qcompiler.calibration.cache import load_cached

    res = _compile(work, accuracy="off", calibration_options=qcompiler.CalibrationOptions(cache=str(work / "c")))
    res.save(work / "int.onnx")
    setup = setup_analysis(work / "float.onnx", work / "int.onnx", str(work / "eval.npz"), target=TARGET)
    stats = load_cached(work / "c", res.report["calibration"]["cache_key"])
    sens = qcompiler.layer_sensitivity(setup=setup)
    tensors = budget_methods._tensors(setup, sens, stats, res.report["calibration"], setup.target,
                                      qcompiler.CalibrationOptions())
    assert "x" in [t.name for t in tensors]
    tuned = budget_methods._TunedModel(setup.model, setup.layers, tensors)
    on = {layer.name for layer in setup.layers}
    feed = setup.batches[0]
    want = setup.model.run(feed, on)["logits"]
    np.testing.assert_allclose(tuned.run(feed, on)["logits"], want, rtol=0, atol=1e-6)
    x = next(t for t in tensors if t.name == "x")
    tuned.set(x, np.float32(x.base[0] * 4), x.base[1])
    assert np.abs(tuned.run(feed, on)["logits"] - want).max() > 1e-3
