"""fold-conv-affine: fold constant scale/shift (Mul/Add by a constant) into an adjacent Conv."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import AnyValue, Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import Node, const_value, is_constant

__all__ = ["FoldConvAffine", "RULES"]


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts as a per-output-channel (or scalar) factor of an NC... tensor."""
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    shape = (1,) * (rank - c.ndim) + c.shape
    if len(shape) != rank or shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return c.reshape(-1).astype(np.float64)


def _conv_parts(conv: Node) -> tuple[np.ndarray, np.ndarray] | None:
    w = conv.inputs[1]
    if not is_constant(w):
        return None
    weight = const_value(w).astype(np.float64)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        if not is_constant(conv.inputs[2]):
            return None
        bias = const_value(conv.inputs[2]).astype(np.float64)
    else:
        bias = np.zeros(weight.shape[0])
    return weight, bias


def _after(m: Match, rw: Rewriter) -> bool:
    # Mul(Conv(x), c) -> Conv(x, W*c, b*c);  Add(Conv(x), d) -> Conv(x, W, b+d)
    node, conv = m.root, m.nodes["conv"]
    parts = _conv_parts(conv)
    if parts is None:
        return False
    weight, bias = parts
    rank = weight.ndim  # a Conv's output has its weight's rank, known even when shapes are not
    c = _per_channel(m.const("c"), weight.shape[0], rank)
    if c is None:
        return False
    if node.op == "Mul":
        weight = weight * c.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = bias * c
    else:
        bias = bias + c
    dtype = const_value(conv.inputs[1]).dtype
    rw.set_input(conv, 1, rw.constant(conv.inputs[1].name, weight.astype(dtype)))
    rw.set_input(conv, 2, rw.constant(conv.name + "_bias", bias.astype(dtype)))
    out = node.outputs[0]
    rw.erase_node(m.graph, node)
    rw.replace_all_uses(m.graph, out, conv.outputs[0])
    return True


def _before(m: Match, rw: Rewriter) -> bool:
    # Conv(a*x) -> Conv(x, W*a);  Conv(x+b) -> Conv(x, W, bias + W.sum*b)  (unpadded convs only)
    conv, node = m.root, m.nodes["affine"]
    x = m.values["x"]
    if int(conv.attrs.get("group", 1)) != 1:
        return False
    if any(conv.attrs.get("pads", [0])) or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False  # padded zeros are not scaled/shifted: not exact
    parts = _conv_parts(conv)
    if parts is None:
        return False
    weight, bias = parts
    rank = weight.ndim
    c = _per_channel(m.const("c"), weight.shape[1], rank)
    if c is None:
        return False
    if x.shape is None or len(x.shape) != rank or x.shape[1] != weight.shape[1]:
        return False  # the constant would broadcast x up to more channels: Conv(x) alone is invalid
    shape = (1, -1) + (1,) * (rank - 2)
    if node.op == "Mul":
        weight = weight * c.reshape(shape)
    else:
        bias = bias + (weight * c.reshape(shape)).sum(axis=tuple(range(1, rank)))
    dtype = const_value(conv.inputs[1]).dtype
    rw.set_input(conv, 1, rw.constant(conv.inputs[1].name, weight.astype(dtype)))
    rw.set_input(conv, 2, rw.constant(conv.name + "_bias", bias.astype(dtype)))
    rw.set_input(conv, 0, x)
    rw.erase_node(m.graph, node)
    return True


_CONV = Op("Conv", single_use=True, bind="conv")
_AFFINE = Op(("Mul", "Add"), inputs=(AnyValue("x"), Const("c")), commutative=True, single_use=True, bind="affine")
RULES = (
    Rule("conv-then-affine", Op(("Mul", "Add"), inputs=(_CONV, Const("c")), commutative=True), _after),
    Rule("affine-then-conv", Op("Conv", inputs=(_AFFINE,)), _before),
)


@dataclass(frozen=True)
class FoldConvAffine(Pass):
    """A constant per-channel (or scalar) Mul/Add right after a Conv goes into its weights
    and bias; one right before an unpadded, ungrouped Conv goes in too.

    Why: exporters write BatchNormalization and learnable affine layers as Mul/Add by
    constants; left alone each one is an extra requantization step (and an extra kernel).
    Requires constant Conv weights. Edits in place; exact up to float rounding.
    """

    name = "fold-conv-affine"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        apply_rules(model, RULES, rw)
        return PassResult(rw.modified)
