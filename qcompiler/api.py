"""The public entry point: ``qcompiler.compile(model, target=..., calibration=...)``."""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import onnx

from .calibration.data import input_specs, load_calibration
from .calibration.options import CalibrationOptions
from .errors import PassFailure, UserError
from .ir import Model, load_model, save_proto
from .ir.io import model_bytes, model_size, save_bytes, save_model
from .ir.validate import check_runnable_domains
from .kernels import INTEGER_OPS
from .pass_manager import Instrumentation, Pass, PassContext, PassManager
from .pipeline import format_pipeline, parse_pipeline
from .registry import PassRegistry, default_registry
from .status import StatusLine, is_terminal
from .target import Target, load_target
from .version import __version__

__all__ = ["compile", "CompileResult", "op_histogram", "INTEGER_OPS", "build_pipeline"]



def op_histogram(model: Model) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for g in model.graph.walk():
        for n in g.gs.nodes:
            counts[n.op] += 1
    return dict(sorted(counts.items()))


@dataclass
class CompileResult:
    """A compiled model and its report (the same dict ``--report`` writes as JSON).

    A build served by the whole-build cache (:mod:`qcompiler.build_cache`) holds the stored
    bytes: ``save`` writes them as they are, ``proto`` and ``model`` are parsed on first use."""

    _model: Model | None
    report: dict[str, Any]
    _proto: onnx.ModelProto | None = field(default=None, repr=False)
    _bytes: bytes | None = field(default=None, repr=False)
    _large: bool = field(default=False, repr=False)

    @property
    def model(self) -> Model:
        if self._model is None:
            self._model = load_model(self.proto, check=False)
        return self._model
    # (float model loader, eval samples, run as written): what report["fidelity"] was measured on
    _eval: tuple[Callable[[], onnx.ModelProto], list[Any], bool] | None = field(default=None, repr=False)

    @property
    def proto(self) -> onnx.ModelProto:
        """The compiled model as a ModelProto, built on first use: a full in-memory copy of every
        weight (compile and ``save`` never build it). Above 2 GB protobuf holds it but cannot
        serialize it; ``save`` writes such a model with external data from the IR's arrays."""
        if self._proto is None and self._bytes is not None:
            self._proto = onnx.ModelProto.FromString(self._bytes)
        elif self._proto is None:
            proto = self.model.to_proto()
            # intermediate shape annotations are for passes; onnxruntime infers its own, and on
            # small models they are the largest part of the file after the weights
            del proto.graph.value_info[:]
            self._proto = proto
        return self._proto

    def serialized(self) -> bytes | None:
        """The model file's bytes (what ``save`` writes); None above 2 GB (external data)."""
        if self._bytes is None and not self._large:
            self._bytes = model_bytes(self.model)
            self._large = self._bytes is None  # (not tried again: building the bytes is the cost)
        return self._bytes

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the model atomically; returns its size in bytes and records it in the report.
        Written from the IR one tensor at a time (``ir.io.save_model``): the same bytes as
        ``proto`` serialized, without holding a second copy of the weights."""
        if self._bytes is not None:
            size = save_bytes(self._bytes, path)
        elif self._model is not None:
            size = save_model(self._model, path)
        else:
            size = save_proto(self.proto, path)
        self.report["size_bytes"]["output"] = size
        return size


def _export_ranges(ctx: PassContext, calib: Any, export_ranges: Any, trt_table: Any, imported: Any) -> dict[str, bytes]:
    """Mark the report when ranges did not come from real data, and write the range files
    (qcompiler.rangefile) once every pass has succeeded; returns what was written, by kind."""
    info = ctx.report.get("calibration")
    if isinstance(info, dict):
        info["real_data"] = bool(getattr(calib, "real_data", calib is not None))
        if imported is not None:
            info["ranges_file"] = str(imported)
    if export_ranges is None and trt_table is None:
        return {}
    ranges = ctx.analysis.get("ranges")
    if ranges is None:
        flag = "--export-ranges" if export_ranges is not None else "--export-tensorrt-table"
        raise UserError(f"{export_ranges or trt_table}: {flag}: no ranges to export (the 'calibrate' pass did not "
                        "run: dynamic mode, disabled, or a pipeline without it)")
    from .rangefile import ranges_to_json, tensorrt_table

    written = {}
    if export_ranges is not None:
        info = info if isinstance(info, dict) else {}
        written["ranges"] = ranges_to_json(ranges, method=info.get("method"), samples=info.get("samples"),
                                           real_data=info.get("real_data")).encode()
    if trt_table is not None:
        written["tensorrt"] = tensorrt_table(ranges).encode()
    _write_extras(written, export_ranges, trt_table)
    return written


def _write_extras(extras: dict[str, bytes], export_ranges: Any, trt_table: Any) -> None:
    from . import files

    for kind, path in (("ranges", export_ranges), ("tensorrt", trt_table)):
        if path is not None and kind in extras:
            files.write_bytes(path, extras[kind])


def build_pipeline(text: str, registry: PassRegistry) -> list[Pass]:
    return [registry.instantiate(spec) for spec in parse_pipeline(text)]


def compile(model: str | os.PathLike[str] | onnx.ModelProto, *, target: str | os.PathLike[str] | Target = "ort-cpu",
            calibration: Any = None, mode: str | None = None, format: str | None = None,
            pipeline: str | None = None, plugins: Sequence[str] = (), registry: PassRegistry | None = None,
            print_ir_after: Iterable[str] = (), time_passes: bool = False, verify_each: bool = True,
            stop_after: str | None = None, disable_passes: Iterable[str] = (),
            calibration_options: CalibrationOptions | None = None,
            image_spec: Any = None, import_ranges: str | os.PathLike[str] | None = None,
            export_ranges: str | os.PathLike[str] | None = None,
            export_tensorrt_table: str | os.PathLike[str] | None = None,
            plan_overrides: dict[str, tuple[str, str]] | None = None, eval_data: Any = None,
            analysis: str | os.PathLike[str] | None = None, weight_bits: int | None = None,
            block_size: int | None = None, weight_symmetric: bool | None = None, weight_algorithm: str | None = None,
            accuracy: str | float | None = None, metric: Any = None,
            check: bool = True, quiet: bool = True, verbose: bool = False, stream: TextIO | None = None
            ) -> CompileResult:
    """Compile ``model`` for ``target``; never modifies the input file or proto.

    With ``check`` (default) the compiled model goes through ``qcompiler.check_model`` before
    anything is written: a model the target cannot run raises ``UserError`` naming the first
    offending node; ``report["check"]`` records the result. ``check=False`` is for debugging.

    ``calibration`` is a path (.npz stacked, directory of .npz, .npy) or an iterable of feed
    dicts; static mode needs it, dynamic mode does not.

    Calibration data and range files (see ``docs/calibration.md``): ``calibration`` may also
    be ``"random:N"`` (smoke tests; the report says ``real_data: false``), a directory of
    images with ``image_spec`` (inline text, a TOML path, an ``ImageSpec``, or None for the
    folder's ``preprocess.toml``), or a zero-argument callable returning a fresh iterator.
    ``import_ranges`` pins the ranges of a range JSON file over the calibrated ones (no data
    needed if it pins every tensor); ``export_ranges`` / ``export_tensorrt_table`` write the
    final ranges as range JSON / a TensorRT calibration table after a successful compile.

    ``calibration_options`` (:class:`qcompiler.CalibrationOptions`: method, per-node or op-type
    overrides, memory, ``cache`` directory, workers, Dask scheduler, observe, statistics,
    ``limit`` samples, ...) sets the ``calibrate`` pass's options: those it sets to a value other
    than the default replace the pipeline's. ``observe`` left unset becomes ``all`` (every float
    tensor) when ranges are exported, so that a range file or TensorRT table describes the
    whole model. ``cache`` also holds whole builds (``qcompiler.build_cache``).

    ``plan_overrides`` ({node name: (outcome, reason)}) sets nodes' outcomes in the plan
    (``qcompiler.plan``) that every pass reads: ``("float", why)`` keeps a node float;
    ``("dynamic", why)`` runs a MatMul with a constant weight as the target's dynamic kernel in a
    static compile (``report["dynamic_nodes"]``; targets with quantize-dynamic after insert-qdq);
    ``("int16-activations", why)`` keeps a node integer with 16-bit activations where the target lists
    that fallback (``report["int16_nodes"]``; the model is raised to opset 21, ``qcompiler.wide``).

    Fidelity (``report["fidelity"]``, see ``qcompiler.fidelity``): measured on ``eval_data``
    (any calibration source) or, without it, on a held-out slice of the calibration data
    (not used for calibration). ``analysis`` (a path) also writes ``qcompiler analyze``'s
    HTML page for the compiled model (its JSON goes into ``report["analysis"]``).

    Weight-only mode (``mode="weight-only"``, the target's ``[weight_only]`` table decides the
    lowering): ``weight_bits`` (4 or 8), ``block_size`` (16, 32, 64, 128), ``weight_symmetric``
    (unset: the target's first ``weight_only.symmetric`` entry) and ``weight_algorithm`` (rtn,
    gptq, awq; default gptq with calibration data, else rtn) are the ``quantize-weights`` pass's
    options. Calibration data is optional.

    Accuracy budget (``qcompiler.budget``): ``accuracy="cosine>=0.99"`` (``sqnr>=DB``,
    ``top1>=F``), measured on the fidelity samples, moves the fewest, cheapest layers to their
    target fallbacks until it holds (``report["accuracy"]``); unmet -> ``UserError``. With
    ``metric=callable(float_outputs, quant_outputs) -> float`` (lists of output dicts),
    ``accuracy`` is its threshold. Without ``accuracy`` the target's ``[accuracy] default``
    applies to static compiles with fidelity samples; ``accuracy="off"`` disables it.
    """
    opts = {k: v for k, v in locals().items() if k not in ("accuracy", "metric")}
    if accuracy == "off" and metric is None:
        return _compile(**opts)
    from .budget import parse_budget, search

    tgt = load_target(target)
    if accuracy is None and metric is None:
        if tgt.default_accuracy is None or mode == "weight-only" or stop_after is not None:
            return _compile(**opts)
        budget, source, explicit = parse_budget(tgt.default_accuracy, flag="accuracy.default"), \
            f"target '{tgt.name}' default (accuracy.default)", False
    else:
        budget, source, explicit = parse_budget(accuracy, metric), "--accuracy", True
    opts["target"] = tgt

    calib = calibration_options or CalibrationOptions()

    def compile_with(overrides: dict[str, tuple[str, str]], cache: str | None, fresh: bool = False,
                     methods: Mapping[str, str] | None = None) -> CompileResult:
        # a recompile with moved layers repeats the first compile's pass log lines: those only with verbose
        quiet = opts["quiet"] or (dict(overrides or {}) != dict(plan_overrides or {}) and not opts["verbose"])
        # methods: per-node calibration methods (the search's method trial), over the user's overrides
        extra = tuple(f"{k}={v}" for k, v in sorted((methods or {}).items()))
        return _compile(**dict(opts, plan_overrides=overrides or None, quiet=quiet, build_cache=not fresh,
                               calibration_options=dataclasses.replace(
                                   calib, cache=cache or "", range_overrides=calib.range_overrides + extra)))

    return search(compile_with, budget, tgt, source=source, overrides=plan_overrides, cache=calib.cache or None,
                  explicit=explicit, calibration=calib)


def _compile(model: str | os.PathLike[str] | onnx.ModelProto, *, target: str | os.PathLike[str] | Target,
             calibration: Any, mode: str | None, format: str | None, pipeline: str | None, plugins: Sequence[str],
             registry: PassRegistry | None, print_ir_after: Iterable[str], time_passes: bool, verify_each: bool,
             stop_after: str | None, disable_passes: Iterable[str], calibration_options: CalibrationOptions | None,
             image_spec: Any, import_ranges: Any, export_ranges: Any, export_tensorrt_table: Any,
             plan_overrides: dict[str, tuple[str, str]] | None, eval_data: Any,
             analysis: Any, weight_bits: int | None, block_size: int | None, weight_symmetric: bool | None,
             weight_algorithm: str | None, check: bool, quiet: bool, verbose: bool, stream: TextIO | None,
             build_cache: bool = True) -> CompileResult:
    """One compile (``compile`` without the accuracy budget). ``build_cache=False`` skips the
    whole-build cache lookup (the budget search needs a compile's eval samples, which a hit
    does not carry)."""
    start = time.perf_counter()
    print_ir_after, disable_passes = set(print_ir_after), tuple(disable_passes)
    tgt = load_target(target)
    reg = registry or default_registry()
    for plugin in plugins:
        reg.load_plugin(str(plugin))
    status = StatusLine(stream or sys.stderr, enabled=not quiet and is_terminal(stream or sys.stderr))
    log = (lambda msg: None) if quiet else status.println

    def load() -> Model:
        with status.phase("loading the model", log, verbose):
            return load_model(model)

    calib_options = calibration_options or CalibrationOptions()
    if calib_options.ranges_file:  # the same knob as import_ranges: one path (checks, cache key, report)
        if import_ranges is not None and os.fspath(import_ranges) != calib_options.ranges_file:
            raise UserError(f"{import_ranges}: import_ranges and calibration_options.ranges_file name different files")
        import_ranges, calib_options = calib_options.ranges_file, dataclasses.replace(calib_options, ranges_file="")
    calibration_cache, calibration_limit = calib_options.cache or None, calib_options.limit or None
    cache_key, cache_status, early_calib, early_eval = None, None, None, None
    if calibration_cache is not None and build_cache:  # the whole-build cache (qcompiler.build_cache)
        from .build_cache import disabled_reason, load_build

        why = disabled_reason(plugins=plugins, registry=registry, print_ir_after=print_ir_after,
                              time_passes=time_passes, analysis=analysis)
        keyed = None if why else _build_key(model, tgt, calibration, eval_data, calibration_limit, image_spec, {
            "mode": mode, "format": format, "pipeline": pipeline, "disabled": sorted(disable_passes),
            "stop_after": stop_after, "verify_each": verify_each, "check": check, "import_ranges": import_ranges,
            "image_spec": image_spec,  # every calibration option but where the cache lives:
            "calibration_options": sorted((k, v) for k, v in dataclasses.asdict(calib_options).items() if k != "cache"),
            "plan_overrides": sorted((plan_overrides or {}).items()),
            "weight_only": [weight_bits, block_size, weight_symmetric, weight_algorithm],
            "export": [export_ranges is not None, export_tensorrt_table is not None]})
        if keyed is None:
            cache_status = {"status": f"disabled: {why or 'the inputs could not be read for the key'}"}
        else:
            cache_key, early_calib, early_eval = keyed
            hit = load_build(calibration_cache, cache_key)
            if hit is not None:
                data, report, extras = hit
                _write_extras(extras, export_ranges, export_tensorrt_table)
                report["seconds"] = round(time.perf_counter() - start, 4)
                report["build_cache"] = {"status": "hit", "key": cache_key}
                log(f"build cache hit {cache_key[:16]}: no pass ran")
                return CompileResult(None, report, _bytes=data)
            cache_status = {"status": "miss", "key": cache_key}
    m = None
    if mode:
        mode_reason = "--mode"
    elif tgt.default_mode == "auto" and pipeline is not None:
        mode, mode_reason = "static", "auto with an explicit pipeline: static"
    elif tgt.default_mode == "auto":  # the model's ops decide (Target.choose_mode)
        m = load()
        mode, mode_reason = tgt.choose_mode(set(op_histogram(m)))
    else:
        mode, mode_reason = tgt.default_mode, f"target default ({tgt.default_mode})"
    fmt = format or tgt.default_format
    if mode not in ("static", "dynamic", "weight-only"):
        raise UserError(f"--mode {mode}: must be static, dynamic or weight-only")
    wo_opts = {k: v for k, v in {"bits": weight_bits, "block_size": block_size, "symmetric": weight_symmetric,
                                 "algorithm": weight_algorithm}.items() if v is not None}
    if mode == "weight-only":
        from .weight_only import WeightOnlyOptions

        if tgt.weight_only is None:
            raise UserError(f"target '{tgt.name}' has no [weight_only] table: it cannot run weight-only models")
        WeightOnlyOptions(**wo_opts).validate(has_data=calibration is not None)
    elif wo_opts:
        flag = {"bits": "--weight-bits", "block_size": "--block-size", "symmetric": "--weight-symmetric",
                "algorithm": "--weight-algorithm"}[next(iter(wo_opts))]
        raise UserError(f"{flag}: only with --mode weight-only")
    if fmt not in ("qdq", "qoperator"):
        raise UserError(f"--format {fmt}: must be qdq or qoperator")
    text = pipeline if pipeline is not None else tgt.pipeline(mode)
    if not text:
        raise UserError(f"target '{tgt.name}' defines no {mode} pipeline (key defaults."
                        f"{'pipeline' if mode == 'static' else 'dynamic_pipeline'})")
    passes = build_pipeline(text, reg)
    if import_ranges is not None:  # pin through the calibrate pass's ranges-file option
        if not any(p.name == "calibrate" for p in passes):
            raise UserError(f"{import_ranges}: --import-ranges needs the 'calibrate' pass in the pipeline")
        passes = [dataclasses.replace(p, ranges_file=str(import_ranges)) if p.name == "calibrate" else p
                  for p in passes]
    calib_opts = calib_options.changed()  # what the caller set replaces the pipeline's calibrate options
    if not calib_options.observe and (export_ranges is not None or export_tensorrt_table is not None):
        calib_opts["observe"] = "all"  # a range file or TensorRT table describes the whole model
    if calib_opts:
        passes = [dataclasses.replace(p, **calib_opts) if p.name == "calibrate" else p for p in passes]
    if wo_opts:
        passes = [dataclasses.replace(p, **wo_opts) if p.name == "quantize-weights" else p for p in passes]
    for name in disable_passes:
        reg.get(name)  # unknown names are errors, not silently ignored
    m = m if m is not None else load()
    check_runnable_domains(m)
    input_size = sum(f.stat().st_size for f in m.files) if m.files else model.ByteSize()
    ops_before = op_histogram(m)
    calib = None
    needs_calibration = any(p.name == "calibrate" for p in passes) and "calibrate" not in set(disable_passes)
    if image_spec is not None and calibration is None:
        raise UserError(f"--image-spec {image_spec}: needs --calibration DIR (a directory of images)")
    specs = input_specs(m)
    # the float model for the fidelity section, read only when there are samples to measure on
    # (a billion-parameter weight-only compile must not hold a second full-precision copy)
    float_proto = lambda: model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))  # noqa: E731
    eval_samples: list[Any] = []
    fidelity: dict[str, Any] = {}
    if eval_data is not None:
        ev = load_calibration(_early(early_eval, specs, eval_data), specs, image_spec=image_spec)
        eval_samples, fidelity = list(ev), {"source": ev.description, "samples": len(ev)}
    if calibration is not None:
        calib = load_calibration(_early(early_calib, specs, calibration), specs, limit=calibration_limit,
                                 image_spec=image_spec)
        if eval_data is None:
            from .fidelity import HOLD_OUT_MAX_MODEL_BYTES, hold_out

            if input_size > HOLD_OUT_MAX_MODEL_BYTES:  # a second full-precision copy in onnxruntime
                fidelity = {"status": f"not measured: the input model is {input_size / 2**30:.1f} GiB, above "
                                      f"{HOLD_OUT_MAX_MODEL_BYTES / 2**30:.0f} GiB, and measuring holds a second "
                                      "full-precision copy in onnxruntime; pass --eval-data to measure anyway",
                            "source": calib.description}
            else:
                eval_samples, fidelity = hold_out(calib)
    elif needs_calibration and mode == "static" and not any(getattr(p, "ranges_file", "") for p in passes):
        raise UserError(f"{m.source}: static mode needs calibration data (--calibration PATH), or use --mode dynamic")
    float_file = None if isinstance(model, onnx.ModelProto) else os.fspath(model)
    reference = None
    if eval_samples and stop_after is None:
        from .fidelity import FloatReference

        reference = FloatReference.start(float_file if float_file is not None else model, eval_samples)
    ctx = PassContext(target=tgt, calibration=calib, mode=mode, format=fmt, quiet=quiet, verbose=verbose,
                      log=log, status=status)
    if plan_overrides:
        ctx.analysis["plan_overrides"] = dict(plan_overrides)
    inst = Instrumentation(print_ir_after=set(print_ir_after), time_passes=time_passes, verify_each=verify_each,
                           stop_after=stop_after, disabled=set(disable_passes), stream=stream or sys.stderr,
                           debug=verbose)
    manager = PassManager(passes, inst)
    try:
        manager.run(m, ctx)
    except PassFailure as exc:
        _blame_input(model, calib, exc)
        raise
    check_report = None
    if check:
        with status.phase("checking the compiled model", log, verbose):
            check_report = _check_output(m, tgt, plan_overrides, ctx.analysis.get("float_nodes"))
    extras = _export_ranges(ctx, calib, export_ranges, export_tensorrt_table, import_ranges)
    m.metadata["qcompiler.version"] = __version__
    m.metadata["qcompiler.target"] = tgt.name
    result = CompileResult(m, {})
    if (eval_samples and stop_after is None) or cache_key is not None:
        data = result.serialized()  # the saved bytes, built once (fidelity, cache and save reuse them)
        out_size = None if data is None else len(data)  # None above 2 GB: known once saved (external data)
    else:  # nothing reads the bytes: save streams the IR (a 1.1B output never exists as one buffer)
        out_size = model_size(m)
    lowered = sorted(ctx.analysis.get("lowered", []))
    report: dict[str, Any] = {
        "qcompiler_version": __version__,
        "target": tgt.name,
        "target_source": str(tgt.path) if tgt.path else None,
        "mode": mode,
        "mode_reason": mode_reason,
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
    if check_report is not None:
        report["check"] = check_report
    report["fidelity"] = _fidelity(float_proto, reference, result, fidelity, eval_samples, stop_after, tgt, analysis,
                                   report)
    report.update({k: v for k, v in ctx.report.items() if k not in report})
    result.report = report
    if cache_key is not None:
        _store_build(calibration_cache, cache_key, result, extras)
    if cache_status is not None:
        result.report["build_cache"] = cache_status
    result._eval = (float_proto, eval_samples, fmt == "qdq")
    return result


def _build_key(model: Any, tgt: Target, calibration: Any, eval_data: Any, limit: int | None, image_spec: Any,
               options: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The whole-build cache key (``qcompiler.build_cache``) from the raw inputs, before the model
    is loaded: the model file's bytes and its external data, the resolved target, the samples'
    content and ``options`` (the environment is added by ``build_key``). Also returns the
    calibration and eval data it read (validated; the compile goes on with them on a miss, so a
    one-shot iterator is read once). None when an input cannot be read safely here (the compile
    then reports it): a missing or special file, external data outside the model's folder."""
    import hashlib
    from pathlib import Path

    from .build_cache import build_key, file_digest
    from .calibration.cache import data_digest
    from .ir.io import external_data_files

    try:
        if isinstance(model, onnx.ModelProto):
            proto, source = model, "<ModelProto>"
            model_digest = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        else:
            path = Path(model)
            source = str(path)
            if not path.is_file():
                return None
            proto = onnx.load(source, load_external_data=False)
            folder = path.parent.resolve()
            files = [path, *external_data_files(proto, path.parent)]
            if not all(f.is_file() and f.resolve().is_relative_to(folder) for f in files[1:]):
                return None
            model_digest = file_digest(files)
        ranges = options["import_ranges"]
        if ranges is not None and not Path(ranges).is_file():
            return None
        specs = input_specs(proto, source)
    except Exception:  # noqa: BLE001 - unreadable model: loading it reports the error
        return None
    calib = None if calibration is None else load_calibration(calibration, specs, limit=limit, image_spec=image_spec)
    ev = None if eval_data is None else load_calibration(eval_data, specs, image_spec=image_spec)
    key = build_key({
        **options, "model": [source, model_digest], "target": [str(tgt.path) if tgt.path else None, tgt.data],
        "calibration": None if calib is None else [*data_digest(calib), calib.description, calib.real_data],
        "eval": None if ev is None else [*data_digest(ev), ev.description],
        "import_ranges": None if ranges is None else [str(ranges), file_digest([Path(ranges)])]})
    return key, calib, ev


def _early(data: Any, specs: list[Any], source: Any) -> Any:
    """The data read for the cache key if it was validated against these input specs, else ``source``."""
    return data if data is not None and data.specs == specs else source


def _store_build(directory: Any, key: str, result: CompileResult, extras: dict[str, bytes]) -> None:
    """Store a finished build; the result's report becomes the stored JSON form (what a hit
    returns). Models above 2 GB and reports JSON cannot hold are not stored."""
    import json

    from .build_cache import store_build

    data = result.serialized()
    try:
        text = json.dumps(result.report, sort_keys=True)
    except (TypeError, ValueError):
        return
    if data is not None:
        result.report = json.loads(text)
        store_build(directory, key, data, result.report, extras)


def _fidelity(float_model: Callable[[], onnx.ModelProto], reference: Any, result: CompileResult,
              info: dict[str, Any], samples: list[Any], stop_after: str | None, tgt: Target, analysis: Any,
              report: dict[str, Any]) -> dict[str, Any]:
    """The report's ``fidelity`` section (and the analysis page when asked). The float outputs
    come from ``reference`` (a :class:`qcompiler.fidelity.FloatReference` started before the
    passes); the compiled model runs from its serialized bytes, which the save reuses."""
    from .fidelity import measure_fidelity

    if stop_after is not None:
        return {"status": f"not measured: compilation stopped after '{stop_after}'"}
    if not samples:
        if analysis is not None:
            raise UserError(f"{analysis}: --analysis needs real input samples (--eval-data, or 10 or more "
                            "calibration samples to hold some out)")
        return info or {"status": "not measured: no real data (pass --eval-data PATH)"}
    as_written = report["format"] == "qdq"
    info = dict(info, outputs=measure_fidelity(reference, result.serialized() or result.proto, samples,
                                               as_written=as_written),
                engine="onnxruntime CPU provider, " + ("QDQ as written (graph optimizations off)" if as_written
                                                       else "the model's integer kernels"))
    if analysis is not None:
        from .analysis import analyze

        rep = analyze(float_model(), result.proto, samples, target=tgt, html=analysis)
        report["analysis"] = {"html": str(analysis), "summary": rep["summary"], "ranking": rep["ranking"]}
    return info


def _check_output(model: Model, target: Target, plan_overrides: dict[str, tuple[str, str]] | None,
                  float_nodes: dict[str, str] | None) -> dict[str, Any]:
    """The legality check of a compiled model (``qcompiler check``); illegal -> UserError.
    The nodes the plan kept float are float (check_model's ``float_nodes``)."""
    from .check import check_model

    res = check_model(model, target, plan_overrides=plan_overrides, float_nodes=float_nodes)
    if not res.legal:
        lines = res.problem_lines()
        more = f" (+{len(lines) - 1} more offending nodes)" if len(lines) > 1 else ""
        raise UserError(f"{model.source}: compiled model is not legal for target '{target.name}': "
                        f"{lines[0]}{more}; nothing written (--no-check / check=False to write it anyway)")
    return {"legal": res.legal, "warnings": [p._asdict() for p in res.warnings],
            "problems": [p._asdict() for p in res.problems], "host_warning": res.saturation_warning()}


def _blame_input(model: str | os.PathLike[str] | onnx.ModelProto, calib: Any, exc: PassFailure) -> None:
    """When onnxruntime fails inside a pass, run the *input* model on the first calibration
    sample: if that fails too, the fault is the user's model or data (a Conv with group 0,
    token ids past the embedding table, ...) and becomes a UserError quoting onnxruntime.
    Otherwise the pass broke the model and the internal error stands."""
    if calib is None or "onnxruntime" not in type(exc.cause).__module__:
        return
    import onnxruntime as ort

    source = str(model) if isinstance(model, (str, os.PathLike)) else "<ModelProto>"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    try:
        target = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        sess = ort.InferenceSession(target, opts, providers=["CPUExecutionProvider"])
        sess.run(None, next(iter(calib)))
    except Exception as err:  # onnxruntime's own exception types
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        text = text.split(" : ", 3)[-1] if text.startswith("[ONNXRuntimeError]") else text
        raise UserError(f"{source}: onnxruntime cannot run the input model on calibration sample 0: {text}") from exc
