"""fuse-gelu: 0.5 * x * (1 + erf(x / sqrt(2))) -> one Gelu(x)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qcompiler import Const, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, UserError, apply_rules
from qcompiler import Node, const_value, is_constant

__all__ = ["FuseGelu", "RULES"]

# option value -> (domain of the emitted Gelu, default-domain opset it needs)
_DOMAINS = {"ai.onnx": ("", 20), "com.microsoft": ("com.microsoft", 0)}


def _near(value: float) -> Callable[[np.ndarray], bool]:
    return lambda a: a.size == 1 and math.isclose(float(a.reshape(-1)[0]), value, rel_tol=1e-6)


def _is_const(v: object, value: float) -> bool:
    """``v`` is an initializer holding one number close to ``value``."""
    return is_constant(v) and _near(value)(const_value(v))


def _other(node: Node, value: object) -> object:
    """The input of a binary ``node`` that is not ``value`` (None if neither/both are)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def _erf_argument(erf: Node) -> object:
    """x when Erf reads x / sqrt(2) or x * (1 / sqrt(2)), else None."""
    scale = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
    if scale is None or len(scale.inputs) != 2:
        return None
    x, c = scale.inputs
    if scale.op == "Div" and _is_const(c, math.sqrt(2.0)):
        return x
    if scale.op == "Mul":
        for x, c in ((scale.inputs[0], scale.inputs[1]), (scale.inputs[1], scale.inputs[0])):
            if not is_constant(x) and _is_const(c, math.sqrt(0.5)):
                return x
    return None


def _fuse(m: Match, rw: Rewriter, domain: str) -> bool:
    """The product's three factors (in any grouping) must be x, 0.5 and (1 + erf(x / sqrt 2))."""
    root, add = m.root, m.nodes["add"]
    erf = add.inputs[0].inputs[0] if add.inputs[0].inputs and add.inputs[0].inputs[0].op == "Erf" else add.inputs[1].inputs[0]
    x = _erf_argument(erf)
    if x is None:
        return False
    scale = erf.inputs[0].inputs[0]
    inner = m.nodes["inner"]
    if any(v is add.outputs[0] for v in inner.inputs):  # (x * a) * 0.5 or x * (a * 0.5)
        f1, f2 = _other(inner, add.outputs[0]), _other(root, inner.outputs[0])
    else:  # (x * 0.5) * a: the root reads the Add, the inner Mul scales x
        f1, f2 = inner.inputs[0], inner.inputs[1]
    if not ((f1 is x and _is_const(f2, 0.5)) or (f2 is x and _is_const(f1, 0.5))):
        return False
    if len(scale.outputs[0].outputs) != 1 or len(erf.outputs[0].outputs) != 1:
        return False
    graph = m.graph
    if graph.is_graph_output(scale.outputs[0]) or graph.is_graph_output(erf.outputs[0]):
        return False
    out = root.outputs[0]
    new = rw.value(out.name + "_gelu", dtype=out.dtype, shape=out.shape)
    rw.create_node(graph, "Gelu", [x], [new], name=root.name + "_gelu", domain=domain, before=scale)
    for node in (root, inner, add, erf, scale):
        rw.erase_node(graph, node)
    rw.replace_all_uses(graph, out, new)
    return True


_ADD = Op("Add", inputs=(Op("Erf", single_use=True), Const(check=_near(1.0))), single_use=True, bind="add")
_ADD_C = Op("Add", inputs=(Const(check=_near(1.0)), Op("Erf", single_use=True)), single_use=True, bind="add")


def _rules(domain: str) -> tuple[Rule, ...]:
    """Every grouping exporters write: ((x * a) * 0.5), (0.5 * (a * x)), (x * (a * 0.5)),
    ((x * 0.5) * a), ... with a = 1 + erf(...); which factor is x is checked in :func:`_fuse`."""
    rules: list[Rule] = []
    for a_name, a in (("add", _ADD), ("add-commuted", _ADD_C)):
        half = Op("Mul", single_use=True, bind="inner")  # x * 0.5, multiplied by a at the root
        for outer_side in (0, 1):
            rules.append(Rule(f"gelu-{a_name}-half-first-{outer_side}",
                              Op("Mul", inputs=(a, half) if outer_side == 0 else (half, a)),
                              lambda m, rw: _fuse(m, rw, domain)))
        for side in (0, 1):  # where the Add's output sits in the inner Mul
            inner_inputs = (a, None) if side == 0 else (None, a)
            inner = Op("Mul", inputs=inner_inputs, single_use=True, bind="inner")
            for outer_side in (0, 1):
                outer_inputs = (inner, None) if outer_side == 0 else (None, inner)
                rules.append(Rule(f"gelu-{a_name}-{side}{outer_side}", Op("Mul", inputs=outer_inputs),
                                  lambda m, rw: _fuse(m, rw, domain)))
    return tuple(rules)


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
    (opset 20+; the pass does nothing on an older model), `com.microsoft` onnxruntime's contrib
    Gelu (any opset; for onnxruntime targets). Requires the intermediate values to be read only
    inside the pattern. Edits in place; equal to float rounding (the kernel computes
    x * 0.5 * (1 + erf(x * 0.7071...)) in float32).
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
