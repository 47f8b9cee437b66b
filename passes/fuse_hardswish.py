"""fuse-hardswish: x * clip(x + 3, 0, 6) / 6 -> HardSwish(x)."""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler import AnyValue, Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules

__all__ = ["FuseHardswish", "RULES"]


def _fuse(m: Match, rw: Rewriter) -> bool:
    # Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) -> HardSwish(x); the chain is read only inside itself
    chain = [m.nodes[k] for k in ("mul", "clip", "add")]
    return bool(rw.replace_node(m.graph, m.root, "HardSwish", [m.values["x"]], before=chain[-1], erase=chain))


_X = AnyValue("x")
_CLIP = Op("Clip", inputs=(Op("Add", inputs=(_X, Const(value=3.0)), commutative=True, single_use=True, bind="add"),
                           Const(value=0.0), Const(value=6.0)), single_use=True, bind="clip")
RULES = (Rule("hardswish", Op("Div", inputs=(Op("Mul", inputs=(_X, _CLIP), commutative=True, single_use=True, bind="mul"),
                                             Const(value=6.0))), _fuse),)


@dataclass(frozen=True)
class FuseHardswish(Pass):
    """The decomposed hard-swish `x * clip(x + 3, 0, 6) / 6` -> one HardSwish node (opset 14+).

    Why: decomposed, it is four ops and, quantized, four requantizations of the same value;
    as one op it is one float kernel between a DQ and a Q. Requires opset >= 14 (a no-op
    below). Edits in place; exact.
    """

    name = "fuse-hardswish"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if (model.opset("") or 0) < 14:
            return PassResult(False)
        rw = ctx.rewriter(model)
        apply_rules(model, RULES, rw)
        return PassResult(rw.modified)

