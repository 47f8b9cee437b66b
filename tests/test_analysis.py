"""qcompiler analyze: per-layer accumulated error and sensitivity, the HTML page and the
compile report's fidelity section.

CPU facts pinned: the analysis runs only float ops in onnxruntime (every Q -> DQ pair feeds a
Sub, so no integer kernel is formed), so the ranking is the same with and without VNNI;
``test_fake_quant_is_the_qdq_model`` checks it against the QDQ model run with
ORT_DISABLE_ALL (Q/DQ as written, float arithmetic). The compile-report fidelity runs the
compiled ort-cpu model in onnxruntime's integer kernels; its weights are limited so that the
AVX2 (no VNNI) u8s8 path does not saturate, and the asserted bound is loose.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.analysis import FakeQuantModel, find_layers, render_html, setup_analysis
from qcompiler.analysis.html import fmt
from qcompiler.cli import main

BAD = "conv2"


def _model(bad: bool = True) -> onnx.ModelProto:
    """x -> conv1 -> Relu -> conv2 -> Relu -> conv3 -> Relu -> GAP -> Flatten -> Gemm (10 classes).
    conv1's channel 0 is always 0 after its Relu; with ``bad``, conv2 gives that dead channel
    a weight 60x its others in every output channel: the weight contributes nothing to the
    float output but sets conv2's per-channel weight scales, so its useful weights get
    about 2 levels each - conv2 is the one bad layer."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(8).astype(np.float32) * 0.1
    w1[0] = 0.0
    b1[0] = -1.0
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    if bad:
        w2[:, 0, 1, 1] = 12.0
    w3 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    wg = rng.standard_normal((10, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(8, np.float32), "b2"), (w3, "w3"),
        (np.zeros(8, np.float32), "b3"), (wg, "wg"), (np.zeros(10, np.float32), "bg")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name=BAD, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "bad_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("analysis")
    onnx.save(_model(), d / "float.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((20, 3, 12, 12)).astype(np.float32))
    np.savez(d / "eval.npz", x=rng.standard_normal((6, 3, 12, 12)).astype(np.float32))
    for tgt, name in (("ort-cpu", "q.onnx"), ("ort-cpu-qdq", "qdq.onnx")):
        res = qcompiler.compile(str(d / "float.onnx"), target=tgt, calibration=str(d / "calib.npz"))
        res.save(d / name)
    return d


def test_bad_layer_is_named_worst(work: Path) -> None:
    for quant in ("q.onnx", "qdq.onnx"):  # QOperator and QDQ outputs map to the same float nodes
        rep = qcompiler.analyze(work / "float.onnx", work / quant, str(work / "eval.npz"))
        names = [x["name"] for x in rep["layers"]]
        # (in QDQ form the Gemm whose float output is the graph output is no integer group)
        assert {"conv1", BAD, "conv3"} | ({"fc"} if quant == "q.onnx" else set()) <= set(names), names
        assert rep["ranking"][0] == BAD, (quant, rep["ranking"])
        by = {x["name"]: x for x in rep["layers"]}
        # the bad layer alone costs more than any other layer alone, by a margin
        others = [by[n]["sensitivity"]["score_db"] for n in names if n != BAD]
        assert by[BAD]["sensitivity"]["score_db"] < min(others) - 6, rep["layers"]
        assert rep["outputs"]["logits"]["top1_agreement"] is not None
        assert by["conv1"]["range"]["chosen"][0] == 0.0  # Relu fused: the range starts at 0
        assert 0 <= by["conv1"]["range"]["clipped_fraction"] <= 1
        assert "int8" in by[BAD]["precision"] and by[BAD]["reason"]
    # without the outlier the same layer is not the worst by that margin
    onnx.save(_model(bad=False), work / "good.onnx")
    qcompiler.compile(str(work / "good.onnx"), calibration=str(work / "calib.npz")).save(work / "good.q.onnx")
    good = qcompiler.analyze(work / "good.onnx", work / "good.q.onnx", str(work / "eval.npz"))
    by = {x["name"]: x for x in good["layers"]}
    assert by[BAD]["sensitivity"]["score_db"] > 30


def test_layer_sensitivity_is_reusable_and_ranked(work: Path) -> None:
    rows = qcompiler.layer_sensitivity(work / "float.onnx", work / "q.onnx", str(work / "eval.npz"), limit=4)
    assert rows[0]["layer"] == BAD
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores)
    assert set(rows[0]["outputs"]["logits"]) == {"sqnr_db", "cosine", "top1_agreement"}


def test_fake_quant_is_the_qdq_model(work: Path) -> None:
    """All layers on = the QDQ model run as written (float Q/DQ arithmetic) at the last
    integer layer's output (the final Gemm is float in QDQ form, with Q/DQ weights the
    analysis leaves float); all off = the float model; and full graph optimization gives the
    same numbers as none."""
    setup = setup_analysis(work / "float.onnx", work / "qdq.onnx", str(work / "eval.npz"), target="ort-cpu-qdq")
    x = {"x": np.load(work / "eval.npz")["x"]}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    m = onnx.load(work / "qdq.onnx")
    m.graph.output.append(helper.make_empty_tensor_value_info("p_dq"))
    qdq = ort.InferenceSession(m.SerializeToString(), so).run(["p_dq"], x)[0]
    flt = ort.InferenceSession(str(work / "float.onnx"), so).run(["logits"], x)[0]
    on = {layer.name for layer in setup.layers}
    got = setup.model.run(x, on, outputs=["p", "logits"])
    np.testing.assert_allclose(got["p"], qdq, rtol=1e-5, atol=1e-6)
    got = got["logits"]
    np.testing.assert_allclose(setup.model.run(x, set())["logits"], flt, rtol=1e-5, atol=1e-5)
    plain = FakeQuantModel(onnx.load(work / "float.onnx"),
                           find_layers(onnx.load(work / "qdq.onnx"), qcompiler.load_target("ort-cpu-qdq"),
                                       onnx.load(work / "float.onnx")),
                           opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(plain.run(x, on)["logits"], got, rtol=1e-4, atol=1e-5)


def _strip_activation_qdq(m: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ model with every activation Q -> DQ pair bypassed (weights stay behind their DQ)."""
    consts = {i.name for i in m.graph.initializer}
    ren: dict[str, str] = {}
    keep = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            ren[n.output[0]] = n.input[0]
        elif n.op_type == "DequantizeLinear" and n.input[0] in ren:
            ren[n.output[0]] = ren[n.input[0]]
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = ren.get(name, name)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_error_split_names_the_weights_and_matches_the_qdq_model(work: Path) -> None:
    """weights-only = the QDQ model with its activation Q/DQ pairs removed, run as written
    (float arithmetic: no integer kernel, so no CPU-ISA dependence), rel 1e-4 on the cosine
    noise; the bad layer's outlier weight makes the weights the limit; activations-only is
    nearly exact where the weights-only model is not."""
    rep = qcompiler.analyze(work / "float.onnx", work / "qdq.onnx", str(work / "eval.npz"), target="ort-cpu-qdq")
    split = rep["error_split"]
    assert split["limited_by"] == "weights", split
    w, a = split["weights_only"]["logits"], split["activations_only"]["logits"]
    assert w["sqnr_db"] < a["sqnr_db"] - 6
    x = {"x": np.load(work / "eval.npz")["x"]}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    flt = ort.InferenceSession(str(work / "float.onnx"), so).run(["logits"], x)[0].astype(np.float64)
    wq = ort.InferenceSession(_strip_activation_qdq(onnx.load(work / "qdq.onnx")).SerializeToString(),
                              so).run(["logits"], x)[0].astype(np.float64)
    cos = float((flt * wq).sum() / np.sqrt((flt * flt).sum() * (wq * wq).sum()))
    assert abs((1 - cos) - (1 - w["cosine"])) <= 1e-4 * max(1e-9, 1 - cos) + 2e-6, (cos, w)
    # the summary names it
    assert any(line.startswith("Weights alone:") and "weight grids limit" in line for line in rep["summary"])
    # the good model: conv2 without its outlier is no longer weight-limited by that margin
    onnx.save(_model(bad=False), work / "good2.onnx")
    qcompiler.compile(str(work / "good2.onnx"), target="ort-cpu-qdq",
                      calibration=str(work / "calib.npz")).save(work / "good2.q.onnx")
    good = qcompiler.analyze(work / "good2.onnx", work / "good2.q.onnx", str(work / "eval.npz"))
    assert good["error_split"]["weights_only"]["logits"]["sqnr_db"] > w["sqnr_db"] + 6


class _Cells(HTMLParser):
    """Rows of the tables with an id: table id -> [(row data attribute, [cell texts])]."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self.table = ""
        self.row: list[str] | None = None
        self.key = ""
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.table = a.get("id") or ""
            self.tables.setdefault(self.table, [])
        elif tag == "tr":
            self.row, self.key = [], a.get("data-layer") or a.get("data-output") or ""
            if a.get("data-part"):
                self.key += "/" + str(a["data-part"])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.row is not None and self.cell is not None:
            self.row.append("".join(self.cell))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.tables[self.table].append((self.key, self.row))
            self.row = None


def test_html_numbers_are_the_json_numbers(work: Path, tmp_path: Path) -> None:
    assert main(["analyze", str(work / "float.onnx"), str(work / "q.onnx"), "--inputs", str(work / "eval.npz"),
                 "--html", str(tmp_path / "a.html"), "--json", str(tmp_path / "a.json"), "-q"]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    page = (tmp_path / "a.html").read_text()
    assert page == render_html(rep)
    p = _Cells()
    p.feed(page)
    rows = [r for r in p.tables["worst"] if r[0]]
    assert [k for k, _ in rows] == rep["ranking"]
    by = {x["name"]: x for x in rep["layers"]}
    for key, cells in rows:
        x = by[key]
        assert cells[3] == fmt(x["sensitivity"]["score_db"])
        assert cells[4] == fmt(x["accumulated"]["sqnr_db"]) and cells[5] == fmt(x["accumulated"]["cosine"])
        assert cells[7] == f"[{fmt(x['range']['chosen'][0])}, {fmt(x['range']['chosen'][1])}]"
    outs = {k: c for k, c in p.tables["outputs"] if k}
    keys = ("cosine", "sqnr_db", "top1_agreement")
    assert outs["logits/all"][2:] == [fmt(rep["outputs"]["logits"][k]) for k in keys]
    for part in ("weights", "activations"):
        assert outs[f"logits/{part}"][2:] == [fmt(rep["error_split"][f"{part}_only"]["logits"][k]) for k in keys]
    for line in rep["summary"]:
        assert line.replace("&", "&amp;") in page
    assert len(re.findall(r'<div class="hist" data-layer=', page)) == len(rep["histograms"]) > 0
    assert not re.search(r'(src|href)="?https?:', page) and "<script" not in page  # self-contained
    # deterministic bytes
    assert main(["analyze", str(work / "float.onnx"), str(work / "q.onnx"), "--inputs", str(work / "eval.npz"),
                 "--html", str(tmp_path / "b.html"), "--json", str(tmp_path / "b.json"), "-q"]) == 0
    assert (tmp_path / "b.html").read_bytes() == (tmp_path / "a.html").read_bytes()
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "a.json").read_bytes()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _console(browser: str, page: Path, profile: Path) -> list[str]:
    """Console messages Chromium logs while loading ``page`` (any level: the page has no
    script, so any message is an error or a blocked resource)."""
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "</html>" in proc.stdout, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_html_opens_in_chromium_without_console_errors(work: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    qcompiler.analyze(work / "float.onnx", work / "q.onnx", str(work / "eval.npz"), html=tmp_path / "a.html")
    # the detector works: a page with a script error is caught
    (tmp_path / "bad.html").write_text("<!DOCTYPE html><html><body><script>nope();</script></body></html>")
    assert _console(browser, tmp_path / "bad.html", tmp_path / "p1")
    assert _console(browser, tmp_path / "a.html", tmp_path / "p2") == []


def test_compile_report_fidelity_and_analysis(work: Path, tmp_path: Path) -> None:
    rep_path = tmp_path / "r.json"
    assert main(["compile", str(work / "float.onnx"), "-o", str(tmp_path / "q.onnx"), "--calibration",
                 str(work / "calib.npz"), "--report", str(rep_path), "--analysis", str(tmp_path / "a.html"), "-q"]) == 0
    r = json.loads(rep_path.read_text())
    fid = r["fidelity"]
    assert fid["samples"] == 2 and "the last 2 of 20" in fid["held_out"]
    assert r["calibration"]["samples"] == 18  # the held-out samples are not calibrated on
    assert fid["outputs"]["logits"]["cosine"] > 0.5
    assert r["analysis"]["ranking"][0] == BAD and (tmp_path / "a.html").stat().st_size > 1000
    # --eval-data: measured there, nothing held out
    r2 = qcompiler.compile(str(work / "float.onnx"), calibration=str(work / "calib.npz"),
                           eval_data=str(work / "eval.npz")).report
    assert r2["fidelity"]["samples"] == 6 and "held_out" not in r2["fidelity"]
    assert r2["calibration"]["samples"] == 20
    # random data: said so, no figures
    r3 = qcompiler.compile(str(work / "float.onnx"), calibration="random:4").report
    assert "no real data" in r3["fidelity"]["status"] and "outputs" not in r3["fidelity"]


def test_analyze_bad_input_is_one_line(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing.onnx"), str(work / "q.onnx"), "--inputs",
                 str(work / "eval.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.onnx" in err[0]
    assert main(["analyze", str(work / "float.onnx"), str(work / "q.onnx"), "--inputs", str(work / "eval.npz"),
                 "--html", str(tmp_path / "nodir" / "a.html")]) == 2
    assert not (tmp_path / "nodir").exists()


def _matmul_model() -> onnx.ModelProto:
    """x[n, 64] -> MatMul(64x96) -> Relu -> MatMul(96x64): two MatMuls whose weights (6144
    elements) are large enough for quantize-dynamic."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32) * 0.2, "w1"),
             numpy_helper.from_array(rng.standard_normal((96, 64)).astype(np.float32) * 0.2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dynamic_layers_are_analyzed(tmp_path: Path) -> None:
    """A dynamic compile (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) maps back to
    its float MatMuls, and the fake-quant model with every layer on is the compiled model run
    as written (rel 1e-4). CPU fact: MatMulInteger's u8 x s8 products are exact on AVX2
    without VNNI too, because the target's pair-sum limit keeps the weights below the int16
    saturation; ORT_DISABLE_ALL keeps onnxruntime from fusing the pattern."""
    onnx.save(_matmul_model(), tmp_path / "f.onnx")
    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    res = qcompiler.compile(str(tmp_path / "f.onnx"), target="ort-cpu", mode="dynamic",
                            calibration=str(tmp_path / "x.npz"))
    res.save(tmp_path / "q.onnx")
    kernels = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "MatMulInteger" in kernels, kernels
    rep = qcompiler.analyze(tmp_path / "f.onnx", tmp_path / "q.onnx", str(tmp_path / "x.npz"))
    by = {x["name"]: x for x in rep["layers"]}
    assert set(by) == {"mm1", "mm2"}
    assert all(x["kernel"] == "MatMulInteger" and "(dynamic)" in x["precision"] and "range" not in x
               for x in by.values()), by
    setup = setup_analysis(tmp_path / "f.onnx", tmp_path / "q.onnx", str(tmp_path / "x.npz"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(tmp_path / "q.onnx"), so).run(["y"], {"x": x})[0]
    got = setup.model.run({"x": x}, {"mm1", "mm2"})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    flt = ort.InferenceSession(str(tmp_path / "f.onnx"), so).run(["y"], {"x": x})[0]
    assert np.abs(got - flt).max() > 1e-4  # the quantization is really applied
