"""The accuracy budget (qcompiler.budget): ``compile --accuracy``, ``compile(accuracy=...)``,
``metric=callable`` and the targets' fallback keys.

CPU facts pinned: every compile here targets ort-cpu-qdq (QDQ format), whose fidelity runs the
model as written (ORT_DISABLE_ALL: Q/DQ as float ops, no int8 kernel), and the sensitivity
ranking runs only float ops (qcompiler.analysis); so the verdicts are the same with and without
VNNI (no u8s8 saturation can enter).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from conftest import compile_in, outlier_inputs, write_workdir
from qcompiler.budget import DEFAULT_MAX_MOVED, parse_budget
from qcompiler.cli import main
from qcompiler.errors import UserError
from qcompiler.target import load_target

BAD = "conv_in"
TARGET = "ort-cpu-qdq"


def _model() -> onnx.ModelProto:
    """x (channel 0 carries outliers ~1000x the rest) -> conv_in -> Relu -> conv_mid -> Relu ->
    conv_out -> GAP -> Flatten -> fc. conv_in gives channel 0 a tiny weight, so the float output
    hardly depends on it, but its int8 input grid (per tensor) is set by it: channels 1..3 get
    a handful of levels. conv_in is the one bad layer; the others are ordinary."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    w1[:, 0] *= 1e-4
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    w3 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    wg = rng.standard_normal((10, 8)).astype(np.float32)
    z8 = np.zeros(8, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (z8 + 0.1, "b1"), (w2, "w2"), (z8, "b2"), (w3, "w3"), (z8, "b3"), (wg, "wg"),
        (np.zeros(10, np.float32), "bg")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=BAD, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv_mid", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv_out", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "budget", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 10, 10])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _inputs(n: int, seed: int) -> np.ndarray:
    return outlier_inputs(n, seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workdir(tmp_path_factory.mktemp("budget"), {"float.onnx": _model()}, _inputs(16, 0), _inputs(8, 1))


def _compile(work: Path, **kw: object) -> qcompiler.CompileResult:
    return compile_in(work, TARGET, **kw)


def test_integer_plan_misses_and_analyze_names_the_bad_layer(work: Path) -> None:
    res = _compile(work, accuracy="off")
    assert "accuracy" not in res.report
    assert res.report["fidelity"]["outputs"]["logits"]["cosine"] < 0.99  # the budget below is not met as is
    res.save(work / "int.onnx")
    rep = qcompiler.analyze(work / "float.onnx", work / "int.onnx", str(work / "eval.npz"), target=TARGET)
    assert rep["ranking"][0] == BAD


def test_budget_moves_exactly_the_bad_layer_first(work: Path) -> None:
    res = _compile(work, accuracy="cosine>=0.99")
    acc = res.report["accuracy"]
    assert acc["met"] and acc["source"] == "--accuracy"
    assert acc["value_before"] < 0.99 <= acc["value_after"]
    assert [m["node"] for m in acc["moved"]] == [BAD], acc["moved"]
    # ort-cpu-qdq falls back to float (int16-activations first: test_int16_fallback.py's target)
    assert acc["moved"][0]["to"] == "float" and acc["moved"][0]["cost"] == load_target(TARGET).fallback_cost("Conv", "float")
    assert "sensitivity rank 1" in acc["moved"][0]["why"]
    assert acc["sensitivity_ranking"][0] == BAD  # the worst layer analyze names is the one moved first
    assert res.report["fidelity"]["outputs"]["logits"]["cosine"] >= 0.99
    assert res.report["float_nodes"][BAD].startswith("accuracy budget") and "int16_nodes" not in res.report
    # the integer plan, the method trial's compile (entropy on x: better, not enough), the move
    assert acc["compiles"] == 3 and [r["tensor"] for r in acc["methods"]] == ["x"]
    assert acc["fidelity_before"]["logits"]["cosine"] == acc["value_before"]
    # deterministic: same inputs, same bytes
    again = _compile(work, accuracy="cosine>=0.99")
    assert again.proto.SerializeToString() == res.proto.SerializeToString()


def test_python_metric_callable(work: Path) -> None:
    seen: list[int] = []

    def agree(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
        seen.append(len(ref))
        r = np.concatenate([x["logits"] for x in ref])
        g = np.concatenate([x["logits"] for x in got])
        return float(-np.abs(r - g).max())  # task metric: minus the worst logit error

    res = _compile(work, metric=agree, accuracy=-0.05)
    acc = res.report["accuracy"]
    assert acc["met"] and acc["budget"] == "metric>=-0.05" and acc["value_after"] >= -0.05 > acc["value_before"]
    assert acc["moved"][0]["node"] == BAD and seen


def test_budget_already_met_moves_nothing_and_default_applies(work: Path) -> None:
    res = _compile(work, accuracy="sqnr>=-10")
    assert res.report["accuracy"]["moved"] == [] and res.report["accuracy"]["compiles"] == 1
    assert BAD not in res.report["float_nodes"]
    dflt = _compile(work)  # the target's [accuracy] default (cosine>=0.99) is on
    assert dflt.report["accuracy"]["source"].startswith(f"target '{TARGET}' default")
    assert [m["node"] for m in dflt.report["accuracy"]["moved"]] == [BAD]
    r = qcompiler.compile(str(work / "float.onnx"), target=TARGET, calibration="random:4")  # nothing to measure on
    assert "not checked" in r.report["accuracy"]["status"] and r.report["float_nodes"].get(BAD) is None
    with pytest.raises(UserError, match="cannot be measured"):
        qcompiler.compile(str(work / "float.onnx"), target=TARGET, calibration="random:4", accuracy="cosine>=0.9")


def test_unreachable_budget_is_one_line_and_writes_nothing(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "never.onnx"
    rc = main(["compile", str(work / "float.onnx"), "-o", str(out), "--target", TARGET, "--calibration",
               str(work / "calib.npz"), "--eval-data", str(work / "eval.npz"), "--accuracy", "sqnr>=400"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not met; best sqnr" in err[0] and not out.exists(), err


def test_cli_accuracy(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = tmp_path / "r.json"
    rc = main(["compile", str(work / "float.onnx"), "-o", str(tmp_path / "q.onnx"), "--target", TARGET,
               "--calibration", str(work / "calib.npz"), "--eval-data", str(work / "eval.npz"),
               "--accuracy", "cosine>=0.99", "--report", str(rep)])
    assert rc == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "accuracy cosine>=0.99 met" in x]
    assert len(lines) == 1 and "1 layer(s) moved" in lines[0], lines
    r = json.loads(rep.read_text())
    assert [m["node"] for m in r["accuracy"]["moved"]] == [BAD]


@pytest.mark.parametrize("text", ["cosine>0.99", "cosin>=0.9", "sqnr>=abc", "cosine>=1.5", "", "top1>=nan"])
def test_bad_accuracy_string_is_exit_2_one_line(work: Path, tmp_path: Path, text: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compile", str(work / "float.onnx"), "-o", str(tmp_path / "q.onnx"), "--calibration",
               str(work / "calib.npz"), "--accuracy", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--accuracy" in err[0], err
    assert not (tmp_path / "q.onnx").exists()


def test_parse_budget_and_top1_on_non_classifier() -> None:
    b = parse_budget("sqnr >= 20")
    assert (b.metric, b.threshold, b.holds(20.0), b.holds(19.9), b.holds(None)) == ("sqnr", 20.0, True, False, False)
    with pytest.raises(UserError, match="threshold"):
        parse_budget("cosine>=0.9", metric=lambda a, b: 1.0)


def test_target_fallback_keys(tmp_path: Path) -> None:
    for name in ("ort-cpu", "ort-cpu-qdq", "npu-int8", "tensorrt", "dsp-a16w8"):
        t = load_target(name)
        assert t.default_accuracy and t.fallbacks("Conv") and t.fallback_cost("Conv", t.fallbacks("Conv")[0]) > 1
    npu = load_target("npu-int8")
    assert npu.fallbacks("Conv") == ("host-float",)
    assert npu.fallback_cost("Conv", "host-float") == npu.fallback_cost("Conv", "float") + npu.boundary_cost > 0
    cpu = load_target("ort-cpu")  # MatMul: dynamic int8 first, at its own (lower) cost, then float
    assert cpu.fallbacks("MatMul") == ("dynamic", "float") and cpu.fallbacks("Conv") == ("float",)
    assert 1 < cpu.fallback_cost("MatMul", "dynamic") < cpu.fallback_cost("MatMul", "float")
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\ndescription = "x"\nextends = "ort-cpu-qdq"\n[ops.MatMul]\nfallbacks = ["dynamic", "float"]\n')
    with pytest.raises(UserError, match=r"ops\.MatMul\.fallbacks.*'dynamic'.*no quantize-dynamic"):
        load_target(str(bad))
    bad.write_text('name = "t"\ndescription = "x"\nextends = "ort-cpu"\n[ops.MatMul]\nfallbacks = ["int16-activations"]\n')
    assert load_target(str(bad)).fallbacks("MatMul") == ("int16-activations",)  # built (test_int16_fallback.py)
    bad.write_text('name = "t"\ndescription = "x"\nextends = "dsp-a16w8"\n[ops.MatMul]\nfallbacks = ["int16-activations"]\n')
    with pytest.raises(UserError, match=r"ops\.MatMul\.fallbacks.*'int16-activations'.*already uint16"):
        load_target(str(bad))
    bad.write_text('name = "t"\ndescription = "x"\nextends = "ort-cpu"\n[accuracy.fallback_cost.gpu]\nMatMul = 1.0\n')
    with pytest.raises(UserError, match=r"accuracy\.fallback_cost\.gpu"):
        load_target(str(bad))
    bad.write_text('name = "t"\ndescription = "x"\nextends = "ort-cpu"\n[accuracy]\nfallbacks = ["gpu"]\n')
    with pytest.raises(UserError, match=r"accuracy\.fallbacks"):
        load_target(str(bad))


def test_unmet_default_budget_keeps_the_best_with_a_warning(work: Path, tmp_path: Path) -> None:
    """A target's default budget never fails a compile: the best model is kept, met is false."""
    t = tmp_path / "strict.toml"
    t.write_text(f'name = "strict"\ndescription = "x"\nextends = "{TARGET}"\n[accuracy]\ndefault = "sqnr>=400"\n')
    res = qcompiler.compile(str(work / "float.onnx"), target=str(t), calibration=str(work / "calib.npz"),
                            eval_data=str(work / "eval.npz"))
    acc = res.report["accuracy"]
    assert acc["met"] is False and "NOT met" in acc["summary"] and acc["value_after"] > acc["value_before"]
    assert BAD in {m["node"] for m in acc["moved"]}
    # a default budget keeps a quantized model quantized: at most a share of the movable layers
    integer = [n for n in res.report["lowered"]] + [m["node"] for m in acc["moved"]]
    assert len(acc["moved"]) <= max(1, int(len(integer) * DEFAULT_MAX_MOVED)), (acc["moved"], integer)
    explicit = qcompiler.compile(str(work / "float.onnx"), target=str(t), calibration=str(work / "calib.npz"),
                                 eval_data=str(work / "eval.npz"), accuracy="sqnr>=30")
    assert explicit.report["accuracy"]["met"]


@pytest.mark.parametrize("how", ["cosine", "metric"])
def test_budget_search_through_a_warm_build_cache(work: Path, tmp_path: Path, how: str) -> None:
    """With --calibration-cache, the search's first compile is a whole-build cache hit on a
    rebuild; a hit carries no eval samples, so the search recompiles past the build cache where
    it needs them (ranking, a user metric) and gives the same bytes as the cold build."""
    def worst(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
        return float(-max(np.abs(r["logits"] - g["logits"]).max() for r, g in zip(ref, got)))

    kw: dict[str, object] = ({"accuracy": "cosine>=0.99"} if how == "cosine" else {"metric": worst, "accuracy": -0.05})
    cold = _compile(work, calibration_options=qcompiler.CalibrationOptions(cache=str(tmp_path / "cache")), **kw)
    warm = _compile(work, calibration_options=qcompiler.CalibrationOptions(cache=str(tmp_path / "cache")), **kw)
    moved = [(m["node"], m["to"]) for m in warm.report["accuracy"]["moved"]]
    assert warm.report["accuracy"]["met"] and moved[0][0] == BAD
    assert moved == [(m["node"], m["to"]) for m in cold.report["accuracy"]["moved"]]
    assert warm.serialized() == cold.serialized()


def _mlp() -> onnx.ModelProto:
    """x -> mm0 -> Relu -> mm1 -> Relu -> mm2 -> Neg -> y; x's scale varies over four decades between
    samples (``_mlp_data``), so mm0's static per-tensor input range fits no sample well."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.2).astype(np.float32), f"w{i}")
             for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
             # a float op after the last MatMul: its output is no graph output (a kernel without a
             # float output would have nowhere to write it)
             helper.make_node("Neg", ["h2"], ["y"], name="neg")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _mlp_data(n: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((n, 64)).astype(np.float32) * (10.0 ** r.uniform(-2, 2, (n, 1))).astype(np.float32)}


@pytest.mark.parametrize("budget, moves", [("sqnr>=24", [("mm2", "dynamic")]),
                                           ("sqnr>=36", [("mm2", "float"), ("mm0", "dynamic"), ("mm1", "dynamic")])])
def test_budget_moves_a_matmul_to_dynamic_before_float(budget: str, moves: list[tuple[str, str]]) -> None:
    """ort-cpu's MatMul falls back to dynamic int8, then float: a budget dynamic int8 meets moves
    the worst layer (mm2, reading the widest-ranging input) to the dynamic kernel (still integer,
    cheaper than float); a stricter one goes on to float once every layer's dynamic step is spent.

    CPU facts: ort-cpu's static and dynamic MatMul weights both keep the pair-sum limit
    (pair_sum_max = 128), so onnxruntime's u8s8 kernels are exact with and without VNNI and
    the measured figures (and the verdicts) are the same on both."""
    res = qcompiler.compile(_mlp(), target="ort-cpu", mode="static", calibration=_mlp_data(32, 0),
                            eval_data=_mlp_data(16, 1), accuracy=budget)
    acc = res.report["accuracy"]
    assert acc["met"] and acc["value_before"] < float(budget.split(">=")[1]) <= acc["value_after"], acc
    assert [(m["node"], m["to"]) for m in acc["moved"]] == moves, acc["moved"]
    cost = load_target("ort-cpu").fallback_cost("MatMul", moves[0][1])
    assert acc["moved"][0]["cost"] == cost and f"fallback '{moves[0][1]}'" in acc["moved"][0]["why"]
    ops = {n.name: n.op_type for n in res.proto.graph.node}
    for node, to in moves:
        if to == "dynamic":
            assert ops.get(f"{node}_quant") == "MatMulInteger" and node not in ops
            assert res.report["dynamic_nodes"][node].startswith("accuracy budget")
        else:
            assert ops[node] == "MatMul" and res.report["float_nodes"][node].startswith("accuracy budget")
    assert [n for n in ("mm0", "mm1", "mm2") if n not in dict(moves)] == [n for n in ("mm0", "mm1", "mm2")
                                                                         if ops.get(n) == "QLinearMatMul"]
    counts = ", ".join(f"{sum(t == k for _, t in moves)} {k}" for k in sorted({t for _, t in moves}))
    assert f"({counts}, est." in acc["summary"], acc["summary"]
    assert acc["compiles"] >= (3 if moves[0][1] == "float" else 2)


def test_recompiles_share_the_first_compiles_calibration(tmp_path: Path) -> None:
    """calibrate observes the full-integer plan's values whatever the overrides, so each recompile
    of a search is a calibration-cache hit (the statistics do not change when layers move)."""
    res = qcompiler.compile(_mlp(), target="ort-cpu", mode="static", calibration=_mlp_data(32, 0),
                            eval_data=_mlp_data(16, 1), accuracy="sqnr>=24",
                            calibration_options=qcompiler.CalibrationOptions(cache=str(tmp_path)))
    assert res.report["accuracy"]["compiles"] == 2 and res.report["calibration"]["cache"] == "hit"
    plain = qcompiler.compile(_mlp(), target="ort-cpu", mode="static", calibration=_mlp_data(32, 0),
                              eval_data=_mlp_data(16, 1), accuracy="off",
                              plan_overrides={"mm2": ("dynamic", res.report["dynamic_nodes"]["mm2"])})
    assert plain.proto.SerializeToString() == res.proto.SerializeToString()  # the cache changes nothing


def test_fit_of_measured_noise_picks_the_prefix() -> None:
    """_Fit: noise = c0 + c1 * (sensitivity noise left in integer), through the last two compiles;
    no prefix when the unseen part c0 alone misses the budget."""
    from qcompiler.budget import _Fit

    steps = [{"noise": x} for x in (0.004, 0.002, 0.001, 0.0005, 0.0005)]  # left: .008 .004 .002 .001 .0005 0
    fit = _Fit(steps, parse_budget("cosine>=0.999"), 1 - 0.0082)  # c0 = 0.0002, c1 = 1: noise(n) = .0002 + left
    assert fit.add(1, 1 - 0.0042).shortest(2) == 4  # n = 3: .0002 + .001 > .001; n = 4: .0002 + .0005 <= .001
    assert fit.shortest(5) == 5
    high = _Fit(steps, parse_budget("cosine>=0.999"), 1 - 0.0092)  # c0 = 0.0012 > the budget's 0.001
    assert high.add(1, 1 - 0.0052).shortest(2) is None
