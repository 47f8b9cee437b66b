"""fuse-hardswish: x * clip(x + 3, 0, 6) / 6 -> HardSwish(x)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import const_value, is_constant

__all__ = ["FuseHardswish", "RULES"]


def _is(value: float):
    return lambda a: a.size == 1 and abs(float(a.reshape(-1)[0]) - value) < 1e-6


def _fuse(m: Match, rw: Rewriter) -> bool:
    # Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) -> HardSwish(x)
    div, mul, add = m.root, m.nodes["mul"], m.nodes["add"]
    clip = m.nodes["clip"]
    x = add.inputs[0] if is_constant(add.inputs[1]) else add.inputs[1]
    other = mul.inputs[1] if mul.inputs[0] is clip.outputs[0] else mul.inputs[0]
    if other is not x or len(clip.inputs) < 3:
        return False
    lo, hi = clip.inputs[1], clip.inputs[2]
    if not (is_constant(lo) and is_constant(hi)
            and _is(0.0)(const_value(lo)) and _is(6.0)(const_value(hi))):
        return False
    out = div.outputs[0]
    new = rw.value(out.name + "_hardswish", dtype=out.dtype, shape=out.shape)
    rw.create_node(m.graph, "HardSwish", [x], [new], name=div.name + "_hardswish", before=add)
    for node in (div, mul, clip, add):  # single-use chain: nothing else reads it, drop it all
        rw.erase_node(m.graph, node)
    rw.replace_all_uses(m.graph, out, new)
    return True


_ADD = Op("Add", single_use=True, bind="add")
_CLIP = Op("Clip", inputs=(_ADD,), single_use=True, bind="clip")
RULES = (
    Rule("hardswish", Op("Div", inputs=(Op("Mul", inputs=(None, _CLIP), single_use=True, bind="mul"), Const(check=_is(6.0)))), _fuse),
    Rule("hardswish-commuted", Op("Div", inputs=(Op("Mul", inputs=(_CLIP, None), single_use=True, bind="mul"), Const(check=_is(6.0)))), _fuse),
)


@dataclass(frozen=True)
class FuseHardswish(Pass):
    """The decomposed hard-swish `x * clip(x + 3, 0, 6) / 6` -> one HardSwish node (opset 14+).

    Why: decomposed, it is four ops and, quantized, four requantizations of the same value;
    as one op it is one float kernel between a DQ and a Q. Requires opset >= 14 (a no-op
    below). Edits in place; exact. (The Add must add the constant 3: checked in `where`.)
    """

    name = "fuse-hardswish"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if (model.opset("") or 0) < 14:
            return PassResult(False)
        rw = ctx.rewriter(model)
        rules = tuple(Rule(r.name, r.pattern, r.rewrite, where=_adds_three) for r in RULES)
        apply_rules(model, rules, rw)
        return PassResult(rw.modified)


def _adds_three(m: Match) -> bool:
    add = m.nodes["add"]
    consts = [v for v in add.inputs if is_constant(v)]
    return len(consts) == 1 and _is(3.0)(const_value(consts[0]))
