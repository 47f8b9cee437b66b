"""fuse-conv-bn: fold an inference BatchNormalization into the Conv before it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import Const, Match, Model, Node, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import const_value

__all__ = ["FuseConvBn", "RULES"]


def _bias(conv: Node, out_ch: int) -> np.ndarray | None:
    """The Conv's bias as float64 (zeros when it has none); None when it is not a constant."""
    if len(conv.inputs) < 3 or not conv.inputs[2].name:
        return np.zeros(out_ch)
    bias = const_value(conv.inputs[2])
    return bias.astype(np.float64) if bias is not None else None


def _foldable(m: Match) -> str | None:
    bn, out_ch = m.root, m.const("w").shape[0]
    if len(bn.outputs) != 1 or int(bn.attrs.get("training_mode", 0)):
        return "BatchNormalization in training mode"
    if any(m.const(k).shape != (out_ch,) for k in ("gamma", "beta", "mean", "var")):
        return f"BatchNormalization parameters are not one value per Conv output channel ({out_ch})"
    if _bias(m.nodes["conv"], out_ch) is None:
        return "the Conv bias is not a constant"
    return None


def _fold(m: Match, rw: Rewriter) -> bool:
    # BN(conv(x, W) + b) = conv(x, W * s) + (b - mean) * s + beta,  s = gamma / sqrt(var + eps)
    bn, conv, weight = m.root, m.nodes["conv"], m.const("w")
    gamma, beta, mean, var = (m.const(k).astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    bias = _bias(conv, weight.shape[0])
    new_w = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
    new_b = ((bias - mean) * s + beta).astype(weight.dtype)
    rw.set_input(conv, 1, rw.constant(conv.inputs[1].name, new_w))
    rw.set_input(conv, 2, rw.constant(conv.name + "_bias", new_b))
    out = bn.outputs[0]
    rw.erase_node(m.graph, bn)
    rw.replace_all_uses(m.graph, out, conv.outputs[0])
    return True


RULES = (
    # BatchNormalization(Conv(x, W[, b])) -> Conv(x, W', b')
    Rule("conv-bn", Op("BatchNormalization", inputs=(
        Op("Conv", inputs=(None, Const("w")), single_use=True, bind="conv"),
        Const("gamma"), Const("beta"), Const("mean"), Const("var"))), _fold, where=_foldable),
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
