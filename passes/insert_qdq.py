"""insert-qdq: QuantizeLinear/DequantizeLinear pairs where the target runs ops in integer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import (Graph, Model, NodePlan, Pass, PassContext, PassResult, QParams, QType, Rewriter,
                       UserError, Value, compute_qparams, plan_quantization, producer_op, quantize, weight_axis)

__all__ = ["InsertQdq", "qparams_of"]


def qparams_of(value: Value) -> QParams | None:
    """QParams of a value produced by a DequantizeLinear with constant scale/zero point."""
    if producer_op(value) != "DequantizeLinear":
        return None
    dq = value.inputs[0]
    scale = dq.inputs[1]
    if not isinstance(scale, gs.Constant):
        return None
    zp_val = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if zp_val is not None and not isinstance(zp_val, gs.Constant):
        return None
    s = np.asarray(scale.values, dtype=np.float32)
    q_in = dq.inputs[0]
    dtype = (np.asarray(zp_val.values).dtype if zp_val is not None
             else (np.dtype(q_in.dtype) if q_in.dtype is not None else np.dtype(np.uint8)))
    zp = np.asarray(zp_val.values) if zp_val is not None else np.zeros(s.shape, dtype=dtype)
    info = np.iinfo(dtype)
    axis = int(dq.attrs.get("axis", 1)) if s.ndim == 1 and s.size > 1 else None
    return QParams(s, zp.astype(dtype), QType(np.dtype(dtype).name, bool(np.all(zp == 0)), int(info.min),
                                               int(info.max)), axis)


@dataclass(frozen=True)
class InsertQdq(Pass):
    """Quantize what the target runs in integer: a Q->DQ pair on each activation it reads or
    writes (per-tensor, calibrated range), weights stored as integers behind a DQ
    (per-channel where the target allows and `per-channel=true`), int32 biases with scale
    x_scale * w_scale, the input's qparams carried through data-movement ops, and the target's
    fixed qparams (e.g. Sigmoid outputs). Tensors already quantized (QAT Q/DQ) keep their scales.

    Requires `calibrate` (ranges) and uses `group-activations` groups if present. Edits in place.
    `exclude` lists node names to keep float.
    """

    name = "insert-qdq"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ranges = ctx.analysis.get("ranges")
        if ranges is None:
            raise UserError("pass 'insert-qdq' needs activation ranges: run 'calibrate' before it")
        target = ctx.target
        plan = plan_quantization(model, target, ranges=ranges, groups=ctx.analysis.get("groups", {}),
                                 exclude=self.exclude)
        rw = ctx.rewriter(model)
        act: dict[int, tuple[Value, Graph, QParams]] = {}   # value id -> (value, graph, qparams)
        passthrough: list[str] = []
        floats = dict(plan.float_nodes)

        def want(value: Value, graph: Graph, qtype: QType, fixed: tuple[float, int] | None = None) -> None:
            if id(value) in act or producer_op(value) == "DequantizeLinear":
                return
            if any(c.op == "QuantizeLinear" for c in value.outputs):
                return  # already quantized by the model itself (QAT)
            if fixed is not None:
                qp = QParams(np.asarray(fixed[0], np.float32), np.asarray(fixed[1]).astype(qtype.np_dtype), qtype)
            elif isinstance(value, gs.Constant):
                arr = np.asarray(value.values)
                qp = compute_qparams(float(arr.min()), float(arr.max()), qtype)
            else:
                lo, hi = ranges[value.name]
                qp = compute_qparams(lo, hi, qtype)
            act[id(value)] = (value, graph, qp)

        for graph in model.graph.walk():
            for node in graph.gs.nodes:
                np_ = plan.nodes.get(node.name)
                if np_ is not None and np_.node is node:
                    qtype = np_.config.activation.qtype
                    if qtype is None:
                        continue
                    for value, role in zip(node.inputs, np_.roles):
                        if role == "activation":
                            want(value, graph, qtype)
                    out = np_.output
                    publish = not graph.is_graph_output(out) or target.quantize_graph_outputs
                    if np_.config.output_quantized and publish and (out.name in ranges or node.op in target.fixed):
                        want(out, graph, qtype, target.fixed.get((np_.tail or node).op))
                elif node.op in target.passthrough and node.inputs:
                    src = node.inputs[0]
                    entry = act.get(id(src))
                    out = node.outputs[0]
                    if entry is None or graph.is_graph_output(out) or len(node.outputs) != 1:
                        floats.setdefault(node.name, "data movement on a float input")
                        continue
                    floats.pop(node.name, None)
                    act[id(out)] = (out, graph, entry[2])
                    passthrough.append(node.name)

        for value, graph, qp in act.values():
            self._insert_pair(rw, graph, value, qp)
        weights: dict[tuple[str, int | None, QType], Value] = {}
        for np_ in plan.nodes.values():
            self._quantize_params(rw, np_, weights, model)
        ctx.analysis["plan"] = plan
        ctx.analysis["lowered"] = sorted(plan.nodes) + sorted(plan.fused) + sorted(passthrough)
        ctx.analysis["float_nodes"] = floats
        return PassResult(rw.modified)

    @staticmethod
    def _insert_pair(rw: Rewriter, graph: Graph, value: Value, qp: QParams) -> None:
        base = value.name
        scale = rw.constant(f"{base}_scale", qp.scale)
        zp = rw.constant(f"{base}_zero_point", qp.zero_point)
        q = rw.value(f"{base}_quantized", dtype=qp.qtype.np_dtype, shape=value.shape)
        dq = rw.value(f"{base}_dequantized", dtype=np.float32, shape=value.shape)
        rw.replace_all_uses(graph, value, dq)
        # replace_all_uses may have renamed a graph output; Q reads the original value
        src = value
        first = graph.nodes[0] if not value.inputs and graph.nodes else None
        rw.create_node(graph, "QuantizeLinear", [src, scale, zp], [q], name=f"{base}_QuantizeLinear", before=first)
        rw.create_node(graph, "DequantizeLinear", [q, scale, zp], [dq], name=f"{base}_DequantizeLinear",
                       before=first)

    def _quantize_params(self, rw: Rewriter, np_: NodePlan, cache: dict, model: Model) -> None:
        node, cfg = np_.node, np_.config
        w_qp: QParams | None = None
        for i, role in enumerate(np_.roles):
            value = node.inputs[i]
            if role != "weight" or not isinstance(value, gs.Constant):
                continue
            qtype = cfg.weight.qtype
            if qtype is None:
                continue
            w = np.asarray(value.values).astype(np.float32)
            axis = weight_axis(node, w) if (cfg.weight.per_channel and self.per_channel) else None
            if axis is not None and (model.opset("") or 0) < 13:
                axis = None  # DequantizeLinear has no axis before opset 13
            key = (value.name, axis, qtype)
            if key not in cache:
                if axis is None:
                    qp = compute_qparams(float(w.min()), float(w.max()), qtype)
                else:
                    other = tuple(d for d in range(w.ndim) if d != axis)
                    qp = compute_qparams(w.min(axis=other), w.max(axis=other), qtype, axis=axis)
                wq = rw.constant(f"{value.name}_quantized", quantize(w, qp))
                scale = rw.constant(f"{value.name}_scale", qp.scale)
                zp = rw.constant(f"{value.name}_zero_point", qp.zero_point)
                out = rw.value(f"{value.name}_dequantized", dtype=np.float32, shape=list(w.shape))
                attrs = {"axis": axis} if axis is not None else {}
                rw.create_node(np_.graph, "DequantizeLinear", [wq, scale, zp], [out], attrs,
                               name=f"{value.name}_DequantizeLinear", before=node)
                cache[key] = (out, qp)
            out, w_qp = cache[key]
            rw.set_input(node, i, out)
        for i, role in enumerate(np_.roles):
            value = node.inputs[i]
            if role != "bias" or not isinstance(value, gs.Constant) or w_qp is None:
                continue
            x_qp = self._input_qparams(node)
            if x_qp is None or cfg.bias.dtype != "int32":
                continue
            b = np.asarray(value.values).astype(np.float64).reshape(-1)
            scale = (np.float64(x_qp.scale) * w_qp.scale.astype(np.float64)).astype(np.float32)
            if scale.ndim == 0 or scale.size == 1:
                scale = np.full(b.shape, float(scale.reshape(-1)[0]), np.float32)
            safe = np.where(scale > 0, scale.astype(np.float64), 1.0)
            bq = np.clip(np.rint(b / safe), -(2**31), 2**31 - 1).astype(np.int32)
            bq_c = rw.constant(f"{value.name}_quantized", bq)
            s_c = rw.constant(f"{value.name}_scale", scale)
            out = rw.value(f"{value.name}_dequantized", dtype=np.float32, shape=list(b.shape))
            rw.create_node(np_.graph, "DequantizeLinear", [bq_c, s_c], [out], {"axis": 0},
                           name=f"{value.name}_DequantizeLinear", before=node)
            rw.set_input(node, i, out)

    @staticmethod
    def _input_qparams(node: gs.Node) -> QParams | None:
        qp = qparams_of(node.inputs[0])
        if qp is None or qp.scale.size != 1:
            return None
        return QParams(qp.scale.reshape(()), qp.zero_point.reshape(()), qp.qtype)
