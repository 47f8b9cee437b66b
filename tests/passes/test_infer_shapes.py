"""infer-shapes: onnx's inferred dtypes/shapes land on the IR's intermediate values (quantization
reads dtypes, folding reads static shapes); what stays unknown is recorded, the public signature
is never rewritten."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from _util import assert_same_outputs, init, make_model, modified, rand, run_pass, tensor


def _conv_model(x_shape: list[int | str], y_shape: list[int | str]) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> MatMul -> Cast(int32): float and integer intermediates."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "fc"], ["m"], name="mm"),
        helper.make_node("Cast", ["m"], ["y"], name="cast", to=TensorProto.INT32),
    ]
    return make_model(nodes, [tensor("x", x_shape)], [tensor("y", y_shape, TensorProto.INT32)],
                      [init("w", rand([3, 2, 3, 3], seed=1)), init("fc", rand([48, 5], seed=2))])


def test_intermediate_values_get_dtype_and_shape() -> None:
    """Every intermediate (c, r, f, m) gets float32 and its static shape; the model still runs."""
    proto = _conv_model([1, 2, 4, 4], [1, 5])
    model, ctx, pm = run_pass(proto, "infer-shapes")
    assert modified(pm)
    values = model.graph.values()
    assert {k: (np.dtype(values[k].dtype), values[k].shape) for k in ("c", "r", "f", "m")} == {
        "c": (np.dtype(np.float32), [1, 3, 4, 4]),
        "r": (np.dtype(np.float32), [1, 3, 4, 4]),
        "f": (np.dtype(np.float32), [1, 48]),
        "m": (np.dtype(np.float32), [1, 5]),
    }
    assert ctx.analysis["unknown_shapes"] == []
    # the annotations are exported as value_info
    vi = {v.name: v for v in model.to_proto().graph.value_info}
    assert [d.dim_value for d in vi["f"].type.tensor_type.shape.dim] == [1, 48]
    x = rand([1, 2, 4, 4], seed=3) * 10
    assert_same_outputs(proto, model, {"x": x}, exact=True)


def test_symbolic_dims_kept_as_names() -> None:
    """A symbolic batch 'N' propagates by name, not as 0 or None."""
    model, _, pm = run_pass(_conv_model(["N", 2, 4, 4], ["N", 5]), "infer-shapes")
    assert modified(pm)
    values = model.graph.values()
    assert values["c"].shape == ["N", 3, 4, 4]
    assert values["f"].shape == ["N", 48]
    assert values["m"].shape == ["N", 5]
    vi = {v.name: v for v in model.to_proto().graph.value_info}
    assert vi["m"].type.tensor_type.shape.dim[0].dim_param == "N"


def test_integer_intermediates_get_integer_dtypes() -> None:
    """Shape arithmetic is int64, so quantization will not touch it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["d0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d0", "ax"], ["d0u"], name="unsq"),
        helper.make_node("Concat", ["d0u", "m1"], ["t"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "t"], ["y"], name="reshape"),
    ]
    proto = make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])],
                       [init("i0", np.array(0, np.int64)), init("ax", np.array([0], np.int64)),
                        init("m1", np.array([-1], np.int64))])
    model, _, _ = run_pass(proto, "infer-shapes")
    values = model.graph.values()
    assert (np.dtype(values["s"].dtype), values["s"].shape) == (np.dtype(np.int64), [3])
    assert (np.dtype(values["d0"].dtype), values["d0"].shape) == (np.dtype(np.int64), [])
    assert (np.dtype(values["t"].dtype), values["t"].shape) == (np.dtype(np.int64), [2])


def _reshape_then_relu() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["d0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d0", "ax"], ["d0u"], name="unsq"),
        helper.make_node("Concat", ["d0u", "m1"], ["t"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "t"], ["rs"], name="reshape"),
        helper.make_node("Relu", ["rs"], ["y"], name="relu"),
    ]
    return make_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])],
                      [init("i0", np.array(0, np.int64)), init("ax", np.array([0], np.int64)),
                       init("m1", np.array([-1], np.int64))])


def test_data_propagation_resolves_computed_reshape() -> None:
    """With data-prop (default) the Shape->...->Reshape target is known, so the Reshape's output is static."""
    model, _, _ = run_pass(_reshape_then_relu(), "infer-shapes")
    assert model.graph.values()["rs"].shape == [2, 12]


def test_without_data_propagation_reshape_dims_stay_unknown() -> None:
    """data-prop=false: only the rank of the Reshape output is known."""
    model, _, _ = run_pass(_reshape_then_relu(), "infer-shapes", (("data-prop", "false"),))
    rs = model.graph.values()["rs"]
    assert np.dtype(rs.dtype) == np.float32
    assert rs.shape is not None and len(rs.shape) == 2 and 12 not in rs.shape


def test_unknown_values_recorded() -> None:
    """An op onnx knows nothing about (custom domain) leaves its output unknown: listed, not fatal."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Foo", ["r"], ["f"], name="foo", domain="com.example"),
        helper.make_node("Relu", ["f"], ["y"], name="relu2"),
    ]
    proto = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    model, ctx, pm = run_pass(proto, "infer-shapes")
    assert modified(pm)  # r was still annotated
    assert ctx.analysis["unknown_shapes"] == ["f"]
    assert ctx.report["unknown_shapes"] == ["f"]
    values = model.graph.values()
    assert values["f"].dtype is None
    assert (np.dtype(values["r"].dtype), values["r"].shape) == (np.dtype(np.float32), [2, 3])


def test_graph_output_declared_types_untouched() -> None:
    """The declared output shape ['B', 5] stays even though inference finds [1, 5]."""
    proto = _conv_model([1, 2, 4, 4], ["B", 5])
    model, _, _ = run_pass(proto, "infer-shapes")
    out = model.to_proto().graph.output[0]
    assert out.name == "y"
    assert out.type.tensor_type.elem_type == TensorProto.INT32
    dims = out.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", 5]
    assert model.graph.values()["y"].shape == ["B", 5]


def test_second_run_changes_nothing() -> None:
    """Once every value is annotated, a re-run reports modified=False."""
    model, _, pm1 = run_pass(_conv_model(["N", 2, 4, 4], ["N", 5]), "infer-shapes")
    assert modified(pm1)
    model, _, pm2 = run_pass(model, "infer-shapes")
    assert not modified(pm2)
