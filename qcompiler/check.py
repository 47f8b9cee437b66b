"""``qcompiler check``: is every Q/DQ and integer op of a model legal for a target?

A model may come from ``qcompiler compile`` or from elsewhere (onnxruntime's quantizer,
quantization-aware training). The checker finds its integer nodes - integer kernels such as
``QLinearConv`` (QOperator format) and DQ -> op -> Q groups (QDQ format) - and checks their
operands against the target's rules (``qcompiler.check_rules``). Every other node is listed as
float with the reason. Problems name the node, the rule and the target key; warnings (the
``pair_sum_max`` limit) do not make a model illegal. ``qcompiler.compile`` runs this check on
its output before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .check_rules import RULES, Finding, NodeView, Operand, _weight_fact_axis, check_node
from .ir import Model, load_model
from .kernels import KERNELS, OPAQUE_KERNELS, KernelSpec
from .plan import plan_quantization
from .target import OpConfig, Target, load_target
from .weight_only import WEIGHT_ONLY_KERNELS

__all__ = ["check_model", "CheckResult", "Problem", "RULES"]


class Problem(NamedTuple):
    """One finding: the node at fault, the rule id, the target key it comes from, and why."""

    node: str
    rule: str
    key: str
    message: str
    op: str = ""


_QDQ = ("QuantizeLinear", "DequantizeLinear")
_NOT_COMPUTE = frozenset(_QDQ + ("DynamicQuantizeLinear", "Constant"))


@dataclass
class CheckResult:
    """What ``check_model`` found. ``legal`` is true when there are no problems (warnings allowed)."""

    target: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    integer_nodes: dict[str, str] = field(default_factory=dict)  # node -> what it runs as
    float_nodes: dict[str, str] = field(default_factory=dict)    # node -> why it runs in float

    @property
    def legal(self) -> bool:
        return not self.problems

    @staticmethod
    def _lines(items: list[Problem], prefix: str = "") -> list[str]:
        by_node: dict[str, list[Problem]] = {}
        for p in items:
            by_node.setdefault(p.node, []).append(p)
        lines = []
        for node, ps in by_node.items():
            first = ps[0]
            more = f" (+{len(ps) - 1} more: {', '.join(p.rule for p in ps[1:])})" if len(ps) > 1 else ""
            lines.append(f"{prefix}node '{node}' ({first.op}): {first.rule}: {first.message} "
                         f"[target key: {first.key}]{more}")
        return lines

    def problem_lines(self) -> list[str]:
        """One line per offending node: its first problem, and how many more it has."""
        return self._lines(self.problems)

    def warning_lines(self) -> list[str]:
        return self._lines(self.warnings, "warning: ")

    def saturation_warning(self) -> str | None:
        """One line when onnxruntime's CPU kernels will saturate on this machine
        (``cpu-saturation`` findings, see ``qcompiler.host``), else None."""
        hits = [p for p in self.warnings if p.rule == "cpu-saturation"]
        if not hits:
            return None
        from .host import host_description

        nodes = list(dict.fromkeys(p.node for p in hits))
        return (f"warning: {len(nodes)} int8 node{'s' * (len(nodes) != 1)} (first '{nodes[0]}') will saturate int16 "
                f"pair sums in onnxruntime's CPU kernels here ({host_description()}): onnxruntime on this machine "
                f"gives wrong outputs unless run with ORT_ENABLE_BASIC or lower; the target '{self.target}' "
                f"itself is unaffected")

    def summary(self) -> str:
        nodes = len({p.node for p in self.problems})
        head = (f"legal for target '{self.target}'" if self.legal else
                f"not legal for target '{self.target}': {nodes} offending node{'s' * (nodes != 1)} "
                f"({len(self.problems)} problem{'s' * (len(self.problems) != 1)})")
        return (f"{head}; {len(self.integer_nodes)} integer nodes, {len(self.float_nodes)} float nodes, "
                f"{len(self.warnings)} warning{'s' * (len(self.warnings) != 1)}")

    def to_dict(self) -> dict[str, Any]:
        as_dict = lambda ps: [p._asdict() for p in ps]  # noqa: E731
        return {"target": self.target, "legal": self.legal, "problems": as_dict(self.problems),
                "warnings": as_dict(self.warnings), "integer_nodes": dict(self.integer_nodes),
                "float_nodes": dict(self.float_nodes)}


# -- reading values ---------------------------------------------------------------------------
def _const(value: Any) -> np.ndarray | None:
    if value is None or not getattr(value, "name", ""):
        return None
    if isinstance(value, gs.Constant):
        return np.asarray(value.values)
    prod = value.inputs[0] if value.inputs else None
    if prod is not None and prod.op == "Constant" and "value" in prod.attrs:
        v = prod.attrs["value"]
        return np.asarray(v.values if hasattr(v, "values") else v)
    return None


def _dtype_name(value: Any) -> str | None:
    arr = _const(value) if isinstance(value, gs.Constant) else None
    dt = arr.dtype if arr is not None else getattr(value, "dtype", None)
    if dt is None:
        return None
    try:
        return np.dtype(dt).name
    except TypeError:
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(int(dt)).name
        except Exception:  # noqa: BLE001 - an exotic type (int4, float8): name it as ONNX does
            return str(dt).lower()


def _producer(value: Any) -> gs.Node | None:
    return value.inputs[0] if getattr(value, "inputs", None) else None


def _opt(node: gs.Node, i: int) -> Any:
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i].name else None


def _q_dtype(q: gs.Node) -> str:
    zp = _opt(q, 2)
    if zp is not None:
        return _dtype_name(zp) or "uint8"
    if "output_dtype" in q.attrs and int(q.attrs["output_dtype"]):
        return onnx.helper.tensor_dtype_to_np_dtype(int(q.attrs["output_dtype"])).name
    return "uint8"


def _per_axis(node: gs.Node, scale: np.ndarray | None, zp: np.ndarray | None,
              rank: int | None) -> tuple[int | None, bool]:
    """(axis, blocked) of a Q/DQ from its scale shape and attributes."""
    ref = scale if scale is not None else zp
    if ref is None or ref.size <= 1:
        return None, False
    if int(node.attrs.get("block_size", 0) or 0) > 0 or (ref.ndim >= 2):
        return None, True
    axis = int(node.attrs.get("axis", 1))
    return (axis % rank if rank else axis), False


def _dq_operand(value: Any, role: str, index: int) -> Operand | None:
    """The operand a DequantizeLinear feeding ``value`` describes (None if it is not one)."""
    dq = _producer(value)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    x = dq.inputs[0]
    scale, zp = _const(_opt(dq, 1)), _const(_opt(dq, 2))
    codes = _const(x)
    src = _producer(x)
    dtype = _dtype_name(x) if codes is not None or x.dtype is not None else None
    if codes is None and src is not None and src.op == "QuantizeLinear":
        dtype = dtype or _q_dtype(src)
        codes = _fake_quant_codes(src, dtype)  # QAT: Q(constant float) -> DQ
    if dtype is None:
        dtype = _dtype_name(_opt(dq, 2)) if _opt(dq, 2) is not None else "uint8"
    rank = codes.ndim if codes is not None else (len(x.shape) if getattr(x, "shape", None) else None)
    axis, blocked = _per_axis(dq, scale, zp, rank)
    return Operand(role, index, value.name, dtype, scale, zp, axis, blocked, codes)


def _fake_quant_codes(q: gs.Node, dtype: str) -> np.ndarray | None:
    """The integers a QuantizeLinear of a constant float weight produces (QAT models)."""
    w, s, z = _const(q.inputs[0]), _const(_opt(q, 1)), _const(_opt(q, 2))
    if w is None or s is None or w.dtype.kind != "f":
        return None
    try:
        info = np.iinfo(np.dtype(dtype))
    except TypeError:
        return None
    axis, blocked = _per_axis(q, s, z, w.ndim)
    if blocked:
        return None
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    s32 = s.astype(np.float32).reshape(shape if axis is not None else ())
    zz = (z.astype(np.int64) if z is not None else np.zeros(s.shape, np.int64)).reshape(s32.shape)
    return np.clip(np.rint(w.astype(np.float32) / s32).astype(np.int64) + zz, info.min, info.max)


def _q_operand(q: gs.Node, name: str) -> Operand:
    scale, zp = _const(_opt(q, 1)), _const(_opt(q, 2))
    rank = len(q.inputs[0].shape) if getattr(q.inputs[0], "shape", None) else None
    axis, blocked = _per_axis(q, scale, zp, rank)
    return Operand("activation", -1, name, _q_dtype(q), scale, zp, axis, blocked)


def _is_depthwise(op: str, attrs: dict, weight_shape: tuple[int, ...] | None) -> bool:
    group = int(attrs.get("group", 1))
    return op == "Conv" and group > 1 and weight_shape is not None and len(weight_shape) >= 2 and weight_shape[1] == 1


def _excluded(cfg: OpConfig, node: gs.Node) -> str | None:
    """The target's `exclude_when` node fact that keeps this node float, if the target has any."""
    probe = getattr(cfg, "excluded_by", None)
    if probe is None:
        return None
    try:
        return probe(node)
    except Exception:  # noqa: BLE001 - a fact that cannot be decided on this node: not excluded
        return None


def _variant(cfg: OpConfig, op: str, attrs: dict, weight_shape: tuple[int, ...] | None) -> tuple[OpConfig, str | None]:
    if cfg.variants and "depthwise" in cfg.variants and _is_depthwise(op, attrs, weight_shape):
        return cfg.variants["depthwise"], "depthwise"
    return cfg, None


# -- the check --------------------------------------------------------------------------------
def check_model(model: str | os.PathLike[str] | onnx.ModelProto | Model, target: str | os.PathLike[str] | Target,
                *, plan_overrides: dict[str, tuple[str, str]] | None = None,
                float_nodes: Mapping[str, str] | None = None) -> CheckResult:
    """Check every Q/DQ and integer op of ``model`` against ``target``'s rules; a float node's
    reason is the plan's (with ``plan_overrides``, as the compile had them).

    ``float_nodes`` (node name -> reason) are the nodes the compiler's plan kept float: they
    are reported float with that reason, not inferred integer from DequantizeLinear inputs
    (a compress-weights DQ in front of an excluded Gemm's weight is storage, not a kernel)."""
    tgt = load_target(target)
    m = model if isinstance(model, Model) else load_model(model)
    result = CheckResult(tgt.name)
    kernels = _target_kernels(tgt)
    # the compiler's own reasons (gemv-shaped, wrong opset, ...) for ops the target could run
    plan_reasons = plan_quantization(m, tgt, overrides=plan_overrides).float_nodes
    for graph in m.graph.walk():
        nodes = graph.gs.nodes
        outputs = {id(v) for v in graph.gs.outputs}
        tails: dict[int, str] = {}
        int_values: set[int] = set()  # values known to hold quantized integers
        for node in nodes:
            if node.op in ("QuantizeLinear", "DynamicQuantizeLinear") or (
                    node.op in KERNELS and KERNELS[node.op].output is not None
                    and _opt(node, KERNELS[node.op].output[0]) is not None):
                int_values.update(id(o) for o in node.outputs[:1])
            if node.op in _NOT_COMPUTE:
                continue
            if id(node) in tails:
                result.integer_nodes[node.name] = f"{node.op} fused into '{tails[id(node)]}'"
                continue
            domain = "" if node.domain in (None, "", "ai.onnx") else node.domain
            if _check_weight_only(tgt, node, domain, result):
                continue
            if node.op in KERNELS or node.op in OPAQUE_KERNELS:
                _check_kernel(tgt, kernels, node, domain, result)
            elif domain:
                result.float_nodes[node.name] = f"op domain '{domain}' is not an integer kernel of the target"
            elif float_nodes is not None and node.name in float_nodes:
                result.float_nodes[node.name] = float_nodes[node.name]
            else:
                _check_group(tgt, node, outputs, tails, int_values, result)
                if node.name in result.float_nodes and node.name in plan_reasons and tgt.op(node.op) is not None:
                    result.float_nodes[node.name] = plan_reasons[node.name]
    return result


def _weight_only_form(node: gs.Node, domain: str) -> tuple[str, int, int, bool] | None:
    """(kernel as a target names it, bits, block size, symmetric) of a weight-only node: a
    MatMulNBits / GatherBlockQuantized (qcompiler.weight_only), or a float MatMul whose weight
    comes from a blocked DequantizeLinear while its activation is float; else None."""
    facts = WEIGHT_ONLY_KERNELS.get(node.op)
    if facts is not None and facts.domain and domain == facts.domain:
        return (f"{domain}.{node.op}", int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 128)),
                _opt(node, facts.zero_point) is None)
    if node.op != WEIGHT_ONLY_KERNELS["DequantizeLinear"].float_op or domain or len(node.inputs) != 2:
        return None
    dq, act = _producer(node.inputs[1]), _producer(node.inputs[0])
    if dq is None or dq.op != "DequantizeLinear" or not int(dq.attrs.get("block_size", 0)) or (
            act is not None and act.op == "DequantizeLinear"):
        return None
    dtype = _dtype_name(dq.inputs[0]) or ""
    zp = _const(_opt(dq, WEIGHT_ONLY_KERNELS["DequantizeLinear"].zero_point))
    return ("DequantizeLinear", 4 if dtype.endswith("int4") else 8, int(dq.attrs["block_size"]),
            zp is None or not np.any(zp.astype(np.int64)))


def _check_weight_only(tgt: Target, node: gs.Node, domain: str, result: CheckResult) -> bool:
    """Check a weight-only node against the target's [weight_only] table; False if not one."""
    form = _weight_only_form(node, domain)
    if form is None:
        return False
    kernel, bits, block, symmetric = form
    rule = tgt.weight_only
    if kernel == "DequantizeLinear" and (rule is None or rule.kernel != kernel):
        return False  # a blocked DQ into a float MatMul: the target's op rules decide (float elsewhere)
    gather = node.op in WEIGHT_ONLY_KERNELS and WEIGHT_ONLY_KERNELS[node.op].float_op == "Gather"
    key = "weight_only.gather_kernel" if gather else "weight_only.kernel"
    result.integer_nodes[node.name] = f"{kernel} (weight-only, {bits}-bit, block {block})"
    if rule is None:
        _add(result, node, [Finding("kernel", "weight_only", f"target '{tgt.name}' has no [weight_only] table, "
                                    f"so no weight-only {kernel}")])
        return True
    named = rule.gather_kernel if gather else rule.kernel
    findings = []
    if kernel != named:
        findings.append(Finding("kernel", key, f"target '{tgt.name}' runs weight-only {WEIGHT_ONLY_KERNELS[node.op if node.op in WEIGHT_ONLY_KERNELS else 'DequantizeLinear'].float_op} as "
                                f"{named or 'float'}, not {kernel}"))
    for fact, value, allowed in (("bits", bits, rule.bits), ("block_sizes", block, rule.block_sizes),
                                 ("symmetric", symmetric, rule.symmetric)):
        if value not in allowed:
            findings.append(Finding(fact, f"weight_only.{fact}", f"{kernel} with {fact.rstrip('s')} "
                                    f"{str(value).lower()}: target '{tgt.name}' allows {list(allowed)}"))
    _add(result, node, findings)
    return True


def _target_kernels(tgt: Target) -> dict[tuple[str, str], list[tuple[str, OpConfig, str]]]:
    """(domain, kernel op) -> [(float op, config, mode)] for every kernel the target names."""
    found: dict[tuple[str, str], list[tuple[str, OpConfig, str]]] = {}
    for mode, table in (("static", tgt.ops), ("dynamic", tgt.dynamic_ops)):
        for op, cfg in table.items():
            for c in [cfg] + list((cfg.variants or {}).values()):
                if c.kernel:
                    found.setdefault((c.kernel_domain, c.kernel_op or ""), []).append((op, cfg, mode))
    return found


def _add(result: CheckResult, node: gs.Node, findings: list[Finding]) -> None:
    for f in findings:
        p = Problem(node.name, f.rule, f.key, f.message, node.op)
        (result.warnings if f.warning else result.problems).append(p)


def _check_kernel(tgt: Target, kernels: dict, node: gs.Node, domain: str, result: CheckResult) -> None:
    layout = KERNELS.get(node.op)
    entries = kernels.get((domain, node.op), [])
    if layout is not None:
        entries = [e for e in entries if e[0] == layout.float_op] or entries
    qualified = f"{domain}.{node.op}" if domain else node.op
    if not entries:
        if layout is None:
            _add(result, node, [Finding("kernel", "ops", f"target '{tgt.name}' names no kernel {qualified}")])
            return
        op = layout.float_op
        # a dynamic kernel belongs in dynamic.ops, unless only the static table knows the op
        dynamic = layout.dynamic and (op in tgt.dynamic_ops or op not in tgt.ops)
        table, prefix = (tgt.dynamic_ops, "dynamic.ops") if dynamic else (tgt.ops, "ops")
        cfg = table.get(op)
        if cfg is not None and cfg.kernel:
            msg = f"target '{tgt.name}' runs {op} as {cfg.kernel}, not {qualified}"
        elif cfg is not None:
            msg = f"target '{tgt.name}' has no kernel for {op} (no '{prefix}.{op}.kernel'), so not {qualified}"
        else:
            msg = f"target '{tgt.name}' does not run {op} in integer, so has no kernel {qualified}"
        _add(result, node, [Finding("kernel", f"{prefix}.{op}.kernel" if cfg is not None else f"{prefix}.{op}", msg)])
        if cfg is None:
            return
        mode = "dynamic" if prefix == "dynamic.ops" else "static"
    else:
        op, cfg, mode = entries[0]
    result.integer_nodes[node.name] = qualified
    if layout is None:
        return
    view, input_scale = _kernel_view(tgt, node, layout, op, cfg, mode)
    findings = check_node(tgt, view, input_scale=input_scale)
    for pos in layout.scalar_zero_point:
        opd = next((o for o in view.operands if o.index == pos), None)
        if opd is not None and opd.zero_point is not None and opd.zero_point.size > 1:
            findings.append(Finding("granularity", f"{'dynamic.ops' if mode == 'dynamic' else 'ops'}.{op}.kernel",
                                    f"{node.op} takes a scalar zero point for input {pos} ('{opd.name}'); "
                                    f"it has {opd.zero_point.size}"))
    _add(result, node, findings)


def _kernel_view(tgt: Target, node: gs.Node, layout: KernelSpec, op: str, cfg: OpConfig, mode: str
                 ) -> tuple[NodeView, np.ndarray | None]:
    attrs = dict(node.attrs)
    positions = [(pos, o.value, o.scale, o.zero_point) for pos, o in layout.positions(len(node.inputs))]
    w_pos = next((t for p, t, _, _ in positions if p == 1), None)
    w_codes = _const(_opt(node, w_pos)) if w_pos is not None else None
    cfg, variant = _variant(cfg, op, attrs, None if w_codes is None else tuple(w_codes.shape))
    view = NodeView(node.name, node.op, op, cfg, mode, variant, attrs, check_activations=not layout.dynamic)
    input_scale = None
    for pos, t, s, z in positions:
        value = _opt(node, t)
        if value is None:
            continue
        role = ("activation" if layout.variadic_from is not None else cfg.inputs[pos] if pos < len(cfg.inputs)
                else getattr(cfg, "other_inputs", "float"))
        if role == "any":
            continue
        scale = _const(_opt(node, s)) if s is not None else None
        zp = _const(_opt(node, z)) if z is not None else None
        codes = _const(value) if role in ("weight", "bias") else None
        if role == "weight" and codes is None:
            role = "activation"  # a run-time tensor in a weight position is an activation (plan)
        per = (scale is not None and scale.size > 1) or (zp is not None and zp.size > 1)
        axis = None
        if per:
            # the op's channel axis: kernels have no axis attribute
            axis = _weight_fact_axis(view, codes) if role == "weight" else 0
            axis = 0 if axis is None else axis
        dtype = _dtype_name(value) or (_dtype_name(_opt(node, z)) if z is not None and _opt(node, z) is not None
                                       else None)
        view.operands.append(Operand(role, pos, value.name, dtype, scale, zp, axis, False, codes))
        if pos == 0 and role == "activation":
            input_scale = scale
    if layout.output is not None and _opt(node, layout.output[0]) is not None:
        s, z = layout.output
        out = node.outputs[0]
        zp = _const(_opt(node, z))
        dtype = _dtype_name(out) or (_dtype_name(_opt(node, z)) if _opt(node, z) is not None else None)
        view.output = Operand("activation", -1, out.name, dtype, _const(_opt(node, s)), zp)
    return view, input_scale


def _check_group(tgt: Target, node: gs.Node, graph_outputs: set[int], tails: dict[int, str],
                 int_values: set[int], result: CheckResult) -> None:
    """A default-domain op: a DQ -> op -> Q group the target runs in integer, or float (why)."""
    fed = [_producer(v) is not None and _producer(v).op == "DequantizeLinear" for v in node.inputs]
    if node.op in tgt.passthrough:
        first = node.inputs[0] if node.inputs else None
        on_int = first is not None and (fed[0] or id(first) in int_values
                                        or (_dtype_name(first) or "float").startswith(("int", "uint")))
        if on_int:
            int_values.update(id(o) for o in node.outputs[:1])
            result.integer_nodes[node.name] = f"{node.op} on integer data"
        else:
            result.float_nodes[node.name] = "data movement on float data"
        return
    cfg = tgt.op(node.op)
    if cfg is None:
        result.float_nodes[node.name] = f"target '{tgt.name}' runs {node.op} in float (not in its ops table)"
        return
    w_shape = None
    if len(node.inputs) > 1:
        w = _dq_operand(node.inputs[1], "weight", 1)
        w_shape = tuple(w.codes.shape) if w is not None and w.codes is not None else None
    cfg, variant = _variant(cfg, node.op, dict(node.attrs), w_shape)
    wide = _wide_group(tgt, node, cfg)
    if wide is not None:  # the target's int16-activations fallback: checked against its 16-bit rule
        cfg, variant = wide, None
    # past the listed roles: `other_inputs` when the target sets one (Concat), else not checked
    other = getattr(cfg, "other_inputs", "float")
    roles = [cfg.inputs[i] if i < len(cfg.inputs) else (other if other != "float" else "unlisted")
             for i in range(len(node.inputs))]
    excluded = _excluded(cfg, node)
    if excluded:
        result.float_nodes[node.name] = (f"{node.op} node is {excluded}: target '{tgt.name}' keeps it float "
                                         f"(ops.{node.op}.exclude_when)")
        return
    quant_roles = [i for i, r in enumerate(roles) if r in ("activation", "weight") and node.inputs[i].name]
    if not any(fed[i] for i in quant_roles):
        reason = "no input to quantize" if not quant_roles else "no DequantizeLinear on its inputs"
        result.float_nodes[node.name] = f"runs in float ({reason})"
        return
    missing = [i for i in quant_roles if not fed[i]]
    if missing:
        i = missing[0]
        result.float_nodes[node.name] = (f"runs in float (input {i} ('{node.inputs[i].name}') has no "
                                         f"DequantizeLinear, so no integer kernel applies)")
        return
    view = NodeView(node.name, node.op, node.op, cfg, "static", variant, dict(node.attrs))
    input_scale = None
    for i, (value, role) in enumerate(zip(node.inputs, roles)):
        if not value.name or role in ("any", "unlisted"):
            continue
        opd = _dq_operand(value, role, i)
        if opd is None:
            if role == "bias" and _const(value) is not None and cfg.bias.dtype != "float":
                view.operands.append(Operand("bias", i, value.name, None))
            continue
        if role == "weight" and opd.codes is None:
            opd.role = "activation"  # a run-time tensor in a weight position is an activation (plan)
        view.operands.append(opd)
        if i == 0 and role == "activation":
            input_scale = opd.scale
    tail = None
    out = node.outputs[0] if node.outputs else None
    if out is not None and len(out.outputs) == 1 and id(out) not in graph_outputs:
        nxt = out.outputs[0]
        if nxt.op not in _QDQ and tgt.fused_with(node.op, nxt.op):
            tail = nxt
    final = (tail or node).outputs[0] if out is not None else None
    qs = [c for c in final.outputs if c.op == "QuantizeLinear"] if final is not None else []
    if cfg.output_quantized and qs:
        view.output = _q_operand(qs[0], final.name)
        view.output_op = (tail or node).op
    if tail is not None:
        tails[id(tail)] = node.name
    label = f"{node.op} (Q/DQ{', int16-activations' if wide is not None else ''})" + (
        f" + {tail.op}" if tail is not None else "")
    result.integer_nodes[node.name] = label
    _add(result, node, check_node(tgt, view, input_scale=input_scale))


def _wide_group(tgt: Target, node: gs.Node, cfg: OpConfig) -> OpConfig | None:
    """The 16-bit configuration of a group whose first input is dequantized from the target's
    int16-activations dtype, when the target lists that fallback for the op (else None: the
    group is checked against the op's own rule)."""
    from .wide import WIDE, wide_config, wide_dtype

    opd = _dq_operand(node.inputs[0], "activation", 0) if node.inputs else None
    if (opd is None or WIDE not in tgt.fallbacks(node.op) or opd.dtype != wide_dtype(tgt)
            or opd.dtype == cfg.activation.dtype):
        return None
    return wide_config(cfg, tgt)
