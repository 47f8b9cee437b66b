"""Hardware targets as data: the schema, the loader, and the lookup tables passes read.

A target file (TOML, read with the standard library's ``tomllib``) says which ops run in
integer, with which dtypes, symmetry, granularity and scale rules, which kernels they lower
to, which ops pass quantized data through, and which op chains fuse. Passes never test a
target's name; they ask this module. Every error cites the file and the key.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError, did_you_mean
from .tomlfile import dump_toml, read_toml
from .quant import DTYPES, MIN_OPSET, QType, qrange, valid_scale
from .wide import check_wide_fallback

__all__ = ["Target", "OpConfig", "TensorRule", "Arithmetic", "WeightOnlyRule", "load_target", "builtin_targets", "SCHEMA_VERSION",
           "NODE_FACTS"]

SCHEMA_VERSION = 1
#: longest ``extends`` chain a target may have (a cycle guard and a bound on recursion)
MAX_EXTENDS = 32

# -- schema: key -> expected type (a tuple of allowed values for enums) --------------------
_TENSOR_RULE = {
    "dtype": tuple(DTYPES) + ("float",),
    "symmetric": bool,
    "granularity": ("per-tensor", "per-channel", "blocked"),
    "block_size": int,
    "narrow_range": bool,
    "bits": int,
    "range": list,
    "scale": ("float", "power-of-two"),
    "pair_sum_max": int,
    "encoding_min": float,
    "encoding_max": float,
}
_OP = {
    "kernel": str,
    "inputs": list,
    "output": ("quantized", "float"),
    "activation": dict,
    "weight": dict,
    "bias": dict,
    "min_opset": int,
    "prefer_gemm": bool,
    "exclude_when": list,
    "other_inputs": str,
    "needs_integer_consumer": bool,
    "fallbacks": list,
    "note": str,
}
# op variants: facts of a node (not of the target) that select a sub-table of overrides
_VARIANTS = ("depthwise",)


def _weight_only_kernel_names(float_op: str) -> tuple[str, ...]:
    """``domain.op`` of the kernel table's weight-only kernels replacing ``float_op``: the
    values a target's ``[weight_only]`` table may name."""
    from .kernels import KERNELS

    return tuple(f"{d}.{s.name}" for s in KERNELS.values() if s.weight_only and s.float_op == float_op
                 for d in s.domains)

_OP["depthwise"] = {k: v for k, v in _OP.items()}
#: what a layer may fall back to under an accuracy budget (``[accuracy] fallbacks``, ``ops.X.fallbacks``):
#: ``float``, ``host-float`` (float on the host: the same graph, plus a partition boundary's cost) and
#: ``dynamic`` (the target's dynamic kernel inside a static compile; MatMul) and ``int16-activations``
#: (integer on the target's 16-bit activation grid, ``qcompiler.wide``); a name in _FALLBACKS_NOT_BUILT
#: would get a clear refusal instead of "unknown"
FALLBACKS = ("float", "host-float", "dynamic", "int16-activations")
_FALLBACKS_NOT_BUILT: tuple[str, ...] = ()
_ROLES = ("activation", "weight", "bias", "float", "any")
_SCHEMA: dict[str, Any] = {
    "schema": int,
    "name": str,
    "description": str,
    "extends": str,
    "defaults": {
        "format": ("qdq", "qoperator"),
        "mode": ("static", "dynamic", "auto", "weight-only"),
        "auto_dynamic_ops": list,
        "pipeline": str,
        "dynamic_pipeline": str,
        "calibration_method": str,
        "quantize_graph_outputs": bool,
        "float_precision": ("fp32", "fp16"),
        "min_opset": int,
    },
    "isa": {"arch": str, "vnni": bool, "int16_pair_saturation": bool, "notes": str},
    "arithmetic": {
        "requantize": ("float", "fixed-point"),
        "rounding": ("half-even", "half-up", "half-away"),
        "multiplier_bits": int,
        "accumulator_bits": int,
        "notes": str,
    },
    "quantization": {"activation": _TENSOR_RULE, "weight": _TENSOR_RULE, "bias": _TENSOR_RULE},
    "ops": ("table-of", _OP),
    "passthrough": {"ops": list},
    "fused": ("array-of", {"ops": list, "note": str}),
    "fixed_qparams": ("table-of", {"scale": float, "zero_point": int, "note": str}),
    "dynamic": {"ops": ("table-of", _OP), "weight": _TENSOR_RULE, "activation": _TENSOR_RULE},
    "accuracy": {"default": str, "fallbacks": list, "cost": ("table-of", float), "boundary_cost": float,
                 "int16_dtype": ("int16", "uint16"),
                 "fallback_cost": ("table-of", ("table-of", float)), "note": str},
    "weight_only": {"kernel": _weight_only_kernel_names("MatMul") + ("DequantizeLinear",),
                    "gather_kernel": _weight_only_kernel_names("Gather") + ("",),
                    "bits": list, "block_sizes": list, "symmetric": list, "accuracy_level": int,
                    "pipeline": str, "note": str},
}


@dataclass(frozen=True)
class WeightOnlyRule:
    """What a target runs in weight-only mode (``[weight_only]``): the MatMul lowering (a
    contrib kernel, or a blocked DequantizeLinear feeding the float MatMul), the optional
    embedding-table kernel, and the bit widths, block sizes and symmetries it accepts."""

    kernel: str
    gather_kernel: str = ""
    bits: tuple[int, ...] = (4, 8)
    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    symmetric: tuple[bool, ...] = (True, False)
    accuracy_level: int = 0
    pipeline: str = ""


@dataclass(frozen=True)
class TensorRule:
    """Resolved quantization rule for one kind of tensor."""

    dtype: str
    symmetric: bool
    per_channel: bool
    qtype: QType | None  # None when dtype is "float"
    block_size: int = 0  # > 0: granularity "blocked" (weights), blocks along the reduction axis
    encoding: tuple[float, float] | None = None  # float range an encoding may cover (clamps calibration)

    @property
    def blocked(self) -> bool:
        return self.block_size > 0

    @property
    def min_opset(self) -> int:
        """First default-domain opset whose Q/DQ can express this rule (16/4-bit, blocked: 21)."""
        if self.qtype is None:
            return 1
        return max(MIN_OPSET.get(self.dtype, 21), 21 if self.blocked else 1)

    def clamp(self, lo: float, hi: float) -> tuple[float, float]:
        """A calibrated range limited to the rule's encoding range (if any)."""
        if self.encoding is None:
            return lo, hi
        return max(lo, self.encoding[0]), min(hi, self.encoding[1])


@dataclass(frozen=True)
class Arithmetic:
    """How the target's integer kernels compute (read by the integer simulator)."""

    requantize: str = "float"        # "float": acc * (float scale ratio); "fixed-point": multiplier + shift
    rounding: str = "half-even"      # "half-even" | "half-up" | "half-away"
    multiplier_bits: int = 31
    accumulator_bits: int = 32


def _is_gemv(node: Any) -> bool:
    """A MatMul/Gemm whose activation has a static 1 on the M side (a matrix-vector product)."""
    if node.op not in ("MatMul", "Gemm") or not node.inputs:
        return False
    shape = node.inputs[0].shape
    if shape is None or len(shape) == 0:
        return False
    if len(shape) == 1:
        return True
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return shape[-1] == 1
    return shape[-2] == 1


def _has_constant_input(node: Any) -> bool:
    """Some input is a constant (e.g. a bias Add, as opposed to a residual Add of two activations)."""
    import onnx_graphsurgeon as gs  # here, not at the top: listing targets needs no onnx (import time)

    return any(isinstance(v, gs.Constant) and v.name for v in node.inputs)


# Facts of a node (not of the target) that `exclude_when` may name; code decides them.
NODE_FACTS: dict[str, Callable[[Any], bool]] = {
    "depthwise": lambda node: _is_depthwise(node),
    "gemv": _is_gemv,
    "constant-input": _has_constant_input,
}


@dataclass(frozen=True)
class OpConfig:
    op_type: str
    kernel: str | None
    inputs: tuple[str, ...]
    output_quantized: bool
    activation: TensorRule
    weight: TensorRule
    bias: TensorRule
    min_opset: int
    prefer_gemm: bool
    variants: "dict[str, OpConfig]" = None  # type: ignore[assignment]
    exclude_when: tuple[str, ...] = ()  # node facts (NODE_FACTS) that keep a node of this op float
    other_inputs: str = "float"         # role of inputs past the end of `inputs` (Concat: activation)
    needs_integer_consumer: bool = False  # integer only if an integer node reads its output

    def for_node(self, node: Any) -> "OpConfig":
        """The configuration for one node: a variant's overrides where the node is one."""
        if self.variants and "depthwise" in self.variants and _is_depthwise(node):
            return self.variants["depthwise"]
        return self

    def role(self, index: int) -> str:
        """The role of input ``index``."""
        return self.inputs[index] if index < len(self.inputs) else self.other_inputs

    def excluded_by(self, node: Any) -> str | None:
        """The first `exclude_when` fact that holds for ``node``, or None."""
        return next((f for f in self.exclude_when if NODE_FACTS[f](node)), None)

    @property
    def kernel_domain(self) -> str:
        return self.kernel.rsplit(".", 1)[0] if self.kernel and "." in self.kernel else ""

    @property
    def kernel_op(self) -> str | None:
        return self.kernel.rsplit(".", 1)[-1] if self.kernel else None


def _validate(data: Any, schema: Any, where: str, src: str) -> None:
    if isinstance(schema, tuple) and schema and schema[0] == "table-of":
        if not isinstance(data, dict):
            raise UserError(f"{src}: key '{where}' must be a table")
        for k, v in data.items():
            _validate(v, schema[1], f"{where}.{k}", src)
        return
    if isinstance(schema, tuple) and schema and schema[0] == "array-of":
        if not isinstance(data, list):
            raise UserError(f"{src}: key '{where}' must be an array of tables")
        for i, v in enumerate(data):
            _validate(v, schema[1], f"{where}[{i}]", src)
        return
    if isinstance(schema, dict):
        if not isinstance(data, dict):
            raise UserError(f"{src}: key '{where}' must be a table")
        for k, v in data.items():
            key = f"{where}.{k}" if where else k
            if k not in schema:
                hint = did_you_mean(k, schema)
                raise UserError(f"{src}: unknown key '{key}'{hint}")
            _validate(v, schema[k], key, src)
        return
    if isinstance(schema, tuple):
        if data not in schema:
            raise UserError(f"{src}: key '{where}' = {data!r} must be one of {', '.join(map(str, schema))}")
        return
    if schema is float:
        ok = isinstance(data, (int, float)) and not isinstance(data, bool)
    elif schema is int:
        ok = isinstance(data, int) and not isinstance(data, bool)
    else:
        ok = isinstance(data, schema)
    if not ok:
        raise UserError(f"{src}: key '{where}' must be {schema.__name__}, not {type(data).__name__}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def builtin_targets() -> dict[str, Path]:
    """Built-in target files shipped in the package, plus ``qcompiler.targets`` entry points."""
    found: dict[str, Path] = {}
    root = importlib.resources.files("qcompiler.targets")
    for entry in sorted(root.iterdir(), key=lambda e: e.name.removesuffix(".toml")):
        if entry.name.endswith(".toml"):
            found[entry.name[:-5]] = Path(str(entry))
    for ep in entry_points(group="qcompiler.targets"):
        # "package:file.toml" names a resource inside an installed package; else a path
        if ":" in ep.value and not Path(ep.value).is_file():
            package, _, resource = ep.value.partition(":")
            try:
                found.setdefault(ep.name, Path(str(importlib.resources.files(package) / resource)))
            except ModuleNotFoundError:
                continue
        else:
            found.setdefault(ep.name, Path(ep.value))
    return found


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, "target file")


def load_target(spec: "str | Path | Target", _seen: tuple[str, ...] = ()) -> "Target":
    """Load a target by built-in name or by path to a ``.toml`` file, resolving ``extends``."""
    if isinstance(spec, Target):
        return spec
    text = str(spec)
    builtins = builtin_targets()
    if text.endswith(".toml") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise UserError(f"{path}: no such target file")
    elif text in builtins:
        path = builtins[text]
    else:
        hint = did_you_mean(text, builtins)
        raise UserError(f"unknown target '{text}'{hint}; built-in targets: {', '.join(builtins)}")
    data = _read(path)
    _validate(data, _SCHEMA, "", str(path))
    for key in ("name", "description"):
        if key not in data:
            raise UserError(f"{path}: missing required key '{key}'")
    if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise UserError(f"{path}: key 'schema' = {data['schema']} is not supported (this qcompiler reads {SCHEMA_VERSION})")
    if "extends" in data:
        parent_name = data["extends"]
        parent_spec = parent_name
        if len(_seen) >= 2 * MAX_EXTENDS:  # _seen holds a name and a path per level
            raise UserError(f"{path}: key 'extends': the chain is longer than {MAX_EXTENDS} targets")
        # a built-in name, a sibling NAME.toml, or a path ending in .toml (relative to this
        # file) - never an arbitrary file such as /etc/passwd
        sibling = path.parent / f"{parent_name}.toml"
        if parent_name not in builtins and sibling.is_file():
            parent_spec = str(sibling)
        elif parent_name not in builtins:
            if not parent_name.endswith(".toml"):
                raise UserError(f"{path}: key 'extends' = '{parent_name}' must name a built-in target, a sibling "
                                f"NAME.toml, or a file ending in .toml")
            parent_spec = str(path.parent / parent_name)
        # files already on the chain are tracked by resolved path too: names need not match file names
        own = str(path.resolve())
        parent_path = (str(Path(parent_spec).resolve()) if parent_spec != parent_name
                       else str(builtins[parent_name].resolve()) if parent_name in builtins else None)
        if parent_name in _seen or parent_path in _seen + (own,):
            raise UserError(f"{path}: key 'extends' = '{parent_name}' forms a cycle")
        try:
            parent = load_target(parent_spec, _seen + (data["name"], own))
        except UserError as exc:
            raise UserError(f"{path}: key 'extends': {exc}") from exc
        merged = _merge(parent.data, {k: v for k, v in data.items() if k != "extends"})
        merged["extends"] = parent_name
        data = merged
    return Target(data, path)


class Target:
    """A resolved target; the accessors are the only way passes read it."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        self.data = data
        self.path = path
        src = str(path) if path else "<target>"
        self.name: str = data["name"]
        self.description: str = data.get("description", "")
        d = data.get("defaults", {})
        self.default_format: str = d.get("format", "qdq")
        self.default_mode: str = d.get("mode", "static")
        self.auto_dynamic_ops: tuple[str, ...] = tuple(d.get("auto_dynamic_ops", ()))
        self.calibration_method: str = d.get("calibration_method", "minmax")
        self.quantize_graph_outputs: bool = d.get("quantize_graph_outputs", False)
        self.min_opset: int = d.get("min_opset", 13)
        self.float_precision: str = d.get("float_precision", "fp32")
        self.arithmetic: Arithmetic = Arithmetic(**{k: v for k, v in data.get("arithmetic", {}).items() if k != "notes"})
        self._pipelines = {"static": d.get("pipeline", ""), "dynamic": d.get("dynamic_pipeline", "")}
        q = data.get("quantization", {})
        self._rules = {k: q.get(k, {}) for k in ("activation", "weight", "bias")}
        self.passthrough: frozenset[str] = frozenset(data.get("passthrough", {}).get("ops", []))
        # each fused pattern is a chain of steps; a step lists alternatives as "Relu|Clip"
        self.fused: tuple[tuple[frozenset[str], ...], ...] = tuple(
            tuple(frozenset(str(step).split("|")) for step in f["ops"]) for f in data.get("fused", []))
        for i, raw in enumerate(data.get("fused", [])):
            if len(raw["ops"]) < 2 or not all(isinstance(x, str) and x for x in raw["ops"]):
                raise UserError(f"{src}: key 'fused[{i}].ops' must list at least two op types")
        for op, v in data.get("fixed_qparams", {}).items():
            missing = [k for k in ("scale", "zero_point") if k not in v]
            if missing:
                raise UserError(f"{src}: key 'fixed_qparams.{op}' needs '{missing[0]}'")
        self.fixed: dict[str, tuple[float, int]] = {
            op: (float(v["scale"]), int(v["zero_point"])) for op, v in data.get("fixed_qparams", {}).items()}
        act = self._rule(self._rules["activation"], src, "quantization.activation")
        for op, (scale, zp) in self.fixed.items():
            if not valid_scale(scale):
                raise UserError(f"{src}: key 'fixed_qparams.{op}.scale' = {scale} must be a positive, finite, "
                                "normal float32")
            if act.qtype is not None and not act.qtype.qmin <= zp <= act.qtype.qmax:
                raise UserError(f"{src}: key 'fixed_qparams.{op}.zero_point' = {zp} is outside the activation range "
                                f"[{act.qtype.qmin}, {act.qtype.qmax}]")
        self.ops: dict[str, OpConfig] = {
            op: self._op_config(op, cfg, src, f"ops.{op}") for op, cfg in data.get("ops", {}).items()}
        acc = data.get("accuracy", {})
        self.default_accuracy: str | None = acc.get("default") or None
        self.fallback_costs: dict[str, float] = {k: float(v) for k, v in acc.get("cost", {}).items()}
        self.boundary_cost: float = float(acc.get("boundary_cost", 0.0))
        self._fallbacks = {"": self._fallback_list(acc.get("fallbacks", ["float"]), src, "accuracy.fallbacks")}
        for op, cfg in data.get("ops", {}).items():
            if "fallbacks" in cfg:
                self._fallbacks[op] = self._fallback_list(cfg["fallbacks"], src, f"ops.{op}.fallbacks")
        # per fallback: its own cost table over [accuracy.cost] (a dynamic MatMul costs less than a float one)
        self.outcome_costs: dict[str, dict[str, float]] = {
            k: {op: float(v) for op, v in t.items()} for k, t in acc.get("fallback_cost", {}).items()}
        for key, table in [("accuracy.cost", self.fallback_costs)] + [
                (f"accuracy.fallback_cost.{k}", t) for k, t in self.outcome_costs.items()]:
            for op, v in table.items():
                if not v > 0:
                    raise UserError(f"{src}: key '{key}.{op}' = {v} must be positive")
        for k in self.outcome_costs:
            if k not in FALLBACKS:
                raise UserError(f"{src}: key 'accuracy.fallback_cost.{k}': not a fallback ({', '.join(FALLBACKS)})")
        dyn = data.get("dynamic", {})
        self.dynamic_ops: dict[str, OpConfig] = {
            op: self._op_config(op, cfg, src, f"dynamic.ops.{op}", dyn) for op, cfg in dyn.get("ops", {}).items()}
        self._check_dynamic_fallback(src)
        check_wide_fallback(self, src, self._fallbacks)
        for key in ("activation", "weight", "bias"):
            self._rule(self._rules[key], src, f"quantization.{key}")  # validate eagerly
        wo = data.get("weight_only")
        self.weight_only: WeightOnlyRule | None = None
        if wo is not None:
            if "kernel" not in wo:
                raise UserError(f"{src}: key 'weight_only.kernel' is required in a [weight_only] table")
            for key in ("bits", "block_sizes"):
                if not all(isinstance(x, int) and not isinstance(x, bool) for x in wo.get(key, [])):
                    raise UserError(f"{src}: key 'weight_only.{key}' must list integers")
            if not all(isinstance(x, bool) for x in wo.get("symmetric", [])):
                raise UserError(f"{src}: key 'weight_only.symmetric' must list booleans")
            self.weight_only = WeightOnlyRule(
                wo["kernel"], wo.get("gather_kernel", ""), tuple(wo.get("bits", (4, 8))),
                tuple(wo.get("block_sizes", (16, 32, 64, 128))), tuple(wo.get("symmetric", (True, False))),
                int(wo.get("accuracy_level", 0)), wo.get("pipeline", ""))
            self._pipelines["weight-only"] = self.weight_only.pipeline

    # -- construction helpers --------------------------------------------------------------
    @staticmethod
    def _fallback_list(raw: list[Any], src: str, where: str) -> tuple[str, ...]:
        for x in raw:
            if x in _FALLBACKS_NOT_BUILT:
                raise UserError(f"{src}: key '{where}' names '{x}': that per-node fallback is not built yet "
                                f"(built: {', '.join(FALLBACKS)})")
            if x not in FALLBACKS:
                raise UserError(f"{src}: key '{where}' has {x!r}; fallbacks are {', '.join(FALLBACKS)}")
        if len(set(raw)) != len(raw):
            raise UserError(f"{src}: key '{where}' lists a fallback twice")
        return tuple(raw)

    def _check_dynamic_fallback(self, src: str) -> None:
        """A ``dynamic`` fallback needs what builds it: a dynamic MatMul kernel and the
        quantize-dynamic pass in the static pipeline (which builds the plan's dynamic outcomes)."""
        where = [f"ops.{op}.fallbacks" if op else "accuracy.fallbacks" for op, f in self._fallbacks.items()
                 if "dynamic" in f]
        if not where:
            return
        from .pipeline import parse_pipeline

        cfg = self.dynamic_ops.get("MatMul")
        if cfg is None or not cfg.kernel:
            raise UserError(f"{src}: key '{where[0]}' names 'dynamic', but the target has no dynamic MatMul "
                            "kernel (key dynamic.ops.MatMul.kernel)")
        names = [p.name for p in parse_pipeline(self._pipelines["static"])]
        if "quantize-dynamic" not in names or "insert-qdq" not in names[:names.index("quantize-dynamic")]:
            raise UserError(f"{src}: key '{where[0]}' names 'dynamic', but the static pipeline (defaults.pipeline) "
                            "has no quantize-dynamic pass after insert-qdq to build it")

    def fallbacks(self, op: str) -> tuple[str, ...]:
        """The ordered fallbacks of a layer of type ``op`` under an accuracy budget."""
        return self._fallbacks.get(op, self._fallbacks[""])

    def fallback_cost(self, op: str, outcome: str) -> float:
        """Estimated latency of ``op`` after falling back to ``outcome``, relative to its integer
        kernel (1.0): ``[accuracy.cost]`` per op class (``default`` for the rest), plus
        ``boundary_cost`` for ``host-float`` (a host partition's transfer)."""
        base = self.fallback_costs.get(op, self.fallback_costs.get("default", 2.0))
        own = self.outcome_costs.get(outcome, {})
        base = own.get(op, own.get("default", base))
        return base + (self.boundary_cost if outcome == "host-float" else 0.0)

    def _rule(self, raw: dict[str, Any], src: str, where: str) -> TensorRule:
        dtype = raw.get("dtype", "float")
        symmetric = bool(raw.get("symmetric", False))
        granularity = raw.get("granularity", "per-tensor")
        per_channel = granularity == "per-channel"
        block_size = int(raw.get("block_size", 0))
        if granularity == "blocked" and block_size < 1:
            raise UserError(f"{src}: key '{where}.block_size' must be a positive int with granularity = \"blocked\"")
        if granularity != "blocked" and "block_size" in raw:
            raise UserError(f"{src}: key '{where}.block_size' needs granularity = \"blocked\"")
        if granularity != "blocked":
            block_size = 0
        enc_lo, enc_hi = raw.get("encoding_min"), raw.get("encoding_max")
        encoding = None
        if enc_lo is not None or enc_hi is not None:
            encoding = (float(enc_lo) if enc_lo is not None else -np.inf, float(enc_hi) if enc_hi is not None else np.inf)
            if not encoding[0] <= 0.0 <= encoding[1] or encoding[0] == encoding[1]:
                raise UserError(f"{src}: key '{where}.encoding_min'/'encoding_max' must satisfy min <= 0 <= max, min < max")
        if dtype == "float":
            return TensorRule(dtype, symmetric, per_channel, None, block_size, encoding)
        explicit = raw.get("range")
        if explicit is not None:
            info_lo, info_hi = qrange(dtype)
            if (len(explicit) != 2 or not all(isinstance(x, int) for x in explicit)
                    or not info_lo <= explicit[0] < explicit[1] <= info_hi):
                raise UserError(f"{src}: key '{where}.range' must be [lo, hi] integers within {dtype}'s range")
        bits = raw.get("bits")
        width = int(np.log2(qrange(dtype)[1] - qrange(dtype)[0] + 1))
        if bits is not None and not 2 <= bits <= width:
            raise UserError(f"{src}: key '{where}.bits' = {bits} must be between 2 and {width} for {dtype}")
        lo, hi = qrange(dtype, narrow=bool(raw.get("narrow_range", False)), bits=raw.get("bits"),
                        explicit=tuple(explicit) if explicit else None)
        qtype = QType(dtype=dtype, symmetric=symmetric, qmin=lo, qmax=hi,
                      power_of_two=raw.get("scale", "float") == "power-of-two",
                      pair_sum_max=int(raw.get("pair_sum_max", 0)))
        return TensorRule(dtype, symmetric, per_channel, qtype, block_size, encoding)

    def _op_config(self, op: str, cfg: dict[str, Any], src: str, where: str,
                   section: dict[str, Any] | None = None) -> OpConfig:
        roles = tuple(cfg.get("inputs", ["activation"]))
        for r in roles:
            if r not in _ROLES:
                raise UserError(f"{src}: key '{where}.inputs' has role '{r}'; roles are {', '.join(_ROLES)}")
        other = cfg.get("other_inputs", "float")
        if other not in _ROLES:
            raise UserError(f"{src}: key '{where}.other_inputs' = {other!r} must be one of {', '.join(_ROLES)}")
        facts = tuple(cfg.get("exclude_when", []))
        for f in facts:
            if f not in NODE_FACTS:
                raise UserError(f"{src}: key '{where}.exclude_when' has '{f}'; node facts are {', '.join(NODE_FACTS)}")
        base = self._rules if section is None else {k: _merge(self._rules[k], section.get(k, {})) for k in self._rules}
        rules = {k: self._rule(_merge(base[k], cfg.get(k, {})), src, f"{where}.{k}") for k in base}
        variants = {}
        for v in _VARIANTS:
            if v in cfg:
                merged = _merge({k: x for k, x in cfg.items() if k not in _VARIANTS}, cfg[v])
                variants[v] = self._op_config(op, merged, src, f"{where}.{v}", section)
        return OpConfig(op, cfg.get("kernel"), roles, cfg.get("output", "quantized") == "quantized",
                        rules["activation"], rules["weight"], rules["bias"], int(cfg.get("min_opset", 1)),
                        bool(cfg.get("prefer_gemm", False)), variants, facts, other,
                        bool(cfg.get("needs_integer_consumer", False)))

    # -- lookups ----------------------------------------------------------------------------
    def pipeline(self, mode: str) -> str:
        return self._pipelines.get(mode, "")

    def choose_mode(self, op_types: set[str]) -> tuple[str, str]:
        """The mode for a model with these op types, and why. ``defaults.mode = "auto"`` picks
        dynamic when the model has every op in ``defaults.auto_dynamic_ops`` and no Conv
        (a transformer: its static int8 MatMuls lose to run-time activation scales) and the
        target has a dynamic pipeline; static otherwise."""
        wanted = set(self.auto_dynamic_ops)
        if (wanted and wanted <= op_types and not op_types & {"Conv", "ConvTranspose"}
                and self.pipeline("dynamic")):
            return "dynamic", f"auto: the model has {', '.join(sorted(wanted))} and no Conv"
        return "static", "auto: not a transformer-shaped graph (defaults.auto_dynamic_ops)"

    def activation_rule(self) -> TensorRule:
        return self._rule(self._rules["activation"], str(self.path), "quantization.activation")

    def weight_rule(self) -> TensorRule:
        return self._rule(self._rules["weight"], str(self.path), "quantization.weight")

    def op(self, op_type: str, mode: str = "static") -> OpConfig | None:
        return (self.dynamic_ops if mode == "dynamic" else self.ops).get(op_type)

    def fused_with(self, first: str, second: str) -> bool:
        """Whether ``second`` directly after ``first`` runs inside one kernel (no Q/DQ between)."""
        return any(first in p[0] and second in p[1] for p in self.fused)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "format": self.default_format,
                "mode": self.default_mode, "source": str(self.path) if self.path else None}

    def to_toml(self) -> str:
        """The resolved target (extends applied) as TOML text, for ``targets --show``."""
        return dump_toml(self.data)


def _is_depthwise(node: Any) -> bool:
    """A grouped Conv with one input channel per group (a fact of the node)."""
    group = int(getattr(node, "attrs", {}).get("group", 1))
    if node.op != "Conv" or group <= 1 or len(node.inputs) < 2:
        return False
    shape = node.inputs[1].shape
    return shape is not None and len(shape) >= 2 and shape[1] == 1
