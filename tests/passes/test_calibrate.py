"""calibrate: observed ranges (minmax exact, invariant to sample order and batching), the mse
clipping search against a brute-force reference on the raw samples, degenerate all-zero
tensors, and the per-channel means / input second moments insert-qdq relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
from _util import init, make_model, rand, run_ort, tensor


def calibrate(proto: onnx.ModelProto, feeds: Any, **options: object) -> dict[str, Any]:
    """Run the calibrate pass alone on ort-cpu (uint8 asymmetric activations); its analysis.
    Observes every float tensor unless ``observe`` says otherwise: these tests check the
    statistics themselves, on tensors the target may or may not quantize."""
    options.setdefault("observe", "all")
    model = qcompiler.load_model(proto)
    ctx = qcompiler.PassContext(target=qcompiler.load_target("ort-cpu"),
                                calibration=qcompiler.load_calibration(feeds, qcompiler.input_specs(model)))
    opts = tuple((k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items())
    pm = qcompiler.PassManager([qcompiler.default_registry().instantiate(qcompiler.PassSpec("calibrate", opts))])
    pm.run(model, ctx)
    assert not pm.records[-1]["modified"]  # calibration never changes the graph
    return ctx.analysis


def intermediates(proto: onnx.ModelProto, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]
                  ) -> dict[str, list[np.ndarray]]:
    """The float model's tensors ``names`` per sample, computed independently in onnxruntime."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in samples:
        for n, arr in zip(names, run_ort(exposed, dict(feed))):
            out[n].append(arr)
    return out


def _conv_relu(batch: int | str = 1) -> onnx.ModelProto:
    """x -> Conv(3x3, pad 1) -> c -> Relu -> y."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", [batch, 3, 6, 6])], [tensor("y", [batch, 4, 6, 6])],
                      [init("w", rand([4, 3, 3, 3], seed=1)), init("b", rand([4], seed=2))])


# -- minmax ---------------------------------------------------------------------------------------


def test_minmax_ranges_are_data_extremes() -> None:
    """minmax: a graph input's and an intermediate tensor's ranges equal np.min/np.max over all
    samples (the intermediate computed separately in onnxruntime)."""
    proto = _conv_relu()
    xs = np.random.default_rng(0).standard_normal((5, 1, 3, 6, 6)).astype(np.float32) * 2
    samples = [{"x": x} for x in xs]
    ranges = calibrate(proto, samples, method="minmax")["ranges"]
    assert ranges["x"] == (float(xs.min()), float(xs.max()))
    c = np.stack(intermediates(proto, ["c"], samples)["c"])
    # to float32 rounding: calibration runs onnxruntime's fully optimized (blocked-layout)
    # convolution, the reference the default session's kernels
    np.testing.assert_allclose(ranges["c"], (float(c.min()), float(c.max())), rtol=1e-6, atol=0)
    y = np.maximum(c, 0)
    np.testing.assert_allclose(ranges["y"], (float(y.min()), float(y.max())), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_ranges_invariant_to_order_and_batching(method: str) -> None:
    """The same samples, reversed or regrouped into batches of 2, give identical ranges
    (streaming min/max and fixed-range histograms are order- and batch-free)."""
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 3, 6, 6])], [tensor("c", ["N", 4, 6, 6])], [init("w", rand([4, 3, 3, 3], seed=1))])
    xs = np.random.default_rng(1).laplace(0, 1, (8, 3, 6, 6)).astype(np.float32)
    base = calibrate(proto, [{"x": xs[i:i + 1]} for i in range(8)], method=method)
    reversed_ = calibrate(proto, [{"x": xs[i:i + 1]} for i in reversed(range(8))], method=method)
    batched = calibrate(proto, {"x": xs.reshape(4, 2, 3, 6, 6)}, method=method)  # 4 samples of batch 2
    assert set(base["ranges"]) == {"x", "c"}
    assert base["ranges"] == reversed_["ranges"] == batched["ranges"]
    for other in (reversed_, batched):
        for name, mean in base["channel_means"].items():
            # means: float32 per-batch sums, so equal to float32 rounding (ranges: exactly)
            np.testing.assert_allclose(other["channel_means"][name], mean, rtol=1e-5, atol=1e-7)


# -- mse ------------------------------------------------------------------------------------------


def _abs_laplace_quantiles(n: int, outliers: int) -> np.ndarray:
    """|Laplace(0, 1)| at evenly spaced quantiles (a smooth heavy tail, no sampling noise), the
    smallest ``outliers`` values replaced by outliers spread over [15, 30]."""
    p = (np.arange(n) + 0.5) / n
    v = np.abs(np.log(1 - 2 * np.abs(p - 0.5)))
    v[:outliers] = np.linspace(15, 30, outliers)
    return v.astype(np.float32)


def _qdq_mse_one_sided(v: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """Brute force: the actual uint8 quantize-dequantize MSE of the raw values ``v`` (all >= 0)
    for each clip range [0, hi] (scale (hi - 0) / 255 stored as float32, zero point 0)."""
    x = v.astype(np.float64)[None, :]
    errs = []
    for chunk in np.array_split(highs, max(1, len(highs) // 32)):
        scale = (chunk.astype(np.float32) / np.float32(255)).astype(np.float64)[:, None]
        q = np.clip(np.rint(x / scale), 0, 255)
        errs.append(np.mean((q * scale - x) ** 2, axis=1))
    return np.concatenate(errs)


def _abs_model(shape: list[int]) -> onnx.ModelProto:
    return make_model([helper.make_node("Abs", ["x"], ["t"], name="abs")], [tensor("x", shape)], [tensor("t", shape)])


def test_mse_matches_brute_force() -> None:
    """mse on a heavy-tailed one-sided tensor: narrower than minmax, and its range is the one a
    brute-force search over the same clip candidates (fractions 0.05..1 in steps of 0.01 of the
    observed max, scored by the actual QDQ error of the raw samples) picks, to within 2
    histogram bins; its actual error is within 0.1% of the best on a fine grid (every bin)."""
    v = _abs_laplace_quantiles(16384, 8)
    signs = np.where(np.arange(v.size) % 2 == 0, 1.0, -1.0).astype(np.float32)
    x = (v * signs).reshape(4, 1, 1, 64, 64)  # |x| = v, so the Abs output holds exactly v
    analysis = calibrate(_abs_model([1, 1, 64, 64]), {"x": x}, method="mse")
    lo, hi = analysis["ranges"]["t"]
    top = float(v.max())
    bin_width = top / 2048
    assert lo == 0.0 and hi < top - 10 * bin_width  # narrower than minmax

    candidates = top * np.linspace(0.05, 1.0, 96)
    best = candidates[int(np.argmin(_qdq_mse_one_sided(v, candidates)))]
    assert abs(hi - best) <= 2 * bin_width

    fine = top * np.arange(103, 2049) / 2048
    fine_best = float(_qdq_mse_one_sided(v, fine).min())
    chosen, minmax = _qdq_mse_one_sided(v, np.array([hi, top]))
    assert chosen <= 1.001 * fine_best
    assert chosen < minmax


def test_mse_narrower_on_two_sided_heavy_tail() -> None:
    """A two-sided Laplace tensor with outliers: mse clips the range on both ends, and the
    clipped range has a lower actual uint8 QDQ error than the full range."""
    rng = np.random.default_rng(0)
    x = rng.laplace(0, 1, (4, 1, 1, 64, 64)).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, 8, replace=False)
    flat[idx] = np.where(np.arange(8) % 2 == 0, 1, -1) * np.linspace(15, 30, 8)
    proto = make_model([helper.make_node("Identity", ["x"], ["t"], name="id")],
                       [tensor("x", [1, 1, 64, 64])], [tensor("t", [1, 1, 64, 64])])
    mm = calibrate(proto, {"x": x}, method="minmax")["ranges"]["t"]
    ms = calibrate(proto, {"x": x}, method="mse")["ranges"]["t"]
    assert mm == (float(flat.min()), float(flat.max()))
    assert mm[0] < ms[0] < 0 < ms[1] < mm[1]

    def qdq_mse(lo: float, hi: float) -> float:
        qp = qcompiler.compute_qparams(lo, hi, qcompiler.QType("uint8", False, 0, 255))
        return float(np.mean((qcompiler.dequantize(qcompiler.quantize(flat, qp), qp) - flat) ** 2))

    assert qdq_mse(*ms) < qdq_mse(*mm)


def test_mse_applies_to_graph_inputs() -> None:
    """The graph input itself is a quantized activation (it feeds the first Conv): mse must clip
    its heavy tail too."""
    v = _abs_laplace_quantiles(16384, 8)
    x = v.reshape(4, 1, 1, 64, 64)
    ranges = calibrate(_abs_model([1, 1, 64, 64]), {"x": x}, method="mse")["ranges"]
    assert ranges["x"][1] < float(v.max())


def test_mse_on_relu_output_with_exact_zeros() -> None:
    """Half the values exactly 0 (a ReLU output): the chosen range is still near-optimal for the
    actual QDQ error (within 0.5% of a fine brute-force search) and no worse than minmax."""
    v = _abs_laplace_quantiles(16384, 8)
    x = np.concatenate([v, -v]).reshape(8, 1, 1, 64, 64)  # Relu(x): v and as many zeros
    proto = make_model([helper.make_node("Relu", ["x"], ["t"], name="relu")],
                       [tensor("x", [1, 1, 64, 64])], [tensor("t", [1, 1, 64, 64])])
    lo, hi = calibrate(proto, {"x": x}, method="mse")["ranges"]["t"]
    relu = np.concatenate([v, np.zeros_like(v)])
    top = float(v.max())
    fine_best = float(_qdq_mse_one_sided(relu, top * np.arange(103, 2049) / 2048).min())
    chosen, minmax = _qdq_mse_one_sided(relu, np.array([hi, top]))
    assert chosen <= minmax
    assert chosen <= 1.005 * fine_best


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_all_zero_tensors(method: str) -> None:
    """An all-zero graph input and an all-zero intermediate don't crash calibration, get the
    valid range (0, 0), and the compiled model (finite positive scales) still computes the
    float output, which is then the bias alone, to within half an int32 bias step."""
    zero = np.zeros((1, 3, 4, 4), np.float32)
    nodes = [helper.make_node("Mul", ["x", "zero"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "w", "b"], ["y"], name="conv")]
    proto = make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 4, 4])],
                       [init("zero", zero), init("w", rand([2, 3, 1, 1], seed=3)), init("b", rand([2], seed=4))])
    analysis = calibrate(proto, {"x": np.zeros((3, 1, 3, 4, 4), np.float32)}, method=method)
    assert analysis["ranges"]["x"] == (0.0, 0.0)
    assert analysis["ranges"]["m"] == (0.0, 0.0)
    result = qcompiler.compile(proto, target="ort-cpu", calibration={"x": rand([3, 1, 3, 4, 4], seed=5)},
                               pipeline=qcompiler.load_target("ort-cpu").pipeline("static").replace(
                                   "calibrate", f"calibrate{{method={method}}}").replace(",compact-qparams", ""))
    scales = [t for t in result.proto.graph.initializer if t.name.endswith("_scale")]
    assert scales and all(np.isfinite(onnx.numpy_helper.to_array(t)).all() and
                          (onnx.numpy_helper.to_array(t) > 0).all() for t in scales)
    bias_step = next(onnx.numpy_helper.to_array(t) for t in result.proto.graph.initializer if t.name == "b_scale")
    feeds = {"x": rand([1, 3, 4, 4], seed=6)}
    err = np.abs(run_ort(result.proto, feeds)[0] - run_ort(proto, feeds)[0])
    assert (err <= 0.5 * bias_step.reshape(1, -1, 1, 1) + 1e-6).all()


# -- channel means and input moments --------------------------------------------------------------


def _means_model(conv_reads_input: bool) -> onnx.ModelProto:
    """[Relu ->] 1x1 Conv -> GlobalAveragePool -> Flatten -> Gemm(transB) -> y."""
    conv_in = "x" if conv_reads_input else "r"
    nodes = [helper.make_node("Conv", [conv_in, "w", "b"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="gemm", transB=1)]
    if not conv_reads_input:
        nodes.insert(0, helper.make_node("Relu", ["x"], ["r"], name="relu"))
    return make_model(nodes, [tensor("x", [2, 3, 5, 5])], [tensor("y", [2, 4])],
                      [init("w", rand([6, 3, 1, 1], seed=7)), init("b", rand([6], seed=8)),
                       init("wg", rand([4, 6], seed=9)), init("bg", rand([4], seed=10))])


@pytest.mark.parametrize(("conv_reads_input", "method"), [
    (False, "minmax"), (False, "mse"), (True, "minmax"),
    (True, "mse"),
])
def test_channel_means_and_moments(conv_reads_input: bool, method: str) -> None:
    """channel_means[input] = per-channel mean over batch and positions; input_moments[node] =
    sum over all positions of x x^T (1x1 Conv: channels; Gemm: features), all samples included."""
    proto = _means_model(conv_reads_input)
    xs = np.random.default_rng(11).standard_normal((5, 2, 3, 5, 5)).astype(np.float32) + 0.5
    samples = [{"x": x} for x in xs]
    analysis = calibrate(proto, samples, method=method, moment_samples=100)
    conv_in = "x" if conv_reads_input else "r"
    acts = intermediates(proto, [conv_in, "f"], samples)
    a = np.concatenate(acts[conv_in]).astype(np.float64)     # [10, 3, 5, 5]
    f = np.concatenate(acts["f"]).astype(np.float64)         # [10, 6]
    np.testing.assert_allclose(analysis["channel_means"][conv_in], a.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(analysis["channel_means"]["f"], f.mean(axis=0), rtol=1e-6, atol=1e-7)
    cols = np.moveaxis(a, 1, 0).reshape(3, -1)               # one column per (sample, position)
    moments = analysis["input_moments"]
    assert moments["conv"].shape == (1, 3, 3) and moments["gemm"].shape == (1, 6, 6)
    np.testing.assert_allclose(moments["conv"][0], cols @ cols.T, rtol=1e-5)
    np.testing.assert_allclose(moments["gemm"][0], f.T @ f, rtol=1e-5)


def test_moment_samples_limits_moments() -> None:
    """moment-samples=2 accumulates the moments of the first two samples only (ranges still
    see all samples)."""
    proto = _means_model(False)
    xs = np.random.default_rng(12).standard_normal((5, 2, 3, 5, 5)).astype(np.float32)
    samples = [{"x": x} for x in xs]
    analysis = calibrate(proto, samples, method="minmax", moment_samples=2)
    f = np.concatenate(intermediates(proto, ["f"], samples[:2])["f"]).astype(np.float64)
    np.testing.assert_allclose(analysis["input_moments"]["gemm"][0], f.T @ f, rtol=1e-5)
    assert analysis["ranges"]["x"] == (float(xs.min()), float(xs.max()))


def test_statistics_ranges_collects_ranges_only() -> None:
    """statistics=ranges: the same ranges as the default, and neither the channel means nor the
    second moments (so insert-qdq rounds plainly and corrects no bias)."""
    proto = _means_model(False)
    xs = np.random.default_rng(13).standard_normal((4, 2, 3, 5, 5)).astype(np.float32)
    samples = [{"x": x} for x in xs]
    full = calibrate(proto, samples, method="minmax")
    only = calibrate(proto, samples, method="minmax", statistics="ranges")
    assert full["channel_means"] and full["input_moments"]
    assert not only.get("channel_means") and not only.get("input_moments")
    assert only["ranges"] == full["ranges"]


def test_value_inside_a_fused_group_is_not_observed() -> None:
    """Conv -> Relu grouped (ort-cpu fuses them): the Conv output is never quantized, so it is
    not observed at all; the Relu output gets the method's range."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu"),
             helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2")]
    proto = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("z", [1, 2, 6, 6])],
                       [init("w", rand([4, 3, 3, 3], seed=1)), init("b", rand([4], seed=2)),
                        init("w2", rand([2, 4, 1, 1], seed=3))])
    xs = np.random.default_rng(4).laplace(0, 1, (6, 1, 3, 6, 6)).astype(np.float32)
    samples = [{"x": x} for x in xs]
    model = qcompiler.load_model(proto)
    target = qcompiler.load_target("ort-cpu")
    ctx = qcompiler.PassContext(target=target, calibration=qcompiler.load_calibration(samples, qcompiler.input_specs(model)))
    reg = qcompiler.default_registry()
    qcompiler.PassManager([reg.instantiate(qcompiler.PassSpec("infer-shapes")),
                           reg.instantiate(qcompiler.PassSpec("group-activations")),
                           reg.instantiate(qcompiler.PassSpec("calibrate", (("method", "percentile"),
                                                                            ("percentile", "90"),
                                                                            ("observe", "all"))))]).run(model, ctx)
    assert ctx.analysis["groups"] == {"conv": "relu"}
    rep = ctx.report["calibration"]
    assert rep["fused_inner_tensors"] == 1
    c = np.stack(intermediates(proto, ["c"], samples)["c"])
    assert "c" not in ctx.analysis["ranges"] and {"x", "y", "z"} <= set(ctx.analysis["ranges"])
    y = np.maximum(c, 0)
    lo, hi = ctx.analysis["ranges"]["y"]
    assert hi < 0.8 * float(y.max())  # 90th percentile clips the tail: not the min/max
    ungrouped = calibrate(proto, samples, method="percentile", percentile=90)["ranges"]["c"]
    assert ungrouped[1] < 0.8 * float(c.max())  # without the group, c itself gets percentile


def test_layers_reading_one_input_share_their_moments() -> None:
    """Q/K/V-style MatMuls on the same input have the same input moments: accumulated once
    and reported under every layer's name, equal to X^T X over every sample's rows; a MatMul
    on another input has its own."""
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [helper.make_node("Add", ["h0", "h1"], ["s"], name="add"),
              helper.make_node("MatMul", ["s", "w3"], ["y"], name="mm3")]
    inits = [init(f"w{i}", rng.standard_normal((8, 8)).astype(np.float32)) for i in range(4)]
    proto = make_model(nodes, [tensor("x", [5, 8])], [tensor("y", [5, 8]), tensor("h2", [5, 8])], inits)
    samples = [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(4)]
    moments = calibrate(proto, samples, method="minmax")["input_moments"]
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(moments["mm0"][0], x.T @ x, rtol=1e-5)
    assert moments["mm1"] is moments["mm0"] and moments["mm2"] is moments["mm0"]
    s = np.concatenate(intermediates(proto, ["s"], samples)["s"]).astype(np.float64)
    np.testing.assert_allclose(moments["mm3"][0], s.T @ s, rtol=1e-5)


def test_grouped_layers_take_moments_from_fewer_samples() -> None:
    """grouped-moment-samples=2: a depthwise Conv's per-channel input moments come from the
    first 2 samples, the following 1x1 Conv's from the first `moment-samples`=4; both equal
    sum(patch patch^T) over those samples' im2col columns (every position of a 5x5 map)."""
    rng = np.random.default_rng(31)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=3),
             helper.make_node("Conv", ["d", "wp"], ["y"], name="pw")]
    proto = make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 2, 5, 5])],
                       [init("wd", rng.standard_normal((3, 1, 3, 3)).astype(np.float32)),
                        init("wp", rng.standard_normal((2, 3, 1, 1)).astype(np.float32))])
    samples = [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)} for _ in range(6)]
    moments = calibrate(proto, samples, method="minmax", moment_samples=4, grouped_moment_samples=2)["input_moments"]
    spec = qcompiler.PatchSpec((3, 3), (1, 1, 1, 1), (), (), 3)
    cols = [qcompiler.input_patches(s["x"], spec).astype(np.float64) for s in samples[:2]]
    want = sum(c @ c.transpose(0, 2, 1) for c in cols)
    assert moments["dw"].shape == (3, 9, 9)
    np.testing.assert_allclose(moments["dw"], want, rtol=1e-5, atol=1e-5)
    d = intermediates(proto, ["d"], samples[:4])["d"]
    flat = np.concatenate([a.reshape(3, -1) for a in d], axis=1).astype(np.float64)
    np.testing.assert_allclose(moments["pw"][0], flat @ flat.T, rtol=1e-5, atol=1e-5)


# -- saturating readers ---------------------------------------------------------------------------


def _conv_hardswish() -> onnx.ModelProto:
    """x -> Conv(3x3, pad 1, weights x4) -> c -> HardSwish -> y: c reaches far below -3."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c"], ["y"], name="hswish")]
    return make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])],
                      [init("w", 4 * rand([4, 3, 3, 3], seed=1)), init("b", rand([4], seed=2))], opset=17)


def test_saturation_bounds_per_reader() -> None:
    """Relu/HardSwish/constant-Clip readers bound a value; any other reader, or being a graph
    output, leaves it unbounded; several saturating readers give the union of their intervals."""
    from qcompiler.calibration import saturation_bounds

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="clip"),
             helper.make_node("HardSwish", ["a"], ["c"], name="hs"),
             helper.make_node("Add", ["b", "c"], ["d"], name="add"),
             helper.make_node("HardSigmoid", ["d"], ["e"], name="hsig", alpha=0.25, beta=0.5),
             helper.make_node("Relu", ["e"], ["f"], name="r1")]
    proto = make_model(nodes, [tensor("x", [1, 4])], [tensor("f", [1, 4]), tensor("e", [1, 4])],
                       [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))], opset=17)
    bounds = saturation_bounds(qcompiler.load_model(proto))
    assert bounds["a"] == (-3.0, float("inf"))  # Clip(0, 6) and HardSwish: the wider interval
    assert bounds["d"] == (-2.0, 2.0)  # HardSigmoid 0.25 x + 0.5 is 0 below -2 and 1 above 2
    assert "b" not in bounds and "c" not in bounds  # read by Add
    assert "e" not in bounds  # a graph output


def test_saturation_clamps_range_and_lowers_error() -> None:
    """With saturation on, the range of a value read only by HardSwish stops at -3 (minmax:
    exactly max(min, -3)); the HardSwish output computed from the value quantized on that
    range is closer to onnxruntime's float output than with the full observed range."""
    proto = _conv_hardswish()
    samples = [{"x": rand([1, 3, 6, 6], seed=s)} for s in range(4)]
    seen = intermediates(proto, ["c", "y"], samples)
    lo_obs = min(float(a.min()) for a in seen["c"])
    hi_obs = max(float(a.max()) for a in seen["c"])
    assert lo_obs < -6  # the test needs a range reaching well past the saturation point
    on = calibrate(proto, samples, method="minmax", saturation=True)["ranges"]["c"]
    off = calibrate(proto, samples, method="minmax")["ranges"]["c"]  # the default: off
    assert off == pytest.approx((lo_obs, hi_obs), rel=1e-6)
    assert on == pytest.approx((-3.0, hi_obs), rel=1e-6)

    qtype = qcompiler.QType("uint8", False, 0, 255)

    def hswish_error(rng: tuple[float, float]) -> float:
        qp = qcompiler.compute_qparams(rng[0], rng[1], qtype)
        err = 0.0
        for c, y in zip(seen["c"], seen["y"]):
            d = qcompiler.dequantize(qcompiler.quantize(c, qp), qp).astype(np.float64)
            err += float(np.square(d * np.clip(d + 3, 0, 6) / 6 - y).sum())
        return err

    assert hswish_error(on) < 0.7 * hswish_error(off)
