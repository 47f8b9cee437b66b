"""``--print-ir-after PASS``: large constants print as type, shape and a digest of their values
(small ones in full), and an unknown pass name is exit 2 with a suggestion, like --stop-after."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import qcompiler
from conftest import init, make_model, tensor_info, tiny_calibration, tiny_model
from qcompiler.cli import main
from qcompiler.pass_manager import ELIDE_ELEMENTS


def _files(tmp: Path) -> tuple[Path, Path]:
    model, calib = tmp / "m.onnx", tmp / "c.npz"
    model.write_bytes(tiny_model().SerializeToString())
    np.savez(calib, **tiny_calibration(4))
    return model, calib


def test_large_constants_are_elided_with_shape_dtype_and_digest() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((8, 16)).astype(np.float32)  # 128 elements > ELIDE_ELEMENTS
    edge = np.arange(ELIDE_ELEMENTS, dtype=np.float32).reshape(8, 8)  # exactly the limit: printed in full
    const = helper.make_node("Constant", [], ["k"], name="k",
                             value=helper.make_tensor("kv", TensorProto.FLOAT, [100], np.ones(100) * 0.5))
    proto = make_model([helper.make_node("MatMul", ["x", "e"], ["h"], name="mm0"),
                        helper.make_node("MatMul", ["h", "w"], ["y0"], name="mm1"), const,
                        helper.make_node("ReduceSum", ["k"], ["ks"], name="sum", keepdims=0),
                        helper.make_node("Add", ["y0", "ks"], ["y"], name="add")],
                       [tensor_info("x", [1, 8])], [tensor_info("y", [1, 16])], [init("w", big), init("e", edge)])
    text = qcompiler.load_model(proto).graph.to_text(elide_above=ELIDE_ELEMENTS)
    digest = hashlib.sha256(big.tobytes()).hexdigest()[:12]
    assert f'float[8,16] w = ["elided": "128 elements", "sha256": "{digest}"]' in text
    half = hashlib.sha256(np.full(100, 0.5, np.float32).tobytes()).hexdigest()[:12]
    assert f'"elided": "100 elements", "sha256": "{half}"' in text  # the Constant node's value too
    assert "{0,1,2,3," in text and ",63}" in text  # the one at the limit whole
    full = qcompiler.load_model(proto).graph.to_text()  # the default keeps every value (golden tests)
    assert "elided" not in full


def test_print_ir_after_is_short_and_names_the_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, calib = _files(tmp_path)
    assert main(["compile", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib),
                 "--print-ir-after", "insert-qdq", "-q"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("// ----- IR after insert-qdq -----\n")
    assert err.count("// ----- IR after") == 1
    assert re.search(r'int8\[4,4,3,3\] w2_quantized = \["elided": "144 elements", "sha256": "[0-9a-f]{12}"\]', err)


@pytest.mark.parametrize("flag,name,suggestion", [("--print-ir-after", "insert-qd", "insert-qdq"),
                                                  ("--print-ir-after", "calibrat", "calibrate"),
                                                  ("--stop-after", "fold-constant", "fold-constants")])
def test_unknown_pass_name_is_exit_2_with_a_suggestion(flag: str, name: str, suggestion: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, calib = _files(tmp_path)
    out = tmp_path / "q.onnx"
    assert main(["compile", str(model), "-o", str(out), "--calibration", str(calib), flag, name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {name}" in err[0] and f"did you mean '{suggestion}'?" in err[0], err
    assert not out.exists()
