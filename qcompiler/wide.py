"""The ``int16-activations`` fallback: a layer that stays integer with its activations on the
target's 16-bit grid (weights stay on the target's weight grid, biases int32 at x_scale * w_scale).

Why a module of its own: the plan (``qcompiler.plan``) decides which nodes take it
(``compile(plan_overrides={node: ("int16-activations", why)})``, the accuracy budget's moves);
this module holds the facts every reader needs for that decision, once: the 16-bit rule a
target's activation rule becomes, which nodes can take it, the opset the output needs (16-bit
QuantizeLinear/DequantizeLinear exist from opset 21), and the target-file check.

The 16-bit dtype: ``[accuracy] int16_dtype`` when the target declares it, else ``int16`` for a
signed activation dtype and ``uint16`` for an unsigned one. ``int16`` is symmetric (zero point 0,
range [-32767, 32767]), ``uint16`` asymmetric; power-of-two scales and encoding ranges carry over
from the 8-bit rule. (docs/design.md, "int16-activations fallback".)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import UserError
from .quant import MIN_OPSET, QType, qrange

__all__ = ["WIDE", "WIDE_DTYPES", "wide_dtype", "wide_rule", "wide_config", "wide_blocker", "override_opset",
           "check_wide_fallback"]

#: the fallback's name in target files and plan overrides
WIDE = "int16-activations"
WIDE_DTYPES = ("int16", "uint16")


def wide_dtype(target: Any) -> str:
    """The target's 16-bit activation dtype (module docstring)."""
    declared = target.data.get("accuracy", {}).get("int16_dtype")
    if declared:
        return str(declared)
    rule = target.activation_rule()
    return "int16" if rule.qtype is not None and rule.qtype.qmin < 0 else "uint16"


def wide_rule(rule: Any, dtype: str) -> Any:
    """``rule`` (an 8-bit activation ``TensorRule``) on the 16-bit grid ``dtype``."""
    symmetric = dtype == "int16"
    lo, hi = qrange(dtype, narrow=symmetric)
    pow2 = bool(rule.qtype is not None and rule.qtype.power_of_two)
    return dataclasses.replace(rule, dtype=dtype, symmetric=symmetric, per_channel=False, block_size=0,
                               qtype=QType(dtype=dtype, symmetric=symmetric, qmin=lo, qmax=hi, power_of_two=pow2))


def wide_config(cfg: Any, target: Any) -> Any:
    """An op's ``OpConfig`` with its activation rule on the target's 16-bit grid."""
    return dataclasses.replace(cfg, activation=wide_rule(cfg.activation, wide_dtype(target)), variants=None)


def wide_blocker(node: Any, target: Any) -> str | None:
    """Why ``node`` cannot take the int16-activations outcome (None: it can): the target must
    list the fallback for its op and quantize the op's activations."""
    if WIDE not in target.fallbacks(node.op):
        return (f"target '{target.name}' has no {WIDE} fallback for {node.op} "
                f"(keys accuracy.fallbacks, ops.{node.op}.fallbacks)")
    cfg = target.op(node.op)
    if cfg is None or cfg.for_node(node).activation.qtype is None:
        return f"target '{target.name}' does not quantize {node.op}'s activations"
    return None


def override_opset(target: Any, overrides: Mapping[str, tuple[str, str]] | None) -> int:
    """The default-domain opset these plan overrides need (0: none): 21 when a node takes
    int16-activations (16-bit QuantizeLinear/DequantizeLinear). upgrade-opset raises the model
    to it, so the plan finds the opset its 16-bit rule needs."""
    if any(kind == WIDE for kind, _ in (overrides or {}).values()):
        return MIN_OPSET[wide_dtype(target)]
    return 0


def check_wide_fallback(target: Any, src: str, fallbacks: Mapping[str, tuple[str, ...]]) -> None:
    """Refuse, at load, a target naming int16-activations whose activations are not 8-bit
    (already 16-bit, or float): one line naming the file and the key."""
    where = [f"ops.{op}.fallbacks" if op else "accuracy.fallbacks" for op, f in fallbacks.items() if WIDE in f]
    if not where:
        return
    rule = target.activation_rule()
    if rule.qtype is None or rule.qtype.np_dtype.itemsize != 1:
        raise UserError(f"{src}: key '{where[0]}' names '{WIDE}', but the target's activations are already "
                        f"{rule.dtype} (quantization.activation.dtype): the fallback moves 8-bit activations to 16 bits")
