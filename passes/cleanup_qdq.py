"""cleanup-qdq: remove quantization steps that do nothing and store constant weights as integers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qcompiler import Match, Model, Op, Pass, PassContext, PassResult, QParams, QType, Rewriter, Rule, apply_rules
from qcompiler import Const, quantize
from qcompiler import Node, const_value

__all__ = ["CleanupQdq", "RULES"]


def _omitted_zp_dtype(node: Node) -> np.dtype | None:
    """The integer type ONNX implies when the zero point is omitted: a QuantizeLinear's
    `output_dtype` (opset 21+; uint8 by default), a DequantizeLinear's input type (None: unknown)."""
    if node.op == "QuantizeLinear":
        to = int(node.attrs.get("output_dtype", 0))
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)) if to else np.dtype(np.uint8)
    dtype = node.inputs[0].dtype
    return np.dtype(dtype) if dtype is not None else None


def _params(node: Node) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    scale = const_value(node.inputs[1])
    if len(node.inputs) > 2 and node.inputs[2].name:
        zp = const_value(node.inputs[2])
    else:
        dtype = _omitted_zp_dtype(node)
        zp = np.zeros((), dtype) if dtype is not None else None
    return scale, zp, int(node.attrs.get("axis", 1))


def _drop_dq_q(m: Match, rw: Rewriter) -> bool:
    # Q(DQ(x, s, z), s, z) -> x
    q, dq = m.root, m.nodes["dq"]
    s1, z1, a1 = _params(dq)
    s2, z2, a2 = _params(q)
    if s1 is None or s2 is None or z1 is None or z2 is None:
        return False
    if s1.shape != s2.shape or not np.array_equal(s1, s2) or z1.dtype != z2.dtype or not np.array_equal(z1, z2):
        return False
    if s1.size > 1 and a1 != a2:
        return False
    out = q.outputs[0]
    if m.graph.is_graph_output(out):
        return False
    rw.erase_node(m.graph, q)
    rw.replace_all_uses(m.graph, out, dq.inputs[0])
    return True


def _fold_q_const(m: Match, rw: Rewriter) -> bool:
    # Q(W const) -> W_int (stored integer initializer), e.g. QAT weights
    q = m.root
    w = m.const("w").astype(np.float32)
    scale, zp, axis = _params(q)
    if scale is None or zp is None or (len(q.inputs) > 2 and q.inputs[2].name and zp is None):
        return False
    if zp.dtype.kind not in "iu":
        return False  # int4/float8 (ml_dtypes) storage: leave it to run time
    info = np.iinfo(zp.dtype)
    qp = QParams(scale.astype(np.float32), zp, QType(zp.dtype.name, False, int(info.min), int(info.max)),
                 axis if scale.size > 1 else None)
    out = q.outputs[0]
    if m.graph.is_graph_output(out):
        return False
    rw.erase_node(m.graph, q)
    rw.make_constant(out, quantize(w, qp))
    return True


RULES = (
    Rule("dq-q", Op("QuantizeLinear", inputs=(Op("DequantizeLinear", bind="dq"),)), _drop_dq_q),
    Rule("q-const", Op("QuantizeLinear", inputs=(Const("w"), Const(), )), _fold_q_const),
)


@dataclass(frozen=True)
class CleanupQdq(Pass):
    """Remove Q(DQ(x)) pairs with identical qparams (the integer value passes straight
    through), fold QuantizeLinear of a constant float weight into a stored integer
    initializer (models from quantization-aware training), and drop dead nodes.

    Requires nothing. Edits in place; exact.
    """

    name = "cleanup-qdq"
    fold_weights: bool = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        rules = RULES if self.fold_weights else RULES[:1]
        apply_rules(model, rules, rw)
        rw.cleanup(model.graph)
        return PassResult(rw.modified)
