"""fold-matmul-add: MatMul + bias Add -> Gemm, where the target prefers Gemm."""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler import AnyValue, Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import Value

__all__ = ["FoldMatmulAdd"]


def _rank(value: Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _fits(m: Match) -> str | None:
    a, w, b = m.values["a"], m.const("w"), m.const("b")
    if _rank(a) != 2 or w.ndim != 2:
        return "Gemm needs a 2-D activation and a 2-D weight"
    if b.reshape(-1).shape[0] != w.shape[1] or b.size != w.shape[1]:
        return f"the bias (shape {list(b.shape)}) is not one value per output column ({w.shape[1]})"
    return None


def _fold(m: Match, rw: Rewriter) -> bool:
    # Add(MatMul(A[M,K], W[K,N]), b[N]) -> Gemm(A, W, b)
    mm, b = m.nodes["mm"], m.values["b"]
    bias = rw.constant(b.name + "_1d", m.const("b").reshape(-1))
    rw.replace_node(m.graph, m.root, "Gemm", [m.values["a"], mm.inputs[1], bias], name=mm.name, before=mm, erase=[mm])
    return True


_MM = Op("MatMul", inputs=(AnyValue("a"), Const("w")), single_use=True, bind="mm")
RULES = (Rule("matmul-add", Op("Add", inputs=(_MM, Const("b")), commutative=True), _fold, where=_fits),)


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
