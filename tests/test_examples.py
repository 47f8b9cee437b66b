"""The examples/ ladder: each step's script runs as a user would run it and its claims hold.

Each step runs once per test session (module-scoped fixture, a subprocess with this Python,
run from an unrelated working directory to prove paths resolve relative to the script) and
several tests check its output files and JSON. The plugin pass and the custom target also get
fast in-process checks on a tiny model, so a failure there points at them, not at the
end-to-end scripts. The end-to-end steps are marked slow (`pytest -m 'not slow'` skips them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompiler
from qcompiler import PassContext, PassManager, PassRegistry, UserError, load_model, load_target, parse_pipeline

from conftest import TINY_INPUT, tiny_calibration, tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data"
PLUGIN = EXAMPLES / "02_custom_pass" / "my_pass.py"
MY_TARGET = EXAMPLES / "03_custom_target" / "my-target.toml"
TIMEOUT_S = 600  # a hung compile fails the test instead of blocking the suite


def run_step(script: Path, out: Path, cwd: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """Run an example script as a user would; return its --json numbers and its stdout."""
    js = out / "summary.json"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--json", str(js), *extra],
                          cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(js.read_text()), proc.stdout


def ops_of(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def eval_input(n: int = 1) -> np.ndarray:
    """The first ``n`` bundled eval images as model input, preprocessed independently of examples/effnet.py."""
    with np.load(DATA / "effnet_images.npz") as d:
        u8 = d["eval"][:n]
    return ((u8.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


# -- bundled data ------------------------------------------------------------------------------

def test_bundled_images_match_the_documented_layout() -> None:
    """Examples and the README rely on these exact keys, shapes and dtypes."""
    with np.load(DATA / "effnet_images.npz") as d:
        assert sorted(d.files) == ["calib", "eval"]
        assert d["calib"].shape == (32, 224, 224, 3) and d["calib"].dtype == np.uint8
        assert d["eval"].shape == (48, 224, 224, 3) and d["eval"].dtype == np.uint8
        assert d["calib"].std() > 20 and d["eval"].std() > 20  # real pictures, not blank arrays
    prov = json.loads((DATA / "provenance.json").read_text())
    assert [len(prov["calib"]), len(prov["eval"])] == [32, 48]
    assert [e["index"] for e in prov["eval"]] == list(range(48))
    assert all(e["source_debian_package_file"] for split in prov.values() for e in split)
    calib_src = {e["source_debian_package_file"] for e in prov["calib"]}
    assert not calib_src & {e["source_debian_package_file"] for e in prov["eval"]}, "calib and eval overlap"


def test_bundled_model_classifies_the_bundled_images() -> None:
    """The model file and the preprocessing agree: fp32 logits are finite, vary per image and
    do not collapse to a single class."""
    sess = ort.InferenceSession(str(DATA / "effnet_lite0.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": eval_input(8)})[0]
    assert logits.shape == (8, 1000) and np.isfinite(logits).all()
    assert len(set(logits.argmax(1).tolist())) >= 4


# -- step 1: compile a model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("step1")
    summary, stdout = run_step(EXAMPLES / "01_compile_a_model" / "run.py", out, tmp_path_factory.mktemp("cwd"),
                               "--runs", "3")
    return summary, stdout, out


@pytest.mark.slow
def test_step1_numbers(step1: tuple[dict[str, Any], str, Path]) -> None:
    """int8 is < 30% of fp32's size, follows fp32 on the eval images (loose bounds: accuracy
    work is ongoing) and both latencies were measured."""
    s, stdout, out = step1
    assert s["size_ratio"] < 0.3
    assert s["size_mb"]["int8"] == pytest.approx((out / "effnet_lite0.int8.onnx").stat().st_size / 1e6, abs=1e-3)
    assert 0.5 <= s["top1_agreement"] <= 1.0
    assert 0.8 <= s["logits_cosine"] <= 1.0 + 1e-9
    assert s["latency_ms"]["fp32"] > 0 and s["latency_ms"]["int8"] > 0
    assert s["runs"] == 3 and s["eval_images"] == 48 and s["calibration_images"] == 32
    for needle in ("size", "latency", "top-1 agreement", "cosine"):
        assert needle in stdout


@pytest.mark.slow
def test_step1_output_is_a_valid_integer_model(step1: tuple[dict[str, Any], str, Path]) -> None:
    """The saved model passes the ONNX checker, uses integer kernels, and runs in onnxruntime
    with the fp32 model's input and output."""
    _, _, out = step1
    path = out / "effnet_lite0.int8.onnx"
    onnx.checker.check_model(onnx.load(str(path)))
    assert ops_of(path)["QLinearConv"] > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": eval_input(2)})[0]
    assert y.shape == (2, 1000) and np.isfinite(y).all() and np.ptp(y) > 0


# -- step 2: a plugin pass ---------------------------------------------------------------------

def _plugin_registry() -> PassRegistry:
    reg = PassRegistry()
    assert reg.load_plugin(str(PLUGIN)) == ["prune-small-weights"]
    return reg


def test_plugin_pass_zeroes_exactly_the_small_weights() -> None:
    """On the tiny model the pass zeroes |w| < threshold in Conv and Gemm weights, nothing
    else, reports honest counts, and the result matches onnxruntime on the same edit done in numpy."""
    reg = _plugin_registry()
    proto = tiny_model()
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    threshold = 0.1
    (spec,) = parse_pipeline(f"prune-small-weights{{threshold={threshold}}}")
    model = load_model(proto)
    ctx = PassContext(target=load_target("ort-cpu"))
    PassManager([reg.instantiate(spec)]).run(model, ctx)

    pruned_names = ("w1", "w2", "wg")  # the Conv, Conv and Gemm weights; biases stay
    expected = {k: (np.where(np.abs(v) < threshold, 0, v) if k in pruned_names else v) for k, v in weights.items()}
    n_small = sum(int(((np.abs(weights[k]) < threshold) & (weights[k] != 0)).sum()) for k in pruned_names)
    assert n_small > 0
    assert ctx.report["prune_small_weights"] == {"threshold": threshold, "pruned": n_small,
                                                 "total": sum(weights[k].size for k in pruned_names),
                                                 "tensors": 3}
    out = model.to_proto()
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert sorted(after) == ["b1", "b2", "bg", "w1_pruned", "w2_pruned", "wg_pruned"]  # originals cleaned up
    for name, array in after.items():
        np.testing.assert_array_equal(array, expected[name.removesuffix("_pruned")], err_msg=name)

    ref = proto
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(expected[t.name], t.name))
    got_sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    want_sess = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    x = tiny_calibration(1)[TINY_INPUT]
    got, want = got_sess.run(None, {TINY_INPUT: x})[0], want_sess.run(None, {TINY_INPUT: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_plugin_pass_options_and_no_op() -> None:
    """Threshold 0 changes nothing (and says so); a negative threshold is a user error; the
    `ops` list restricts which nodes are pruned."""
    reg = _plugin_registry()
    model = load_model(tiny_model())
    ctx = PassContext(target=load_target("ort-cpu"))
    (spec,) = parse_pipeline("prune-small-weights{threshold=0}")
    assert PassManager([reg.instantiate(spec)]).run(model, ctx) is False
    assert ctx.report["prune_small_weights"]["pruned"] == 0
    with pytest.raises(UserError, match="threshold must be >= 0"):
        reg.instantiate(parse_pipeline("prune-small-weights{threshold=-1}")[0])
    ctx = PassContext(target=load_target("ort-cpu"))
    PassManager([reg.instantiate(parse_pipeline("prune-small-weights{threshold=0.1,ops=[Gemm]}")[0])]).run(model, ctx)
    assert ctx.report["prune_small_weights"]["tensors"] == 1
    assert ctx.report["prune_small_weights"]["total"] == 5 * 4  # only the Gemm weight was considered


@pytest.fixture(scope="module")
def step2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("step2")
    summary, stdout = run_step(EXAMPLES / "02_custom_pass" / "run.py", out, tmp_path_factory.mktemp("cwd"))
    return summary, stdout, out


@pytest.mark.slow
def test_step2_plugin_changes_the_compiled_model(step2: tuple[dict[str, Any], str, Path]) -> None:
    """The plugin pass ran where it was inserted, pruned weights, and the pruned compile's
    int8 weights hold more zeros than the default compile's (so the bytes differ for a reason)."""
    s, stdout, out = step2
    assert s["pruned_weights"] > 0 and s["pruned_tensors"] > 0
    names = [p.name for p in parse_pipeline(s["pipeline"])]
    assert names[names.index("fuse-pad-conv") + 1] == "prune-small-weights"
    default, pruned = out / "effnet_lite0.int8.onnx", out / "effnet_lite0.pruned.int8.onnx"
    assert default.read_bytes() != pruned.read_bytes()
    assert s["bytes_identical"] is False and s["max_abs_logit_diff"] > 0

    def int8_zeros(path: Path) -> int:
        return sum(int((numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8)
    assert int8_zeros(pruned) > int8_zeros(default)
    report = json.loads(pruned.with_suffix(".report.json").read_text())
    assert report["prune_small_weights"]["pruned"] == s["pruned_weights"]
    assert "qcompiler compile" in stdout and "--plugin" in stdout


# -- step 3: a custom target -------------------------------------------------------------------

def test_custom_target_merges_over_ort_cpu() -> None:
    """my-target.toml overrides exactly what its README says and inherits the rest."""
    mine, base = load_target(MY_TARGET), load_target("ort-cpu")
    assert (mine.name, mine.default_format, base.default_format) == ("my-target", "qdq", "qoperator")
    assert mine.op("Conv").weight.per_channel is False and base.op("Conv").weight.per_channel is True
    assert mine.op("Conv").kernel == base.op("Conv").kernel
    assert mine.pipeline("static") == base.pipeline("static")
    assert mine.activation_rule() == base.activation_rule()


@pytest.fixture(scope="module")
def step3(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("step3")
    summary, stdout = run_step(EXAMPLES / "03_custom_target" / "run.py", out, tmp_path_factory.mktemp("cwd"))
    return summary, stdout, out


@pytest.mark.slow
def test_step3_targets_shape_the_output(step3: tuple[dict[str, Any], str, Path]) -> None:
    """ort-cpu lowers to QLinearConv; the QDQ custom target keeps float Conv between
    QuantizeLinear/DequantizeLinear and has no QLinearConv; both run on the eval images."""
    s, stdout, out = step3
    ort_ops, my_ops = ops_of(out / "effnet_lite0.ort-cpu.onnx"), ops_of(out / "effnet_lite0.my-target.onnx")
    assert ort_ops["QLinearConv"] > 0
    assert my_ops["QLinearConv"] == 0 and my_ops["QuantizeLinear"] > 0 and my_ops["DequantizeLinear"] > 0
    assert my_ops["Conv"] == ort_ops["QLinearConv"]
    assert s["ort-cpu"]["ops"] == dict(sorted(ort_ops.items()))
    assert s["my-target"]["ops"] == dict(sorted(my_ops.items()))
    for name in ("ort-cpu", "my-target"):
        assert 0.0 <= s[name]["top1_agreement"] <= 1.0
        assert -1.0 <= s[name]["logits_cosine"] <= 1.0 + 1e-9
    assert "QLinearConv" in stdout and "QuantizeLinear" in stdout


# -- step 4: extend a built-in hardware target ----------------------------------------------------

MY_NPU = EXAMPLES / "04_extend_a_target" / "my-npu.toml"


def test_my_npu_extends_npu_int8() -> None:
    """my-npu.toml changes weight granularity and adds two ops; the rest is npu-int8's."""
    mine, base = load_target(MY_NPU), load_target("npu-int8")
    assert mine.op("Conv").weight.per_channel and not base.op("Conv").weight.per_channel
    assert mine.op("Conv").weight.qtype.power_of_two and mine.activation_rule() == base.activation_rule()
    assert base.op("GlobalAveragePool") is None and mine.op("GlobalAveragePool") is not None
    assert mine.fixed["Sigmoid"] == (2.0 ** -7, 0) and mine.pipeline("static") == base.pipeline("static")


@pytest.fixture(scope="module")
def step4(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("step4")
    summary, stdout = run_step(EXAMPLES / "04_extend_a_target" / "run.py", out, tmp_path_factory.mktemp("cwd"))
    return summary, stdout, out


@pytest.mark.slow
def test_step4_partitions_follow_the_target(step4: tuple[dict[str, Any], str, Path]) -> None:
    """npu-int8 leaves GlobalAveragePool on the host (two integer partitions); my-npu runs it on
    the NPU (one partition); both outputs run in onnxruntime and the printed numbers are the JSON's."""
    s, stdout, out = step4
    assert len(s["npu-int8"]["partitions"]) == 2 and "GlobalAveragePool" in s["npu-int8"]["host_ops"]
    assert len(s["my-npu"]["partitions"]) == 1 and "GlobalAveragePool" not in s["my-npu"]["host_ops"]
    for name in ("npu-int8", "my-npu"):
        assert (out / f"effnet_lite0.{name}.onnx").is_file()
        assert 0.0 <= s[name]["top1_agreement"] <= 1.0
        assert f"top-1 agreement {s[name]['top1_agreement']:.3f}" in stdout
    assert s["my-npu"]["logits_cosine"] > s["npu-int8"]["logits_cosine"]  # per-channel weights help


def test_examples_import_only_the_public_api() -> None:
    """The ladder teaches the public API: every qcompiler name the examples use is exported."""
    import ast

    for path in sorted(EXAMPLES.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcompiler"):
                assert node.module == "qcompiler", f"{path}: imports from {node.module}"
                for alias in node.names:
                    assert alias.name in qcompiler.__all__, f"{path}: {alias.name} is not public"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "qcompiler":
                assert node.attr in qcompiler.__all__, f"{path}: qcompiler.{node.attr} is not public"
