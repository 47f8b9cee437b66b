"""The CLI contract: user errors exit 2 with one line naming the culprit and leave nothing
behind; a successful compile writes a valid, deterministic model and a complete report; the
listing commands show the built-ins.

Most cases call ``qcompiler.cli.main`` in-process (fast); a few run ``python -m qcompiler.cli``
in a subprocess to check the real process exit code and stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import qcompiler
import qcompiler.registry as reg_mod
from conftest import TINY_INPUT, make_model, tensor_info, tiny_calibration, tiny_model
from qcompiler.cli import main
from qcompiler.registry import BUILTIN_PASSES


@dataclass
class Case:
    """One failing command line: its arguments, the text its error must contain, and the
    input files that must be unchanged afterwards."""

    args: list[str]
    expect: list[str]
    inputs: list[Path] = field(default_factory=list)
    output: Path | None = None


def _save(path: Path, proto: onnx.ModelProto) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def _small(nodes: list[onnx.NodeProto], **kw: object) -> onnx.ModelProto:
    return make_model(nodes, [tensor_info("x", [1, 4])], [tensor_info("y", [1, 4])], **kw)  # type: ignore[arg-type]


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


class Env:
    """Files for one case, all under tmp_path: a valid model and calibration set, plus an
    empty output directory that must stay empty when the command fails."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model = _save(tmp / "tiny.onnx", tiny_model())
        self.calib = _npz(tmp / "calib.npz", **tiny_calibration())
        self.out_dir = tmp / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "q.onnx"

    def compile(self, model: Path | None = None, calib: Path | None = None, *extra: str) -> list[str]:
        return ["compile", str(model or self.model), "-o", str(self.out),
                "--calibration", str(calib or self.calib), *extra]


def _truncated(e: Env) -> Case:
    data = e.model.read_bytes()
    bad = e.tmp / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    return Case(e.compile(bad), [str(bad), "not a readable ONNX model"], [bad])


def _text_file(e: Env) -> Case:
    bad = e.tmp / "notes.onnx"
    bad.write_text("this is a text file, not a protobuf\n")
    return Case(e.compile(bad), [str(bad)], [bad])


def _cycle(e: Env) -> Case:
    bad = _save(e.tmp / "cycle.onnx", _small([helper.make_node("Add", ["x", "b"], ["a"], name="cyc_add"),
                                              helper.make_node("Relu", ["a"], ["b"], name="cyc_relu"),
                                              helper.make_node("Relu", ["a"], ["y"], name="tail")]))
    return Case(e.compile(bad), [str(bad), "cycle", "cyc_add", "cyc_relu"], [bad])


def _missing_initializer(e: Env) -> Case:
    bad = _save(e.tmp / "missing.onnx", _small([helper.make_node("Add", ["x", "w_gone"], ["y"], name="add_w")]))
    return Case(e.compile(bad), [str(bad), "'add_w'", "'w_gone'"], [bad])


def _unknown_domain(e: Env) -> Case:
    bad = _save(e.tmp / "domain.onnx", _small([helper.make_node("Frob", ["x"], ["y"], name="frob1",
                                                                domain="com.example.unknown")]))
    return Case(e.compile(bad), [str(bad), "'frob1'", "com.example.unknown"], [bad])


def _target_bad_key(e: Env) -> Case:
    toml = e.tmp / "mytarget.toml"
    toml.write_text('schema = 1\nname = "mine"\ndescription = "d"\nextends = "ort-cpu"\n\n'
                    '[quantization.weight]\nsymetric = true\n')
    return Case(e.compile(None, None, "--target", str(toml)), [str(toml), "quantization.weight.symetric"],
                [e.model, toml])


def _calib_wrong_name(e: Env) -> Case:
    bad = _npz(e.tmp / "wrong_name.npz", input_0=tiny_calibration()[TINY_INPUT])
    return Case(e.compile(None, bad), [str(bad), "'input_0'"], [e.model, bad])


def _calib_wrong_rank(e: Env) -> Case:
    bad = _npz(e.tmp / "wrong_rank.npz", x=np.zeros((2, 3, 8), np.float32))
    return Case(e.compile(None, bad), [str(bad), "'x'", "rank"], [e.model, bad])


def _calib_wrong_dtype(e: Env) -> Case:
    bad = _npz(e.tmp / "int64.npz", x=np.ones((2, 3, 8, 8), np.int64))
    return Case(e.compile(None, bad), [str(bad), "'x'", "int64", "float32"], [e.model, bad])


def _calib_nan(e: Env) -> Case:
    arr = tiny_calibration()[TINY_INPUT]
    arr[2, 1, 4, 4] = np.nan
    bad = _npz(e.tmp / "nan.npz", x=arr)
    return Case(e.compile(None, bad), [str(bad), "'x'", "NaN", "sample 2"], [e.model, bad])


def _missing_out_dir(e: Env) -> Case:
    out = e.tmp / "no_such_dir" / "q.onnx"
    args = ["compile", str(e.model), "-o", str(out), "--calibration", str(e.calib)]
    return Case(args, [str(out), "no_such_dir", "does not exist"], [e.model, e.calib], output=out)


def _missing_report_dir(e: Env) -> Case:
    report = e.tmp / "no_report_dir" / "r.json"
    return Case(e.compile(None, None, "--report", str(report)), [str(report), "no_report_dir"],
                [e.model, e.calib])


def _unknown_target(e: Env) -> Case:
    return Case(e.compile(None, None, "--target", "nosuch-target"), ["'nosuch-target'", "ort-cpu"],
                [e.model, e.calib])


def _unknown_pass(e: Env) -> Case:
    return Case(e.compile(None, None, "--pipeline", "canonicalize,fold-constnts"),
                ["'fold-constnts'", "did you mean 'fold-constants'"], [e.model, e.calib])


def _unknown_disabled_pass(e: Env) -> Case:
    return Case(e.compile(None, None, "--disable-pass", "fuse-conv-nb"), ["'fuse-conv-nb'"], [e.model, e.calib])


def _missing_calibration(e: Env) -> Case:
    return Case(["compile", str(e.model), "-o", str(e.out)], [str(e.model), "calibration"], [e.model])


def _overwrite_input(e: Env) -> Case:
    return Case(["compile", str(e.model), "-o", str(e.model), "--calibration", str(e.calib)],
                [str(e.model), "overwrite"], [e.model, e.calib], output=e.tmp / "never.onnx")


CASES: dict[str, Callable[[Env], Case]] = {
    "truncated-model": _truncated,
    "text-file": _text_file,
    "cycle": _cycle,
    "missing-initializer": _missing_initializer,
    "unknown-domain": _unknown_domain,
    "target-bad-key": _target_bad_key,
    "calib-wrong-input-name": _calib_wrong_name,
    "calib-wrong-rank": _calib_wrong_rank,
    "calib-wrong-dtype": _calib_wrong_dtype,
    "calib-nan": _calib_nan,
    "missing-output-dir": _missing_out_dir,
    "missing-report-dir": _missing_report_dir,
    "unknown-target": _unknown_target,
    "unknown-pass": _unknown_pass,
    "unknown-disabled-pass": _unknown_disabled_pass,
    "no-calibration": _missing_calibration,
    "output-is-input": _overwrite_input,
}


def _check_failure(case: Case, env: Env, rc: int, stderr: str, snapshots: dict[Path, bytes]) -> None:
    """The exit-2 contract, shared by the in-process and subprocess runs."""
    assert rc == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qcompiler: error: ")
    for fragment in case.expect:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in stderr
    out = case.output or env.out
    assert not out.exists()
    assert list(env.out_dir.iterdir()) == []  # no temp or partial files either
    for path, data in snapshots.items():
        assert path.read_bytes() == data, f"{path} was modified"


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_exit_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each user mistake: exit 2, one stderr line naming the culprit, no output, inputs untouched."""
    env = Env(tmp_path)
    case = CASES[name](env)
    snapshots = {p: p.read_bytes() for p in case.inputs + [env.model, env.calib]}
    rc = main(case.args)
    captured = capsys.readouterr()
    _check_failure(case, env, rc, captured.err, snapshots)
    assert captured.out == ""


@pytest.mark.parametrize("name", ["missing-initializer", "calib-nan"])
def test_user_error_exit_2_subprocess(name: str, tmp_path: Path) -> None:
    """The real process exit code and stderr, via ``python -m qcompiler.cli``."""
    env = Env(tmp_path)
    case = CASES[name](env)
    snapshots = {p: p.read_bytes() for p in case.inputs + [env.model, env.calib]}
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *case.args], capture_output=True,
                          text=True, timeout=60)
    _check_failure(case, env, proc.returncode, proc.stderr, snapshots)


def test_verbose_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-v adds the traceback for a user error but keeps exit code 2 and the error line."""
    env = Env(tmp_path)
    case = _missing_initializer(env)
    rc = main(case.args + ["-v"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("qcompiler: error: ")
    assert not env.out.exists()


def test_internal_error_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashing plugin pass is an internal error: exit 1, naming the pass, no output."""
    env = Env(tmp_path)
    plugin = tmp_path / "crash_plugin.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from qcompiler import Pass, PassResult\n\n\n"
        "@dataclass(frozen=True)\n"
        "class Crash(Pass):\n"
        "    \"\"\"Always fails.\"\"\"\n\n"
        "    name = \"crash-now\"\n\n"
        "    def run(self, model, ctx):\n"
        "        raise ZeroDivisionError('oops')\n")
    # a fresh default registry (restored afterwards) keeps the plugin out of other tests
    monkeypatch.setattr(reg_mod, "_default", None)
    rc = main(["compile", str(env.model), "-o", str(env.out), "--plugin", str(plugin),
               "--pipeline", "canonicalize,crash-now"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompiler: internal error:")
    assert "'crash-now'" in lines[0] and "canonicalize" in lines[0] and "Traceback" not in err
    assert not env.out.exists()


# -- successful compiles ---------------------------------------------------------------------

def _session(path: Path, *, as_written: bool = False) -> ort.InferenceSession:
    """``as_written``: run DQ -> op -> Q without onnxruntime's fusion into its int8 CPU kernels,
    which saturate on x86 without VNNI for weights not made for that CPU (see qcompiler.host)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if as_written:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _signature(proto: onnx.ModelProto) -> list[tuple[str, int, list[int]]]:
    """(name, elem_type, dims) of each graph input and output."""
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(proto.graph.input) + list(proto.graph.output)]


@pytest.mark.parametrize("target, fmt, integer_op", [("ort-cpu", "qoperator", "QLinearConv"),
                                                     ("tensorrt", "qdq", "QuantizeLinear")])
def test_compile_success_with_report(target: str, fmt: str, integer_op: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A full compile: valid report, checker-clean output that runs, same I/O signature, and
    outputs within 0.1 (absolute, outputs are O(1)) of the float model on calibration samples.
    CPU fact pinned: none - the tensorrt output (GPU weights) runs as written in onnxruntime,
    the ort-cpu output in its own kernels, exact on every x86 CPU (pair_sum_max weights)."""
    env = Env(tmp_path)
    report_path = tmp_path / "report.json"
    rc = main(["compile", str(env.model), "-o", str(env.out), "--calibration", str(env.calib),
               "--target", target, "--report", str(report_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.startswith("qcompiler: ") and target in err  # the one-line summary

    report = json.loads(report_path.read_text())
    for key in ("target", "mode", "format", "passes", "ops_before", "ops_after", "lowered", "float_nodes",
                "size_bytes", "qcompiler_version"):
        assert key in report, key
    assert (report["target"], report["mode"], report["format"]) == (target, "static", fmt)
    assert report["qcompiler_version"] == qcompiler.__version__
    pipeline = [s.split("{")[0] for s in qcompiler.load_target(target).pipeline("static").split(",")]
    assert [p["name"] for p in report["passes"]] == pipeline
    for p in report["passes"]:
        assert isinstance(p["seconds"], float | int) and p["seconds"] >= 0
        assert isinstance(p["modified"], bool)
    assert any(p["modified"] for p in report["passes"] if p["name"] == "insert-qdq")
    assert report["ops_before"] == {"Add": 1, "Conv": 2, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1,
                                    "Relu": 1}
    assert "conv1" in report["lowered"] and "gemm" in report["lowered"]
    assert isinstance(report["float_nodes"], dict)
    assert report["size_bytes"] == {"input": env.model.stat().st_size, "output": env.out.stat().st_size}

    out = onnx.load(str(env.out))
    onnx.checker.check_model(out, full_check=True)
    ops_after: dict[str, int] = {}
    for node in out.graph.node:
        ops_after[node.op_type] = ops_after.get(node.op_type, 0) + 1
    assert report["ops_after"] == ops_after
    assert integer_op in ops_after
    assert _signature(out) == _signature(tiny_model())
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["qcompiler.version"] == qcompiler.__version__ and meta["qcompiler.target"] == target

    float_sess, q_sess = _session(env.model), _session(env.out, as_written=target != "ort-cpu")
    assert [(i.name, i.type, i.shape) for i in q_sess.get_inputs()] == \
        [(i.name, i.type, i.shape) for i in float_sess.get_inputs()]
    assert [(o.name, o.type, o.shape) for o in q_sess.get_outputs()] == \
        [(o.name, o.type, o.shape) for o in float_sess.get_outputs()]
    for sample in tiny_calibration()[TINY_INPUT]:
        feed = {TINY_INPUT: sample[None]}
        (want,) = float_sess.run(None, feed)
        (got,) = q_sess.run(None, feed)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=0.1, rtol=0)


def test_compile_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Compiling the same inputs twice gives byte-identical models."""
    env = Env(tmp_path)
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert main(["compile", str(env.model), "-o", str(out), "--calibration", str(env.calib), "-q"]) == 0
    assert capsys.readouterr().err == ""  # -q: nothing printed on success
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_compile_leaves_inputs_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A successful compile doesn't modify the model or calibration files."""
    env = Env(tmp_path)
    before = (env.model.read_bytes(), env.calib.read_bytes())
    assert main(["compile", str(env.model), "-o", str(env.out), "--calibration", str(env.calib), "-q"]) == 0
    assert (env.model.read_bytes(), env.calib.read_bytes()) == before
    assert [p.name for p in env.out_dir.iterdir()] == ["q.onnx"]


# -- listing and inspection ----------------------------------------------------------------

def test_passes_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    """``qcompiler passes`` lists every built-in with its summary and options."""
    assert main(["passes", "--target", "ort-cpu"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(("ort-cpu", " "))}
    assert set(BUILTIN_PASSES) <= listed
    insert = next(line for line in out.splitlines() if line.startswith("insert-qdq "))
    assert "per-channel: bool = True" in insert
    assert f"ort-cpu static pipeline:  {qcompiler.load_target('ort-cpu').pipeline('static')}" in out


def test_passes_with_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``qcompiler passes --plugin FILE`` adds the plugin's pass to the listing."""
    monkeypatch.setattr(reg_mod, "_default", None)  # a fresh default registry, restored afterwards
    plugin = tmp_path / "listplug.py"
    plugin.write_text("from dataclasses import dataclass\nfrom qcompiler import Pass, PassResult\n\n\n"
                      "@dataclass(frozen=True)\nclass Hello(Pass):\n    \"\"\"Say hello. Nothing else.\"\"\"\n\n"
                      "    name = \"say-hello\"\n    loud: bool = False\n\n"
                      "    def run(self, model, ctx):\n        return PassResult(False)\n")
    assert main(["passes", "--plugin", str(plugin)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("say-hello "))
    assert "Say hello." in line and "loud: bool = False" in line


def test_inspect_prints_histogram_and_float_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect shows the op histogram, integer nodes with kernels, and why others stay float."""
    env = Env(tmp_path)
    assert main(["inspect", str(env.model), "--target", "tensorrt"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["Conv", "2"] in lines and ["Gemm", "1"] in lines and ["Relu", "1"] in lines
    float_lines = [line for line in out.splitlines() if line.startswith("  relu1:")]
    assert len(float_lines) == 1 and "float" in float_lines[0] and "tensorrt" in float_lines[0]

    assert main(["inspect", str(env.model), "--target", "ort-cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"] == {"Add": 1, "Conv": 2, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 1}
    assert info["lowered"]["conv1"] == "QLinearConv"
    assert info["lowered"]["relu1"] == "fused into 'conv1'"
    assert info["float_nodes"] == {}
    assert env.model.read_bytes() == _save(tmp_path / "fresh.onnx", tiny_model()).read_bytes()


def test_inspect_bad_model_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect follows the same error contract as compile."""
    bad = _save(tmp_path / "m.onnx", _small([helper.make_node("Add", ["x", "nowhere"], ["y"], name="a1")]))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "'nowhere'" in err[0]


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == qcompiler.__version__


def test_closed_stdout_is_not_an_internal_error() -> None:
    """`qcompiler passes | head -0`: the reader is gone before anything is written; that is
    not an internal error (no message, no traceback) and exits like SIGPIPE would."""
    proc = subprocess.Popen([sys.executable, "-m", "qcompiler.cli", "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader exits at once: every write fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert "internal error" not in err.decode() and "Traceback" not in err.decode()
    assert proc.returncode == 141
