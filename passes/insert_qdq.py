"""insert-qdq: QuantizeLinear/DequantizeLinear pairs where the target runs ops in integer."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from qcompiler import (Graph, Model, NodePlan, Pass, PassContext, PassResult, QParams, QType, Rewriter,
                       UserError, Value, compute_qparams, dequantize, producer_op, quantize, weight_axis,
                       weight_qparams)
from qcompiler import Node, const_value, is_constant
from qcompiler.calibration.methods import weight_mse_clip
from qcompiler.plan import QuantStep, partitions, plan_for, quantization_walk, reduction_axis
from qcompiler.wide import WIDE
from qcompiler.quant import INT_RANGES
from qcompiler.rounding import WeightRounder

__all__ = ["InsertQdq", "qparams_of"]

#: layers rounded at once (GPTQ): the column loop is GIL-bound between numpy calls, two threads
#: fill a 2-core machine; the codes do not depend on it
_ROUNDING_THREADS = 2


def qparams_of(value: Value) -> QParams | None:
    """QParams of a value produced by a DequantizeLinear with constant scale/zero point."""
    if producer_op(value) != "DequantizeLinear":
        return None
    dq = value.inputs[0]
    scale = dq.inputs[1]
    if not is_constant(scale):
        return None
    zp_val = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if zp_val is not None and not is_constant(zp_val):
        return None
    s = np.asarray(const_value(scale), dtype=np.float32)
    q_in = dq.inputs[0]
    dtype = (const_value(zp_val).dtype if zp_val is not None
             else (np.dtype(q_in.dtype) if q_in.dtype is not None else np.dtype(np.uint8)))
    zp = const_value(zp_val) if zp_val is not None else np.zeros(s.shape, dtype=dtype)
    name = np.dtype(dtype).name
    lo, hi = INT_RANGES[name] if name in INT_RANGES else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    axis = int(dq.attrs.get("axis", 1)) if s.ndim == 1 and s.size > 1 else None
    return QParams(s, zp.astype(dtype), QType(name, bool(np.all(zp == 0)), lo, hi), axis)


@dataclass(frozen=True)
class InsertQdq(Pass):
    """Quantize what the target runs in integer: a Q->DQ pair on each activation it reads or
    writes (per-tensor, calibrated range), weights stored as integers behind a DQ
    (per-channel where the target allows and `per-channel=true`), int32 biases with scale
    x_scale * w_scale, the input's qparams carried through data-movement ops, and the target's
    fixed qparams (e.g. Sigmoid outputs). Tensors already quantized (QAT Q/DQ) keep their scales.

    With `rounding=gptq` (and the input second moments `calibrate` records) weights are not
    rounded to nearest but column by column, each rounding error compensated on the columns
    still to come through the inverse input covariance (GPTQ): what is minimised is the
    layer's output error on real inputs, not the weight error. `rounding=nearest` turns it off.

    With `bias-correction=true` (and the per-channel input means `calibrate` records), each
    bias absorbs the mean output shift its weight's rounding causes, (W_q - W) . E[x]: rounding
    errors of a channel's weights otherwise add up to a systematic offset that accumulates
    through the network (depthwise convs with 9 weights per channel suffer most).

    The target's rules decide the rest: 16-bit activations, power-of-two scales, encoding
    ranges (`encoding_min`/`encoding_max` clamp the calibrated range), blocked (and 4-bit,
    stored packed) weights along the op's reduction axis. The integer regions (connected
    integer nodes, with the values crossing to and from float) go to `report["partitions"]`.

    Requires `calibrate` (ranges) and uses `group-activations` groups if present. Edits in place.
    `exclude` lists node names to keep float.
    """

    name = "insert-qdq"
    per_channel: bool = True
    bias_correction: bool = True
    rounding: str = "gptq"
    exclude: tuple[str, ...] = ()
    weight_range: str = "minmax"  # minmax | mse: per-channel clip minimising weight QDQ error (calibrate H1)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        ranges = ctx.analysis.get("ranges")
        if ranges is None:
            raise UserError("pass 'insert-qdq' needs activation ranges: run 'calibrate' before it")
        target = ctx.target
        plan = plan_for(model, ctx, ranges=ranges, exclude=self.exclude)
        rw = ctx.rewriter(model)
        act: dict[int, tuple[Value, Graph, QParams]] = {}   # value id -> (value, graph, qparams)
        regrid: list[tuple[Value, Graph, QParams, QuantStep]] = []  # requantize steps: a second grid
        wide_ranges = ctx.analysis.get("wide_ranges", {})
        passthrough: list[str] = []
        floats = plan.float_nodes  # the report's float nodes are the plan's (lowering may add deviations)

        owner: dict[int, Graph] = {}  # the graph that defines each value (outer scope for branches)
        for g in model.graph.walk():
            for v in g.inputs:
                owner[id(v)] = g
            for n in g.nodes:
                for v in n.outputs:
                    owner[id(v)] = g

        for step in quantization_walk(model, target, plan, ranges):
            if step.kind == "float-move":
                floats.setdefault(step.node.name, "data movement on a float input")
                continue
            value = step.value
            if step.kind == "inherit":  # data movement: its input's qparams
                floats.pop(step.node.name, None)
                act[id(value)] = (value, step.graph, act[id(step.source)][2])
                passthrough.append(step.node.name)
                continue
            qtype = step.rule.qtype
            assert qtype is not None
            if step.fixed is not None:
                qp = QParams(np.asarray(step.fixed[0], np.float32), np.asarray(step.fixed[1]).astype(qtype.np_dtype), qtype)
            elif is_constant(value):
                arr = const_value(value)
                qp = compute_qparams(float(arr.min()), float(arr.max()), qtype)
            else:
                # (a 16-bit grid's own range; a range pinned without data is the range on every grid)
                rng = wide_ranges.get(value.name, ranges[value.name]) if step.wide else ranges[value.name]
                lo, hi = step.rule.clamp(*rng)  # a target's encoding range limits calibration
                qp = compute_qparams(lo, hi, qtype)
            if step.kind == "requantize":
                regrid.append((value, owner.get(id(value), step.graph), qp, step))
                continue
            act[id(value)] = (value, owner.get(id(value), step.graph), qp)

        integer = sorted(plan.nodes) + sorted(plan.fused) + sorted(passthrough)
        parts = partitions(model, integer)
        ctx.analysis["partitions"] = parts
        ctx.report["partitions"] = parts
        input_names = {name: np_.node.inputs[0].name for name, np_ in plan.nodes.items() if np_.node.inputs}
        first = {id(value): self._insert_pair(rw, graph, value, qp) for value, graph, qp in act.values()}
        for value, graph, qp, step in regrid:  # after every first pair: readers are rewired from its output
            self._insert_regrid(rw, graph, value, first[id(value)], qp, step)
        wide = {n: ov.reason for n, ov in plan.overrides.items() if ov.kind == WIDE and n in plan.nodes}
        if wide:
            ctx.report["int16_nodes"] = dict(sorted(wide.items()))
        weights: dict[tuple[str, int | None, QType], Value] = {}
        if self.rounding not in ("gptq", "nearest"):
            raise UserError(f"pass 'insert-qdq': rounding '{self.rounding}' is not one of gptq, nearest")
        means = ctx.analysis.get("channel_means", {}) if self.bias_correction else {}
        moments = ctx.analysis.get("input_moments", {}) if self.rounding == "gptq" else {}
        rounder = WeightRounder(ctx.analysis.get("cache_dir", ""), total=sum(1 for n in plan.nodes if n in moments))
        with rounder, ThreadPoolExecutor(max_workers=_ROUNDING_THREADS) as pool:
            # every layer's GPTQ rounding is started first, two at a time: the column loop holds
            # the GIL only between numpy calls, so two layers in flight use both cores (1.5x on
            # MiniLM); each layer's codes are what one call gives, so the output is unchanged
            jobs: dict[str, tuple[Future, tuple[np.ndarray, QParams]]] = {}  # node -> (codes, input 1's params)
            seen: set[tuple[str, int | None, QType, int]] = set()  # a weight two nodes share is rounded once
            for name, np_ in plan.nodes.items():
                params = self._weight_params(np_, 1, model) if name in moments else None
                if params is None or np_.config.weight.block_size:
                    continue
                shared = (np_.node.inputs[1].name, params[1].axis, params[1].qtype, 0)  # the constants' cache key
                if shared not in seen:
                    seen.add(shared)
                    jobs[name] = (pool.submit(_gptq_codes, np_.node, *params, moments[name], rounder), params)
            for i, (name, np_) in enumerate(plan.nodes.items()):
                ctx.progress("quantizing weights" + (" (GPTQ rounding)" if moments else ""), i, len(plan.nodes))
                self._quantize_params(rw, np_, weights, model, means.get(input_names.get(name, "")),
                                      jobs.get(name))
        ctx.report["weight_rounding"] = rounder.summary()
        ctx.analysis["plan"] = plan
        ctx.analysis["lowered"] = sorted(plan.nodes) + sorted(plan.fused) + sorted(passthrough)
        ctx.analysis["float_nodes"] = floats
        return PassResult(rw.modified)

    @staticmethod
    def _insert_regrid(rw: Rewriter, graph: Graph, value: Value, dq_first: Value, qp: QParams, step: QuantStep) -> None:
        """A second pair for ``value`` on ``qp``'s grid (a requantize step): it reads the first
        pair's output when the value was written on that grid (``step.after``), else the float
        value; the step's readers read its output instead of the first pair's."""
        base = f"{value.name}_{qp.qtype.dtype}"
        src = dq_first if step.after else value
        scale = rw.constant(f"{base}_scale", qp.scale)
        zp = rw.constant(f"{base}_zero_point", qp.zero_point)
        q = rw.value(f"{base}_quantized", dtype=qp.qtype.np_dtype, shape=value.shape)
        dq = rw.value(f"{base}_dequantized", dtype=np.float32, shape=value.shape)
        first = graph.nodes[0] if not value.inputs and graph.nodes else None
        rw.create_node(graph, "QuantizeLinear", [src, scale, zp], [q], name=f"{base}_QuantizeLinear", before=first)
        rw.create_node(graph, "DequantizeLinear", [q, scale, zp], [dq], name=f"{base}_DequantizeLinear", before=first)
        for reader in step.readers:
            for i, v in enumerate(reader.inputs):
                if v is dq_first or v is value:
                    rw.set_input(reader, i, dq)

    @staticmethod
    def _insert_pair(rw: Rewriter, graph: Graph, value: Value, qp: QParams) -> Value:
        base = value.name
        scale = rw.constant(f"{base}_scale", qp.scale)
        zp = rw.constant(f"{base}_zero_point", qp.zero_point)
        q = rw.value(f"{base}_quantized", dtype=qp.qtype.np_dtype, shape=value.shape)
        dq = rw.value(f"{base}_dequantized", dtype=np.float32, shape=value.shape)
        rw.replace_all_uses(graph, value, dq)  # may rename a graph output; Q still reads `value`
        first = graph.nodes[0] if not value.inputs and graph.nodes else None
        rw.create_node(graph, "QuantizeLinear", [value, scale, zp], [q], name=f"{base}_QuantizeLinear", before=first)
        rw.create_node(graph, "DequantizeLinear", [q, scale, zp], [dq], name=f"{base}_DequantizeLinear",
                       before=first)
        return dq

    def _weight_params(self, np_: NodePlan, i: int, model: Model) -> tuple[np.ndarray, QParams] | None:
        """Input ``i``'s float weight and its qparams, if it is a quantized constant weight (the
        one place that decides them: the GPTQ jobs and the constants built below both use it)."""
        node, cfg = np_.node, np_.config
        if i >= len(np_.roles) or np_.roles[i] != "weight" or not is_constant(node.inputs[i]):
            return None
        qtype = cfg.weight.qtype
        if qtype is None:
            return None
        w = const_value(node.inputs[i]).astype(np.float32)
        return w, self._qparams(np_, i, w, self._axis(np_, w, model))

    def _qparams(self, np_: NodePlan, i: int, w: np.ndarray, axis: int | None) -> QParams:
        """The qparams of weight input ``i`` (float array ``w``, quantization ``axis``)."""
        cfg = np_.config
        qtype, block = cfg.weight.qtype, cfg.weight.block_size
        assert qtype is not None
        if self.weight_range not in ("minmax", "mse"):
            raise UserError(f"pass 'insert-qdq': weight-range '{self.weight_range}' is not one of minmax, mse")
        src = weight_mse_clip(w, qtype, axis) if self.weight_range == "mse" and not block else w
        qp = weight_qparams(src, qtype, axis, block)
        if not block and i == 1:
            qp = _bias_safe(qp, np_.node, np_, cfg.bias.dtype)
        return qp

    def _axis(self, np_: NodePlan, w: np.ndarray, model: Model) -> int | None:
        """The weight's quantization axis: blocks along the reduction axis, channels per the
        target and ``per_channel``; none before opset 13 (DequantizeLinear has no axis there)."""
        node, cfg = np_.node, np_.config
        if cfg.weight.block_size:
            axis = reduction_axis(node, w)  # plan_quantization checked it exists
        else:
            axis = weight_axis(node, w) if (cfg.weight.per_channel and self.per_channel) else None
        return None if axis is not None and (model.opset("") or 0) < 13 else axis

    def _quantize_params(self, rw: Rewriter, np_: NodePlan, cache: dict, model: Model,
                         mean: np.ndarray | None, gptq: tuple[Future, tuple[np.ndarray, QParams]] | None) -> None:
        node, cfg = np_.node, np_.config
        w_qp: QParams | None = None
        shift: np.ndarray | None = None
        for i, role in enumerate(np_.roles):
            value = node.inputs[i]
            if role != "weight" or not is_constant(value) or cfg.weight.qtype is None:
                continue
            qtype = cfg.weight.qtype
            w = const_value(value).astype(np.float32)
            block = cfg.weight.block_size
            axis = self._axis(np_, w, model)
            key = (value.name, axis, qtype, block)
            if key not in cache:
                job = gptq if (gptq is not None and i == 1 and not block) else None
                qp = job[1][1] if job is not None else self._qparams(np_, i, w, axis)
                codes = job[0].result() if job is not None else None
                stored = codes if codes is not None else quantize(w, qp)
                wq = rw.constant(f"{value.name}_quantized", stored)
                scale = rw.constant(f"{value.name}_scale", qp.scale)
                zp = rw.constant(f"{value.name}_zero_point", qp.zero_point)
                out = rw.value(f"{value.name}_dequantized", dtype=np.float32, shape=list(w.shape))
                attrs = {"axis": axis} if axis is not None else {}
                if block:
                    attrs["block_size"] = block
                rw.create_node(np_.graph, "DequantizeLinear", [wq, scale, zp], [out], attrs,
                               name=f"{value.name}_DequantizeLinear", before=node)
                cache[key] = (out, qp, stored)  # not wq.values: reading a lazy 4-bit constant unpacks it
            out, w_qp, stored = cache[key]
            rw.set_input(node, i, out)
            if mean is not None and i == 1 and not w_qp.block_size:
                delta = dequantize(stored, w_qp) - w
                shift = _output_shift(node, delta, mean)
        if shift is not None and node.op == "Conv" and "bias" in cfg.inputs and len(np_.roles) < 3:
            # no bias yet: a zero bias gives the correction somewhere to go
            rw.set_input(node, 2, rw.constant(f"{node.name}_bias", np.zeros(shift.shape, np.float32)))
            np_.roles.append("bias")
        for i, role in enumerate(np_.roles):
            value = node.inputs[i]
            if role != "bias" or not is_constant(value) or w_qp is None:
                continue
            x_qp = self._input_qparams(node)
            if x_qp is None or cfg.bias.dtype != "int32":
                continue
            b = const_value(value).astype(np.float64).reshape(-1)
            if shift is not None and shift.shape == b.shape:
                b = b - shift
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
    def _input_qparams(node: Node) -> QParams | None:
        qp = qparams_of(node.inputs[0])
        if qp is None or qp.scale.size != 1:
            return None
        return QParams(qp.scale.reshape(()), qp.zero_point.reshape(()), qp.qtype)


def _output_shift(node: Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Mean output change per output channel caused by weight error ``delta`` on inputs whose
    per-channel mean is ``mean``: (W_q - W) . E[x]."""
    mean = np.asarray(mean, dtype=np.float64)
    d = delta.astype(np.float64)
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        m_out, c_per = d.shape[0], d.shape[1]
        if mean.shape[0] != group * c_per or m_out % group:
            return None
        per_in = d.reshape(m_out, c_per, -1).sum(axis=2)            # [M, C/g]
        mean_g = mean.reshape(group, c_per)[np.arange(m_out) // (m_out // group)]
        return (per_in * mean_g).sum(axis=1)
    if node.op == "Gemm":
        trans_b = int(node.attrs.get("transB", 0))
        k = d.shape[1] if trans_b else d.shape[0]
        if mean.shape[0] != k:
            return None
        alpha = float(node.attrs.get("alpha", 1.0))
        return alpha * (d @ mean if trans_b else mean @ d)
    if node.op == "MatMul" and d.ndim == 2 and mean.shape[0] == d.shape[0]:
        return mean @ d
    return None


def _gptq_codes(node: Node, w: np.ndarray, qp: QParams, moment: np.ndarray,
                rounder: WeightRounder) -> np.ndarray | None:
    """GPTQ-rounded integer weights in the weight's own layout, or None if shapes disagree."""
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        m = w.shape[0]
        w3 = w.reshape(group, m // group, -1)
        unflatten = lambda c: c.reshape(w.shape)  # noqa: E731
    elif node.op in ("Gemm", "MatMul") and w.ndim == 2:
        trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        w3 = (w if trans_b else w.T)[None]
        unflatten = (lambda c: c[0]) if trans_b else (lambda c: c[0].T)  # noqa: E731
    else:
        return None
    g, rows, k = w3.shape
    if moment.shape != (g, k, k):
        return None
    scale = np.broadcast_to(qp.scale.reshape(-1) if qp.scale.size > 1 else qp.scale.reshape(1), (g * rows,))
    zp = np.broadcast_to(qp.zero_point.reshape(-1) if qp.zero_point.size > 1 else qp.zero_point.reshape(1),
                         (g * rows,))
    return unflatten(rounder.round(w3, moment, scale.reshape(g, rows), zp.reshape(g, rows), qp.qtype))


def _bias_safe(qp: QParams, node: Node, np_: NodePlan, bias_dtype: str) -> QParams:
    """Raise weight scales whose int32 bias could not be stored: a channel of (near-)zero
    weights gets a scale so small that bias / (x_scale * w_scale) overflows int32, or that the
    product is a float32 subnormal. Such channels quantize to zero weights either way; the
    larger scale keeps their bias exact. Other channels are unchanged."""
    bias_idx = next((j for j, r in enumerate(np_.roles) if r == "bias"), None)
    if (bias_dtype != "int32" or bias_idx is None or not is_constant(node.inputs[bias_idx])
            or not qp.qtype.symmetric):
        return qp
    x_qp = InsertQdq._input_qparams(node)
    if x_qp is None:
        return qp
    x_s = float(x_qp.scale)
    b = np.abs(np.asarray(const_value(node.inputs[bias_idx]), dtype=np.float64).reshape(-1))
    tiny = float(np.finfo(np.float32).tiny)
    floor = np.maximum(b / (x_s * (2**31 - 1)) * 1.01, 2 * tiny / x_s)
    scale = qp.scale.astype(np.float64)
    if floor.size != scale.size:
        floor = np.full(scale.shape, floor.max()) if scale.size == 1 else np.broadcast_to(floor.max(), scale.shape)
    floor = floor.reshape(scale.shape)
    if np.all(scale >= floor):
        return qp
    if qp.qtype.power_of_two:
        floor = 2.0 ** np.ceil(np.log2(floor))
    return QParams(np.maximum(scale, floor).astype(np.float32), qp.zero_point, qp.qtype, qp.axis, qp.block_size)
