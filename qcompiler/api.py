"""The public entry point: ``qcompiler.compile(model, target=..., calibration=...)``."""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import onnx

from .calibration import input_specs, load_calibration
from .errors import UserError
from .ir import Model, load_model, save_proto
from .pass_manager import Instrumentation, Pass, PassContext, PassManager
from .pipeline import format_pipeline, parse_pipeline
from .registry import PassRegistry, default_registry
from .target import Target, load_target
from .version import __version__

__all__ = ["compile", "CompileResult", "op_histogram", "INTEGER_OPS", "build_pipeline"]

INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearWhere",
})


def op_histogram(model: Model) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for g in model.graph.walk():
        for n in g.gs.nodes:
            counts[n.op] += 1
    return dict(sorted(counts.items()))


@dataclass
class CompileResult:
    """A compiled model and its report (the same dict ``--report`` writes as JSON)."""

    model: Model
    report: dict[str, Any]
    _proto: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            proto = self.model.to_proto()
            # intermediate shape annotations are for passes; onnxruntime infers its own, and on
            # small models they are the largest part of the file after the weights
            del proto.graph.value_info[:]
            self._proto = proto
        return self._proto

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the model atomically; returns its size in bytes and records it in the report."""
        size = save_proto(self.proto, path)
        self.report["size_bytes"]["output"] = size
        return size


def build_pipeline(text: str, registry: PassRegistry) -> list[Pass]:
    return [registry.instantiate(spec) for spec in parse_pipeline(text)]


def compile(model: str | os.PathLike[str] | onnx.ModelProto, *, target: str | os.PathLike[str] | Target = "ort-cpu",
            calibration: Any = None, mode: str | None = None, format: str | None = None,
            pipeline: str | None = None, plugins: Sequence[str] = (), registry: PassRegistry | None = None,
            print_ir_after: Iterable[str] = (), time_passes: bool = False, verify_each: bool = True,
            stop_after: str | None = None, disable_passes: Iterable[str] = (), calibration_limit: int | None = None,
            quiet: bool = True, verbose: bool = False, stream: TextIO | None = None) -> CompileResult:
    """Compile ``model`` for ``target``; never modifies the input file or proto.

    ``calibration`` is a path (.npz stacked, directory of .npz, .npy) or an iterable of feed
    dicts; static mode needs it, dynamic mode does not.
    """
    start = time.perf_counter()
    tgt = load_target(target)
    reg = registry or default_registry()
    for plugin in plugins:
        reg.load_plugin(str(plugin))
    mode = mode or tgt.default_mode
    fmt = format or tgt.default_format
    if mode not in ("static", "dynamic"):
        raise UserError(f"--mode {mode}: must be static or dynamic")
    if fmt not in ("qdq", "qoperator"):
        raise UserError(f"--format {fmt}: must be qdq or qoperator")
    text = pipeline if pipeline is not None else tgt.pipeline(mode)
    if not text:
        raise UserError(f"target '{tgt.name}' defines no {mode} pipeline (key defaults."
                        f"{'pipeline' if mode == 'static' else 'dynamic_pipeline'})")
    passes = build_pipeline(text, reg)
    for name in disable_passes:
        reg.get(name)  # unknown names are errors, not silently ignored
    input_size = os.path.getsize(model) if isinstance(model, (str, os.PathLike)) else model.ByteSize()
    m = load_model(model)
    ops_before = op_histogram(m)
    calib = None
    needs_calibration = any(p.name == "calibrate" for p in passes) and "calibrate" not in set(disable_passes)
    if calibration is not None:
        calib = load_calibration(calibration, input_specs(m), limit=calibration_limit)
    elif needs_calibration and mode == "static":
        raise UserError(f"{m.source}: static mode needs calibration data (--calibration PATH), or use --mode dynamic")
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=stream or sys.stderr))
    ctx = PassContext(target=tgt, calibration=calib, mode=mode, format=fmt, quiet=quiet, verbose=verbose, log=log)
    inst = Instrumentation(print_ir_after=set(print_ir_after), time_passes=time_passes, verify_each=verify_each,
                           stop_after=stop_after, disabled=set(disable_passes), stream=stream or sys.stderr)
    manager = PassManager(passes, inst)
    manager.run(m, ctx)
    m.metadata["qcompiler.version"] = __version__
    m.metadata["qcompiler.target"] = tgt.name
    result = CompileResult(m, {})
    out_size = result.proto.ByteSize()
    lowered = sorted(ctx.analysis.get("lowered", []))
    report: dict[str, Any] = {
        "qcompiler_version": __version__,
        "target": tgt.name,
        "target_source": str(tgt.path) if tgt.path else None,
        "mode": mode,
        "format": fmt,
        "pipeline": format_pipeline(parse_pipeline(text)),
        "passes": manager.records,
        "ops_before": ops_before,
        "ops_after": op_histogram(m),
        "lowered": lowered,
        "float_nodes": dict(sorted(ctx.analysis.get("float_nodes", {}).items())),
        "size_bytes": {"input": input_size, "output": out_size},
        "seconds": round(time.perf_counter() - start, 4),
    }
    report.update({k: v for k, v in ctx.report.items() if k not in report})
    result.report = report
    return result
