"""fold-constants: evaluate nodes whose inputs are all known at compile time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from qcompiler import Model, Node, Pass, PassContext, PassResult, node_subgraphs
from qcompiler import Value, const_value, is_constant

__all__ = ["FoldConstants"]

_NEVER = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
          "Bernoulli", "If", "Loop", "Scan"}
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _static_shape(value: Value) -> list[int] | None:
    shape = value.shape
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace nodes whose inputs are all initializers (and Shape of statically shaped values)
    by initializers holding their result, computed with onnx's reference evaluator.

    Why: exporters emit shape arithmetic (Shape/Gather/Concat/Reshape chains computing pad
    sizes, reshape targets) that hides constant operands from fusion and quantization.
    Results larger than `max-bytes` stay as nodes so the model never balloons.
    QuantizeLinear/DequantizeLinear are folded only with `fold-qdq=true` (their integer
    weights are smaller than the float they would become). Edits in place.
    """

    name = "fold-constants"
    max_bytes: int = 1 << 24
    fold_qdq: bool = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        for graph in list(model.graph.walk()):
            for node in graph.nodes:
                if not node.outputs or any(graph.is_graph_output(o) for o in node.outputs):
                    continue
                results = self._evaluate(node, model)
                if results is None:
                    continue
                outs = list(node.outputs)
                rw.erase_node(graph, node)
                for value, array in zip(outs, results):
                    rw.make_constant(value, array)
        rw.cleanup(model.graph)
        return PassResult(rw.modified)

    def _evaluate(self, node: Node, model: Model) -> list[np.ndarray] | None:
        if node.domain not in (None, "", "ai.onnx") or node.op in _NEVER or node_subgraphs(node):
            return None
        if node.op in _QDQ and not self.fold_qdq:
            return None
        if node.op == "Shape":
            shape = _static_shape(node.inputs[0])
            if shape is None:
                return None
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end")
            dims = shape[start:end] if end is not None else shape[start:]
            return [np.asarray(dims, dtype=np.int64)]
        if node.op == "Size":
            shape = _static_shape(node.inputs[0])
            return None if shape is None else [np.asarray(int(np.prod(shape)), dtype=np.int64)]
        inputs = [v for v in node.inputs]
        if not inputs or any(v.name and not is_constant(v) for v in inputs):
            return None
        feeds = {}
        in_names = []
        for i, v in enumerate(inputs):
            if not v.name:
                in_names.append("")
                continue
            key = f"in{i}"
            feeds[key] = const_value(v)
            in_names.append(key)
        out_names = [f"out{i}" for i in range(len(node.outputs))]
        attrs = {}
        for k, v in node.attrs.items():
            if is_constant(v):
                v = onnx.numpy_helper.from_array(const_value(v))
            attrs[k] = v
        try:
            proto_node = onnx.helper.make_node(node.op, in_names, out_names, **attrs)
            opset = model.opset("") or 17
            if node.op == "DequantizeLinear" and opset < 19:
                # onnx.reference implements DequantizeLinear only from opset 19; versions 10-18
                # compute the same for their (integer) input types
                opset = 19
            graph = onnx.helper.make_graph(
                [proto_node], "fold",
                [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                 for k, a in feeds.items()],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in out_names])
            proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
            results = ReferenceEvaluator(proto).run(None, feeds)
        except Exception:
            return None  # not evaluable here: leave it to run time
        arrays = [np.asarray(r) for r in results]
        if any(a.dtype == object for a in arrays) or sum(a.nbytes for a in arrays) > self.max_bytes:
            return None
        return arrays
