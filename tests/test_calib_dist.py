"""Distributed calibration: shards over spawned local processes and over a Dask cluster on
loopback merge to the single-process statistics (min/max and histograms exactly; float64
channel means and moments to 1e-12 relative, their addition order differs)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

import qcompiler
from conftest import tiny_calibration, tiny_model

try:
    import distributed  # noqa: F401
    HAVE_DASK = True
except ImportError:
    HAVE_DASK = False


def _calib_analysis(method: str, **kw: Any) -> dict[str, Any]:
    model = qcompiler.load_model(tiny_model())
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"),
                                calibration=qcompiler.load_calibration(tiny_calibration(7), qcompiler.input_specs(model)))
    opts = tuple((k, str(v)) for k, v in kw.items())
    reg = qcompiler.default_registry()
    qcompiler.PassManager([reg.instantiate(qcompiler.PassSpec("infer-shapes")),
                           reg.instantiate(qcompiler.PassSpec("calibrate", (("method", method),) + opts))]).run(model, ctx)
    ctx.analysis["report"] = ctx.report["calibration"]
    return ctx.analysis


def _assert_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["ranges"] == b["ranges"]
    for key in ("channel_means", "input_moments"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            # float32 per-batch sums (one GEMM / GEMV per batch), float64 across batches: the
            # shard split changes the summation order, agreement is to float32 rounding
            np.testing.assert_allclose(a[key][k], b[key][k], rtol=1e-5, atol=1e-6 * float(np.abs(b[key][k]).max()))


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_two_local_workers_equal_one(method: str) -> None:
    one = _calib_analysis(method)
    two = _calib_analysis(method, workers=2)
    _assert_equal(one, two)
    assert two["report"]["workers"] == 2 and two["report"]["samples"] == 7


def test_moving_average_is_shard_invariant() -> None:
    _assert_equal(_calib_analysis("minmax", momentum=0.8), _calib_analysis("minmax", momentum=0.8, workers=2))


@pytest.mark.skipif(not HAVE_DASK, reason="dask[distributed] not installed (optional extra 'dask')")
def test_dask_local_cluster_equals_single_process() -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        dask = _calib_analysis("percentile", scheduler=cluster.scheduler_address)
    _assert_equal(_calib_analysis("percentile"), dask)
    assert dask["report"]["scheduler"].startswith("tcp://127.0.0.1")


def test_missing_dask_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(qcompiler.UserError, match="pip install 'qcompiler\\[dask\\]'"):
        _calib_analysis("minmax", scheduler="tcp://127.0.0.1:1")


def test_unpicklable_data_is_a_user_error() -> None:
    model = qcompiler.load_model(tiny_model())
    data = qcompiler.load_calibration(tiny_calibration(2), qcompiler.input_specs(model))
    data.unpicklable = lambda: None  # a lambda cannot be sent to a worker process
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"), calibration=data)
    p = qcompiler.default_registry().instantiate(qcompiler.PassSpec("calibrate", (("workers", "2"),)))
    with pytest.raises(qcompiler.UserError, match="cannot be sent to worker processes"):
        qcompiler.PassManager([p]).run(model, ctx)
