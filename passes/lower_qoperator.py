"""lower-qoperator: DQ -> op -> Q groups become the integer kernels the target names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompiler import (Graph, KernelSpec, Model, Node, OpConfig, Pass, PassContext, PassResult, Rewriter, Value,
                       assemble_inputs, kernel_spec, producer_op)
from qcompiler import Variable, const_value, is_constant
from qcompiler.wide import WIDE

__all__ = ["LowerQoperator"]


@dataclass
class _Operands:
    """Integer operands gathered from the DQs feeding a node and the Q after it."""

    ins: list[tuple[Value, Value, Value | None]]   # (int value, scale, zero point) per input
    out: tuple[Value, Value, Value] | None         # (Q output, y_scale, y_zero_point)
    zeros: dict = field(default_factory=dict)      # dtype -> shared scalar zero point


def _dq_operand(value: Value) -> tuple[Value, Value, Value | None] | None:
    if producer_op(value) != "DequantizeLinear":
        return None
    dq = value.inputs[0]
    zp = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    return dq.inputs[0], dq.inputs[1], zp


def _scalar(v: Value | None) -> bool:
    return v is None or (is_constant(v) and const_value(v).size == 1)


def _zp(rw: Rewriter, op: tuple[Value, Value, Value | None], like: Value) -> Value:
    if op[2] is not None:
        return op[2]
    dtype = np.dtype(like.dtype) if like.dtype is not None else np.dtype(np.uint8)
    return rw.constant("zero_point", np.zeros(const_value(op[1]).shape, dtype))


def _wzp(rw: Rewriter, o: _Operands, i: int) -> Value:
    """A weight's zero point; an all-zero per-channel vector becomes one shared scalar
    (the kernel takes a scalar with per-channel scales: ``KernelSpec.shared_zero_point``)."""
    op = o.ins[i]
    zp = op[2]
    if is_constant(zp):
        arr = const_value(zp)
        if arr.size > 1 and not arr.any():
            if arr.dtype.str not in o.zeros:
                o.zeros[arr.dtype.str] = rw.constant("weight_zero_point", np.zeros((), arr.dtype))
            return o.zeros[arr.dtype.str]
    return _zp(rw, op, op[0])


def _build(rw: Rewriter, spec: KernelSpec, o: _Operands, node: Node) -> tuple[list[Value], dict] | None:
    """The kernel's inputs and attributes from the table's layout, or None when the group does
    not fit it: activations (every operand but the weight) need one scale, an int32 bias
    slot takes no float bias."""
    for i, op in enumerate(o.ins):
        where = spec.operand(i)
        if where is None:
            continue
        if where.is_bias:
            if op is None and node.inputs[i].name:
                return None  # float bias: the kernel needs int32
        elif op is None or (i != spec.weight and not _scalar(op[1])):
            return None
    operands: list[tuple[Value, ...] | None] = []
    for i, op in enumerate(o.ins):
        where = spec.operand(i)
        if op is None or where is None or where.is_bias:
            operands.append(op)
            continue
        zp = _wzp(rw, o, i) if i in spec.shared_zero_point else _zp(rw, op, op[0])
        operands.append((op[0], op[1], zp))
    out = (o.out[1], o.out[2]) if o.out is not None else None
    return assemble_inputs(spec, operands, out, Variable.empty), spec.carried_attrs(node.attrs)


def _lowerable(cfg: OpConfig | None, op: str) -> KernelSpec | None:
    """The kernel the target names for float op ``op`` if lowering can build it."""
    spec = kernel_spec(cfg.kernel_op) if cfg is not None and cfg.kernel else None
    if spec is None or spec.dynamic or not spec.lower or spec.float_op != op:
        return None
    return spec


def _clip_bounds(node: Node) -> tuple[float, float]:
    lo, hi = -np.inf, np.inf
    if node.op == "Relu":
        return 0.0, np.inf
    if len(node.inputs) > 1 and node.inputs[1].name:
        lo = float(const_value(node.inputs[1]))
    if len(node.inputs) > 2 and node.inputs[2].name:
        hi = float(const_value(node.inputs[2]))
    return lo, hi


def _tail_redundant(tail: Node, q: Node) -> bool:
    """Q's saturation already applies the activation's clipping: the activation can go."""
    scale = float(const_value(q.inputs[1]))
    zp_v = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
    zp = int(const_value(zp_v)) if zp_v is not None else 0
    info = np.iinfo(const_value(zp_v).dtype if zp_v is not None else np.uint8)
    rep_lo, rep_hi = scale * (info.min - zp), scale * (info.max - zp)
    lo, hi = _clip_bounds(tail)
    return rep_lo >= lo - 1e-6 * abs(lo) and rep_hi <= hi + 1e-6 * abs(hi if np.isfinite(hi) else 0)


@dataclass(frozen=True)
class LowerQoperator(Pass):
    """Replace each DQ->op->Q group (op with a `kernel` in the target) by that integer
    kernel reading the DQs' integer inputs and writing the Q's output, absorb a fused
    Relu/Clip when the Q's saturation makes it redundant, and run data-movement ops directly
    on integer data. Groups that do not fit a kernel's signature stay in QDQ form.

    Requires insert-qdq. Does nothing unless the format is `qoperator`. Edits in place.
    """

    name = "lower-qoperator"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.format != "qoperator":
            return PassResult(False)
        rw = ctx.rewriter(model)
        zeros: dict[str, Value] = {}  # shared scalar zero points, one per dtype
        lowered: list[str] = []
        plan = ctx.analysis.get("plan")  # insert-qdq's: the report's float nodes are its
        # int16-activations nodes stay Q/DQ groups (no QOperator kernel takes 16-bit activations)
        wide = {n for n, ov in plan.overrides.items() if ov.kind == WIDE} if plan is not None else set()
        for graph in list(model.graph.walk()):
            for node in graph.nodes:
                if not node.outputs:
                    continue
                if node.op in ctx.target.passthrough:
                    if self._passthrough(rw, graph, node):
                        lowered.append(node.name)
                    continue
                cfg = ctx.target.op(node.op)
                spec = _lowerable(cfg, node.op)
                if spec is None or node.name in wide:
                    continue
                name = self._lower(rw, graph, node, spec, cfg.kernel_domain, zeros)
                if name:
                    lowered.append(name)
        rw.cleanup(model.graph)
        previous = set(ctx.analysis.get("lowered", []))
        # a node insert-qdq planned as integer but still here as its float op had no quantized
        # output to requantize into (a graph or branch output, or read only by float ops): in this
        # format it runs in float on dequantized inputs, so the report says so
        kept: dict[str, str] = {}
        for graph in model.graph.walk():
            for node in graph.nodes:
                spec = _lowerable(ctx.target.op(node.op), node.op)
                if node.name in previous and spec is not None and node.name not in lowered and node.name not in wide:
                    kept[node.name] = (f"no {spec.name}: its output is not quantized (a graph output or "
                                       f"read only by float ops), so it runs in float on dequantized inputs")
        ctx.analysis["lowered"] = sorted((previous | set(lowered)) - set(kept))
        for name, reason in kept.items():
            plan.deviate(name, reason)
        return PassResult(rw.modified)

    @staticmethod
    def _single_q(graph: Graph, value: Value) -> Node | None:
        readers = value.outputs
        if len(readers) != 1 or graph.is_graph_output(value) or readers[0].op != "QuantizeLinear":
            return None
        return readers[0]

    def _lower(self, rw: Rewriter, graph: Graph, node: Node, spec: KernelSpec, domain: str,
               zeros: dict[str, Value]) -> str | None:
        ins = []
        for i, value in enumerate(node.inputs):
            if not value.name:
                ins.append(None)
                continue
            op = _dq_operand(value)
            where = spec.operand(i)
            if op is None and where is not None and not where.is_bias:
                return None
            ins.append(op)
        if not ins or ins[0] is None:
            return None
        out_value = node.outputs[0]
        tail = None
        readers = out_value.outputs
        if len(readers) == 1 and readers[0].op in ("Relu", "Clip") and not graph.is_graph_output(out_value):
            q_after_tail = self._single_q(graph, readers[0].outputs[0])
            if q_after_tail is not None and _tail_redundant(readers[0], q_after_tail):
                tail = readers[0]
        q = self._single_q(graph, (tail or node).outputs[0])
        out = None
        if q is not None:
            zp = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
            if zp is None:
                return None
            out = (q.outputs[0], q.inputs[1], zp)
        elif not spec.float_output:
            return None
        built = _build(rw, spec, _Operands(ins, out, zeros), node)
        if built is None:
            return None
        inputs, attrs = built
        final = out[0] if out is not None else (tail or node).outputs[0]
        name = node.name
        for n in ([q] if q is not None else []) + ([tail] if tail is not None else []) + [node]:
            rw.erase_node(graph, n)
        rw.create_node(graph, spec.name, inputs, [final], attrs, name=name, domain=domain, reuse_name=True)
        return name

    @staticmethod
    def _passthrough(rw: Rewriter, graph: Graph, node: Node) -> bool:
        if not node.inputs or len(node.outputs) != 1:
            return False
        op = _dq_operand(node.inputs[0])
        q = LowerQoperator._single_q(graph, node.outputs[0])
        if op is None or q is None:
            return False
        zp = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
        same = (is_constant(q.inputs[1]) and is_constant(op[1])
                and np.array_equal(const_value(q.inputs[1]), const_value(op[1]))
                and zp is not None and op[2] is not None
                and np.array_equal(const_value(zp), const_value(op[2])))
        if not same:
            return False
        q_out = q.outputs[0]
        rw.erase_node(graph, q)
        rw.set_input(node, 0, op[0])
        old = node.outputs[0]
        rw.replace_all_uses(graph, q_out, old)
        rw.set_value_type(old, q_out.dtype, old.shape)
        return True
