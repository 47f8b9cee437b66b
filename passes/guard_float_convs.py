"""guard-float-convs: keep a float Conv/ConvTranspose/Gemm fed by a DequantizeLinear float in onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import Model, Node, Pass, PassContext, PassResult
from qcompiler import const_value, is_constant, producer, users

__all__ = ["GuardFloatConvs"]

_OPS = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: Node) -> tuple[int, int] | None:
    """(axis of input 0 holding the reduced channels, their count), from the weight's layout."""
    shape = const_value(node.inputs[1]).shape
    if len(shape) < 2:
        return None
    if node.op == "Conv":
        return 1, shape[1] * int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return 1, shape[0]
    axis = 0 if int(node.attrs.get("transA", 0)) else 1
    return axis, shape[1] if int(node.attrs.get("transB", 0)) else shape[0]


@dataclass(frozen=True)
class GuardFloatConvs(Pass):
    """Give each Conv, ConvTranspose or Gemm with a float32 constant weight that reads a per-tensor
    DequantizeLinear (a float layer after an integer one) its own DequantizeLinear with the same
    scale and zero point repeated along input 0's channel axis (per-axis, ``axis`` = that axis).

    Why: onnxruntime (graph optimizations on: what a user runs) rewrites such a node's float
    weight into a per-tensor symmetric int8 one when its output goes to a QuantizeLinear (its
    WeightBiasQuantization transformer, 1.32; it requires input 0 to come from a
    DequantizeLinear with a scalar scale), so a layer the plan keeps float between integer ones
    - the accuracy budget's float fallback, a user override - silently runs on a coarser weight
    grid than the integer layers' per-channel one. On effnet_lite0 with 22 layers moved to float
    that cost 10 dB of output SQNR (docs/design.md, "Accuracy budget"). The per-axis form
    computes the same numbers (one scale for every channel) and is not matched; it is applied
    whatever reads the output (other onnxruntime versions match more widely). Needs opset 13
    (``axis`` on DequantizeLinear); a reader with one input channel is left alone (a
    one-element scale counts as scalar). Run after the passes that
    decide what stays float (lower-qoperator, cleanup-qdq, compress-weights). Edits in place.
    """

    name = "guard-float-convs"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        if model.opsets.get("", 0) < 13:
            return PassResult(False)
        for graph in list(model.graph.walk()):
            for node in list(graph.nodes):
                # a float weight: an integer-stored one (a QDQ layer, compress-weights) is another matter
                if node.op not in _OPS or len(node.inputs) < 2 or not is_constant(node.inputs[1]) \
                        or const_value(node.inputs[1]).dtype != np.float32:
                    continue
                dq = producer(node.inputs[0])
                if dq is None or dq.op != "DequantizeLinear" or not is_constant(dq.inputs[1]):
                    continue
                scale = const_value(dq.inputs[1])
                zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
                if scale.size != 1 or (zp is not None and not is_constant(dq.inputs[2])):
                    continue
                found = _input_channels(node)
                if found is None or found[1] < 2:
                    continue
                axis, channels = found
                ins = [dq.inputs[0], rw.constant(f"{node.name}_in_scale", np.full(channels, scale.reshape(()), scale.dtype))]
                if zp is not None:
                    ins.append(rw.constant(f"{node.name}_in_zero_point", np.full(channels, zp.reshape(()), zp.dtype)))
                old = node.inputs[0]
                out = rw.value(f"{old.name}_per_axis", dtype=old.dtype, shape=old.shape)
                rw.create_node(graph, "DequantizeLinear", ins, [out], {"axis": axis}, name=f"{node.name}_in_dq",
                               before=node)
                rw.set_input(node, 0, out)
                if not users(old) and not graph.is_graph_output(old):
                    rw.erase_node(graph, dq)
        return PassResult(rw.modified)
