"""infer-shapes: onnx's shape and type inference, copied back onto the IR's values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qcompiler import Model, Pass, PassContext, PassResult
from qcompiler import is_constant

__all__ = ["InferShapes"]


def _shape(t: onnx.TypeProto) -> list[int | str | None] | None:
    if not t.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def _without_weights(proto: onnx.ModelProto, max_elements: int) -> onnx.ModelProto:
    """The main graph's large initializers as typed graph inputs instead: inference needs their
    dtype and shape, never their values (values matter only for small shape tensors, kept).
    onnx's inference copies the model several times (serialize, parse, serialize back); on a
    90 MB transformer that made this pass the compile's memory peak (+330 MB)."""
    g = proto.graph
    declared = {i.name for i in g.input}
    keep = []
    for t in g.initializer:
        if int(np.prod(t.dims)) <= max_elements:
            keep.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(keep)
    return proto


def _value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Inferred types of a graph's values and of every nested body's (If/Loop/Scan): names are
    unique across a model's graphs, so one map serves all of them."""
    infos = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                for name, vi in _value_infos(body).items():
                    infos.setdefault(name, vi)
    return infos


@dataclass(frozen=True)
class InferShapes(Pass):
    """Annotate every value with the dtype and shape onnx's inference finds (symbolic dims
    kept as names); values it cannot infer are listed in the report as `unknown_shapes`.

    Why: quantization needs dtypes (only float32 activations are quantized) and folding needs
    static shapes. Never fails on an incomplete inference: it records what stays unknown.
    Edits value annotations in place.
    """

    name = "infer-shapes"
    data_prop: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        # weights over 32 KiB (more than 4096 elements) are exported as payload-less stubs,
        # then declared as inputs: the IR's weights are never copied for inference
        proto = _without_weights(model.to_proto(shared={}, min_bytes=4096 * 8 + 1), max_elements=4096)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                         data_prop=self.data_prop)
        except Exception as exc:  # inference is advisory: record and go on
            ctx.report.setdefault("warnings", []).append(f"infer-shapes: {str(exc).splitlines()[0]}")
            return PassResult(False)
        infos = _value_infos(inferred.graph)
        unknown: list[str] = []
        for graph in model.graph.walk():
            for node in graph.nodes:
                for value in node.outputs:
                    if is_constant(value) or not value.name:
                        continue
                    vi = infos.get(value.name)
                    if vi is None or not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type == 0:
                        if value.dtype is None:
                            unknown.append(value.name)
                        continue
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
                    shape = _shape(vi.type)
                    if graph.is_graph_output(value):
                        continue  # public signature is kept as declared
                    if value.dtype is None or shape is not None:
                        rw.set_value_type(value, dtype, shape if shape is not None else value.shape)
        ctx.analysis["unknown_shapes"] = sorted(unknown)
        if unknown:
            ctx.report["unknown_shapes"] = sorted(unknown)
        return PassResult(rw.modified)
