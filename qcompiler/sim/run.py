"""``simulate``: run a quantized model with a target's integer arithmetic and measure its
fidelity against the float model.

The quantized model runs in ``onnx.reference.ReferenceEvaluator`` with the integer kernels of
:mod:`.kernels` (bound to the target's :class:`~.arith.Arithmetic`) replacing onnx's own; QDQ
groups the target runs in integer are first rewritten into those kernels (:mod:`.qdq`). The
float model, when given, runs in onnxruntime with every compared tensor exposed as an output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from ..errors import UserError
from ..kernels import KERNELS
from .arith import Arithmetic
from .kernels import MS_DOMAIN, SIM_DOMAIN, make_kernels
from .qdq import integer_groups

__all__ = ["simulate", "SimResult", "TensorFidelity", "Accumulator", "quantized_tensors", "float_name"]

# op type -> (index of output scale input, index of output zero point input)
_OUT_QPARAMS = {"QuantizeLinear": (1, 2)} | {s.name: s.output for s in KERNELS.values() if s.output is not None}


@dataclass
class TensorFidelity:
    """Simulated vs float values of one tensor, over all samples."""

    sqnr_db: float
    cosine: float
    elements: int


@dataclass
class SimResult:
    """What :func:`simulate` returns. ``outputs``: one dict (output name -> array) per sample.
    ``tensors``: fidelity per compared tensor (float-model name), ``output_fidelity`` the same
    for the graph outputs; both empty without a reference model."""

    target: str
    arithmetic: Arithmetic
    outputs: list[dict[str, np.ndarray]]
    tensors: dict[str, TensorFidelity] = field(default_factory=dict)
    output_fidelity: dict[str, TensorFidelity] = field(default_factory=dict)
    integer_groups: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    host_warnings: list[str] = field(default_factory=list)  # onnxruntime on this CPU differs (qcompiler.host)

    def to_dict(self) -> dict[str, Any]:
        def fid(d: dict[str, TensorFidelity]) -> dict[str, Any]:
            return {k: {"sqnr_db": _finite(v.sqnr_db), "cosine": _finite(v.cosine), "elements": v.elements}
                    for k, v in d.items()}

        a = self.arithmetic
        return {"target": self.target, "samples": len(self.outputs),
                "arithmetic": {"requantize": a.requantize, "rounding": a.rounding,
                               "multiplier_bits": a.multiplier_bits, "accumulator_bits": a.accumulator_bits,
                               "int16_pair_saturation": a.pair_saturation},
                "qdq_groups_simulated_in_integer": self.integer_groups, "stats": dict(sorted(self.stats.items())),
                "outputs": fid(self.output_fidelity), "tensors": fid(self.tensors),
                "host_warnings": list(self.host_warnings)}

    def table(self, limit: int = 20) -> str:
        """A short text table: outputs first, then the worst ``limit`` tensors by SQNR."""
        lines = [f"target {self.target}: {len(self.outputs)} sample(s), requantize {self.arithmetic.requantize} "
                 f"({self.arithmetic.rounding}), pair saturation {'on' if self.arithmetic.pair_saturation else 'off'}"]
        lines.extend(self.host_warnings)
        if not self.output_fidelity:
            return "\n".join(lines + ["(no reference model: no fidelity figures)"])
        lines.append(f"{'output':<40}{'SQNR dB':>10}{'cosine':>10}")
        for k, v in self.output_fidelity.items():
            lines.append(f"{k[:39]:<40}{v.sqnr_db:>10.2f}{v.cosine:>10.5f}")
        worst = sorted(self.tensors.items(), key=lambda kv: kv[1].sqnr_db)[:limit]
        if worst:
            lines.append(f"{'tensor (worst first)':<40}{'SQNR dB':>10}{'cosine':>10}")
            for k, v in worst:
                lines.append(f"{k[:39]:<40}{v.sqnr_db:>10.2f}{v.cosine:>10.5f}")
        return "\n".join(lines)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class Accumulator:
    """Running sums for SQNR and cosine (mergeable over samples)."""

    def __init__(self) -> None:
        self.sig = self.err = self.dot = self.ss = 0.0
        self.n = 0

    def add(self, ref: np.ndarray, sim: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).reshape(-1)
        s = np.asarray(sim, dtype=np.float64).reshape(-1)
        if r.shape != s.shape:
            return
        self.sig += float(r @ r)
        self.err += float((r - s) @ (r - s))
        self.dot += float(r @ s)
        self.ss += float(s @ s)
        self.n += r.size

    def result(self) -> TensorFidelity:
        sqnr = math.inf if self.err == 0 else (10 * math.log10(self.sig / self.err) if self.sig > 0 else -math.inf)
        den = math.sqrt(self.sig * self.ss)
        cos = (self.dot / den) if den > 0 else (1.0 if self.sig == self.ss == 0 else 0.0)
        return TensorFidelity(sqnr, cos, self.n)


def quantized_tensors(model: onnx.ModelProto, passthrough: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """Integer tensor name -> (scale name, zero point name), from the ops that produce them
    (QuantizeLinear, the kernels of ``qcompiler.kernels``) and propagated through the
    ``passthrough`` ops (a target's data movement, which keeps its input's qparams)."""
    passthrough = frozenset(passthrough)
    found: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:  # models are topologically sorted
        if node.op_type in _OUT_QPARAMS:
            si, zi = _OUT_QPARAMS[node.op_type]
            if len(node.input) > si and node.input[si]:
                zp = node.input[zi] if len(node.input) > zi else ""
                found[node.output[0]] = (node.input[si], zp)
        elif node.op_type == "DynamicQuantizeLinear":
            found[node.output[0]] = (node.output[1], node.output[2])
        elif node.op_type in passthrough and node.input and node.input[0] in found:
            for o in node.output:
                found[o] = found[node.input[0]]
    return found


def float_name(name: str, float_names: set[str]) -> str | None:
    if name in float_names:
        return name
    for suffix in ("_quantized", "_QuantizeLinear_Output", "_q"):
        if name.endswith(suffix) and name[: -len(suffix)] in float_names:
            return name[: -len(suffix)]
    return None


def _load(model: Any, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if hasattr(model, "proto") and isinstance(getattr(model, "proto"), onnx.ModelProto):
        return model.proto
    path = os.fspath(model)
    try:
        return onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise UserError(f"{path}: cannot read {what}: {exc}".splitlines()[0]) from None


def _float_runner(ref: onnx.ModelProto, names: list[str]) -> Any:
    """Run the float model exposing ``names``: onnxruntime, else onnx.reference."""
    m = onnx.ModelProto()
    m.CopyFrom(ref)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    outs = [o.name for o in m.graph.output]
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return lambda feed: dict(zip(outs, sess.run(outs, feed)))
    except Exception:  # noqa: BLE001 - fall back to the slow but general evaluator
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(m, new_ops=make_kernels(Arithmetic()))
        return lambda feed: dict(zip(outs, ev.run(outs, feed)))


def _host_warnings(proto: onnx.ModelProto, target: Any) -> list[str]:
    """The simulator computes the target's arithmetic; say when onnxruntime on this machine
    would not (int16 pair saturation without VNNI), so the two figures are not confused."""
    from ..check import check_model

    line = check_model(proto, target).saturation_warning()
    return [line] if line else []


def simulate(model: Any, target: Any, inputs: Any, *, reference: Any = None, limit: int | None = None,
             image_spec: Any = None) -> SimResult:
    """Run the quantized ``model`` (path or ModelProto) on ``inputs`` (any calibration source:
    path, ``random:N``, dict of stacked arrays, iterable of feed dicts, a directory of images
    preprocessed by ``image_spec`` as in ``compile``) with ``target``'s integer
    arithmetic. With ``reference`` (the float model), also report per-tensor and output SQNR
    and cosine. Deterministic: the same inputs give the same bytes."""
    from onnx.reference import ReferenceEvaluator

    from ..calibration.data import load_calibration
    from ..target import Target, load_target

    tgt = target if isinstance(target, Target) else load_target(target)
    arith = Arithmetic.from_target(tgt)
    proto = _load(model, "the quantized model")
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    sim_model, n_groups = integer_groups(proto, tgt)
    _ensure_opsets(sim_model)
    stats: dict[str, int] = {}
    try:
        ev = ReferenceEvaluator(sim_model, new_ops=make_kernels(arith, stats))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{src}: cannot simulate: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    data = load_calibration(inputs, _input_specs(proto), limit=limit, image_spec=image_spec)
    out_names = [o.name for o in proto.graph.output]
    qinfo = quantized_tensors(sim_model, tgt.passthrough)
    ref_proto = _load(reference, "the reference model") if reference is not None else None
    float_names: set[str] = set()
    if ref_proto is not None:
        float_names = {o for n in ref_proto.graph.node for o in n.output} | {i.name for i in ref_proto.graph.input}
    runner = None
    accs: dict[str, Accumulator] = {}
    out_accs: dict[str, Accumulator] = {o: Accumulator() for o in out_names}
    outputs: list[dict[str, np.ndarray]] = []
    for feed in data:
        try:
            with np.errstate(over="ignore"):  # exp overflow in float Sigmoid etc. is benign (-> 0 or 1)
                res = ev.run(None, feed, intermediate=True)
        except NotImplementedError as exc:  # an op or attribute the simulator does not model
            raise UserError(f"{src}: cannot simulate: {str(exc).splitlines()[0]}") from None
        outputs.append({o: np.asarray(res[o]) for o in out_names})
        if ref_proto is None:
            continue
        pairs = _comparable(res, qinfo, float_names, out_names)
        if runner is None:
            runner = _float_runner(ref_proto, sorted({f for f, _ in pairs.values()} | set(out_names)))
        ref_vals = runner(feed)
        for sim_name, (fname, value) in pairs.items():
            if fname in ref_vals:
                accs.setdefault(fname, Accumulator()).add(ref_vals[fname], value)
        for o in out_names:
            if o in ref_vals:
                sim_val = _as_float(res[o], qinfo.get(o), res)
                if sim_val is not None:
                    out_accs[o].add(ref_vals[o], sim_val)
    if not outputs:
        raise UserError(f"{src}: no input samples to simulate")
    graph_inputs = {i.name for i in proto.graph.input}
    tensors = {k: a.result() for k, a in sorted(accs.items()) if a.n and k not in out_names and k not in graph_inputs}
    outs = {k: a.result() for k, a in out_accs.items() if a.n}
    return SimResult(tgt.name, arith, outputs, tensors, outs, n_groups, stats, _host_warnings(proto, tgt))


def _input_specs(proto: onnx.ModelProto) -> list[Any]:
    """Run-time inputs (not initializers) as calibration input specs."""
    from ..calibration.data import InputSpec

    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs


def _as_float(value: Any, qp: tuple[str, str] | None, res: dict[str, Any]) -> np.ndarray | None:
    """Real values of a simulated tensor: floats as they are, per-tensor quantized integers
    dequantized; None when that is not possible (no or per-channel qparams)."""
    v = np.asarray(value)
    if v.dtype.kind == "f":
        return v
    if v.dtype.kind in "iu" and qp is not None and qp[0] in res:
        s = np.asarray(res[qp[0]], dtype=np.float64)
        zp = np.asarray(res[qp[1]], dtype=np.float64) if qp[1] and res.get(qp[1]) is not None else 0.0
        if s.size == 1 and np.size(zp) == 1:
            return (v.astype(np.float64) - np.reshape(zp, ())) * s.reshape(())
    return None


def _comparable(res: dict[str, Any], qinfo: dict[str, tuple[str, str]], float_names: set[str],
                out_names: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Simulated tensors that have a float counterpart: name -> (float name, float values)."""
    pairs: dict[str, tuple[str, np.ndarray]] = {}
    for name, value in res.items():
        if not name or value is None or not isinstance(value, np.ndarray) or name in out_names:
            continue
        fname = float_name(name, float_names)
        if fname is None:
            continue
        if value.dtype.kind == "f":
            pairs.setdefault(name, (fname, value))
        elif name in qinfo:
            real = _as_float(value, qinfo[name], res)
            if real is not None:
                pairs[name] = (fname, real)
    # one simulated tensor per float name: prefer the float one (a DQ output named like the float tensor)
    by_float: dict[str, tuple[str, np.ndarray]] = {}
    for name, (fname, v) in sorted(pairs.items()):
        if fname not in by_float or name == fname:
            by_float[fname] = (name, v)
    return {name: (fname, v) for fname, (name, v) in by_float.items()}


def _ensure_opsets(model: onnx.ModelProto) -> None:
    domains = {o.domain for o in model.opset_import}
    for dom in (MS_DOMAIN, SIM_DOMAIN):
        if dom not in domains:
            model.opset_import.append(onnx.helper.make_opsetid(dom, 1))

