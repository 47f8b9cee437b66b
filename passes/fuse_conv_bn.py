"""fuse-conv-bn: fold an inference BatchNormalization into the Conv before it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules

__all__ = ["FuseConvBn", "RULES"]


def _fold(m: Match, rw: Rewriter) -> bool:
    # BN(conv(x, W) + b) = conv(x, W * s) + (b - mean) * s + beta,  s = gamma / sqrt(var + eps)
    bn, conv = m.root, m.nodes["conv"]
    if len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)):
        return False
    weight = m.const("w")
    out_ch = weight.shape[0]
    gamma, beta, mean, var = (m.const(k).astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    if any(a.shape != (out_ch,) for a in (gamma, beta, mean, var)):
        return False
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    bias = np.zeros(out_ch) if len(conv.inputs) < 3 or not conv.inputs[2].name else None
    if bias is None:
        value = conv.inputs[2]
        if not hasattr(value, "values"):
            return False
        bias = np.asarray(value.values).astype(np.float64)
    new_w = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
    new_b = ((bias - mean) * s + beta).astype(weight.dtype)
    graph = m.graph
    rw.set_input(conv, 1, rw.constant(conv.inputs[1].name, new_w))
    rw.set_input(conv, 2, rw.constant(conv.name + "_bias", new_b))
    out = bn.outputs[0]
    rw.erase_node(graph, bn)
    rw.replace_all_uses(graph, out, conv.outputs[0])
    return True


RULES = (
    # BatchNormalization(Conv(x, W[, b])) -> Conv(x, W', b')
    Rule("conv-bn", Op("BatchNormalization", inputs=(
        Op("Conv", inputs=(None, Const("w")), single_use=True, bind="conv"),
        Const("gamma"), Const("beta"), Const("mean"), Const("var"))), _fold),
)


@dataclass(frozen=True)
class FuseConvBn(Pass):
    """Conv followed by inference-mode BatchNormalization -> one Conv with scaled weights
    and a new bias. Requires constant Conv weights and BN parameters, and a Conv output read
    only by the BN. Edits in place; numerically equal up to float rounding.
    """

    name = "fuse-conv-bn"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        apply_rules(model, RULES, rw)
        return PassResult(rw.modified)
