"""fold-matmul-add: MatMul + bias Add -> Gemm, where the target prefers Gemm."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import AnyValue, Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import Value, const_value, is_constant

__all__ = ["FoldMatmulAdd"]


def _rank(value: Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _fold(m: Match, rw: Rewriter) -> bool:
    # Add(MatMul(A[M,K], W[K,N]), b[N]) -> Gemm(A, W, b)
    add, mm = m.root, m.nodes["mm"]
    a, w = mm.inputs[0], m.const("w")
    b_value = m.values["b"]
    if not is_constant(b_value):
        return False
    b = const_value(b_value)
    if _rank(a) != 2 or w.ndim != 2 or b.reshape(-1).shape[0] != w.shape[1] or b.size != w.shape[1]:
        return False
    out = add.outputs[0]
    gemm_out = rw.value(out.name + "_gemm", dtype=out.dtype, shape=out.shape)
    rw.create_node(m.graph, "Gemm", [a, mm.inputs[1], rw.constant(b_value.name + "_1d", b.reshape(-1))],
                   [gemm_out], {}, name=mm.name + "_gemm", before=mm)
    rw.erase_node(m.graph, add)
    rw.erase_node(m.graph, mm)
    rw.replace_all_uses(m.graph, out, gemm_out)
    return True


_MM = Op("MatMul", inputs=(AnyValue(), Const("w")), single_use=True, bind="mm")
RULES = (
    Rule("matmul-add", Op("Add", inputs=(_MM, AnyValue("b"))), _fold),
    Rule("add-matmul", Op("Add", inputs=(AnyValue("b"), _MM)), _fold),
)


@dataclass(frozen=True)
class FoldMatmulAdd(Pass):
    """MatMul (2-D activation, constant 2-D weight) followed by an Add of a constant [N] bias
    -> one Gemm, only where the target's MatMul entry says `prefer_gemm = true`.

    Why: a Gemm lowers to one integer kernel with an int32 bias (QGemm) instead of a
    QLinearMatMul plus a requantizing QLinearAdd. Requires shapes (run infer-shapes first).
    Edits in place; exact.
    """

    name = "fold-matmul-add"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = ctx.target.op("MatMul")
        if cfg is None or not cfg.prefer_gemm or ctx.target.op("Gemm") is None:
            return PassResult(False)
        rw = ctx.rewriter(model)
        apply_rules(model, RULES, rw)
        return PassResult(rw.modified)
