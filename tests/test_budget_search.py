"""The accuracy budget's prediction search (qcompiler.budget._Predictor.shortest): it starts at the
prefix the sensitivities say is enough and gallops to a bisection, so a right guess costs two
fake-quant runs; whatever the guess, it returns a prefix predicted to meet the budget whose
predecessor is not.

CPU facts pinned: the compile targets ort-cpu-qdq and the predictions run the fake-quant model,
whose Q/DQ are float ops (qcompiler.analysis), so the verdicts are the same with and without VNNI.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.budget import Budget, _Measure, _Predictor, _moves, _rank, parse_budget

LAYERS = 8


def _model() -> onnx.ModelProto:
    """x -> 8 x (Conv 3x3 + Relu), each Conv's weight scaled differently (so each layer adds a
    different share of the quantization noise) -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(3)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        w = rng.standard_normal((6, 6, 3, 3)).astype(np.float32) * 0.25
        w[:, i % 6] *= 30.0  # one input channel dominates: the others get few levels
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.full(6, 0.05, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    inits += [numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "wg"),
              numpy_helper.from_array(np.zeros(5, np.float32), "bg")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def ranked() -> tuple[list[dict], object]:
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 6, 8, 8)).astype(np.float32)} for _ in range(12)]
    res = qcompiler.compile(_model(), target="ort-cpu-qdq", calibration=data[:8], eval_data=data[8:], accuracy="off")
    target = qcompiler.load_target("ort-cpu-qdq")
    rows, setup, _ = _rank(res, target, {})
    return _moves(rows), setup


def _bound(n: int) -> int:
    """Runs a gallop-then-bisect search may take on ``n`` steps (besides the all-integer one)."""
    return 2 * math.ceil(math.log2(n + 1)) + 2


def test_search_returns_the_first_holding_prefix_with_few_runs(ranked: tuple[list[dict], object]) -> None:
    """For budgets at each prefix's own predicted figure: the answer holds and its predecessor does
    not; a right guess costs at most two runs; any guess stays within the gallop's bound."""
    steps, setup = ranked
    assert len(steps) >= LAYERS
    probe = _Predictor(steps, setup, _Measure(parse_budget("sqnr>=0")))
    figures = [probe.value(n) for n in range(len(steps) + 1)]
    right = 0
    for n in range(1, len(steps) + 1):
        if figures[n] is None or math.isinf(figures[n]):
            continue
        budget = Budget("sqnr", figures[n], f"sqnr>={figures[n]}")
        pred = _Predictor(steps, setup, _Measure(budget))
        scale = pred.scale(figures[0], 0)
        assert scale == 1.0
        guess = pred._guess(1, scale)
        got = pred.shortest(1, scale)
        runs = len(set(pred.memo) - {0})
        want = next(m for m in range(1, len(steps) + 1) if budget.holds(figures[m]))
        assert got is not None and pred.holds(got, scale)
        assert got == 1 or not pred.holds(got - 1, scale)
        if want == got and guess == got:  # the sensitivities guessed it: one pair of runs
            right += 1
            assert runs <= 2, (n, guess, got, sorted(pred.memo))
        assert runs <= _bound(len(steps)), (n, guess, got, sorted(pred.memo))
    assert right >= 1  # the guess is right for some budgets (else the test shows nothing)


def test_search_is_none_when_no_prefix_holds_and_is_deterministic(ranked: tuple[list[dict], object]) -> None:
    """No prefix meeting the budget -> None; the same inputs give the same runs and answer."""
    steps, setup = ranked
    # a user metric (no noise form: the search starts mid-range) that no prefix meets
    unreachable = _Predictor(steps, setup, _Measure(parse_budget(0.0, metric=lambda ref, got: -1.0)))
    assert unreachable.shortest(1, unreachable.scale(None, 0)) is None
    assert len(steps) in unreachable.memo  # it tried the longest prefix before giving up
    first = _Predictor(steps, setup, _Measure(parse_budget("cosine>=0.9999")))
    again = _Predictor(steps, setup, _Measure(parse_budget("cosine>=0.9999")))
    assert first.shortest(1, 2.0) == again.shortest(1, 2.0)
    assert first.memo == again.memo
