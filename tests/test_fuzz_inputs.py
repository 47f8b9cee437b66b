"""Property-based fuzz (Hypothesis) of the model loader and the target TOML parser.

Fixed seed (``derandomize=True``) and a bounded budget: the same examples every run. The
property is the CLI contract in API form: any bytes either load or raise UserError - never
another exception.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from badinputs import conv_model, mlp  # noqa: E402
from qcompiler import UserError, load_model, load_target  # noqa: E402

_SETTINGS = settings(derandomize=True, max_examples=100, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
_SEEDS = [conv_model().SerializeToString(), mlp().SerializeToString()]


@st.composite
def _damaged_model(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@_SETTINGS
@given(_damaged_model())
def test_loader_accepts_or_refuses_damaged_models(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(data)
        try:
            load_model(path)
        except UserError as exc:
            assert "\n" not in str(exc)
        assert path.read_bytes() == data


_KEYS = ["schema", "name", "description", "extends", "defaults.format", "defaults.mode", "defaults.min_opset",
         "quantization.activation.bits", "quantization.activation.dtype", "quantization.weight.granularity",
         "quantization.weight.block_size", "quantization.weight.range", "fixed_qparams.Sigmoid.scale",
         "fixed_qparams.Sigmoid.zero_point", "ops.Conv.inputs", "ops.Conv.kernel", "arithmetic.rounding"]
_VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=12), st.sampled_from(['"ort-cpu"', '"ort-cpu-qdq"', '"x.toml"', '"/etc/passwd"']),
                    st.lists(st.integers(-300, 300), max_size=3))


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return v if v.startswith('"') else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


@_SETTINGS
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8), st.booleans())
def test_target_parser_accepts_or_refuses(entries: dict[str, object], base: bool) -> None:
    lines = ['name = "fz"', 'description = "fuzz"'] + (['extends = "ort-cpu-qdq"'] if base else [])
    tables: dict[str, list[str]] = {}
    for key, value in entries.items():
        table, _, leaf = key.rpartition(".")
        tables.setdefault(table, []).append(f"{leaf} = {_toml_value(value)}")
    text = "\n".join(lines + tables.pop("", [])) + "\n"
    text += "".join(f"\n[{t}]\n" + "\n".join(body) + "\n" for t, body in tables.items())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.toml"
        path.write_text(text)
        try:
            load_target(path)
        except UserError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"a = [" * 3000, b"name = 'x'\n" * 2])
def test_target_parser_on_raw_bytes(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(raw)
    with pytest.raises(UserError):
        load_target(path)
