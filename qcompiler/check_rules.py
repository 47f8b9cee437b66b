"""The legality rules of ``qcompiler check``, applied to one integer node at a time.

``qcompiler.check`` turns each integer node of a model (a DQ -> op -> Q group or an integer
kernel such as ``QLinearConv``) into a :class:`NodeView`: the float op it implements, the
target's configuration for it, and one :class:`Operand` per quantized input or output. The
rules here compare those operands with the target's tensor rules. Each finding names a rule
id and the dotted target key the requirement comes from, so a user can see which line of the
target file a model breaks. Rules read the target only through ``Target``/``OpConfig`` and,
for the key names, ``Target.data``; they never test a target's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from .plan import weight_axis
from .target import OpConfig, Target, TensorRule

__all__ = ["Operand", "NodeView", "Finding", "RULES", "check_node", "target_key"]

# rule id -> one-line meaning (the one place rule meanings are written; docs/design.md lists the ids)
RULES: dict[str, str] = {
    "kernel": "an integer op the target has no kernel for",
    "dtype": "an operand's integer type differs from the target's dtype for its role",
    "symmetric": "a nonzero zero point where the role is symmetric",
    "power-of-two": "a scale that is not a power of two where the rule requires it",
    "granularity": "per-channel or blocked scales where the role does not allow them, or on the wrong axis",
    "range": "quantized weight values outside the rule's integer range",
    "fixed-qparams": "an output whose scale/zero point differs from the target's fixed qparams",
    "bias-scale": "an int32 bias whose scale is not input_scale * weight_scale",
    "pair-sum": "(warning) two weights of a channel sum past pair_sum_max (int16 pair saturation)",
    "cpu-saturation": "(warning) onnxruntime's int8 CPU kernels will saturate int16 pair sums on this machine",
}
# float ops whose int8 form onnxruntime runs on u8/s8 x s8 GEMM kernels (pair sums, see qcompiler.host)
_PAIR_GEMM_OPS = frozenset({"Conv", "MatMul", "Gemm"})
_BIAS_RTOL = 2.0**-20  # a product of two float32 scales, rounded once or twice in float32


@dataclass
class Operand:
    """One quantized tensor of an integer node, as the model stores it."""

    role: str                      # activation | weight | bias | float (a position the target keeps float)
    index: int                     # input position in the float op (-1: the output)
    name: str                      # tensor name, for messages
    dtype: str | None              # integer dtype name (None: the operand is float)
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int | None = None        # per-axis quantization axis (normalised), None per tensor
    blocked: bool = False
    codes: np.ndarray | None = None  # constant integer values (weights, biases)


@dataclass
class NodeView:
    """An integer node: what it implements, under which configuration, on which operands."""

    name: str
    op: str                        # the op as it appears in the model (Conv, QLinearConv, ...)
    float_op: str                  # the float op it implements (Conv for QLinearConv)
    config: OpConfig
    mode: str = "static"
    variant: str | None = None     # "depthwise" when the op's variant table applies
    attrs: dict[str, Any] = field(default_factory=dict)
    operands: list[Operand] = field(default_factory=list)
    output: Operand | None = None
    output_op: str | None = None   # op whose output the output operand is (a fused tail)
    check_activations: bool = True  # dynamic kernels quantize activations themselves


@dataclass(frozen=True)
class Finding:
    rule: str
    key: str
    message: str
    warning: bool = False


def target_key(target: Target, op: str, role: str, fields: tuple[str, ...], *, variant: str | None = None,
               mode: str = "static") -> str:
    """The dotted key of the target file a tensor-rule field comes from: the most specific
    table that sets it (op variant, op, dynamic section, target-wide), else the target-wide one."""
    data = target.data
    dyn = data.get("dynamic", {})
    ops = dyn.get("ops", {}) if mode == "dynamic" else data.get("ops", {})
    prefix = "dynamic.ops" if mode == "dynamic" else "ops"
    op_table = ops.get(op, {})
    tables: list[tuple[dict, str]] = []
    if variant:
        tables.append((op_table.get(variant, {}).get(role, {}), f"{prefix}.{op}.{variant}.{role}"))
    tables.append((op_table.get(role, {}), f"{prefix}.{op}.{role}"))
    if mode == "dynamic":
        tables.append((dyn.get(role, {}), f"dynamic.{role}"))
    tables.append((data.get("quantization", {}).get(role, {}), f"quantization.{role}"))
    for name in fields:
        for table, path in tables:
            if isinstance(table, dict) and name in table:
                return f"{path}.{name}"
    return f"{tables[-1][1]}.{fields[0]}"


def _rule_for(view: NodeView, role: str) -> TensorRule:
    return {"activation": view.config.activation, "weight": view.config.weight, "bias": view.config.bias}[role]


def _fmt(arr: np.ndarray, limit: int = 3) -> str:
    flat = np.asarray(arr).reshape(-1)
    shown = ", ".join(f"{x:g}" for x in flat[:limit].tolist())
    return shown if flat.size <= limit else f"{shown}, ... ({flat.size} values)"


def _is_pow2(scale: np.ndarray) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)
    mant, _ = np.frexp(s)
    return (s > 0) & (mant == 0.5)


def _channel_view(codes: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or codes.ndim == 0:
        return codes.reshape(1, -1)
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def _weight_fact_axis(view: NodeView, codes: np.ndarray | None) -> int | None:
    """The output-channel axis of the weight, a fact of the float op (see plan.weight_axis)."""
    if codes is None:
        return None
    shim = SimpleNamespace(op=view.float_op, attrs=view.attrs)
    try:
        return weight_axis(shim, codes)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an odd shape: no fact, no granularity-axis check
        return None


def check_node(target: Target, view: NodeView, *, input_scale: np.ndarray | None = None) -> list[Finding]:
    """Every rule finding for one integer node (errors and warnings), in operand order."""
    out: list[Finding] = []
    weight_scale = None
    for opd in view.operands + ([view.output] if view.output is not None else []):
        out.extend(_operand_rules(target, view, opd))
        if opd.role == "weight" and opd.index == 1:
            weight_scale = opd.scale
    if view.output is not None and view.output.dtype is not None:
        out.extend(_fixed_rule(target, view, view.output))
    for opd in view.operands:
        if opd.role == "bias" and opd.dtype == "int32" and opd.scale is not None:
            out.extend(_bias_scale_rule(target, view, opd, input_scale, weight_scale))
    out.extend(_host_saturation(view))
    return out


def _host_saturation(view: NodeView) -> list[Finding]:
    """A warning when onnxruntime, run on this machine, computes the node's int8 GEMM with
    saturating int16 pairs (x86 without VNNI, ``qcompiler.host``) and two weights of one
    output channel are large enough to overflow. Only for nodes whose target does not already
    bound pair sums (``pair_sum_max`` warns for those); depthwise convolutions accumulate
    exactly in onnxruntime and are skipped."""
    from . import host

    if view.float_op not in _PAIR_GEMM_OPS or view.mode != "static" or not host.int16_pair_saturation():
        return []
    acts = [o for o in view.operands if o.role == "activation"]
    weights = [o for o in view.operands if o.role == "weight" and o.dtype == "int8" and o.codes is not None]
    if not weights or not acts or any(a.dtype not in ("int8", "uint8") for a in acts):
        return []
    # an emitted s8 x s8 kernel widens to int16 before multiplying (exact, REFERENCE B/C); a
    # DQ -> op -> Q group is fused with its s8 activations shifted to u8, so it saturates too
    if view.op != view.float_op and all(a.dtype == "int8" for a in acts):
        return []
    opd = weights[0]
    rule = view.config.weight.qtype
    if rule is not None and rule.pair_sum_max:
        return []
    if view.float_op == "Conv" and int(view.attrs.get("group", 1)) > 1 and opd.codes.ndim >= 2 \
            and opd.codes.shape[1] == 1:
        return []
    return _pair_sum(view, opd, host.PAIR_SUM_LIMIT, f"input {opd.index} ('{opd.name}')", "isa.vnni",
                     rule="cpu-saturation", why=f"int16 pair saturation in onnxruntime's CPU kernels: "
                                                f"{host.host_description()}; the target's own hardware is unaffected")


def _operand_rules(target: Target, view: NodeView, opd: Operand) -> list[Finding]:
    where = f"output '{opd.name}'" if opd.index < 0 else f"input {opd.index} ('{opd.name}')"

    def key(role: str, *fields: str) -> str:
        return target_key(target, view.float_op, role, fields, variant=view.variant, mode=view.mode)

    if opd.role == "float":
        if opd.dtype is None:
            return []
        inputs_key = f"{'dynamic.ops' if view.mode == 'dynamic' else 'ops'}.{view.float_op}.inputs"
        return [Finding("dtype", inputs_key, f"{where} is quantized ({opd.dtype}) but the target keeps "
                                             f"input {opd.index} of {view.float_op} float")]
    if opd.role == "activation" and not view.check_activations:
        return []
    rule = _rule_for(view, opd.role)
    found: list[Finding] = []
    # dtype: the stored integer type against the role's dtype
    if opd.dtype is None:
        if rule.dtype != "float" and opd.role == "bias":
            found.append(Finding("dtype", key("bias", "dtype"),
                                 f"bias {where} is float; the target needs {rule.dtype} biases"))
        return found
    if rule.dtype == "float":
        return [Finding("dtype", key(opd.role, "dtype"),
                        f"{opd.role} {where} is {opd.dtype}; the target keeps {opd.role}s float")]
    if opd.dtype != rule.dtype:
        found.append(Finding("dtype", key(opd.role, "dtype"),
                             f"{opd.role} {where} is {opd.dtype}; the target needs {rule.dtype}"))
        return found  # the remaining rules are stated for the target's dtype
    qt = rule.qtype
    assert qt is not None
    # symmetric: zero point at the symmetric position (0 signed, mid-range unsigned)
    if opd.zero_point is not None and (rule.symmetric or opd.role == "bias"):
        want = 0 if (qt.qmin < 0 or opd.role == "bias") else int(np.round((qt.qmin + qt.qmax) / 2.0))
        zp = np.asarray(opd.zero_point).astype(np.int64)
        if np.any(zp != want):
            bad = zp[zp != want].reshape(-1)
            rkey = key(opd.role, "symmetric") if opd.role != "bias" else key("bias", "dtype")
            found.append(Finding("symmetric", rkey, f"{opd.role} {where} has zero point {_fmt(bad)}; "
                                                    f"the target requires {want} (symmetric)"))
    # power-of-two scales
    if qt.power_of_two and opd.scale is not None and opd.role != "bias":
        ok = _is_pow2(opd.scale)
        if not np.all(ok):
            bad = np.asarray(opd.scale, dtype=np.float64).reshape(-1)[~ok.reshape(-1)]
            found.append(Finding("power-of-two", key(opd.role, "scale"),
                                 f"{opd.role} {where} has scale {_fmt(bad)}, not a power of two"))
    # granularity: per-channel only where allowed, on the op's channel axis; blocked only where the rule is blocked
    if opd.role != "bias":
        found.extend(_granularity(view, opd, rule, where, key))
    # range: stored weight codes within [qmin, qmax] (narrow range, reduced bits, explicit range)
    if opd.role == "weight" and opd.codes is not None and opd.codes.size:
        lo, hi = int(opd.codes.min()), int(opd.codes.max())
        if lo < qt.qmin or hi > qt.qmax:
            found.append(Finding("range", key("weight", "range", "bits", "narrow_range", "dtype"),
                                 f"weight {where} has values in [{lo}, {hi}], outside [{qt.qmin}, {qt.qmax}]"))
        elif qt.pair_sum_max and rule.symmetric and view.mode == "static":
            found.extend(_pair_sum(view, opd, qt.pair_sum_max, where, key("weight", "pair_sum_max")))
    return found


def _granularity(view: NodeView, opd: Operand, rule: TensorRule, where: str,
                 key: Callable[..., str]) -> list[Finding]:
    if opd.blocked:  # blocked scales only where the rule says granularity = "blocked"
        if rule.blocked:
            return []
        return [Finding("granularity", key(opd.role, "granularity"),
                        f"{opd.role} {where} uses blocked quantization, which the target does not allow")]
    if opd.axis is None:
        return []
    if not rule.per_channel:
        return [Finding("granularity", key(opd.role, "granularity"),
                        f"{opd.role} {where} has per-channel scales (axis {opd.axis}); the target allows "
                        f"per-tensor only")]
    if opd.role == "weight":
        fact = _weight_fact_axis(view, opd.codes)
        if fact is not None and opd.codes is not None and fact % opd.codes.ndim != opd.axis:
            return [Finding("granularity", key("weight", "granularity"),
                            f"weight {where} is per-channel on axis {opd.axis}; {view.float_op}'s output "
                            f"channels are on axis {fact}")]
    return []


def _pair_sum(view: NodeView, opd: Operand, limit: int, where: str, key: str, *, rule: str = "pair-sum",
              why: str = "int16 pair saturation possible on CPUs without VNNI") -> list[Finding]:
    """Kernels that add products in int16 pairs saturate when two weights of one output channel
    are both large; a warning, because such models run (they only lose accuracy on that CPU)."""
    if opd.blocked or opd.codes is None:
        return []
    codes = opd.codes.astype(np.int64)
    zp = np.asarray(opd.zero_point if opd.zero_point is not None else 0).astype(np.int64)
    axis = opd.axis if opd.axis is not None else _weight_fact_axis(view, codes)
    if zp.size > 1 and (axis is None or zp.size != codes.shape[axis]):
        return []
    if axis is not None and zp.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    mags = _channel_view(np.abs(codes - zp), axis)
    if mags.shape[1] < 2:
        return []
    top2 = -np.partition(-mags, 1, axis=1)[:, :2]
    sums = top2.sum(axis=1)
    bad = int((sums > limit).sum())
    if not bad:
        return []
    limit_name = "pair_sum_max" if rule == "pair-sum" else "the int16 pair limit"
    return [Finding(rule, key, f"weight {where}: {bad} of {sums.size} channels have two weights summing "
                               f"to {int(sums.max())} > {limit_name} {limit} ({why})", warning=True)]


def _fixed_rule(target: Target, view: NodeView, opd: Operand) -> list[Finding]:
    op = view.output_op or view.float_op
    fixed = target.fixed.get(op)
    if fixed is None or opd.scale is None:
        return []
    scale, zp = fixed
    got_s = np.asarray(opd.scale, dtype=np.float32).reshape(-1)
    got_z = (np.asarray(opd.zero_point).astype(np.int64).reshape(-1) if opd.zero_point is not None
             else np.zeros(1, np.int64))
    if got_s.size == 1 and got_s[0] == np.float32(scale) and got_z.size == 1 and int(got_z[0]) == zp:
        return []
    return [Finding("fixed-qparams", f"fixed_qparams.{op}",
                    f"{op} output '{opd.name}' has scale {_fmt(got_s)} / zero point {_fmt(got_z)}; the target "
                    f"fixes them to {scale:g} / {zp}")]


def _bias_scale_rule(target: Target, view: NodeView, opd: Operand, input_scale: np.ndarray | None,
                     weight_scale: np.ndarray | None) -> list[Finding]:
    if input_scale is None or weight_scale is None or np.asarray(input_scale).size != 1:
        return []
    x_scale = np.float64(np.asarray(input_scale, np.float32).reshape(()))
    want = x_scale * np.asarray(weight_scale, np.float64).reshape(-1)
    got = np.asarray(opd.scale, np.float64).reshape(-1)
    if want.size not in (1, got.size) and got.size != 1:
        return [Finding("bias-scale", target_key(target, view.float_op, "bias", ("dtype",), variant=view.variant),
                        f"bias input {opd.index} ('{opd.name}') has {got.size} scales for {want.size} weight scales")]
    if np.allclose(got, want, rtol=_BIAS_RTOL, atol=0.0):
        return []
    err = np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    return [Finding("bias-scale", target_key(target, view.float_op, "bias", ("dtype",), variant=view.variant),
                    f"bias input {opd.index} ('{opd.name}') scale differs from input_scale * weight_scale "
                    f"(largest relative error {float(err.max()):.3g})")]
