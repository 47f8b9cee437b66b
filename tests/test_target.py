"""Targets as TOML data: built-ins, schema errors citing file and key, ``extends``, and
``targets --show`` producing TOML that reads back to the same data.

A target file is user input: every mistake in it must be a UserError that names the file and
the dotted key, so the user can find the line to fix.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qcompiler import UserError, builtin_targets, load_target
from qcompiler.cli import main

MINIMAL = 'schema = 1\nname = "{name}"\ndescription = "test target"\n'


def _write(tmp_path: Path, filename: str, text: str) -> Path:
    path = tmp_path / filename
    path.write_text(text)
    return path


def _user_error(spec: str | Path) -> str:
    with pytest.raises(UserError) as err:
        load_target(spec)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- built-ins ---------------------------------------------------------------------------------

def test_builtin_targets_are_listed() -> None:
    """Both shipped targets are found as package data."""
    found = builtin_targets()
    assert {"ort-cpu", "tensorrt"} <= set(found)
    assert all(p.suffix == ".toml" and p.is_file() for p in found.values())


def test_ort_cpu_loads_with_expected_rules() -> None:
    """ort-cpu: u8 asymmetric activations, s8 symmetric per-channel weights in [-127, 127] with a pair-sum limit of 128 (depthwise: none), QOperator."""
    t = load_target("ort-cpu")
    assert t.name == "ort-cpu" and t.default_format == "qoperator" and t.default_mode == "auto"
    act = t.activation_rule()
    assert (act.dtype, act.symmetric, act.per_channel) == ("uint8", False, False)
    assert (act.qtype.qmin, act.qtype.qmax) == (0, 255)
    conv = t.op("Conv")
    assert conv is not None and conv.kernel == "QLinearConv" and conv.kernel_domain == ""
    assert conv.inputs == ("activation", "weight", "bias")
    assert (conv.weight.dtype, conv.weight.symmetric, conv.weight.per_channel) == ("int8", True, True)
    assert (conv.weight.qtype.qmin, conv.weight.qtype.qmax, conv.weight.qtype.pair_sum_max) == (-127, 127, 128)
    assert conv.variants["depthwise"].weight.qtype.pair_sum_max == 0
    gemm = t.op("Gemm")
    assert gemm.kernel_domain == "com.microsoft" and gemm.kernel_op == "QGemm"
    assert t.fused_with("Conv", "Relu") and not t.fused_with("Relu", "Conv")
    assert "Reshape" in t.passthrough
    assert t.fixed["Sigmoid"] == (0.00390625, 0)
    assert t.op("MatMul", mode="dynamic").kernel == "MatMulInteger"
    assert t.pipeline("static").split(",")[-5:] == ["cleanup-qdq", "convert-float16", "compress-weights",
                                                   "guard-float-convs", "compact-qparams"]


def test_tensorrt_loads_with_expected_rules() -> None:
    """tensorrt: symmetric narrow int8 activations, float op outputs, QDQ format."""
    t = load_target("tensorrt")
    assert t.name == "tensorrt" and t.default_format == "qdq"
    act = t.activation_rule()
    assert (act.dtype, act.symmetric) == ("int8", True)
    assert (act.qtype.qmin, act.qtype.qmax) == (-127, 127)
    conv = t.op("Conv")
    assert conv.kernel is None and conv.output_quantized is False
    assert conv.bias.dtype == "float" and conv.bias.qtype is None
    assert t.op("Softmax") is None


def test_load_by_path_equals_builtin() -> None:
    """A built-in loaded by path is the same target."""
    path = builtin_targets()["ort-cpu"]
    assert load_target(str(path)).data == load_target("ort-cpu").data


# -- errors ------------------------------------------------------------------------------------

def test_unknown_target_name_suggests() -> None:
    """A typo in a built-in name gets a suggestion and the list of built-ins."""
    msg = _user_error("ort-cpo")
    assert "'ort-cpo'" in msg and "did you mean 'ort-cpu'" in msg and "tensorrt" in msg


def test_missing_target_file() -> None:
    """A .toml path that doesn't exist is named."""
    msg = _user_error("/nonexistent/dir/t.toml")
    assert "/nonexistent/dir/t.toml" in msg


def test_unknown_key_cites_file_and_dotted_key(tmp_path: Path) -> None:
    """A misspelled nested key is reported with its full dotted path and a suggestion."""
    path = _write(tmp_path, "t.toml", MINIMAL.format(name="t") + '[quantization.activation]\ndtyp = "int8"\n')
    msg = _user_error(path)
    assert str(path) in msg
    assert "'quantization.activation.dtyp'" in msg and "did you mean 'dtype'" in msg


def test_unknown_key_inside_op_table(tmp_path: Path) -> None:
    """Keys under ops.<Op> are checked too, with the op in the dotted key."""
    path = _write(tmp_path, "t.toml", MINIMAL.format(name="t") + '[ops.Conv]\nkernal = "QLinearConv"\n')
    msg = _user_error(path)
    assert str(path) in msg and "'ops.Conv.kernal'" in msg


@pytest.mark.parametrize("body, key, want", [
    ('[defaults]\nquantize_graph_outputs = "yes"\n', "defaults.quantize_graph_outputs", "bool"),
    ("[defaults]\nmin_opset = 13.5\n", "defaults.min_opset", "int"),
    ("[defaults]\nmin_opset = true\n", "defaults.min_opset", "int"),
    ("[ops.Conv]\nkernel = 5\n", "ops.Conv.kernel", "str"),
    ('ops = "Conv"\n', "ops", "table"),
    ('[quantization.weight]\nblock_size = "32"\n', "quantization.weight.block_size", "int"),
    ('[quantization.activation]\nencoding_max = "6"\n', "quantization.activation.encoding_max", "float"),
    ("[arithmetic]\nmultiplier_bits = 31.5\n", "arithmetic.multiplier_bits", "int"),
    ('[ops.MatMul]\nexclude_when = "gemv"\n', "ops.MatMul.exclude_when", "list"),
])
def test_wrong_type_cites_key(tmp_path: Path, body: str, key: str, want: str) -> None:
    """A value of the wrong type names the key and the expected type."""
    text = MINIMAL.format(name="t")
    path = _write(tmp_path, "t.toml", (body + text) if not body.startswith("[") else (text + body))
    msg = _user_error(path)
    assert str(path) in msg and f"'{key}'" in msg and want in msg


@pytest.mark.parametrize("body, key", [
    ('[quantization.weight]\ngranularity = "per-row"\n', "quantization.weight.granularity"),
    ('[quantization.activation]\ndtype = "int3"\n', "quantization.activation.dtype"),
    ('[arithmetic]\nrounding = "half-down"\n', "arithmetic.rounding"),
    ('[arithmetic]\nrequantize = "double"\n', "arithmetic.requantize"),
    ('[defaults]\nfloat_precision = "bf16"\n', "defaults.float_precision"),
    ('[defaults]\nformat = "qlinear"\n', "defaults.format"),
    ('[ops.Conv]\noutput = "int8"\n', "ops.Conv.output"),
])
def test_bad_enum_value_cites_key_and_choices(tmp_path: Path, body: str, key: str) -> None:
    """An enum value outside its choices names the key, the value and the allowed values."""
    path = _write(tmp_path, "t.toml", MINIMAL.format(name="t") + body)
    msg = _user_error(path)
    assert str(path) in msg and f"'{key}'" in msg and "must be one of" in msg


def test_bad_role_and_range(tmp_path: Path) -> None:
    """Semantic checks beyond types also cite the key."""
    path = _write(tmp_path, "r.toml", MINIMAL.format(name="r") + '[ops.Conv]\ninputs = ["activation", "wieght"]\n')
    msg = _user_error(path)
    assert "'ops.Conv.inputs'" in msg and "wieght" in msg
    path = _write(tmp_path, "q.toml", MINIMAL.format(name="q") +
                  '[quantization.weight]\ndtype = "int8"\nrange = [-200, 64]\n')
    msg = _user_error(path)
    assert "'quantization.weight.range'" in msg


@pytest.mark.parametrize("body, key, words", [
    ('[ops.MatMul]\nexclude_when = ["gemm"]\n', "ops.MatMul.exclude_when", "node facts are depthwise, gemv"),
    ('[ops.Concat]\nother_inputs = "activations"\n', "ops.Concat.other_inputs", "must be one of activation"),
    ('[quantization.weight]\ndtype = "int4"\nblock_size = 32\n', "quantization.weight.block_size", "needs granularity"),
    ('[quantization.weight]\ndtype = "int4"\ngranularity = "blocked"\n', "quantization.weight.block_size",
     "positive int"),
    ('[quantization.activation]\ndtype = "uint8"\nencoding_min = 0.5\n', "quantization.activation.encoding_min",
     "min <= 0 <= max"),
])
def test_semantic_errors_of_v1_keys(tmp_path: Path, body: str, key: str, words: str) -> None:
    """New schema-v1 keys are checked beyond their type, and the error cites file and key."""
    path = _write(tmp_path, "v.toml", MINIMAL.format(name="v") + body)
    msg = _user_error(path)
    assert str(path) in msg and f"'{key}'" in msg and words in msg


def test_v1_keys_resolve(tmp_path: Path) -> None:
    """int4/uint16 dtypes, blocked weights, encoding ranges, node facts, other_inputs and the
    [arithmetic] table resolve to what the accessors report (defaults filled in)."""
    path = _write(tmp_path, "v.toml", MINIMAL.format(name="v") + """
[arithmetic]
requantize = "fixed-point"
rounding = "half-away"
[quantization.activation]
dtype = "uint16"
encoding_min = -8.0
encoding_max = 8.0
[quantization.weight]
dtype = "int4"
symmetric = true
granularity = "blocked"
block_size = 32
[ops.MatMul]
inputs = ["activation", "weight"]
exclude_when = ["gemv"]
[ops.Concat]
other_inputs = "activation"
""")
    t = load_target(path)
    assert (t.arithmetic.requantize, t.arithmetic.rounding, t.arithmetic.multiplier_bits,
            t.arithmetic.accumulator_bits) == ("fixed-point", "half-away", 31, 32)
    mm = t.op("MatMul")
    assert mm.exclude_when == ("gemv",) and mm.role(5) == "float"
    assert (mm.weight.qtype.qmin, mm.weight.qtype.qmax, mm.weight.block_size, mm.weight.blocked) == (-8, 7, 32, True)
    assert mm.weight.min_opset == 21 and mm.activation.min_opset == 21
    assert (mm.activation.qtype.qmin, mm.activation.qtype.qmax) == (0, 65535)
    assert mm.activation.clamp(-20.0, 3.0) == (-8.0, 3.0)
    assert t.op("Concat").role(3) == "activation"
    assert load_target("ort-cpu").op("Conv").weight.min_opset == 10


def test_new_builtin_targets_load() -> None:
    """ort-cpu-qdq, npu-int8 and dsp-a16w8 resolve to the rules their README section states."""
    qdq, cpu = load_target("ort-cpu-qdq"), load_target("ort-cpu")
    assert qdq.default_format == "qdq" and qdq.data["extends"] == "ort-cpu"
    assert qdq.op("Conv").weight == cpu.op("Conv").weight and qdq.op("Conv").weight.qtype.pair_sum_max == 128
    assert "lower-qoperator" not in qdq.pipeline("static")
    npu = load_target("npu-int8")
    for rule in (npu.activation_rule(), npu.op("Conv").weight):
        assert rule.dtype == "int8" and rule.symmetric and not rule.per_channel and rule.qtype.power_of_two
    assert npu.op("Sigmoid") is None and npu.op("Concat").other_inputs == "activation"
    assert {"Reshape", "MaxPool", "Resize"} == set(npu.passthrough)
    assert npu.arithmetic.requantize == "fixed-point"
    dsp = load_target("dsp-a16w8")
    assert dsp.activation_rule().dtype == "uint16" and dsp.op("Conv").weight.dtype == "int8"
    assert dsp.op("Conv").bias.dtype == "int32" and dsp.min_opset == 21
    assert dsp.fixed["Softmax"] == (2.0 ** -16, 0) and dsp.fixed["Sigmoid"] == (2.0 ** -16, 0)
    trt = load_target("tensorrt")
    assert trt.op("MatMul").exclude_when == ("gemv",) and trt.op("Add").exclude_when == ("constant-input",)
    assert trt.op("Softmax") is None and trt.op("LayerNormalization") is None


def test_missing_required_key_and_bad_toml(tmp_path: Path) -> None:
    """No name, or a file that isn't TOML, is reported with the file."""
    path = _write(tmp_path, "n.toml", 'description = "no name"\n')
    assert "'name'" in _user_error(path)
    path = _write(tmp_path, "b.toml", "name = \n")
    msg = _user_error(path)
    assert str(path) in msg and "TOML" in msg


def test_unsupported_schema_version(tmp_path: Path) -> None:
    """A future schema version is refused, naming the key."""
    path = _write(tmp_path, "s.toml", MINIMAL.format(name="s").replace("schema = 1", "schema = 99"))
    assert "'schema'" in _user_error(path)


# -- extends -----------------------------------------------------------------------------------

def test_extends_builtin_overrides_one_key(tmp_path: Path) -> None:
    """A child that changes only the activation dtype inherits everything else from ort-cpu."""
    path = _write(tmp_path, "child.toml", 'schema = 1\nname = "child"\ndescription = "int8 acts"\n'
                  'extends = "ort-cpu"\n\n[quantization.activation]\ndtype = "int8"\n')
    child, parent = load_target(path), load_target("ort-cpu")
    assert child.name == "child" and child.description == "int8 acts"
    act = child.activation_rule()
    assert act.dtype == "int8" and act.symmetric is False and act.per_channel is False  # rest inherited
    assert (act.qtype.qmin, act.qtype.qmax) == (-128, 127)
    assert child.op("Conv").kernel == "QLinearConv"
    assert child.op("Conv").activation.dtype == "int8"  # op rules see the override
    assert child.op("Conv").weight == parent.op("Conv").weight
    assert child.pipeline("static") == parent.pipeline("static")
    assert child.data["extends"] == "ort-cpu"
    expected = dict(parent.data, name="child", description="int8 acts", extends="ort-cpu")
    expected["quantization"] = dict(parent.data["quantization"],
                                    activation=dict(parent.data["quantization"]["activation"], dtype="int8"))
    assert child.data == expected


def test_extends_sibling_file(tmp_path: Path) -> None:
    """``extends`` can name a sibling .toml file by stem."""
    _write(tmp_path, "base.toml", MINIMAL.format(name="base") + '[defaults]\nformat = "qdq"\nmin_opset = 15\n')
    path = _write(tmp_path, "leaf.toml", MINIMAL.format(name="leaf") + 'extends = "base"\n'
                  "[defaults]\nmin_opset = 17\n")
    t = load_target(path)
    assert (t.name, t.default_format, t.min_opset) == ("leaf", "qdq", 17)


def test_extends_cycle(tmp_path: Path) -> None:
    """a extends b extends a is a UserError, not endless recursion."""
    _write(tmp_path, "a.toml", MINIMAL.format(name="a") + 'extends = "b"\n')
    path_b = _write(tmp_path, "b.toml", MINIMAL.format(name="b") + 'extends = "a"\n')
    msg = _user_error(tmp_path / "a.toml")
    assert "cycle" in msg and "'extends'" in msg
    assert "cycle" in _user_error(path_b)


def test_extends_cycle_when_names_differ_from_files(tmp_path: Path) -> None:
    """The cycle is found even when the targets' names differ from their file names."""
    _write(tmp_path, "a.toml", MINIMAL.format(name="alpha") + 'extends = "b"\n')
    _write(tmp_path, "b.toml", MINIMAL.format(name="beta") + 'extends = "a"\n')
    assert "cycle" in _user_error(tmp_path / "a.toml")


def test_extends_self(tmp_path: Path) -> None:
    """A target extending itself is a cycle."""
    path = _write(tmp_path, "me.toml", MINIMAL.format(name="me") + 'extends = "me"\n')
    assert "cycle" in _user_error(path)


def test_extends_unknown_parent(tmp_path: Path) -> None:
    """An unknown parent is reported against the child file's 'extends' key."""
    path = _write(tmp_path, "c.toml", MINIMAL.format(name="c") + 'extends = "no-such-target"\n')
    msg = _user_error(path)
    assert str(path) in msg and "'extends'" in msg and "no-such-target" in msg


def test_extends_error_in_override_cites_child(tmp_path: Path) -> None:
    """A bad key in the child is blamed on the child file, even with a valid parent."""
    path = _write(tmp_path, "c.toml", MINIMAL.format(name="c") + 'extends = "tensorrt"\n'
                  "[quantization.activation]\nsymmetric = 1\n")
    msg = _user_error(path)
    assert str(path) in msg and "'quantization.activation.symmetric'" in msg


# -- targets --show ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ort-cpu", "tensorrt", "npu-int8", "dsp-a16w8", "ort-cpu-qdq"])
def test_show_parses_back_to_same_data(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``qcompiler targets --show NAME`` prints TOML that tomllib reads back to the target's data
    (for a target that extends another, the merged data: the file holds only the changes)."""
    assert main(["targets", "--show", name]) == 0
    shown = capsys.readouterr().out
    with open(builtin_targets()[name], "rb") as fh:
        on_disk = tomllib.load(fh)
    assert tomllib.loads(shown) == load_target(name).data
    if "extends" not in on_disk:
        assert on_disk == load_target(name).data
    else:
        assert tomllib.loads(shown)["defaults"]["format"] == on_disk["defaults"]["format"]
        inherited = {op: dict(t) for op, t in load_target(on_disk["extends"]).data["ops"].items()}
        for op, t in on_disk.get("ops", {}).items():  # the file's own keys win, op by op
            inherited[op] = {**inherited.get(op, {}), **t}
        assert tomllib.loads(shown)["ops"] == inherited


def test_show_resolves_extends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--show prints the merged target; loading that text again gives the same target data."""
    path = _write(tmp_path, "child.toml", MINIMAL.format(name="child") + 'extends = "tensorrt"\n'
                  '[defaults]\nformat = "qoperator"\n')
    assert main(["targets", "--show", str(path)]) == 0
    shown = capsys.readouterr().out
    data = tomllib.loads(shown)
    assert data == load_target(path).data
    assert data["defaults"]["format"] == "qoperator" and data["ops"]["Conv"]["output"] == "float"
    again = _write(tmp_path, "again.toml", shown.replace('extends = "tensorrt"\n', ""))
    reloaded = load_target(again).data
    assert reloaded == {k: v for k, v in data.items() if k != "extends"}


def test_targets_command_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    """``qcompiler targets`` prints one line per built-in with its description."""
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(builtin_targets())
    assert any(line.startswith("ort-cpu") and "onnxruntime" in line for line in lines)


def test_show_unknown_target_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--show of an unknown target is a one-line user error."""
    assert main(["targets", "--show", "nope-target"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope-target" in err[0]


def test_auto_mode_chooses_dynamic_for_transformer_graphs() -> None:
    """ort-cpu's mode = "auto": a graph with MatMul, LayerNormalization and Softmax and no Conv
    is dynamic; a Conv anywhere, or a missing op of auto_dynamic_ops, keeps static."""
    t = load_target("ort-cpu")
    assert t.choose_mode({"MatMul", "LayerNormalization", "Softmax", "Add"})[0] == "dynamic"
    assert t.choose_mode({"MatMul", "LayerNormalization", "Softmax", "Conv"})[0] == "static"
    assert t.choose_mode({"MatMul", "Softmax"})[0] == "static"
    assert load_target("ort-cpu-qdq").default_mode == "static"


def test_auto_mode_in_compile() -> None:
    """compile() without mode on ort-cpu: a LayerNorm -> MatMul -> Softmax graph compiles in
    dynamic mode (MatMulInteger, no calibration needed) and the report says why; with an
    explicit pipeline auto stays static."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import qcompiler

    w = numpy_helper.from_array(np.random.default_rng(0).uniform(-1, 1, (64, 64)).astype(np.float32), "w")
    g, b = (numpy_helper.from_array(np.full(64, v, np.float32), n) for n, v in (("g", 1.0), ("b", 0.0)))
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], [w, g, b])
    proto = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    result = qcompiler.compile(proto, target="ort-cpu")
    assert result.report["mode"] == "dynamic" and "auto" in result.report["mode_reason"]
    assert "MatMulInteger" in result.report["ops_after"]
    static = qcompiler.compile(proto, target="ort-cpu", calibration="random:2",
                               pipeline=qcompiler.load_target("ort-cpu").pipeline("static"))
    assert static.report["mode"] == "static"
