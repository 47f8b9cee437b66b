"""fuse-pad-conv: fold a zero constant Pad into the padding of the Conv it feeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import AnyValue, Match, Model, Op, Pass, PassContext, PassResult, Rewriter, Rule, apply_rules
from qcompiler import Node, const_value, is_constant

__all__ = ["FusePadConv", "RULES"]


def _pads_of(pad: Node) -> np.ndarray | None:
    if "pads" in pad.attrs:  # opset < 11
        return np.asarray(pad.attrs["pads"], dtype=np.int64)
    if len(pad.inputs) < 2 or not is_constant(pad.inputs[1]):
        return None
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        return None  # explicit axes: rare; leave it
    return np.asarray(const_value(pad.inputs[1]), dtype=np.int64)


def _pad_value(pad: Node) -> float | None:
    if "value" in pad.attrs:
        return float(pad.attrs["value"])
    if len(pad.inputs) < 3 or not pad.inputs[2].name:
        return 0.0
    v = pad.inputs[2]
    return float(const_value(v).reshape(-1)[0]) if is_constant(v) else None


def _fold(m: Match, rw: Rewriter) -> bool:
    # Conv(Pad(x, [0,0,t,l,0,0,b,r], 0)) -> Conv(x, pads += [t,l,b,r])
    conv, pad = m.root, m.nodes["pad"]
    if pad.attrs.get("mode", "constant") not in ("constant", b"constant") or _pad_value(pad) != 0.0:
        return False
    if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False
    pads = _pads_of(pad)
    if pads is None or (pads < 0).any():
        return False
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    if rank < 3 or begin[:2].any() or end[:2].any():
        return False  # only spatial padding folds into Conv
    spatial = rank - 2
    old = np.asarray(conv.attrs.get("pads", [0] * (2 * spatial)), dtype=np.int64)
    new = old + np.concatenate([begin[2:], end[2:]])
    rw.set_attr(conv, "pads", [int(p) for p in new])
    rw.set_input(conv, 0, pad.inputs[0])
    rw.erase_node(m.graph, pad)
    return True


RULES = (Rule("pad-conv", Op("Conv", inputs=(Op("Pad", inputs=(AnyValue(),), single_use=True, bind="pad"),)), _fold),)


@dataclass(frozen=True)
class FusePadConv(Pass):
    """Pad (constant mode, value 0, spatial axes only) feeding a Conv -> the Conv's own `pads`.

    Why: TF-style "same" padding exported from PyTorch is an explicit Pad per Conv; as a
    separate op it costs a copy, and in integer form it would need the zero point as its pad
    value. Requires the Pad output to be read only by the Conv. Edits in place; exact.
    """

    name = "fuse-pad-conv"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)
        apply_rules(model, RULES, rw)
        return PassResult(rw.modified)
