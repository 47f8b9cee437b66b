"""QDQ groups -> integer kernels: the part of a QDQ model a target runs in integer.

A group is ``DequantizeLinear`` on every data input -> one op the target lists under
``[ops]`` -> (an optional fused Relu/Clip the target fuses) -> one per-tensor
``QuantizeLinear``. Such a group runs on the device as one integer kernel: integer operands,
one wide accumulation, one requantization. It is rewritten into the equivalent QOperator node
(domain ``qcompiler.sim``) so it runs through the same kernels as QOperator models. Everything
else (including groups that do not fit, e.g. per-channel activations) stays float, which is
exactly QDQ semantics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..kernels import KernelSpec, assemble_inputs, kernel_spec, kernels_for
from .kernels import SIM_DOMAIN

__all__ = ["integer_groups", "group_kernel"]


def group_kernel(op: str, target: Any) -> KernelSpec | None:
    """The simulated kernel of a QDQ group around float op ``op``: the one the target names
    for it, else the table's first static kernel for the op (QDQ targets name none)."""
    cfg = target.op(op)
    if cfg is None:
        return None
    named = kernel_spec(cfg.kernel_op) if cfg.kernel else None
    for spec in ([named] if named is not None else []) + kernels_for(op):
        if spec.float_op == op and spec.sim is not None and not spec.dynamic:
            return spec
    return None


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.new_inits: list[onnx.TensorProto] = []

    def dq(self, name: str) -> onnx.NodeProto | None:
        p = self.producer.get(name)
        if p is None or p.op_type != "DequantizeLinear" or p.domain not in ("", "ai.onnx", "com.microsoft"):
            return None
        if len(p.input) < 2 or p.input[1] not in self.consts:
            return None
        if any(a.name == "block_size" and a.i for a in p.attribute):
            return None
        return p

    def zp_name(self, node: onnx.NodeProto, like_dtype: np.dtype) -> str:
        if len(node.input) > 2 and node.input[2]:
            return node.input[2]
        name = f"{node.output[0]}__sim_zp"
        if name not in self.consts:
            self.consts[name] = np.zeros((), dtype=like_dtype)
            self.new_inits.append(numpy_helper.from_array(self.consts[name], name))
        return name

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.consts[name] = value
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]


def _scalar(a: np.ndarray | None) -> bool:
    return a is not None and a.size == 1


def _clip_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float | None, float | None] | None:
    if node.op_type == "Relu":
        return 0.0, None
    lo = hi = None
    for a in node.attribute:
        if a.name == "min":
            lo = a.f
        if a.name == "max":
            hi = a.f
    for idx in (1, 2):
        if len(node.input) > idx and node.input[idx]:
            if node.input[idx] not in g.consts:
                return None
            v = float(np.asarray(g.consts[node.input[idx]]).reshape(-1)[0])
            lo, hi = (v, hi) if idx == 1 else (lo, v)
    return lo, hi


def _tail(g: _Graph, node: onnx.NodeProto, target: Any) -> tuple[list[onnx.NodeProto], onnx.NodeProto, Any] | None:
    """The fused activation (if any) and the per-tensor Q that end a group."""
    nxt = g.single_consumer(node.output[0])
    fused: list[onnx.NodeProto] = []
    bounds = None
    if nxt is not None and nxt.op_type in ("Relu", "Clip") and target.fused_with(node.op_type, nxt.op_type):
        bounds = _clip_bounds(g, nxt)
        if bounds is None:
            return None
        fused = [nxt]
        nxt = g.single_consumer(nxt.output[0])
    if nxt is None or nxt.op_type != "QuantizeLinear" or nxt.input[1] not in g.consts:
        return None
    if not _scalar(g.consts[nxt.input[1]]):
        return None
    if len(nxt.input) > 2 and nxt.input[2] and nxt.input[2] not in g.consts:
        return None
    return fused, nxt, bounds


def _rewrite(g: _Graph, node: onnx.NodeProto, target: Any, spec: KernelSpec
             ) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    op = node.op_type
    tail = _tail(g, node, target)
    if tail is None:
        return None
    fused, q, bounds = tail
    data = [i for i in node.input]
    n_data = spec.data_inputs if spec.data_inputs is not None else len(data)
    dqs = [g.dq(i) for i in data[:n_data]]
    if any(d is None for d in dqs):
        return None
    triples: list[list[str]] = []
    for d in dqs:
        assert d is not None
        qdtype = _dtype_of(g, d.input[0])
        if qdtype is None:
            return None
        triples.append([d.input[0], d.input[1], g.zp_name(d, qdtype)])
    # activations (all but a weight) must be per-tensor, and no wider than the target's grid: a
    # group on 16-bit activations where the target's are 8-bit is its int16-activations fallback,
    # which runs as written (Q/DQ around the float op: onnxruntime has no 16-bit kernel for it)
    weight_slot = spec.weight if spec.weight is not None else -1
    act = target.op(op).activation.qtype
    for k, d in enumerate(dqs):
        assert d is not None
        if k != weight_slot and not _scalar(g.consts[d.input[1]]):
            return None
        if k != weight_slot and act is not None and _dtype_of(g, d.input[0]).itemsize > act.np_dtype.itemsize:
            return None
    if weight_slot > 0 and not _scalar(g.consts[triples[1][1]]):
        w_dq = dqs[1]
        assert w_dq is not None
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        w_rank = g.consts[w_dq.input[0]].ndim if w_dq.input[0] in g.consts else 0
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        want = 0 if op == "Conv" or (op == "Gemm" and trans_b) else w_rank - 1
        if w_rank == 0 or axis % w_rank != want:
            return None
    out_dtype = _q_dtype(g, q)
    y = [q.input[1], g.zp_name(q, out_dtype)]
    attrs = spec.carried_attrs({a.name: helper.get_attribute_value(a) for a in node.attribute})
    if bounds is not None:
        if bounds[0] is not None:
            attrs["sim_clip_min"] = float(bounds[0])
        if bounds[1] is not None:
            attrs["sim_clip_max"] = float(bounds[1])
    if op == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
        return None
    if op == "Conv" and not _per_axis_ok(g.consts[triples[1][1]], 0):
        return None
    if op == "MatMul":
        w_s = g.consts[triples[1][1]]
        if not _scalar(w_s) and w_s.ndim != 1:
            return None
    operands: list[tuple[str, ...] | None] = list(map(tuple, triples))
    bias_at = [i for i, o in enumerate(spec.inputs) if o is not None and o.is_bias]
    if bias_at:
        bias = _int_bias(g, node, triples, bias_at[0])
        if bias is False:
            return None
        operands.append((bias,) if bias else None)
    inputs = assemble_inputs(spec, operands, (y[0], y[1]), str)
    new = helper.make_node(spec.name, inputs, [q.output[0]], name=node.name or q.name, domain=SIM_DOMAIN,
                           **attrs)
    return new, [node, *fused, q]


def _per_axis_ok(scale: np.ndarray, axis: int) -> bool:
    return scale.size == 1 or scale.ndim == 1


def _dtype_of(g: _Graph, name: str) -> np.dtype | None:
    if name in g.consts:
        return g.consts[name].dtype
    for vi in list(g.model.graph.value_info) + list(g.model.graph.input) + list(g.model.graph.output):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    p = g.producer.get(name)
    if p is not None and p.op_type == "QuantizeLinear":
        return _q_dtype(g, p)
    return None


def _q_dtype(g: _Graph, q: onnx.NodeProto) -> np.dtype:
    if len(q.input) > 2 and q.input[2] in g.consts:
        return g.consts[q.input[2]].dtype
    for a in q.attribute:
        if a.name == "output_dtype" and a.i:
            return np.dtype(helper.tensor_dtype_to_np_dtype(a.i))
    return np.dtype(np.uint8)


def _int_bias(g: _Graph, node: onnx.NodeProto, triples: list[list[str]], idx: int) -> str | bool:
    """The bias as int32 at the accumulator's scale (x_scale * w_scale): taken as is from
    DQ(int32) when its scale is that product, else rounded from the float bias (what an
    integer device does with a float bias). "" without bias; False when not constant."""
    if len(node.input) <= idx or not node.input[idx]:
        return ""
    name = node.input[idx]
    acc_scale = (np.float32(g.consts[triples[0][1]]).reshape(()) *
                 np.asarray(g.consts[triples[1][1]], dtype=np.float32)).astype(np.float32)
    dq = g.dq(name)
    if dq is not None and dq.input[0] in g.consts:
        q = g.consts[dq.input[0]]
        s = np.asarray(g.consts[dq.input[1]], dtype=np.float32)
        if q.dtype == np.int32 and s.shape in ((), acc_scale.shape) and np.array_equal(
                np.broadcast_to(s, acc_scale.shape), acc_scale) and (len(dq.input) < 3 or not dq.input[2]):
            return dq.input[0]
        zp = g.consts[dq.input[2]].astype(np.int64) if len(dq.input) > 2 and dq.input[2] else 0
        real = ((q.astype(np.int64) - zp).astype(np.float32) * s).astype(np.float32)
    elif name in g.consts:
        real = g.consts[name].astype(np.float32)
    else:
        return False
    rounded = np.rint(real / np.broadcast_to(acc_scale, real.shape)).astype(np.int32)
    return g.add_const(f"{node.name or name}__sim_bias", rounded)


def integer_groups(model: onnx.ModelProto, target: Any) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose QDQ groups (ops ``target`` runs in integer) are integer
    kernels; returns it and the number of groups rewritten. QOperator models come back unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for node in out.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        spec = group_kernel(node.op_type, target)
        if spec is None:
            continue
        r = _rewrite(g, node, target, spec)
        if r is None:
            continue
        new, old = r
        if any(id(o) in drop for o in old):
            continue
        replace[id(old[-1])] = new  # the kernel takes the Q's place (its inputs all exist by then)
        drop.update(id(o) for o in old)
    if not replace:
        return out, 0
    nodes = []
    for n in out.graph.node:
        if id(n) in replace:
            nodes.append(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(g.new_inits)
    return out, len(replace)
