"""fuse-gelu: 0.5 * x * (1 + erf(x / sqrt(2))) -> one Gelu(x)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qcompiler import (AnyValue, Const, Either, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule,
                       UserError, apply_rules)

__all__ = ["FuseGelu", "RULES"]

# option value -> (domain of the emitted Gelu, default-domain opset it needs)
_DOMAINS = {"ai.onnx": ("", 20), "com.microsoft": ("com.microsoft", 0)}

_X, _HALF = AnyValue("x"), Const(value=0.5)
_SCALED = Either(Op("Div", inputs=(_X, Const(value=math.sqrt(2.0))), single_use=True, bind="scale"),
                 Op("Mul", inputs=(_X, Const(value=math.sqrt(0.5))), commutative=True, single_use=True, bind="scale"))
_ERF1 = Op("Add", inputs=(Op("Erf", inputs=(_SCALED,), single_use=True, bind="erf"), Const(value=1.0)),
           commutative=True, single_use=True, bind="add")
_INNER = {"commutative": True, "single_use": True, "bind": "inner"}
# the three groupings exporters write: (x * 0.5) * a, (x * a) * 0.5, x * (a * 0.5); a = 1 + erf(...)
_GROUPINGS = (Op("Mul", (Op("Mul", (_X, _HALF), **_INNER), _ERF1), commutative=True),
              Op("Mul", (Op("Mul", (_X, _ERF1), **_INNER), _HALF), commutative=True),
              Op("Mul", (_X, Op("Mul", (_ERF1, _HALF), **_INNER)), commutative=True))


def _rules(domain: str) -> tuple[Rule, ...]:
    def fuse(m: Match, rw: Rewriter) -> bool:
        chain = [m.nodes[k] for k in ("inner", "add", "erf", "scale")]
        return bool(rw.replace_node(m.graph, m.root, "Gelu", [m.values["x"]], domain=domain, before=chain[-1], erase=chain))

    return tuple(Rule(f"gelu-{i}", pattern, fuse) for i, pattern in enumerate(_GROUPINGS))


_RULES = {domain: _rules(domain) for domain, _ in _DOMAINS.values()}
RULES = _RULES[""]  # emitting the standard Gelu (opset 20+)


@dataclass(frozen=True)
class FuseGelu(Pass):
    """The exact (erf) GELU as exporters decompose it, `0.5 * x * (1 + erf(x / sqrt(2)))`
    (Div by sqrt 2 or Mul by 1/sqrt 2; the three factors in any grouping) -> one `Gelu(x)`.

    Why: decomposed, it is five ops; a target that quantizes Add and Mul then rounds the value
    at every piece, and calibration must observe each piece, which also stops onnxruntime from
    fusing them while it calibrates (MiniLM: 24 more values, 11 MB a sample). As one op it
    stays float between one DQ and one Q. Option `domain`: `ai.onnx` emits the standard Gelu
    (opset 20+; a no-op on older models), `com.microsoft` onnxruntime's contrib Gelu (any
    opset). Requires the intermediate values to be read only inside the pattern. Edits in place;
    equal to float rounding (the kernel computes x * 0.5 * (1 + erf(x * 0.7071...)) in float32).
    """

    name = "fuse-gelu"
    domain: str = "ai.onnx"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.domain not in _DOMAINS:
            raise UserError(f"fuse-gelu: domain must be one of {', '.join(sorted(_DOMAINS))}, not '{self.domain}'")
        domain, needs = _DOMAINS[self.domain]
        if (model.opset("") or 0) < needs:
            return PassResult(False)
        rw = ctx.rewriter(model)
        apply_rules(model, _RULES[domain], rw)
        return PassResult(rw.modified)
