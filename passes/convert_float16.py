"""convert-float16: run whatever stays float in float16 when the target says so.

A target with ``defaults.float_precision = "fp16"`` computes its float parts in half
precision (e.g. TensorRT with fp16 enabled, NPUs whose host path is fp16). This pass makes the
model say so: float nodes outside the quantized path compute in float16, with Casts where an
fp32 value enters or leaves such a region. With ``"fp32"`` (the default) it does nothing, so it
can sit in every pipeline.

Which node converts is decided by the node's ONNX schema, not by a list of op names: every
type variable of the node bound to a float32 value converts when its constraint allows
``tensor(float16)``; positions with a fixed type (``tensor(float)``, e.g. Resize ``scales``)
or a type variable that does not allow float16 stay float32 and are fed float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler import INTEGER_OPS, Graph, Model, Node, Pass, PassContext, PassResult, Rewriter, Value
from qcompiler import node_subgraphs

__all__ = ["ConvertFloat16", "KEEP_OPS", "MOVEMENT_OPS", "FP16_MAX"]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: larger finite constants are clamped to it

# Never converted: quantization steps, integer kernels, and ops whose output type comes from
# an attribute or tensor rather than from their inputs (converting them means rewriting the
# attribute, and the Casts around them cost as much as they save).
KEEP_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
}) | INTEGER_OPS

# Move or select data without arithmetic: they follow their producer (float16 only when a
# converted node feeds them), since converting them alone would only add a pair of Casts.
MOVEMENT_OPS = frozenset({
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Gather",
    "GatherElements", "GatherND", "Split", "Concat", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
    "Pad", "ReverseSequence", "Compress",
})

# Read any element type and compute nothing in float: they read whichever type the value
# has after conversion, so no Cast is ever inserted for them.
_ANY_TYPE_READERS = frozenset({"Shape", "Size"})

# Ops whose out-of-range constants may be clamped to +-65504 without changing the result:
# Clip bounds beyond what float16 data can reach (e.g. max = FLT_MAX) bound nothing either way.
# Any other node reading such a constant (attention masks of -1e9, BatchNormalization running
# variances of 1e7) stays float32.
_CLAMPABLE = frozenset({"Clip"})

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


@lru_cache(maxsize=None)
def _schema(op: str, opset: int, domain: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _is_f32(value: Value) -> bool:
    return value.dtype is not None and np.dtype(value.dtype) == _F32


def _positions(node: Node, schema: onnx.defs.OpSchema) -> list[tuple[str, int, str]] | None:
    """(``"in"``/``"out"``, index, type string) for every present input and output, or None when
    the node does not fit its schema's formal parameters (then it is left alone)."""
    found: list[tuple[str, int, str]] = []
    for kind, values, formals in (("in", node.inputs, schema.inputs), ("out", node.outputs, schema.outputs)):
        for i, value in enumerate(values):
            if i < len(formals):
                formal = formals[i]
            elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                formal = formals[-1]
                if not formal.is_homogeneous:
                    return None
            else:
                return None
            if value.name:
                found.append((kind, i, formal.type_str))
    return found


def _plan_node(node: Node, graph: Graph, exclude: frozenset[str]) -> tuple[set[int], set[int]] | None:
    """Input and output indices that become float16, or None when the node stays as it is."""
    if node.op in KEEP_OPS or node.op in _ANY_TYPE_READERS or node.name in exclude:
        return None
    domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
    if domain != "" or node_subgraphs(node):
        return None  # custom kernels keep their types; If/Loop/Scan bodies stay float32
    schema = _schema(node.op, graph.opset("") or 1, domain)
    if schema is None:
        return None
    positions = _positions(node, schema)
    if positions is None:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, list[tuple[str, int]]] = {}
    for kind, i, type_str in positions:
        if type_str in allowed:
            bound.setdefault(type_str, []).append((kind, i))
    ins: set[int] = set()
    outs: set[int] = set()
    for var, where in bound.items():
        values = [(node.inputs if k == "in" else node.outputs)[i] for k, i in where]
        if not any(_is_f32(v) for v in values) or "tensor(float16)" not in allowed[var]:
            continue
        # one type variable, one type: values of unknown dtype bound with a float32 are float32
        if any(v.dtype is not None and np.dtype(v.dtype) != _F32 for v in values):
            return None  # inconsistent types: leave the node to the checker
        ins.update(i for k, i in where if k == "in")
        outs.update(i for k, i in where if k == "out")
    if not ins and not outs:
        return None
    if node.op not in _CLAMPABLE and any(_out_of_range(node.inputs[i]) for i in ins):
        return None  # e.g. BatchNormalization running variance 1e7: clamping would be wrong
    return ins, outs


def _out_of_range(value: Value) -> bool:
    """A float32 constant with finite values float16 cannot hold (|x| > 65504)."""
    if not isinstance(value, gs.Constant):
        return False
    array = np.asarray(value.values)
    return array.dtype == _F32 and bool(np.any(np.isfinite(array) & (np.abs(array) > FP16_MAX)))


def _quantized_nodes(graph: Graph, ctx: PassContext) -> set[int]:
    """Ids of the nodes a QDQ runtime fuses into integer kernels: those that read a
    DequantizeLinear output and that the target quantizes (an ``[ops]`` entry or
    ``[passthrough]``), and ops fused after them (``[[fused]]``, e.g. Conv+Relu). A Cast
    between DQ and such a node would break the fusion, so they keep float32."""
    target = ctx.target
    quantized: set[int] = set()
    for node in graph.nodes:
        readers_of_dq = any((p := Graph.producer(v)) is not None and p.op == "DequantizeLinear" for v in node.inputs)
        first = Graph.producer(node.inputs[0]) if node.inputs else None
        if ((readers_of_dq and (target.op(node.op) is not None or node.op in target.passthrough))
                or (first is not None and id(first) in quantized and target.fused_with(first.op, node.op))):
            quantized.add(id(node))
    return quantized


def _to_fp16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 with finite values clamped to fp16's range (only `_CLAMPABLE` nodes
    get here with such values: a Clip bound of FLT_MAX would otherwise become an infinity)."""
    clamped = np.where(np.isfinite(array), np.clip(array, -FP16_MAX, FP16_MAX), array)
    return clamped.astype(np.float16)


def _unique(nodes: list[Node]) -> list[Node]:
    """Each node once, in order (a node reading a value twice is listed twice by gs)."""
    seen: set[int] = set()
    return [n for n in nodes if not (id(n) in seen or seen.add(id(n)))]


def _cast(rw: Rewriter, graph: Graph, src: Value, to: int, dtype: np.dtype, hint: str) -> Value:
    out = rw.value(hint, dtype=dtype, shape=src.shape)
    rw.create_node(graph, "Cast", [src], [out], {"to": to}, name=hint)
    return out


@dataclass(frozen=True)
class ConvertFloat16(Pass):
    """Make float nodes outside the quantized path compute in float16 when the target's
    ``defaults.float_precision`` is ``"fp16"`` (or ``force``). Graph inputs and outputs keep
    float32 (Casts at the boundary); Q/DQ, integer kernels, Cast, custom-domain ops, nodes with
    subgraphs, ``exclude`` (node names) and ``exclude-ops`` (op types) stay float32. In QDQ
    format, ops the target quantizes that read a DequantizeLinear (and ops fused after them)
    stay float32 too: the runtime fuses DQ into them, and a Cast in between would prevent it.

    Requires value dtypes (run after infer-shapes; a node whose float types are unknown is
    left float32). Edits in place; not exact (float16 rounding).
    """

    name = "convert-float16"
    force: bool = False
    exclude: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()  # op types kept float32, e.g. Softmax,ReduceSum for range

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not self.force and getattr(ctx.target, "float_precision", "fp32") != "fp16":
            return PassResult(False)
        rw = ctx.rewriter(model)
        graph = model.graph
        exclude = frozenset(self.exclude)
        exclude_ops = frozenset(self.exclude_ops)
        quantized = _quantized_nodes(graph, ctx) if ctx.format == "qdq" else set()
        plans: dict[int, tuple[set[int], set[int]]] = {}
        half: set[int] = set()  # values converted nodes produce in float16 (nodes are in order)
        for node in graph.nodes:
            if id(node) in quantized or node.op in exclude_ops:
                continue
            plan = _plan_node(node, graph, exclude)
            if plan is None:
                continue
            if node.op in MOVEMENT_OPS and not any(id(node.inputs[i]) in half for i in plan[0]):
                continue  # Cast -> Reshape -> Cast would only add work: move float32 data as it is
            plans[id(node)] = plan
            half.update(id(node.outputs[i]) for i in plan[1])
        if not plans:
            return PassResult(False)
        self._rewire(rw, graph, plans)
        _drop_cancelling_casts(rw, graph)
        rw.cleanup(graph)
        rw.toposort(graph)
        return PassResult(rw.modified)

    def _rewire(self, rw: Rewriter, graph: Graph, plans: dict[int, tuple[set[int], set[int]]]) -> None:
        # Every value touched by a converted position, in first-seen order (deterministic).
        order: list[Value] = []
        seen: set[int] = set()
        half_out: set[int] = set()  # values a converted node now produces in float16
        for node in graph.nodes:
            plan = plans.get(id(node))
            if plan is None:
                continue
            ins, outs = plan
            for i in sorted(ins):
                v = node.inputs[i]
                if id(v) not in seen:
                    seen.add(id(v))
                    order.append(v)
            for i in sorted(outs):
                v = node.outputs[i]
                half_out.add(id(v))
                if id(v) not in seen:
                    seen.add(id(v))
                    order.append(v)
        for value in order:
            # (reader, input index) pairs that read float16 / float32 after the conversion
            half_readers: list[tuple[Node, int]] = []
            float_readers: list[tuple[Node, int]] = []
            for reader in _unique(value.outputs):
                if reader.op in _ANY_TYPE_READERS:
                    continue
                plan = plans.get(id(reader))
                for i, inp in enumerate(reader.inputs):
                    if inp is value:
                        (half_readers if plan is not None and i in plan[0] else float_readers).append((reader, i))
            if id(value) in half_out:
                rw.set_value_type(value, _F16, value.shape)
                if float_readers or graph.is_graph_output(value):
                    back = _cast(rw, graph, value, onnx.TensorProto.FLOAT, _F32, value.name + "_fp32")
                    for reader, i in float_readers:
                        rw.set_input(reader, i, back)
                    if graph.is_graph_output(value):
                        # the public output keeps its name and float32 type; the fp16 value is renamed
                        rw.replace_all_uses(graph, value, back, except_nodes=list(value.outputs))
            elif half_readers:
                if isinstance(value, gs.Constant):
                    if value.dtype is not None and np.dtype(value.dtype) == _F32:
                        half: Value = rw.constant(value.name + "_fp16", _to_fp16(np.asarray(value.values)))
                    else:
                        continue
                else:
                    half = _cast(rw, graph, value, onnx.TensorProto.FLOAT16, _F16, value.name + "_fp16")
                for reader, i in half_readers:
                    rw.set_input(reader, i, half)


def _drop_cancelling_casts(rw: Rewriter, graph: Graph) -> None:
    # Cast(to=FLOAT16)(Cast(to=FLOAT)(x16)) -> x16: fp16 -> fp32 -> fp16 is the identity
    for node in graph.nodes:
        if node.op != "Cast" or int(node.attrs.get("to", 0)) != onnx.TensorProto.FLOAT16:
            continue
        inner = Graph.producer(node.inputs[0])
        if inner is None or inner.op != "Cast" or int(inner.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
            continue
        src = inner.inputs[0]
        if src.dtype is None or np.dtype(src.dtype) != _F16 or graph.is_graph_output(node.outputs[0]):
            continue
        rw.replace_all_uses(graph, node.outputs[0], src)
