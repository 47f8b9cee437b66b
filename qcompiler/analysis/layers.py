"""The integer layers of a quantized model, and a float model that can quantize any subset of them.

A *layer* is one integer kernel of the quantized model (a QOperator node such as QLinearConv,
or a QDQ group the target runs in integer, found by :func:`qcompiler.sim.integer_groups`):
its activation inputs with their scale/zero point, its weight and bias as the quantized
model stores them, and its output grid. Each maps back to the node of the float model
(prepared by the target's pipeline up to calibration, so fused BatchNorms and fused
activations have the names and weights the compiler saw) it came from.

:class:`FakeQuantModel` is that float model with every layer's quantization behind a switch
(one boolean graph input per layer): the layer node becomes an ``If`` whose then-branch runs it
on ``DQ(Q(x))`` inputs with the quantized model's dequantized weights and bias, and its output
passes through an ``If`` that applies ``DQ(Q(y))``. One onnxruntime session (the Q/DQ pairs run
as float ops, never as integer kernels, so every CPU gives the same numbers up to float
rounding) then runs the float model (all off), the quantized one (all on) or any mix -
the per-layer sensitivity and, later, an accuracy budget search.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["Layer", "TensorGrid", "find_layers", "FakeQuantModel", "batches", "PARTS"]

#: what of each layer a FakeQuantModel quantizes
PARTS = ("all", "weights", "activations")

def _layout(op_type: str) -> tuple[tuple[tuple[int, int], ...], int | None, tuple[int, int] | None] | None:
    """Where a static integer kernel keeps its operands, read from the kernel table
    (``qcompiler.kernels``): (integer input index, float-op input index) per quantized operand
    (scale and zero point follow it), the int32 bias index, and the output's qparams."""
    from ..kernels import KERNELS

    spec = KERNELS.get(op_type)
    if spec is None or spec.dynamic or spec.output is None or spec.variadic_from is not None:
        return None
    ops = spec.positions(0)
    triples = tuple((o.value, pos) for pos, o in ops if not o.is_bias)
    bias = next((o.value for _, o in ops if o.is_bias), None)
    return triples, bias, spec.output


#: onnxruntime graph transformers that turn Q/DQ into integer kernels or move them
_QDQ_OPTIMIZERS = ("QDQSelectorActionTransformer", "QDQS8ToU8Transformer", "QDQPropagationTransformer",
                   "QDQFinalCleanupTransformer", "DoubleQDQPairsRemover", "ConstantFolding")


@dataclass(frozen=True)
class TensorGrid:
    """The integer grid a float tensor is put on: ``float`` is its name in the float model."""

    float: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None  # per-channel axis (weights), None when per-tensor
    dynamic: bool = False    # scale and zero point computed per run (DynamicQuantizeLinear): no fixed range

    @property
    def dtype(self) -> str:
        return str(self.zero_point.dtype)

    def bounds(self) -> tuple[float, float]:
        """The real range the grid covers (per-tensor grids)."""
        info = np.iinfo(self.zero_point.dtype)
        s = float(np.asarray(self.scale, dtype=np.float64).reshape(-1)[0])
        z = float(np.asarray(self.zero_point).reshape(-1)[0])
        return s * (info.min - z), s * (info.max - z)


@dataclass
class Layer:
    """One integer kernel of the quantized model, mapped to the float node it came from."""

    name: str                      # the node's name in both models
    op: str                        # the float op (Conv, MatMul, ...)
    kernel: str                    # the integer kernel (QLinearConv, or Conv (Q/DQ))
    index: int                     # position in graph order
    activations: dict[int, TensorGrid] = field(default_factory=dict)  # float input index -> grid
    weights: dict[int, np.ndarray] = field(default_factory=dict)       # float input index -> real values
    weight_grids: dict[int, TensorGrid] = field(default_factory=dict)
    output: TensorGrid | None = None
    result: str = ""               # the float tensor it produces (after a fused activation)
    notes: list[str] = field(default_factory=list)

    def precision(self) -> str:
        acts = sorted({g.dtype + (" (dynamic)" if g.dynamic else "") for g in self.activations.values()})
        parts = [f"activations {'/'.join(acts) or '-'}"]
        for g in self.weight_grids.values():
            parts.append(f"weights {g.dtype} {'per-channel' if g.axis is not None else 'per-tensor'}")
            break
        if self.output is not None:
            parts.append(f"output {self.output.dtype}")
        else:
            parts.append("output float")
        return ", ".join(parts)


def _consts(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _float_of(name: str, known: set[str]) -> str | None:
    from ..sim.run import float_name

    return float_name(name, known)


def _weight_axis(float_op: str, node: onnx.NodeProto, w: np.ndarray, scale: np.ndarray) -> int | None:
    """The weight's output-channel axis: a fact of the float op (``plan.weight_axis``)."""
    from types import SimpleNamespace

    from ..plan import weight_axis

    if scale.size == 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = weight_axis(SimpleNamespace(op=float_op, attrs=attrs), w)  # type: ignore[arg-type]
    if axis is not None:
        return axis
    hits = [i for i, d in enumerate(w.shape) if d == scale.size]
    return hits[0] if len(hits) == 1 else None


def _dequant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zp, dtype=np.float64)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), (z.reshape(shape) if z.size > 1 else z.reshape(()))
    return ((q.astype(np.float64) - z) * s).astype(np.float32)


def find_layers(quant: onnx.ModelProto, target: Any, float_model: onnx.ModelProto) -> list[Layer]:
    """The integer layers of ``quant`` (QOperator kernels, and QDQ groups ``target`` runs in
    integer) that map to a node of ``float_model`` (matched by node name), in graph order."""
    from ..sim.qdq import integer_groups

    sim, _ = integer_groups(quant, target)
    consts = _consts(sim.graph)
    fnodes = {n.name: n for n in float_model.graph.node}
    ftensors = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    layers: list[Layer] = []
    dynamic = _DynamicLayers(sim.graph, consts, float_model)
    for node in sim.graph.node:
        dyn = dynamic.layer(node, len(layers))
        if dyn is not None:
            layers.append(dyn)
            continue
        layout = _layout(node.op_type)
        if layout is None or node.name not in fnodes:
            continue
        fnode = fnodes[node.name]
        triples, bias_at, out_at = layout
        layer = Layer(node.name, fnode.op_type, node.op_type if node.domain != "qcompiler.sim"
                      else f"{fnode.op_type} (Q/DQ)", len(layers))
        ins = list(node.input)

        def grid(i: int, fname: str) -> TensorGrid | None:
            if len(ins) <= i + 1 or ins[i + 1] not in consts:
                return None
            zp = consts.get(ins[i + 2]) if len(ins) > i + 2 and ins[i + 2] else None
            scale = np.asarray(consts[ins[i + 1]], dtype=np.float32)
            if zp is None:
                zp = np.zeros((), dtype=np.uint8)
            return TensorGrid(fname, scale, np.asarray(zp))

        for qi, fi in triples:
            if fi >= len(fnode.input) or not ins[qi]:
                continue
            g = grid(qi, fnode.input[fi])
            if g is None:
                layer.notes.append(f"input {fi}: no constant qparams")
                continue
            if ins[qi] in consts:  # a weight
                w = np.asarray(consts[ins[qi]])
                axis = _weight_axis(fnode.op_type, fnode, w, g.scale)
                if g.scale.size > 1 and axis is None:
                    layer.notes.append(f"input {fi}: weight scale axis unknown")
                    continue
                layer.weight_grids[fi] = TensorGrid(g.float, g.scale, g.zero_point, axis)
                layer.weights[fi] = _dequant(w, g.scale, g.zero_point, axis)
            elif g.scale.size == 1:
                layer.activations[fi] = g
        if bias_at is not None and len(ins) > bias_at and ins[bias_at] in consts and len(fnode.input) > 2 \
                and 0 in layer.activations and 1 in layer.weight_grids:
            b = np.asarray(consts[ins[bias_at]])
            if b.dtype.kind == "i":
                s = np.asarray(layer.activations[0].scale, np.float64).reshape(()) * \
                    np.asarray(layer.weight_grids[1].scale, np.float64).reshape(-1)
                layer.weights[2] = (b.astype(np.float64) * s).astype(np.float32)
        layer.result = _float_of(node.output[0], ftensors) or fnode.output[0]
        if out_at is not None and len(ins) > out_at[0] and ins[out_at[0]] in consts:
            fname = layer.result
            zp = consts.get(ins[out_at[1]]) if len(ins) > out_at[1] and ins[out_at[1]] else np.zeros((), np.uint8)
            layer.output = TensorGrid(fname, np.asarray(consts[ins[out_at[0]]], np.float32), np.asarray(zp))
        if layer.activations or layer.weights or layer.output is not None:
            layers.append(layer)
    return layers


class _DynamicLayers:
    """Dynamic kernels (activations quantized per run) as analysis layers, mapped to the float
    node by the tensor the kernel's result replaces (the lowering keeps that name): the fused
    forms take the activation and return float; ``MatMulInteger``/``ConvInteger`` read a
    ``DynamicQuantizeLinear`` output, and the weight scale multiplies the Cast accumulator."""

    def __init__(self, g: onnx.GraphProto, consts: Mapping[str, np.ndarray], float_model: onnx.ModelProto) -> None:
        self.consts = consts
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.fproducer = {o: n for n in float_model.graph.node for o in n.output}

    def _only(self, tensor: str, op: str) -> onnx.NodeProto | None:
        r = self.readers.get(tensor, [])
        return r[0] if len(r) == 1 and r[0].op_type == op else None

    def layer(self, node: onnx.NodeProto, index: int) -> Layer | None:
        from ..kernels import KERNELS

        spec = KERNELS.get(node.op_type)
        if spec is None or not spec.dynamic or spec.weight is None:
            return None
        ins = list(node.input)
        weight_op = spec.inputs[spec.weight]
        if weight_op is None or len(ins) <= weight_op.value or ins[weight_op.value] not in self.consts:
            return None
        wq = np.asarray(self.consts[ins[weight_op.value]])
        zp_at = weight_op.zero_point
        wz = np.asarray(self.consts[ins[zp_at]]) if zp_at is not None and len(ins) > zp_at and ins[zp_at] in \
            self.consts else np.zeros((), wq.dtype)
        if spec.float_output:   # fused: float activation in, float result out
            result = node.output[0]
            ws = self.consts.get(ins[weight_op.scale]) if weight_op.scale is not None else None
        else:                   # DynamicQuantizeLinear -> kernel -> Cast -> Mul(acc, x_scale * w_scale)
            dql = self.producer.get(ins[0])
            cast = self._only(node.output[0], "Cast")
            mul = self._only(cast.output[0], "Mul") if cast is not None else None
            if dql is None or dql.op_type != "DynamicQuantizeLinear" or mul is None:
                return None
            result = mul.output[0]
            other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
            sm = self.producer.get(other)
            ws = None
            if sm is not None and sm.op_type == "Mul":
                ws = next((self.consts[i] for i in sm.input if i in self.consts), None)
        fnode = self.fproducer.get(result)
        if ws is None or fnode is None or fnode.op_type != spec.float_op or len(fnode.input) <= spec.weight:
            return None
        scale = np.asarray(ws, np.float32)
        layer = Layer(fnode.name, fnode.op_type, node.op_type, index)
        w_f = fnode.input[spec.weight]
        axis = _weight_axis(fnode.op_type, fnode, wq, scale)
        if scale.size > 1 and axis is None:
            return None
        layer.weight_grids[spec.weight] = TensorGrid(w_f, scale, wz, axis)
        layer.weights[spec.weight] = _dequant(wq, scale, wz, axis)
        layer.activations[0] = TensorGrid(fnode.input[0], np.zeros((), np.float32), np.zeros((), np.uint8),
                                          dynamic=True)
        layer.result = fnode.output[0]
        return layer


class FakeQuantModel:
    """``float_model`` with each layer's quantization behind a switch (see the module text).

    ``run(feed, on)`` returns the graph outputs (and ``extra`` tensors) with the layers named in
    ``on`` quantized and the rest float.

    ``parts`` quantizes only part of each switched-on layer: ``weights`` (its integer weights
    and bias, activations float) or ``activations`` (its input and output grids, weights
    float). Why: which of the two limits a model decides the remedy (per-channel weights,
    equalization, GPTQ for the first; wider activation grids or float fallback for the second).
    """

    def __init__(self, float_model: onnx.ModelProto, layers: Sequence[Layer], extra: Iterable[str] = (),
                 opt_level: Any = None, parts: str = "all") -> None:
        import onnxruntime as ort

        if parts not in PARTS:
            raise ValueError(f"parts={parts!r}: expected one of {', '.join(PARTS)}")
        quant_acts, quant_weights = parts != "weights", parts != "activations"

        self.layers = list(layers)
        m = onnx.ModelProto()
        m.CopyFrom(float_model)
        g = m.graph
        inits = {t.name: i for i, t in enumerate(g.initializer)}
        producers = {o: n for n in g.node for o in n.output}
        by_name = {n.name: n for n in g.node}
        self.switch = {layer.name: f"qc_on_{i}" for i, layer in enumerate(self.layers)}
        replace: dict[int, onnx.NodeProto] = {}       # node position -> the If node standing for it
        after: dict[int, list[onnx.NodeProto]] = {}   # node position -> nodes right after it
        order = {id(n): i for i, n in enumerate(g.node)}
        for layer in self.layers:
            sw = self.switch[layer.name]
            g.input.append(helper.make_tensor_value_info(sw, onnx.TensorProto.BOOL, []))
            node = by_name[layer.name]
            then_nodes: list[onnx.NodeProto] = []
            then_inits: list[onnx.TensorProto] = []
            else_inits: list[onnx.TensorProto] = []
            q = onnx.NodeProto()
            q.CopyFrom(node)
            f = onnx.NodeProto()
            f.CopyFrom(node)
            for fi, grid in (layer.activations.items() if quant_acts else ()):
                tag = f"{layer.index}_{fi}"
                local = f"{node.input[fi]}__qc{tag}"
                then_nodes += self._qdq(then_inits, node.input[fi], local, grid, tag)
                q.input[fi] = local
            for fi, w in (layer.weights.items() if quant_weights else ()):
                name = node.input[fi] if fi < len(node.input) else ""
                if name not in inits:
                    layer.notes.append(f"input {fi}: float weight not found")
                    continue
                wf = numpy_helper.to_array(g.initializer[inits[name]])
                if wf.shape != w.shape:
                    layer.notes.append(f"input {fi}: weight shape {w.shape} != float {wf.shape}")
                    continue
                # both branches hold their weights as their own constants: onnxruntime pre-packs
                # them (an outer-scope or computed weight would make Conv take its slow path)
                qn, fn = f"qc_w{layer.index}_{fi}_q", f"qc_w{layer.index}_{fi}_f"
                then_inits.append(numpy_helper.from_array(w.astype(np.float32), qn))
                else_inits.append(numpy_helper.from_array(wf, fn))
                q.input[fi], f.input[fi] = qn, fn
            outs = list(node.output)
            q.name, f.name = f"{node.name}__qc_q", f"{node.name}__qc_f"
            del q.output[:], f.output[:]
            q.output.extend(f"{o}__qc_then" for o in outs)
            f.output.extend(f"{o}__qc_else" for o in outs)
            then_g = helper.make_graph(then_nodes + [q], f"qc_then_{layer.index}", [],
                                       [helper.make_empty_tensor_value_info(o) for o in q.output], then_inits)
            else_g = helper.make_graph([f], f"qc_else_{layer.index}", [],
                                       [helper.make_empty_tensor_value_info(o) for o in f.output], else_inits)
            _typed(then_g), _typed(else_g)
            replace[order[id(node)]] = helper.make_node("If", [sw], outs, name=node.name, then_branch=then_g,
                                                         else_branch=else_g)
            if not quant_acts:
                pass
            elif layer.output is not None and layer.output.float in producers:
                t = layer.output.float
                prod = producers[t]
                raw = f"{t}__qc_pre{layer.index}"
                prod.output[list(prod.output).index(t)] = raw
                producers[raw] = prod
                if prod is node:
                    r = replace[order[id(node)]]
                    r.output[list(r.output).index(t)] = raw
                tag = f"{layer.index}_o"
                ti: list[onnx.TensorProto] = []
                tn = self._qdq(ti, raw, f"{t}__qc_then", layer.output, tag)
                tg = helper.make_graph(tn, f"qc_oq_{tag}", [],
                                       [helper.make_empty_tensor_value_info(f"{t}__qc_then")], ti)
                eg = helper.make_graph([helper.make_node("Identity", [raw], [f"{t}__qc_else"])], f"qc_of_{tag}", [],
                                       [helper.make_empty_tensor_value_info(f"{t}__qc_else")])
                _typed(tg), _typed(eg)
                after.setdefault(order[id(prod)], []).append(
                    helper.make_node("If", [sw], [t], name=f"{layer.name}__qc_out", then_branch=tg, else_branch=eg))
            elif layer.output is not None:
                layer.notes.append(f"output '{layer.output.float}' not in the float model")
        old = list(g.node)
        del g.node[:]
        for i, n in enumerate(old):
            g.node.append(replace.get(i, n))
            g.node.extend(after.get(i, []))
        self.outputs = [o.name for o in g.output]
        have = set(self.outputs)
        for name in extra:
            if name not in have:
                g.output.append(helper.make_empty_tensor_value_info(name))
                have.add(name)
        self.all_outputs = [o.name for o in g.output]
        so = ort.SessionOptions()
        # Full float optimization (fusions, NCHWc layout, pre-packed weights) with onnxruntime's
        # QDQ transformers off: no Q/DQ pair becomes an integer kernel (whose results differ by
        # CPU ISA). tests/test_analysis.py checks the numbers against ORT_DISABLE_ALL.
        so.graph_optimization_level = opt_level if opt_level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(_QDQ_OPTIMIZERS))
        self.proto = m

    @staticmethod
    def _qdq(inits: list[onnx.TensorProto], src: str, dst: str, grid: TensorGrid, tag: str) -> list[onnx.NodeProto]:
        s, z = f"qc_s_{tag}", f"qc_z_{tag}"
        if grid.dynamic:  # uint8, scale and zero point from this run's min/max (as the kernel does)
            return [helper.make_node("DynamicQuantizeLinear", [src], [f"{dst}__q", s, z]),
                    helper.make_node("DequantizeLinear", [f"{dst}__q", s, z], [dst])]
        inits.append(numpy_helper.from_array(np.asarray(grid.scale, np.float32).reshape(()), s))
        inits.append(numpy_helper.from_array(np.asarray(grid.zero_point).reshape(()), z))
        return [helper.make_node("QuantizeLinear", [src, s, z], [f"{dst}__q"]),
                helper.make_node("DequantizeLinear", [f"{dst}__q", s, z], [dst])]

    def run(self, feed: Mapping[str, np.ndarray], on: Collection[str], outputs: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        full = dict(feed)
        one, zero = np.ones((), np.bool_), np.zeros((), np.bool_)
        for name, sw in self.switch.items():
            full[sw] = one if name in on else zero
        names = list(outputs) if outputs is not None else self.outputs
        return dict(zip(names, self.session.run(names, full)))


def _typed(graph: onnx.GraphProto) -> None:
    """Branch outputs are float tensors of any shape (If needs their element type)."""
    for o in graph.output:
        o.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def batches(feeds: Iterable[Mapping[str, np.ndarray]], size: int = 8) -> list[dict[str, np.ndarray]]:
    """Consecutive samples with equal input shapes stacked on axis 0 (up to ``size`` each):
    fewer, larger runs. Samples of other shapes start a new batch."""
    out: list[dict[str, np.ndarray]] = []
    cur: list[Mapping[str, np.ndarray]] = []

    def flush() -> None:
        if cur:
            out.append({k: np.concatenate([f[k] for f in cur], axis=0) for k in cur[0]})
            cur.clear()

    for f in feeds:
        if cur and (len(cur) >= size or any(np.shape(f[k]) != np.shape(cur[0][k]) for k in f)):
            flush()
        cur.append(f)
    flush()
    return out
