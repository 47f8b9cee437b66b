"""compress-weights: store the large float weights of ops that stay float as int8 + DequantizeLinear."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qcompiler import Model, Node, Pass, PassContext, PassResult, QType, UserError, quantize, weight_qparams
from qcompiler import const_value, is_constant

__all__ = ["CompressWeights"]


def _weight_axis(node: Node) -> int | None:
    """Output-channel axis of input 1 for the ops whose weight layout is known."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        return -1
    return None


@dataclass(frozen=True)
class CompressWeights(Pass):
    """Rewrite a float op's constant float32 weight (input 1 of Conv, ConvTranspose, Gemm or
    MatMul left in float, with at least `min-elements` elements) into an integer initializer
    in the target's weight dtype, per output channel, behind a DequantizeLinear.

    Why: ops the target does not run in integer (ConvTranspose on ort-cpu, layers excluded by
    the user) otherwise keep 4-byte weights, and on small models they are a visible part of the
    file (PP-OCRv4 det's two ConvTranspose weights are 9.6 KB of a 1.3 MB int8 file). The op
    still computes in float on the dequantized weight; the only change is the weight's rounding
    (symmetric, per channel), the same rounding the integer layers' weights get. onnxruntime
    does not constant-fold DequantizeLinear, so the runtime pays one small dequantization per
    run. Needs opset 13 (DequantizeLinear with `axis`); on older opsets it does nothing. Run
    after insert-qdq/lower-qoperator/cleanup-qdq, so it sees only weights that stayed float.
    Edits in place.

    Nodes a plan override keeps float (``plan_overrides``: the accuracy budget, the user) keep
    their float weights: the override asks for the float layer.
    """

    name = "compress-weights"
    min_elements: int = 1024

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        qtype = ctx.target.weight_rule().qtype or QType("int8", True, -127, 127)
        if qtype.np_dtype.itemsize >= 4:
            raise UserError(f"pass 'compress-weights': target weight dtype {qtype.dtype} saves nothing")
        qtype = replace(qtype, pair_sum_max=0, symmetric=True)  # the op computes in float: no kernel limits
        if model.opsets.get("", 0) < 13:
            return PassResult(False)
        # a node a plan override keeps float (the accuracy budget, or the user) keeps its float
        # weights too: compressing them would put back part of the error it was moved for
        kept = set(ctx.analysis.get("plan_overrides") or {})
        for graph in list(model.graph.walk()):
            for node in list(graph.nodes):
                axis = _weight_axis(node)
                if axis is None or len(node.inputs) < 2 or node.name in kept:
                    continue
                w = node.inputs[1]
                if not is_constant(w) or len(w.outputs) != 1:
                    continue
                arr = const_value(w)
                if arr.dtype != np.float32 or arr.size < self.min_elements or arr.ndim < 2:
                    continue
                axis = axis % arr.ndim
                qp = weight_qparams(arr, qtype, axis)
                q = rw.constant(f"{w.name}_q", quantize(arr, qp))
                scale = rw.constant(f"{w.name}_s", qp.scale.reshape(-1))
                zp = rw.constant(f"{w.name}_z", qp.zero_point.reshape(-1))
                out = rw.value(w.name, dtype=np.float32, shape=list(arr.shape))
                rw.create_node(graph, "DequantizeLinear", [q, scale, zp], [out], {"axis": axis},
                               name=f"{w.name}_dq", before=node)
                rw.set_input(node, 1, out)
        return PassResult(rw.modified)
