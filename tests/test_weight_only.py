"""Weight-only mode end to end: small generated decoders (benchmarks/make_decoder.py), the
MatMulNBits and blocked-QDQ forms against numpy / onnx.reference, check and simulate, bad
options, determinism, external data over the (lowered) 2 GB threshold.

CPU facts pinned: onnxruntime's MatMulNBits with accuracy_level 4 quantizes activations to
int8 inside MLAS with ISA-specific kernels; every onnxruntime comparison here runs a target
with accuracy_level 0 (float32 compute, the same on AVX2 and AVX-512) and states its tolerance.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import qcompiler
from qcompiler.weight_only import matmul_nbits, pack_codes, unpack_codes

_spec = importlib.util.spec_from_file_location("make_decoder", Path(__file__).parents[1] / "benchmarks" / "make_decoder.py")
make_decoder = importlib.util.module_from_spec(_spec)
sys.modules["make_decoder"] = make_decoder
_spec.loader.exec_module(make_decoder)
CFG = make_decoder.SIZES["tiny"]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_decoder.build_decoder(CFG, tmp_path_factory.mktemp("dec") / "tiny.onnx", seed=3)


@pytest.fixture(scope="module")
def exact_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ort-cpu with accuracy_level 0: MatMulNBits computes in float32 on every CPU."""
    p = tmp_path_factory.mktemp("tgt") / "ort-cpu-exact.toml"
    p.write_text('schema = 1\nname = "ort-cpu-exact"\ndescription = "test"\nextends = "ort-cpu"\n\n'
                 '[weight_only]\nkernel = "com.microsoft.MatMulNBits"\naccuracy_level = 0\n')
    return p


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_pack_round_trip_low_bits_first() -> None:
    codes = np.arange(30, dtype=np.uint8).reshape(2, 15) % 16
    packed = pack_codes(codes, 4)
    assert packed.shape == (2, 8)
    assert packed[0, 0] == (1 << 4) | 0  # element 0 in the low nibble
    np.testing.assert_array_equal(unpack_codes(packed, 4, 15), codes)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes * 9, 8), 8, 15), codes * 9)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_matmul_nbits_equals_numpy_and_onnxruntime(decoder: Path, exact_target: Path, bits: int,
                                                   symmetric: bool) -> None:
    res = qcompiler.compile(decoder, target=exact_target, mode="weight-only", weight_bits=bits, block_size=16,
                            weight_symmetric=symmetric)
    proto = res.proto
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 7 * CFG.layers + 1  # q k v o gate up down per layer + lm_head
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    rng = np.random.default_rng(0)
    for n in nodes:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 16 and attrs["accuracy_level"] == 0
        assert (len(n.input) == 4) == (not symmetric)
        k, nn = attrs["K"], attrs["N"]
        a = rng.standard_normal((3, k)).astype(np.float32)
        zp = inits[n.input[3]] if len(n.input) > 3 else None
        ref = matmul_nbits(a, inits[n.input[1]], inits[n.input[2]], zp, k=k, n=nn, bits=bits, block_size=16)
        single = onnx.helper.make_model(
            onnx.helper.make_graph([n], "g", [onnx.helper.make_tensor_value_info(n.input[0], 1, [3, k])],
                                   [onnx.helper.make_tensor_value_info(n.output[0], 1, [3, nn])],
                                   [t for t in proto.graph.initializer if t.name in n.input[1:]]),
            ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)])
        got = _session(single).run(None, {n.input[0]: a})[0]
        # float32 sums in a different order: 1e-4 relative to the output scale
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))
    # and the whole model: quantized logits close to the float model's
    feed = make_decoder.prefill_feed(CFG, 8, 1)
    want = _session(str(decoder)).run(["logits"], feed)[0]
    got = _session(proto).run(["logits"], feed)[0]
    assert _cos(want, got) > (0.85 if bits == 4 else 0.995)  # random weights: see docs/benchmarks.md


def test_dequantized_weight_error_bounds() -> None:
    """RTN with the clipping search: every block's squared error is at most that of the
    block's full range (ratio 1.0, the search's first candidate), strictly less in total on
    heavy-tailed weights, and values inside the chosen range are within half a step."""
    from qcompiler.weight_only import WeightOnlyOptions, _blocks, _extremes, _range_params, block_quantize

    w = np.random.default_rng(1).standard_t(4, size=(100, 24)).astype(np.float32)
    for sym in (True, False):
        opts = WeightOnlyOptions(4, 32, sym)
        q = block_quantize(w, opts)
        b = _blocks(np.ascontiguousarray(w.T), 32)  # [N, blocks, 32], zero-padded
        deq = _blocks(np.ascontiguousarray(q.dequantized().T), 32)
        err = np.square(deq - b).sum(axis=2)
        s1, z1 = _range_params(_extremes(b, opts), opts, 1.0)
        full = np.square((np.clip(np.rint(b / s1[..., None]) + z1[..., None], 0, 15) - z1[..., None])
                         * s1[..., None] - b).sum(axis=2)
        assert np.all(err <= full * (1 + 1e-5) + 1e-9)  # float32 rounding of the two sums
        assert err.sum() < full.sum() * (1 - 1e-3)
        scale, zp = q.scale[..., None], q.zero_point.astype(np.float32)[..., None]
        lo, hi = np.minimum(-zp * scale, (15 - zp) * scale), np.maximum(-zp * scale, (15 - zp) * scale)
        inside = (b >= lo) & (b <= hi)
        bound = np.broadcast_to(np.abs(scale) / 2 * (1 + 1e-5) + 1e-7, b.shape)
        assert np.all(np.abs(deq - b)[inside] <= bound[inside])
        assert (~inside).any()  # the search did clip some extremes


def test_blocked_qdq_form_matches_onnx_reference(decoder: Path) -> None:
    res = qcompiler.compile(decoder, target="ort-cpu-qdq", mode="weight-only", block_size=16)
    proto = res.proto
    assert res.report["weight_only"]["kernel"] == "DequantizeLinear"
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * CFG.layers + 1
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in dqs)
    assert next(i.version for i in proto.opset_import if i.domain == "") >= 21
    feed = make_decoder.prefill_feed(CFG, 6, 2)
    want = ReferenceEvaluator(proto).run(["logits"], feed)[0]
    got = _session(proto).run(["logits"], feed)[0]  # onnxruntime's blocked int4 DQ, graph as written
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    assert qcompiler.check_model(proto, "ort-cpu-qdq").legal


def test_simulate_and_check_know_the_kernels(decoder: Path, tmp_path: Path) -> None:
    res = qcompiler.compile(decoder, target="ort-cpu", mode="weight-only", block_size=16)
    out = tmp_path / "q.onnx"
    res.save(out)
    assert res.report["check"]["legal"]
    ops = res.report["ops_after"]
    assert ops["MatMulNBits"] == 7 * CFG.layers + 1 and ops["GatherBlockQuantized"] == 1
    feeds = [make_decoder.prefill_feed(CFG, 5, i) for i in range(2)]
    sim = qcompiler.simulate(out, "ort-cpu", feeds, reference=decoder)
    assert sim.output_fidelity["logits"].cosine > 0.85  # int4 on random weights (see the first test)
    # a target that cannot run it says so, naming the key
    npu = qcompiler.check_model(out, "npu-int8")
    assert not npu.legal and npu.problems[0].key == "weight_only"
    qdq = qcompiler.check_model(out, "ort-cpu-qdq")
    assert not qdq.legal and any(p.key == "weight_only.kernel" for p in qdq.problems)


def test_asymmetric_or_8bit_rejected_where_target_forbids(decoder: Path) -> None:
    with pytest.raises(qcompiler.UserError, match="weight_only.symmetric"):
        qcompiler.compile(decoder, target="tensorrt", mode="weight-only", weight_symmetric=False)
    with pytest.raises(qcompiler.UserError, match="no \\[weight_only\\] table"):
        qcompiler.compile(decoder, target="npu-int8", mode="weight-only")


def test_awq_folds_scale_into_rmsnorm_and_gptq_beats_rtn_on_layer_error(decoder: Path) -> None:
    calib = [make_decoder.prefill_feed(CFG, 16, 100 + i) for i in range(4)]
    rtn = qcompiler.compile(decoder, target="ort-cpu", mode="weight-only", weight_algorithm="rtn", block_size=16)
    awq = qcompiler.compile(decoder, target="ort-cpu", mode="weight-only", weight_algorithm="awq", block_size=16,
                            calibration=calib)
    rep = awq.report["weight_only"]
    assert rep["algorithm"] == "awq" and rep["awq_scaled"] > 0
    # scales folded into RMSNorm gains where exact; a Mul is added only for other producers
    assert awq.report["ops_after"]["Mul"] - rtn.report["ops_after"]["Mul"] <= rep["awq_scaled"]
    assert awq.report["ops_after"]["Mul"] - rtn.report["ops_after"]["Mul"] < rep["awq_scaled"]
    feed = make_decoder.prefill_feed(CFG, 8, 5)
    want = _session(str(decoder)).run(["logits"], feed)[0]
    assert _cos(want, _session(awq.proto).run(["logits"], feed)[0]) > 0.85


def test_gptq_lowers_layer_error_on_its_data() -> None:
    from qcompiler.weight_only import WeightOnlyOptions, block_quantize

    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs
    w = rng.standard_normal((64, 32)).astype(np.float32)
    h = x.T @ x
    opts = WeightOnlyOptions(4, 16, True)
    err = {alg: float(np.square(x @ (w - block_quantize(w, opts, alg, h).dequantized())).sum())
           for alg in ("rtn", "gptq")}
    assert err["gptq"] < 0.9 * err["rtn"]


def test_default_algorithm_rtn_without_data_gptq_with(decoder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert qcompiler.compile(decoder, mode="weight-only").report["weight_only"]["algorithm"] == "rtn"
    calib = [make_decoder.prefill_feed(CFG, 8, 9)]
    assert qcompiler.compile(decoder, mode="weight-only", calibration=calib).report["weight_only"]["algorithm"] == "gptq"
    # above GPTQ_DEFAULT_MAX_BYTES of MatMul weights (lowered here) awq is the default with data
    from qcompiler.passes import quantize_weights

    monkeypatch.setattr(quantize_weights, "GPTQ_DEFAULT_MAX_BYTES", 1024)
    assert qcompiler.compile(decoder, mode="weight-only", calibration=calib).report["weight_only"]["algorithm"] == "awq"


def test_compile_reads_float_weights_only_through_the_map(decoder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without samples to measure fidelity on, compile never loads the float model whole
    (onnx.load pulls every external tensor into memory: 4.4 GB for the 1.1B decoder)."""
    import importlib

    real = onnx.load

    def load(f: object, *a: object, **k: object) -> onnx.ModelProto:
        if k.get("load_external_data", True):
            raise AssertionError(f"onnx.load({f}) with all external data")
        return real(f, *a, **k)

    monkeypatch.setattr(importlib.import_module("qcompiler.api").onnx, "load", load)
    res = qcompiler.compile(decoder, mode="weight-only")
    assert res.report["weight_only"]["matmuls"] > 0
    assert res.report["weight_only"]["symmetric"] is False  # ort-cpu lists false first


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from Linux /proc")
def test_release_pages_gives_mapped_weight_back_values_unchanged(tmp_path: Path) -> None:
    """A read memory-mapped weight leaves RSS (file pages) once released; reading it again
    gives the same values (the pages come back from the file)."""
    from qcompiler.weight_only import release_pages

    want = np.random.default_rng(0).standard_normal((4096, 2048)).astype(np.float32)  # 32 MB
    path = tmp_path / "w.bin"
    want.tofile(path)
    w = np.memmap(path, dtype=np.float32, mode="r", shape=want.shape)
    before = _rss_file_kb()
    assert float(np.asarray(w, dtype=np.float64).sum()) == pytest.approx(float(want.sum(dtype=np.float64)))
    touched = _rss_file_kb()
    release_pages(w[:, :16])  # a view: its map is found through .base
    released = _rss_file_kb()
    assert touched - before > 24 * 1024 and touched - released > 24 * 1024
    np.testing.assert_array_equal(w, want)
    release_pages(want)  # not a map: nothing happens


@pytest.mark.parametrize("args,needle", [
    (["--weight-bits", "3"], "--weight-bits 3"),
    (["--block-size", "10"], "--block-size 10"),
    (["--weight-algorithm", "awq"], "needs calibration data"),
    (["--weight-symmetric", "maybe"], "--weight-symmetric maybe"),
    (["--weight-algorithm", "hqq"], "--weight-algorithm hqq"),
])
def test_bad_options_exit_2_one_line(decoder: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "o.onnx"
    p = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", str(decoder), "-o", str(out),
                        "--mode", "weight-only", *args], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr
    assert not out.exists()


def test_weight_flags_need_weight_only_mode(decoder: Path) -> None:
    with pytest.raises(qcompiler.UserError, match="--block-size: only with --mode weight-only"):
        qcompiler.compile(decoder, mode="dynamic", block_size=32)


def test_same_bytes_twice(decoder: Path, tmp_path: Path) -> None:
    calib = [make_decoder.prefill_feed(CFG, 8, 11 + i) for i in range(2)]
    paths = []
    for i in range(2):
        p = tmp_path / f"q{i}.onnx"
        qcompiler.compile(decoder, mode="weight-only", weight_algorithm="awq", calibration=calib).save(p)
        paths.append(p)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_external_data_above_threshold_round_trip(decoder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Output above the (lowered) 2 GB threshold goes to external data next to the model,
    the same bytes twice, and runs; the input was itself external data."""
    import qcompiler.ir.io as irio

    monkeypatch.setattr(irio, "_TWO_GB", 64 * 1024)
    res = qcompiler.compile(decoder, mode="weight-only", block_size=16)
    blobs = []
    for i in range(2):
        p = tmp_path / f"big{i}.onnx"
        res.save(p)
        data = tmp_path / f"big{i}.onnx.data"
        assert data.exists() and data.stat().st_size > 64 * 1024
        assert p.stat().st_size < 64 * 1024
        blobs.append((p.read_bytes().replace(b"big1", b"big0"), data.read_bytes()))
    assert blobs[0] == blobs[1]
    feed = make_decoder.prefill_feed(CFG, 4, 3)
    got = _session(str(tmp_path / "big0.onnx")).run(["logits"], feed)[0]
    np.testing.assert_array_equal(got, _session(res.proto).run(["logits"], feed)[0])


def test_streamed_statistics_equal_whole_model_moments(decoder: Path) -> None:
    """Layer-streamed second moments (qcompiler.weight_stats, segments of ~20 KB of weights:
    one per few nodes) equal those of one session over the whole float model exposing every
    MatMul input, to 1e-6 relative (float64 sums of the same float32 activations; onnxruntime
    may fuse differently inside a segment)."""
    from qcompiler.ir import load_model
    from qcompiler.weight_stats import stream_input_moments

    model = load_model(decoder)
    names = sorted({n.inputs[0].name for n in model.graph.nodes if n.op == "MatMul"})
    calib = [make_decoder.prefill_feed(CFG, 8, 11 + i) for i in range(3)]
    got: dict[str, np.ndarray] = {}
    segments = stream_input_moments(model, calib, names, got.__setitem__, samples=3, segment_bytes=20_000)
    assert segments > CFG.layers and sorted(got) == names
    proto = model.to_proto()
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = {name: 0.0 for name in names}
    for feed in calib:
        for name, x in zip(names, sess.run(names, feed)):
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            want[name] = want[name] + rows.T @ rows
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6 * np.abs(want[name]).max(), err_msg=name)


def test_awq_output_does_not_depend_on_segmenting(decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes whether the statistics run in one segment or one per few nodes."""
    import qcompiler.weight_stats as ws

    calib = [make_decoder.prefill_feed(CFG, 8, 11 + i) for i in range(2)]
    blobs = []
    for budget in (1 << 40, 20_000):
        monkeypatch.setattr(ws, "SEGMENT_BYTES", budget)
        res = qcompiler.compile(decoder, mode="weight-only", weight_algorithm="awq", calibration=calib)
        blobs.append((res.serialized(), res.report["weight_only_statistics"]["segments"]))
    assert blobs[0][1] == 1 and blobs[1][1] > CFG.layers
    assert blobs[0][0] == blobs[1][0]
