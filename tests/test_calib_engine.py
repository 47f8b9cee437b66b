"""The calibration engine: memory budget and groups, mergeable statistics, method choice per
node / op type, target-aware grids, fixed qparams, progress and the report, and the CLI /
Python flags that reach the calibrate pass.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
import qcompiler.cli
from conftest import TINY_INPUT, make_model, tensor_info, tiny_calibration, tiny_model
from qcompiler.calibration.engine import Job, Progress, make_groups, run_job
from qcompiler.calibration.options import parse_memory
from qcompiler.calibration.stats import Statistics

METHODS = ["minmax", "percentile", "entropy", "mse"]


def calibrate(proto: onnx.ModelProto, feeds: Any, target: str = "ort-cpu", quiet: bool = True,
              **options: object) -> qcompiler.PassContext:
    """Run infer-shapes + calibrate alone; the context (analysis and report). Observes every
    float tensor unless ``observe`` says otherwise (these tests check the engine itself)."""
    options.setdefault("observe", "all")
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=qcompiler.load_target(target), quiet=quiet,
                                calibration=qcompiler.load_calibration(feeds, qcompiler.input_specs(model)))
    opts = tuple((k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items())
    reg = qcompiler.default_registry()
    qcompiler.PassManager([reg.instantiate(qcompiler.PassSpec("infer-shapes")),
                           reg.instantiate(qcompiler.PassSpec("calibrate", opts))]).run(model, ctx)
    return ctx


def _feeds(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = tiny_calibration(n, seed)[TINY_INPUT]
    return [{TINY_INPUT: x[i:i + 1]} for i in range(n)]


def _same_analysis(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["ranges"] == b["ranges"]
    assert a["channel_means"].keys() == b["channel_means"].keys()
    for k in a["channel_means"]:
        np.testing.assert_array_equal(a["channel_means"][k], b["channel_means"][k])
    assert a["input_moments"].keys() == b["input_moments"].keys()
    for k in a["input_moments"]:
        np.testing.assert_array_equal(a["input_moments"][k], b["input_moments"][k])


# -- memory budget ------------------------------------------------------------------------------------


def test_parse_memory() -> None:
    assert parse_memory("1GB") == 1 << 30
    assert parse_memory("512MB") == 512 << 20
    assert parse_memory("1.5k") == 1536
    assert parse_memory("4096") == 4096
    for bad in ("lots", "12XB", "0", "-1MB"):
        with pytest.raises(qcompiler.UserError, match="calibration-memory"):
            parse_memory(bad)


def test_make_groups() -> None:
    sizes = {"a": 40, "b": 40, "c": 40, "d": 200, "e": 10}
    assert make_groups(list(sizes), sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert make_groups(list(sizes), sizes, 10**6) == [list(sizes)]


@pytest.mark.parametrize("method", METHODS)
def test_tiny_budget_splits_into_groups_with_identical_results(method: str) -> None:
    """A 2 KB budget forces one group per few tensors (the tiny model's activations take 256 to
    1024 bytes each): the report counts the groups and runs, and ranges, channel means and
    moments equal the single-group run exactly."""
    proto, feeds = tiny_model(), _feeds()
    one = calibrate(proto, feeds, method=method)
    many = calibrate(proto, feeds, method=method, memory="2KB")
    rep1, rep = one.report["calibration"], many.report["calibration"]
    assert rep1["groups"] == 1 and rep["groups"] >= 3
    assert rep["runs"] > rep1["runs"]
    assert rep["samples"] == rep1["samples"] == 6
    _same_analysis(one.analysis, many.analysis)


def test_symbolic_shapes_are_measured() -> None:
    """A batch dim named 'N' is bound from the first sample; groups still split and agree."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["n"], name="neg"),
             helper.make_node("Abs", ["n"], ["y"], name="abs")]
    proto = make_model(nodes, [tensor_info("x", ["N", 64])], [tensor_info("y", ["N", 64])])
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32)} for i in range(3)]
    one = calibrate(proto, feeds, method="minmax")
    many = calibrate(proto, feeds, method="minmax", memory="1KB")  # each tensor is 4*64*4 = 1 KB
    assert many.report["calibration"]["groups"] == 3
    _same_analysis(one.analysis, many.analysis)


# -- statistics ---------------------------------------------------------------------------------------


def _job(proto: onnx.ModelProto, hist: bool) -> Job:
    names = ["c1", "r1", "c2", "a1", "p1", "f1", "y"]
    spec = {n: ("signed", -5.0, 5.0, 64) for n in names} if hist else {}
    return Job(proto.SerializeToString(), [names], [TINY_INPUT], track=frozenset(names + [TINY_INPUT]),
               per_sample=frozenset(["r1"]), channel_axes={"r1": 1}, hist_spec=spec)


@pytest.mark.parametrize("hist", [False, True])
def test_merge_of_shards_equals_single_pass(hist: bool) -> None:
    """Shards (sample i -> i % 3) merged in shard order equal one pass: min/max, per-sample
    extremes, histograms and zero counts exactly; float64 sums to 1e-12 relative."""
    proto, feeds = tiny_model(), _feeds(7)
    whole, runs = run_job(_job(proto, hist), feeds)
    assert runs == 7 and whole.samples == 7
    merged = Statistics()
    for shard in range(3):
        job = _job(proto, hist)
        job.shard, job.shards = shard, 3
        merged.merge(run_job(job, feeds)[0])
    assert merged.samples == 7
    assert merged.ranges() == whole.ranges()
    assert merged.per_sample == whole.per_sample
    assert merged.hist.keys() == whole.hist.keys() and all(np.array_equal(merged.hist[k], whole.hist[k]) for k in whole.hist)
    assert merged.zeros == whole.zeros
    for k in whole.sums:
        np.testing.assert_allclose(merged.sums[k], whole.sums[k], rtol=1e-5)  # float32 per-sample sums
        assert merged.counts[k] == whole.counts[k]


def test_lanes_give_bit_identical_statistics() -> None:
    """Samples in flight on 1, 2 or 3 lanes (threads sharing the session) give the same
    statistics bit for bit: extremes, per-sample extremes, histograms, channel sums and GPTQ
    moments (the lanes hand their float sums back, added in sample order) and the same runs."""
    proto, feeds = tiny_model(), _feeds(7)
    model = qcompiler.load_model(proto)
    conv = next(n for n in model.graph.gs.nodes if n.op == "Conv")
    spec = qcompiler.PatchSpec(tuple(conv.inputs[1].shape[2:]), tuple(conv.attrs.get("pads", ())),
                               tuple(conv.attrs.get("strides", ())), tuple(conv.attrs.get("dilations", ())), 1)
    blobs, runs = [], []
    for lanes in (1, 2, 3):
        job = _job(proto, True)
        job.lanes = lanes
        job.moment_specs = {conv.inputs[0].name: [(conv.name, spec)]}
        job.moment_limit = 5
        job.channel_axes = {**job.channel_axes, conv.inputs[0].name: 1}
        stats, n = run_job(job, feeds)
        assert stats.moments[conv.name].shape[0] == 1 and stats.samples == 7
        blobs.append(stats.to_bytes())
        runs.append(n)
    assert blobs[0] == blobs[1] == blobs[2] and runs == [7, 7, 7]


@pytest.mark.parametrize("bound", ["default", "zero"])
def test_lanes_run_ahead_of_the_adder_within_the_byte_bound(monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """While the adder (the thread adding float sums in sample order) is busy, the lanes go on
    with the next samples as long as what waits for it is small: all 12 samples of this tiny
    model run before the first is added. With no bytes allowed, the lanes stop after one
    sample each plus one more waiting, as before. The statistics are the same either way."""
    import threading
    import time

    from qcompiler.calibration import engine as calib_engine, stats as calibration

    if bound == "zero":
        monkeypatch.setattr(calib_engine, "_BACKLOG_BYTES", 0)
    gate, started, out = threading.Event(), [], []
    real_acc, real_run = calib_engine._accumulate, calibration.run_model

    def slow_adder(stats: Statistics, deferred: Any) -> None:
        gate.wait(10)
        real_acc(stats, deferred)

    def counted(sess: Any, feed: Any, outputs: Any = None) -> Any:
        started.append(1)
        return real_run(sess, feed, outputs)

    monkeypatch.setattr(calib_engine, "_accumulate", slow_adder)
    monkeypatch.setattr(calibration, "run_model", counted)
    job = _job(tiny_model(), False)
    job.lanes = 2
    feeds = _feeds(12)
    worker = threading.Thread(target=lambda: out.append(run_job(job, feeds)))
    worker.start()
    deadline = time.monotonic() + (5.0 if bound == "default" else 0.5)
    while time.monotonic() < deadline and len(started) < 12:
        time.sleep(0.01)
    ran_while_blocked = len(started)
    gate.set()
    worker.join(10)
    assert not worker.is_alive()
    if bound == "default":
        assert ran_while_blocked == 12
    else:
        assert 2 <= ran_while_blocked <= 4
    monkeypatch.setattr(calib_engine, "_accumulate", real_acc)
    assert out[0][0].to_bytes() == run_job(_job(tiny_model(), False), feeds)[0].to_bytes()


def test_serialization_is_deterministic_and_round_trips() -> None:
    proto, feeds = tiny_model(), _feeds(3)
    stats, _ = run_job(_job(proto, True), feeds)
    blob = stats.to_bytes()
    again = Statistics.from_bytes(blob)
    assert again.to_bytes() == blob
    assert again.ranges() == stats.ranges() and again.per_sample == stats.per_sample
    assert run_job(_job(proto, True), feeds)[0].to_bytes() == blob  # same data -> same bytes
    with pytest.raises(ValueError):
        Statistics.from_bytes(b"not stats")


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_invariance(method: str) -> None:
    """The same 8 rows as 8 samples of batch 1, or 4 samples of batch 2 (model batch dim 'N'),
    give identical ranges for every method (the moving average excepted: it is per sample)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    proto = make_model(nodes, [tensor_info("x", ["N", 3, 6, 6])], [tensor_info("c", ["N", 4, 6, 6])],
                       [onnx.numpy_helper.from_array(np.random.default_rng(1).uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32), "w")])
    xs = np.random.default_rng(2).standard_t(3, (8, 3, 6, 6)).astype(np.float32)
    a = calibrate(proto, [{"x": xs[i:i + 1]} for i in range(8)], method=method).analysis
    b = calibrate(proto, {"x": xs.reshape(4, 2, 3, 6, 6)}, method=method).analysis
    c = calibrate(proto, [{"x": xs[i:i + 1]} for i in reversed(range(8))], method=method).analysis
    assert a["ranges"] == b["ranges"] == c["ranges"]


def test_moving_average_through_the_pass() -> None:
    """momentum=0.9: each range is the moving average of the per-sample extremes in sample
    order (computed here from the raw graph input)."""
    feeds = _feeds(5)
    ctx = calibrate(tiny_model(), feeds, method="minmax", momentum=0.9)
    lo, hi = float(feeds[0][TINY_INPUT].min()), float(feeds[0][TINY_INPUT].max())
    for f in feeds[1:]:
        lo = 0.9 * lo + (1 - 0.9) * float(f[TINY_INPUT].min())
        hi = 0.9 * hi + (1 - 0.9) * float(f[TINY_INPUT].max())
    assert ctx.analysis["ranges"][TINY_INPUT] == (lo, hi)
    assert ctx.report["calibration"]["momentum"] == 0.9


# -- method choice --------------------------------------------------------------------------------------


def test_overrides_by_op_type_and_node_name() -> None:
    """Global percentile; Relu outputs by op type -> minmax; node 'conv2' by name -> entropy
    (node names win over op types, shown by overriding 'relu1' by name back to mse)."""
    proto, feeds = tiny_model(), _feeds()
    ctx = calibrate(proto, feeds, method="percentile", overrides="[Relu=minmax,conv2=entropy,relu1=mse]")
    rep = ctx.report["calibration"]
    assert rep["overrides"] == {"Relu": "minmax", "conv2": "entropy", "relu1": "mse"}
    ref = {m: calibrate(proto, feeds, method=m).analysis["ranges"] for m in METHODS}
    ranges = ctx.analysis["ranges"]
    assert ranges["c2"] == ref["entropy"]["c2"]
    assert ranges["r1"] == ref["mse"]["r1"]
    assert ranges["c1"] == ref["percentile"]["c1"]
    assert ranges["c1"] != ref["minmax"]["c1"]


def test_override_errors() -> None:
    with pytest.raises(qcompiler.UserError, match="override key 'Nope'"):
        calibrate(tiny_model(), _feeds(2), overrides="[Nope=minmax]")
    with pytest.raises(qcompiler.UserError, match="override 'Relu': method 'fancy'"):
        calibrate(tiny_model(), _feeds(2), overrides="[Relu=fancy]")
    with pytest.raises(qcompiler.UserError, match="method 'kl'"):
        calibrate(tiny_model(), _feeds(2), method="kl")


def test_pipeline_text_round_trips() -> None:
    text = "calibrate{method=entropy,overrides=[Softmax=minmax,/blk/conv=percentile],memory=64MB,workers=2}"
    reg = qcompiler.default_registry()
    p = reg.instantiate(qcompiler.parse_pipeline(text)[0])
    assert p.overrides == ("Softmax=minmax", "/blk/conv=percentile")
    assert p.spec() == text
    assert reg.instantiate(qcompiler.parse_pipeline(p.spec())[0]) == p


def test_symmetric_target_uses_abs_histogram() -> None:
    """tensorrt (int8 symmetric): percentile clips |x| at one threshold t -> [max(lo,-t), min(hi,t)]."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    rng = np.random.default_rng(3)
    proto = make_model(nodes, [tensor_info("x", [1, 2, 32, 32])], [tensor_info("c", [1, 2, 32, 32])],
                       [onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1), "w")])
    xs = rng.laplace(0, 1, (64, 1, 2, 32, 32)).astype(np.float32) + 1.0  # enough values for a dense tail
    ctx = calibrate(proto, {"x": xs}, target="tensorrt", method="percentile", percentile=99.0)
    lo, hi = ctx.analysis["ranges"]["c"]
    t = float(np.percentile(np.abs(xs), 99.0))
    amax = float(np.abs(xs).max())
    assert abs(max(-lo, hi) - t) <= amax / 2048 + 1e-6
    assert lo == max(float(xs.min()), -max(-lo, hi))


def test_fixed_qparams_tensors_get_minmax_only() -> None:
    """ort-cpu pins Sigmoid outputs: with method=mse the Sigmoid output keeps its min/max range
    (no histogram) while the other tensors are clipped; the report counts it."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"), helper.make_node("Mul", ["s", "x"], ["y"], name="mul")]
    proto = make_model(nodes, [tensor_info("x", [1, 1, 32, 32])], [tensor_info("y", [1, 1, 32, 32])])
    xs = np.random.default_rng(4).laplace(0, 2, (4, 1, 1, 32, 32)).astype(np.float32)
    ctx = calibrate(proto, {"x": xs}, method="mse")
    s = 1 / (1 + np.exp(-xs.astype(np.float64)))
    lo, hi = ctx.analysis["ranges"]["s"]
    assert abs(lo - s.min()) < 1e-6 and abs(hi - s.max()) < 1e-6
    assert ctx.report["calibration"]["fixed_qparams_tensors"] == 1
    assert ctx.analysis["ranges"]["x"] != (float(xs.min()), float(xs.max()))


# -- progress and report ---------------------------------------------------------------------------------


def test_progress_line() -> None:
    out = io.StringIO()
    p = Progress(True, runs=2, stream=out)
    for _ in range(2):
        p.start_run()
        for _ in range(3):
            p.tick()
        p.end_run()
    p.close()
    text = out.getvalue()
    assert "run 2/2" in text and "3 samples" in text and "samples/s" in text and "ETA" in text
    silent = io.StringIO()
    q = Progress(False, runs=1, stream=silent)
    q.start_run(), q.tick(), q.end_run(), q.close()
    assert silent.getvalue() == ""


def test_quiet_or_not_a_terminal_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    calibrate(tiny_model(), _feeds(2), quiet=False)  # stderr is captured: not a terminal
    assert "calibrate:" not in capsys.readouterr().err


def test_report_fields() -> None:
    rep = calibrate(tiny_model(), _feeds(3), method="entropy").report["calibration"]
    for key in ("method", "overrides", "samples", "seconds", "peak_rss_mb", "groups", "runs", "cache", "real_data"):
        assert key in rep
    assert rep["method"] == "entropy" and rep["samples"] == 3 and rep["cache"] == "off"
    assert rep["real_data"] is True and rep["peak_rss_mb"] > 0
    assert rep["model_runs"] >= 3


# -- flags ------------------------------------------------------------------------------------------------


def test_compile_kwargs_reach_the_pass() -> None:
    r = qcompiler.compile(tiny_model(), calibration=tiny_calibration(4), calibration_options=qcompiler.CalibrationOptions(
        method="percentile", overrides={"Relu": "minmax"}, memory="1KB"))
    rep = r.report["calibration"]
    assert rep["method"] == "percentile" and rep["overrides"] == {"Relu": "minmax"} and rep["groups"] > 1
    spec = next(p["spec"] for p in r.report["passes"] if p["name"] == "calibrate")
    assert "method=percentile" in spec and "overrides=[Relu=minmax]" in spec and "memory=1KB" in spec


def test_cli_flags(tmp_path: Path) -> None:
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(tiny_model(), str(model))
    np.savez(calib, **tiny_calibration(4))
    rc = qcompiler.cli.main(["compile", str(model), "-o", str(tmp_path / "o.onnx"), "--calibration", str(calib),
                             "--calibration-method", "entropy", "--calibration-override", "Relu=minmax",
                             "--calibration-override", "conv2=mse", "--calibration-memory", "1MB",
                             "--report", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())["calibration"]
    assert rep["method"] == "entropy" and rep["overrides"] == {"Relu": "minmax", "conv2": "mse"}
    assert rep["memory_budget_bytes"] == 1 << 20
    rc = qcompiler.cli.main(["compile", str(model), "-o", str(tmp_path / "o.onnx"), "--calibration", str(calib),
                             "--calibration-memory", "huge", "-q"])
    assert rc == 2


def test_graph_output_observed_once_per_sample() -> None:
    """'y' is a graph output and also asked for as an observed tensor: the session returns it
    twice (the outputs are appended to the serialized model), and it must be counted once:
    its histogram holds exactly one count per element per sample, like an inner tensor's."""
    proto, feeds = tiny_model(), _feeds(5)
    names = ["c1", "y"]
    spec = {n: ("signed", -50.0, 50.0, 32) for n in names}
    stats, runs = run_job(Job(proto.SerializeToString(), [names], [], track=frozenset(names), hist_spec=spec), feeds)
    assert runs == 5
    assert int(stats.hist["y"].sum()) == 5 * 1 * 5       # [1, 5] logits per sample
    assert int(stats.hist["c1"].sum()) == 5 * 4 * 8 * 8  # [1, 4, 8, 8] per sample


@pytest.mark.parametrize("shape,spec", [
    ((2, 6, 33, 29), dict(kernel=(3, 3), pads=(1, 1, 1, 1), strides=(2, 2))),
    ((1, 8, 40, 40), dict(kernel=(3, 3), pads=(1, 1, 1, 1), group=8)),
    ((1, 4, 50, 50), dict(kernel=(5, 5), pads=(2, 2, 2, 2), dilations=(2, 2))),
])
def test_subsampled_patches_equal_every_nth_column_of_all_patches(shape, spec) -> None:
    """input_patches(..., max_positions) gathers only the kept positions; they must be exactly
    the every-step-th columns of the full im2col, in the same order."""
    from qcompiler.calibration.stats import PatchSpec, input_patches

    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    full = input_patches(arr, PatchSpec(**spec))
    some = input_patches(arr, PatchSpec(**spec), max_positions=100)
    step = -(-full.shape[2] // 100)
    assert step > 1 and np.array_equal(some, full[:, :, ::step])


def _naive_patches(arr: np.ndarray, kernel: tuple[int, int], pads: tuple[int, ...], strides: tuple[int, int],
                   dilations: tuple[int, int], group: int) -> np.ndarray:
    """im2col by explicit loops: column (n, oy, ox), row (channel in group, ky, kx)."""
    n, c, h, w = arr.shape
    x = np.pad(arr, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (x.shape[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    ow = (x.shape[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    cg = c // group
    out = np.zeros((group, cg * kernel[0] * kernel[1], n * oh * ow), np.float32)
    for g in range(group):
        for b in range(n):
            for oy in range(oh):
                for ox in range(ow):
                    col = (b * oh + oy) * ow + ox
                    row = 0
                    for ci in range(cg):
                        for ky in range(kernel[0]):
                            for kx in range(kernel[1]):
                                out[g, row, col] = x[b, g * cg + ci, oy * strides[0] + ky * dilations[0],
                                                     ox * strides[1] + kx * dilations[1]]
                                row += 1
    return out


@pytest.mark.parametrize("shape,kernel,pads,strides,dilations,group", [
    ((2, 4, 9, 7), (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), 1),
    ((1, 6, 11, 10), (5, 5), (2, 1, 2, 3), (2, 2), (1, 1), 6),   # depthwise, asymmetric pads
    ((2, 6, 12, 12), (3, 2), (0, 0, 0, 0), (1, 2), (2, 1), 3),   # grouped, dilated, no pads
])
def test_patches_equal_naive_im2col(shape, kernel, pads, strides, dilations, group) -> None:
    """input_patches against a loop-by-loop im2col (exact: patches are copies of inputs)."""
    from qcompiler.calibration.stats import PatchSpec, input_patches

    arr = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got = input_patches(arr, PatchSpec(kernel, pads, strides, dilations, group))
    assert np.array_equal(got, _naive_patches(arr, kernel, pads, strides, dilations, group))


# -- sessions on the IR's own weights ----------------------------------------------------------

def _session_outputs(proto_bytes: bytes, names: list[str], feed: dict[str, np.ndarray],
                     initializers: dict[str, np.ndarray] | None) -> list[np.ndarray]:
    from qcompiler.calibration.engine import _session

    sess = _session(proto_bytes, names, 1, initializers)
    return sess.run(names, feed)


def _weighted_model() -> onnx.ModelProto:
    """Conv (4.6 KB weight) + MatMul (4 KB) on an image, and a Gather (6.4 KB table) on ids."""
    from conftest import init

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm"),
             helper.make_node("Gather", ["E", "ids"], ["e"], name="emb")]
    return make_model(nodes, [tensor_info("x", [1, 8, 6, 6]), tensor_info("ids", [1, 5], onnx.TensorProto.INT64)],
                      [tensor_info("y", [1, 64]), tensor_info("e", [1, 5, 16])],
                      [init("w", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
                       init("W", rng.standard_normal((16, 64)).astype(np.float32)),
                       init("E", rng.standard_normal((100, 16)).astype(np.float32))])


@pytest.mark.parametrize("share_all", [False, True])
def test_session_on_shared_weights_equals_embedded(share_all: bool) -> None:
    """A calibration session given the IR's arrays (add_initializer, no copy) computes exactly
    what the self-contained model computes. Sharing the Conv weight too makes onnxruntime's
    layout optimizer want its bytes: the session falls back to copies, same values."""
    from qcompiler.ir import load_model
    from qcompiler.calibration.selection import kernel_only as _kernel_only

    m = load_model(_weighted_model())
    names = ["c", "r", "p", "f", "y", "e"]
    rng = np.random.default_rng(8)
    feed = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32), "ids": np.array([[0, 5, 99, 5, 42]])}
    whole = _session_outputs(m.to_proto().SerializeToString(), names, feed, None)
    shared: dict[str, np.ndarray] = {}
    proto = m.to_proto(shared=shared, share=None if share_all else _kernel_only)
    assert set(shared) == ({"w", "W", "E"} if share_all else {"W", "E"})
    got = _session_outputs(proto.SerializeToString(), names, feed, shared)
    for a, b in zip(whole, got):
        np.testing.assert_array_equal(a, b)


def test_phases_share_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """percentile needs two passes over the data (min/max, then histograms) and the Reshape's
    inferred-unknown dim a size probe: all three run on one onnxruntime session, built once."""
    import qcompiler.calibration.engine as engine
    from conftest import init

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["t"], name="reshape"),
             helper.make_node("Neg", ["t"], ["y"], name="neg")]
    proto = make_model(nodes, [tensor_info("x", ["N", 64])], [tensor_info("y", ["M", 32])],
                       [init("shape", np.array([-1, 32], np.int64))])
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32)} for i in range(4)]

    built = []
    real = engine._build_session

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_build_session", counting)
    ctx = calibrate(proto, feeds, method="percentile")
    rep = ctx.report["calibration"]
    assert rep["runs"] == 2 and rep["model_runs"] == 2 * 4 + 1  # two phases, one probe run
    assert len(built) == 1


def test_a_failing_lane_stops_the_job_and_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in one lane's run (here the third model run) reaches the caller as itself,
    and no lane or adder thread outlives the job."""
    import threading

    import qcompiler.calibration.stats as calibration

    calls = [0]
    real = calibration.run_model
    lock = threading.Lock()

    def failing(sess: Any, feed: Any, outputs: Any = None) -> Any:
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 3:
            raise RuntimeError("lane failure")
        return real(sess, feed, outputs)

    monkeypatch.setattr(calibration, "run_model", failing)
    job = _job(tiny_model(), True)
    with pytest.raises(RuntimeError, match="lane failure"):
        run_job(job, _feeds(8))
    assert not [t for t in threading.enumerate() if t.name.startswith("qcompiler-calibrate")]


@pytest.mark.parametrize("option,value", [("observe", "some"), ("lanes", "0"), ("statistics", "most")])
def test_bad_lane_and_observe_options(option: str, value: str) -> None:
    with pytest.raises(qcompiler.UserError, match=f"option '{option}={value}'"):
        calibrate(tiny_model(), _feeds(2), method="minmax", **{option: value})


def test_lanes_and_workers_are_clamped_to_cores_and_samples() -> None:
    """L6: lanes=100000 / workers=6 over 2 samples run with at most min(cores, 2) of each;
    the report says what ran."""
    import os

    cores = os.cpu_count() or 1
    result = qcompiler.compile(tiny_model(), calibration=tiny_calibration(2), target="ort-cpu-qdq",
                               pipeline="canonicalize,calibrate{lanes=100000},insert-qdq")
    assert result.report["calibration"]["lanes"] == min(cores, 2)
    from qcompiler.calibration.core import _bounded_parallelism

    data = qcompiler.calibration.load_calibration(tiny_calibration(2), qcompiler.calibration.input_specs(
        qcompiler.load_model(tiny_model())))
    bounded = _bounded_parallelism(qcompiler.CalibrationOptions(workers=6, lanes=3), data)
    assert (bounded.workers, bounded.lanes) == (min(cores, 2), min(cores, 2))
