"""quantize-dynamic: integer weights ahead of time, activations quantized at run time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import (KernelSpec, Model, Pass, PassContext, PassResult, UserError, assemble_inputs, compute_qparams,
                       kernel_spec, kernels_for, quantize, weight_qparams)
from qcompiler import Node, Variable, const_value, is_constant
from qcompiler.plan import plan_dynamic
from qcompiler.calibration.methods import weight_mse_clip

__all__ = ["QuantizeDynamic"]


def _form(spec: KernelSpec | None) -> str | None:
    """How a dynamic MatMul kernel is built: ``fused`` (it quantizes its float activation
    itself and returns float), ``integer`` (integer operands in, int32 accumulator out), or
    None (not a dynamic MatMul kernel qcompiler builds)."""
    if spec is None or not spec.dynamic or spec.float_op != "MatMul":
        return None
    if spec.float_output and spec.inputs[0] is None:
        return "fused"
    if spec.output is None and not spec.float_output:
        return "integer"
    return None


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """MatMul with a constant 2-D weight -> the target's dynamic kernel: the weight stored as
    int8 (per output column where the target allows), the activation quantized per call.
    Two kernel forms (the kernel table says which a kernel is, ``_form``): one that quantizes
    its float activation itself and returns float (onnxruntime's contrib dynamic MatMul), where
    `fold-bias=true` (default) folds a following constant bias Add into the kernel (measured on
    all-MiniLM-L6: 0.68x vs 0.82x fp32 latency unfolded); and one with an int32 accumulator
    output: DynamicQuantizeLinear -> kernel -> Cast -> Mul.

    `max-k` keeps float the MatMuls with more input features than that (in transformers the
    FFN down-projection, whose post-GELU input is the most outlier-heavy: on all-MiniLM-L6
    `max-k=1024` raises embedding cosine from 0.993 to 0.996 for about 0.1x more latency);
    `exclude` keeps named nodes float; Gather on a large constant table (embeddings) becomes
    an int8 table with one scale per row where the target lists `dynamic.ops.Gather`.
    `weight-range=mse` clips each weight column to the range with the least quantization
    error instead of its min/max (measured on all-MiniLM-L6: cosine 0.9939 -> 0.9940).

    In a static compile (the pass in a target's static pipeline, after insert-qdq, whose plan it
    reads from ``ctx.analysis["plan"]``) it builds
    only the plan's ``dynamic`` outcomes (a per-node accuracy-budget fallback,
    ``Plan.override(node, "dynamic", why)``) with the same kernel, and nothing else: a
    static compile without such outcomes is unchanged. The report's ``dynamic_nodes`` lists them.

    Why: for MatMul-heavy models (transformers) activation ranges vary per input, so
    run-time ranges keep accuracy without calibration. Requires nothing. Edits in place.
    """

    name = "quantize-dynamic"
    min_weight_elements: int = 4096
    min_table_elements: int = 1 << 20
    exclude: tuple[str, ...] = ()
    max_k: int = 0
    fold_bias: bool = True
    weight_range: str = "minmax"

    def _gather(self, rw, graph, node: Node, cfg) -> bool:
        """Gather(T, ids) on a large float table -> Gather on an int8 table, then one scale
        per gathered row: Cast(Gather(T_q, ids)) * Unsqueeze(Gather(row_scales, ids), -1)."""
        table = node.inputs[0]
        if not is_constant(table) or int(node.attrs.get("axis", 0)) != 0:
            return False
        t = const_value(table)
        if t.dtype != np.float32 or t.ndim != 2 or t.size < self.min_table_elements:
            return False
        qp = compute_qparams(t.min(axis=1), t.max(axis=1), cfg.weight.qtype, axis=0)
        if not cfg.weight.symmetric:
            return False  # a per-row zero point would need one more Gather: not worth it
        ids, out = node.inputs[1], node.outputs[0]
        tq = rw.constant(table.name + "_quantized", quantize(t, qp))
        rows = rw.constant(table.name + "_row_scale", qp.scale.reshape(-1, 1))
        gq = rw.value(out.name + "_int8", dtype=const_value(tq).dtype)
        gf = rw.value(out.name + "_int8_float", dtype=np.float32)
        gs_ = rw.value(out.name + "_row_scale", dtype=np.float32)
        rw.erase_node(graph, node)
        rw.create_node(graph, "Gather", [tq, ids], [gq], {"axis": 0}, name=node.name, reuse_name=True)
        rw.create_node(graph, "Cast", [gq], [gf], {"to": 1}, name=node.name + "_cast")
        rw.create_node(graph, "Gather", [rows, ids], [gs_], {"axis": 0}, name=node.name + "_scale")
        rw.create_node(graph, "Mul", [gf, gs_], [out], name=node.name + "_dequantize")
        return True

    def _matmul(self, rw, graph, node: Node, cfg, shared: dict[int, tuple], target: str) -> str:
        """Build the dynamic kernel for one MatMul (weight quantized now, activation per call);
        ``shared``: this graph's DynamicQuantizeLinear outputs per activation. Returns the
        kernel node's name."""
        w_val = node.inputs[1]
        w = const_value(w_val)
        qtype = cfg.weight.qtype
        # the pair-sum limit matters here too: the dynamic kernels are u8s8 GEMMs
        axis = 1 if cfg.weight.per_channel else None
        # mse: each channel's clipping range minimises its own quantization error
        qp = weight_qparams(weight_mse_clip(w, qtype, axis) if self.weight_range == "mse" else w, qtype, axis)
        wq = rw.constant(w_val.name + "_quantized", quantize(w, qp))
        ws = rw.constant(w_val.name + "_scale", qp.scale)
        wz = rw.constant(w_val.name + "_zero_point", qp.zero_point)
        out = node.outputs[0]
        a = node.inputs[0]
        spec = kernel_spec(cfg.kernel_op)
        form = _form(spec)
        if form == "fused":
            assert spec is not None
            bias, final = Variable.empty(), out
            readers = out.outputs
            if (self.fold_bias and len(readers) == 1 and readers[0].op == "Add"
                    and not graph.is_graph_output(out)):
                add = readers[0]
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                if is_constant(other) and const_value(other).shape == (w.shape[1],):
                    bias, final = other, add.outputs[0]
                    rw.erase_node(graph, add)
            rw.erase_node(graph, node)
            inputs = assemble_inputs(spec, [None, (wq, ws, wz)], None, Variable.empty)
            inputs[0] = a  # the float activation, quantized by the kernel (then the bias)
            rw.create_node(graph, spec.name, inputs + [bias],
                           [final], name=node.name + "_quant", domain=spec.domains[0])
        elif form == "integer":
            assert spec is not None
            # one DynamicQuantizeLinear per activation, shared by all its MatMuls
            # (attention's Q, K and V projections read the same input)
            if id(a) not in shared:
                aq = rw.value(a.name + "_quantized", dtype=np.uint8)
                as_ = rw.value(a.name + "_scale", dtype=np.float32, shape=[])
                az = rw.value(a.name + "_zero_point", dtype=np.uint8, shape=[])
                rw.create_node(graph, "DynamicQuantizeLinear", [a], [aq, as_, az], name=node.name + "_dql")
                shared[id(a)] = (aq, as_, az)
            aq, as_, az = shared[id(a)]
            acc = rw.value(out.name + "_int32", dtype=np.int32)
            accf = rw.value(out.name + "_float", dtype=np.float32)
            sc = rw.value(out.name + "_scale", dtype=np.float32)
            rw.erase_node(graph, node)
            rw.create_node(graph, spec.name, assemble_inputs(spec, [(aq, as_, az), (wq, ws, wz)], None,
                                                             Variable.empty),
                           [acc], name=node.name + "_quant", domain=spec.domains[0])
            rw.create_node(graph, "Cast", [acc], [accf], {"to": 1}, name=node.name + "_cast")
            rw.create_node(graph, "Mul", [as_, ws], [sc], name=node.name + "_scale_mul")
            rw.create_node(graph, "Mul", [accf, sc], [out], name=node.name + "_rescale")
        else:
            known = ", ".join(k.name for k in kernels_for("MatMul") if _form(k))
            raise UserError(f"target '{target}': key dynamic.ops.MatMul.kernel = "
                            f"'{cfg.kernel}' is not a dynamic kernel ({known})")
        return node.name + "_quant"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.weight_range not in ("minmax", "mse"):
            raise UserError(f"pass 'quantize-dynamic': option 'weight-range={self.weight_range}' must be minmax or mse")
        # after insert-qdq (a static compile) the plan exists: build its dynamic outcomes (accuracy-
        # budget fallbacks) and nothing else; otherwise this pass makes the dynamic-mode plan
        static = ctx.analysis.get("plan")
        cfg = ctx.target.op("MatMul", mode="dynamic")
        if static is not None:
            plan = static
        elif cfg is None:
            raise UserError(f"target '{ctx.target.name}' has no dynamic kernel for MatMul (key dynamic.ops.MatMul)")
        else:
            plan = plan_dynamic(model, ctx.target, exclude=self.exclude, min_weight_elements=self.min_weight_elements,
                                max_k=self.max_k, overrides=ctx.analysis.get("plan_overrides"))
        rw = ctx.rewriter(model)
        lowered: list[str] = []
        for graph in list(model.graph.walk()):
            shared: dict[int, tuple] = {}
            for node in graph.nodes:
                outcome = plan.outcome(node.name) if node.op == "MatMul" and node.outputs else None
                if outcome is not None and outcome.kind == "dynamic":
                    lowered.append(self._matmul(rw, graph, node, cfg, shared, ctx.target.name))
        if static is not None:
            if lowered:
                ctx.report["dynamic_nodes"] = {n: plan.outcome(n).reason for n in sorted(plan.dynamic)}  # type: ignore
            ctx.analysis["lowered"] = sorted(set(ctx.analysis.get("lowered", [])) | set(lowered))
            return PassResult(rw.modified)
        gather_cfg = ctx.target.op("Gather", mode="dynamic")
        if gather_cfg is not None and gather_cfg.weight.qtype is not None:
            for graph in list(model.graph.walk()):
                for node in graph.nodes:
                    if node.op == "Gather" and node.outputs and self._gather(rw, graph, node, gather_cfg):
                        lowered.append(node.name)
        ctx.analysis["plan"] = plan
        ctx.analysis["lowered"] = lowered
        ctx.analysis["float_nodes"] = plan.float_nodes
        return PassResult(rw.modified)
